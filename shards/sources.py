"""Where a candidate's pixels are: typed locators and the one registry that reads them.

A locator is a small JSON-able mapping with a ``kind``:

    {"kind": "tar", "path": "/pool/00001.tar", "offset": 1536, "size": 20480}   a pool tar range
    {"kind": "file", "path": "/data/img.jpg"}                                   a whole file
    {"kind": "blob", "unit": "0007", "offset": 1536, "size": 20480}             a range of
        _work/blobs/<unit>.tar: bytes a curator made (or the acquire stage fetched), stored
        relative to the run's work folder so a moved output still resumes
    {"kind": "url", "url": "https://..."}                                       not local yet:
        the acquire stage fetches it and replaces it by a blob locator

Materialize reads only local kinds; ``read_source`` refuses a URL.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .reader import read_range

BLOBS_DIR = "blobs"


class SourceError(Exception):
    """The bytes a locator names cannot be read (missing file, short read, unknown kind)."""


def _tar(loc: dict, _root: Path | None) -> bytes:
    return read_range(loc["path"], loc["offset"], loc["size"])


def _file(loc: dict, _root: Path | None) -> bytes:
    return Path(loc["path"]).read_bytes()


def _blob(loc: dict, root: Path | None) -> bytes:
    if root is None:
        raise SourceError("a blob locator needs the run's work folder")
    return read_range(blob_path(root, loc["unit"]), loc["offset"], loc["size"])


def _url(loc: dict, _root: Path | None) -> bytes:
    raise SourceError(f"not fetched: {loc.get('url')} (URL candidates go through acquire)")


READERS: dict[str, Callable[[dict, Path | None], bytes]] = {
    "tar": _tar,
    "file": _file,
    "blob": _blob,
    "url": _url,
}


def blob_path(work_root: str | os.PathLike, unit: str) -> Path:
    return Path(work_root) / BLOBS_DIR / f"{unit}.tar"


def read_source(locator: dict, work_root: str | os.PathLike | None = None) -> bytes:
    """The bytes a locator names; SourceError when they cannot be had."""
    reader = READERS.get(locator.get("kind", ""))
    if reader is None:
        raise SourceError(f"unknown locator kind {locator.get('kind')!r}")
    try:
        return reader(locator, Path(work_root) if work_root is not None else None)
    except (OSError, KeyError) as e:
        raise SourceError(f"{type(e).__name__}: {e}") from None


def is_local(locator: dict) -> bool:
    return locator.get("kind") in ("tar", "file", "blob")
