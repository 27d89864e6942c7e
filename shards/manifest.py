"""manifest.json and index.parquet: what a shift directory holds, and how to check it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes

MANIFEST = "manifest.json"
INDEX = "index.parquet"
SHARDS_DIR = "shards"
EMBEDDINGS = "embeddings.npy"  # fp16 (samples, dim), aligned with index.parquet rows
FORMAT = "imagenetpp-shift/1"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dumps_canonical(obj: Any) -> bytes:
    """Stable JSON: sorted keys, no whitespace variation, UTF-8."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(shift_dir: str | os.PathLike) -> dict:
    with open(Path(shift_dir) / MANIFEST, encoding="utf-8") as f:
        return json.load(f)
