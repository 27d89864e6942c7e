"""Re-read every shard of a shift and check it against manifest.json and index.parquet."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from .manifest import INDEX, SHARDS_DIR, read_manifest, sha256_file
from .reader import iter_samples

REQUIRED_FIELDS = (
    "key", "label", "wnid", "class_name", "shift", "curator", "source", "query", "score",
    "model", "seed", "prompt", "sha256", "width", "height", "license", "config_hash", "version",
)  # fmt: skip


def verify_shift(shift_dir: str | os.PathLike) -> list[str]:
    """Problems found (empty when the shift is consistent)."""
    shift_dir = Path(shift_dir)
    try:
        manifest = read_manifest(shift_dir)
    except (OSError, json.JSONDecodeError) as e:
        return [f"manifest.json unreadable: {e}"]
    problems: list[str] = []
    try:
        index = pq.read_table(shift_dir / INDEX).to_pylist()
    except OSError as e:
        return [f"index.parquet unreadable: {e}"]
    by_key = {row["key"]: row for row in index}
    if len(by_key) != len(index):
        problems.append("index.parquet: duplicate keys")
    seen: set[str] = set()
    class_counts: Counter[str] = Counter()
    listed = set()
    for shard in manifest["shards"]:
        name = shard["name"]
        listed.add(name)
        path = shift_dir / SHARDS_DIR / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{name}: sha256 differs from manifest")
        count = 0
        for key, files in iter_samples(path):
            count += 1
            problems.extend(f"{name}/{key}: {p}" for p in _check_sample(key, files, name, by_key))
            if key in seen:
                problems.append(f"{name}/{key}: key appears twice")
            seen.add(key)
            if "json" in files:
                class_counts[json.loads(files["json"]).get("wnid", "?")] += 1
        if count != shard["samples"]:
            problems.append(f"{name}: {count} samples, manifest says {shard['samples']}")
    on_disk = {p.name for p in (shift_dir / SHARDS_DIR).glob("*.tar")}
    problems.extend(f"{n}: shard on disk but not in manifest" for n in sorted(on_disk - listed))
    missing = set(by_key) - seen
    if missing:
        problems.append(f"index.parquet: {len(missing)} keys in no shard, e.g. {min(missing)}")
    if manifest.get("total_samples") != len(seen):
        problems.append(f"manifest total_samples {manifest.get('total_samples')} != {len(seen)}")
    expected = {k: v for k, v in manifest.get("class_counts", {}).items() if v}
    if dict(class_counts) != expected:
        problems.append("per-class counts in shards differ from manifest class_counts")
    return problems


def _check_sample(key: str, files: dict[str, bytes], shard: str, by_key: dict) -> list[str]:
    out = []
    for ext in ("jpg", "cls", "json"):
        if ext not in files:
            out.append(f"no .{ext}")
    if out:
        return out
    try:
        meta = json.loads(files["json"])
    except ValueError:
        return ["json does not parse"]
    out += [f"json lacks '{f}'" for f in REQUIRED_FIELDS if f not in meta]
    if meta.get("key") != key:
        out.append("json key differs from tar key")
    if files["cls"].decode("ascii", "replace") != str(meta.get("label")):
        out.append("cls differs from json label")
    if hashlib.sha256(files["jpg"]).hexdigest() != meta.get("sha256"):
        out.append("jpg sha256 differs from json")
    try:
        with Image.open(io.BytesIO(files["jpg"])) as img:
            img.load()
            if img.size != (meta.get("width"), meta.get("height")):
                out.append("image size differs from json width/height")
    except Exception as e:
        out.append(f"jpg does not decode: {e}")
    caption = (meta.get("source") or {}).get("caption")
    if caption and files.get("txt", b"").decode("utf-8", "replace") != caption:
        out.append("txt differs from json source.caption")
    row = by_key.get(key)
    if row is None:
        out.append("not in index.parquet")
    elif (row["shard"], row["label"], row["sha256"]) != (
        shard,
        meta.get("label"),
        meta.get("sha256"),
    ):
        out.append("index.parquet row differs from sample")
    return out
