"""Reading webdataset tars by plain tar conventions: a sample is the run of members sharing a key."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Member:
    key: str
    ext: str
    offset: int  # byte offset of the member's data in the tar
    size: int


def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first '.' of the base name."""
    base = name.rsplit("/", 1)[-1]
    dot = base.find(".")
    if dot < 0:
        return name, ""
    prefix = name[: len(name) - len(base)]
    return prefix + base[:dot], base[dot + 1 :]


def iter_members(path: str | os.PathLike) -> Iterator[Member]:
    """Regular-file members with their data offsets, without reading the data."""
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if info.isfile():
                key, ext = split_name(info.name)
                yield Member(key, ext, info.offset_data, info.size)


def iter_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in tar order."""
    key: str | None = None
    files: dict[str, bytes] = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, ext = split_name(info.name)
            if k != key:
                if key is not None:
                    yield key, files
                key, files = k, {}
            f = tar.extractfile(info)
            files[ext] = f.read() if f else b""
    if key is not None:
        yield key, files


def read_range(path: str | os.PathLike, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"short read: {path} at {offset} wanted {size} bytes, got {len(data)}")
    return data
