"""The run's working state under OUT/<shift>/_work: committed units, the run lock, the config.

A unit is committed when its output file exists under its final name (written elsewhere and
renamed into place), so a re-run skips exactly the committed units.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from shards.atomic import atomic_write_bytes

from .errors import UserError


class RunLock:
    """An exclusive flock on OUT/<shift>/.lock; the kernel drops it when the process dies."""

    def __init__(self, shift_dir: Path) -> None:
        self.path = shift_dir / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"{self.path.parent} is in use by another run ({holder}); wait for it or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


class WorkDir:
    def __init__(self, shift_dir: Path) -> None:
        self.shift_dir = shift_dir
        self.root = shift_dir / "_work"
        self.candidates = self.root / "candidates"
        self.plan = self.root / "plan"
        self.shard_rows = self.root / "shard_rows"
        self.select_stats = self.root / "select_stats.json"
        self.run_file = self.root / "run.json"

    def bind_config(self, config_hash: str, resolved: dict) -> None:
        """Refuse to resume an output made from a different config."""
        if self.run_file.exists():
            held = json.loads(self.run_file.read_text())["config_hash"]
            if held != config_hash:
                raise UserError(
                    f"{self.shift_dir} holds a run of another config (hash {held}, this one {config_hash}); "
                    "use another --out or delete it"
                )
            return
        blob = json.dumps(
            {"config_hash": config_hash, "config": resolved}, indent=2, sort_keys=True
        )
        atomic_write_bytes(self.run_file, blob.encode())
