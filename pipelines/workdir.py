"""The run's working state under OUT/<shift>/_work: committed units, the run lock, the config.

A unit is committed when its output file exists under its final name (written elsewhere and
renamed into place), so a re-run skips exactly the committed units.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from functools import partial
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
        self.token = uuid.uuid4().hex[:12]
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()} (run {self.token})\n".encode(), 0
        )
        self._fd = fd
        return self

    def guard(self) -> Callable[[], None]:
        """A picklable check for workers: exits the worker if this run no longer holds the lock."""
        return partial(_exit_unless_held, str(self.path), self.token)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def check_output(shift_dir: Path) -> None:
    """Refuse an output that cannot become a shift folder, before anything runs; leaves nothing."""
    existing = next(p for p in (shift_dir, *shift_dir.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise UserError(f"output {shift_dir}: {existing} exists and is not a folder")
    probe = existing / f".imagenetpp-probe.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {shift_dir}: {e.strerror or e}") from None


class WorkDir:
    def __init__(self, shift_dir: Path) -> None:
        self.shift_dir = shift_dir
        self.root = shift_dir / "_work"
        self.candidates = self.root / "candidates"
        self.acquired = self.root / "acquire"
        self.embedded = self.root / "embedded"
        self.plan = self.root / "plan"
        self.shard_rows = self.root / "shard_rows"
        self.select_stats = self.root / "select_stats.json"
        self.run_file = self.root / "run.json"
        self.runs_log = self.root / "runs.jsonl"

    def clear_temporaries(self) -> int:
        """Remove what killed runs left half-written (".<name>.<pid>.tmp"); call under the lock."""
        found = list(self.shift_dir.rglob(".*.tmp")) if self.shift_dir.exists() else []
        for p in found:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return len(found)

    def log_run(self, record: dict) -> None:
        """Append a record of this invocation (at start, and again when it finishes): killed
        runs stay visible in the manifest's run history."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.runs_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def run_history(self) -> list[dict]:
        """One entry per invocation, its start and end records merged, oldest first."""
        if not self.runs_log.exists():
            return []
        runs: dict[tuple, dict] = {}
        for line in self.runs_log.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill mid-write
            runs.setdefault((record.get("pid"), record.get("started")), {}).update(record)
        return list(runs.values())

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


def _exit_unless_held(lock_path: str, token: str) -> None:
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        os._exit(3)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            held_by_us = False  # nobody holds it: the driver is gone
        except BlockingIOError:
            held_by_us = token.encode() in os.pread(fd, 200, 0)
    finally:
        os.close(fd)
    if not held_by_us:
        # The driver died (or another run took the output over): stop before writing anything.
        os._exit(3)


def lock_holder(shift_dir: Path) -> str | None:
    """Who holds the run lock now, or None when no run is active."""
    path = shift_dir / ".lock"
    if not path.exists():
        return None
    with open(path, "rb+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read(200).decode(errors="replace").strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
        return None
