"""Deterministic webdataset tar writer.

Every member gets fixed metadata (mtime 0, uid/gid 0, mode 0444, no user names) and the
members of a sample are written in sorted extension order, so a shard's bytes depend only on
its samples. The tar is written to a temporary name and renamed into place on close, so a
reader never sees a half-written shard.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import commit, temp_name

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


@dataclass(frozen=True)
class ShardInfo:
    name: str
    sha256: str
    samples: int
    bytes: int


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


_TEMPLATE = _tarfile_header("", 0)


def _member_header(name: str, size: int) -> bytes:
    """tarfile's GNU header, byte for byte, for a short name: only name, size and checksum
    differ from one member to the next, and building a TarInfo costs more than the bytes."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) >= 100 or size >= 8**11:  # long names and huge members: tarfile's own way
        return _tarfile_header(name, size)
    header = bytearray(_TEMPLATE)
    header[0 : len(raw)] = raw
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"        "  # the checksum counts its own field as spaces
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


class ShardWriter:
    """Writes one tar shard: ``write(key, {"jpg": b"...", "json": b"..."})`` per sample."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp_path = temp_name(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp_path, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self.samples = 0

    def _emit(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._size += len(data)

    def write(self, key: str, files: dict[str, bytes]) -> dict[str, tuple[int, int]]:
        """Append one sample; returns each member's (data offset, size) in the tar."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key may not contain '.' or '/': {key!r}")
        where = {}
        for ext in sorted(files):
            data = files[ext]
            self._emit(_member_header(f"{key}.{ext}", len(data)))
            where[ext] = (self._size, len(data))
            self._emit(data)
            pad = -len(data) % _BLOCK
            if pad:
                self._emit(b"\0" * pad)
        self.samples += 1
        return where

    def close(self) -> ShardInfo:
        """Finish the tar (end blocks, record padding) and rename it into place."""
        self._emit(b"\0" * (2 * _BLOCK))
        pad = -self._size % _RECORD
        if pad:
            self._emit(b"\0" * pad)
        self._file.close()
        try:
            commit(self.tmp_path, self.path)
        except BaseException:
            self.tmp_path.unlink(missing_ok=True)
            raise
        return ShardInfo(self.path.name, self._hash.hexdigest(), self.samples, self._size)

    def abort(self) -> None:
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
