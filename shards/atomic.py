"""Commit-by-rename: a file appears under its final name only once completely written.

Every commit goes through ``commit()``, which first asks the process's commit guard (if one is
installed) whether the run that asked for the write still holds its output: a worker whose
driver died must not write into an output that is no longer its run's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_guard: Callable[[], None] | None = None


def set_commit_guard(guard: Callable[[], None] | None) -> None:
    """Install a check run before every commit in this process; it raises (or exits) to refuse."""
    global _guard
    _guard = guard


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished temporary into place, if the guard allows."""
    if _guard is not None:
        _guard()
    os.replace(tmp, path)


def temp_name(path: Path) -> Path:
    """A hidden sibling, unique per process, so concurrent writers never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` on success, remove it on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
