"""Re-read every shard of a shift and check it against manifest.json and index.parquet.

``verify_shift`` never raises on a damaged shift: every defect (a truncated or corrupt shard, a
sample that does not parse, an unreadable index or manifest) becomes a line in
``VerifyReport.problems`` and the check goes on with the rest. Only a folder that holds no part
of a shift at all raises ``NotAShift``.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from .manifest import INDEX, MANIFEST, SHARDS_DIR, read_manifest, sha256_file
from .reader import CorruptTar, iter_entries, split_name

REQUIRED_FIELDS = (
    "key", "label", "wnid", "class_name", "shift", "curator", "source", "query", "score",
    "model", "seed", "prompt", "sha256", "width", "height", "license", "config_hash", "version",
)  # fmt: skip

INDEX_COLUMNS = ("key", "shard", "label", "sha256")
# A badly broken shard could yield one problem per sample; keep the report (and memory) bounded.
MAX_SAMPLE_PROBLEMS_PER_SHARD = 20

_BLOCK = 512


class NotAShift(ValueError):
    """The folder holds none of manifest.json, index.parquet, shards/."""


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    shards: int = 0  # shard files read
    samples: int = 0  # samples read from them

    @property
    def ok(self) -> bool:
        return not self.problems

    # Old callers did `problems = verify_shift(...)`; iterating and len() still mean the problems.
    def __iter__(self) -> Iterator[str]:
        return iter(self.problems)

    def __len__(self) -> int:
        return len(self.problems)


@dataclass(frozen=True)
class _ShardEntry:
    name: str
    sha256: str | None  # None: the manifest gives no usable value, so nothing to compare
    samples: int | None


class _Index:
    """The columns of index.parquet that verify needs, held compactly: keys and sha256s as
    fixed-width bytes (sorted keys for lookup), shards dictionary-encoded, labels as integers.
    About 100 bytes a row, no Python object per row: 1.3M rows stay near 130 MB. Read in
    batches, so building it never holds a Python list of every key either."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        pf = pq.ParquetFile(path)
        n = pf.metadata.num_rows
        width = 1
        for batch in pf.iter_batches(batch_size=65536, columns=["key"]):
            k = batch.column("key").cast(pa.binary())
            width = max(width, int(pc.max(pc.binary_length(k)).as_py() or 1))
        keys = np.zeros(n, dtype=f"S{width}")
        self.sha256 = np.zeros(n, dtype="S64")
        self.label = np.full(n, -1, dtype=np.int64)
        shard_codes = np.zeros(n, dtype=np.int32)
        self.shard_names: list[str | None] = []
        codes: dict[str | None, int] = {}
        has_key = np.ones(n, dtype=bool)
        start = 0
        for batch in pf.iter_batches(batch_size=65536, columns=list(INDEX_COLUMNS)):
            stop = start + batch.num_rows
            k = batch.column("key")
            has_key[start:stop] = k.is_valid().to_numpy(zero_copy_only=False)
            keys[start:stop] = [x.encode() if x is not None else b"" for x in k.to_pylist()]
            self.sha256[start:stop] = [(x or "").encode()[:64] for x in batch.column("sha256").to_pylist()]  # fmt: skip
            self.label[start:stop] = [-1 if x is None else x for x in batch.column("label").to_pylist()]  # fmt: skip
            for i, name in enumerate(batch.column("shard").to_pylist()):
                if name not in codes:
                    codes[name] = len(self.shard_names)
                    self.shard_names.append(name)
                shard_codes[start + i] = codes[name]
            start = stop
        self.shard = shard_codes
        self.has_sha = self.sha256 != b""
        nulls = int((~has_key).sum())
        order = np.argsort(keys, kind="stable")
        order = order[has_key[order]]
        sorted_keys = keys[order]
        dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1]) + 1
        if dup.size:
            example = sorted_keys[dup[0]].decode()
            problems.append(f"index.parquet: duplicate keys ({dup.size} extra rows, e.g. {example})")  # fmt: skip
            first = np.ones(order.size, dtype=bool)
            first[dup] = False  # the first row of each key is the one looked up
            order, sorted_keys = order[first], sorted_keys[first]
        if nulls:
            problems.append(f"index.parquet: {nulls} rows without a key")
        self._order, self._sorted = order, sorted_keys
        del keys
        pa.default_memory_pool().release_unused()  # Arrow keeps freed batches otherwise
        self.seen = np.zeros(n, dtype=bool)
        self.keyed = has_key

    def find(self, key: str) -> int | None:
        """The row of ``key`` (its first row when repeated), or None."""
        k = key.encode()
        i = int(np.searchsorted(self._sorted, k))
        if i < len(self._sorted) and self._sorted[i] == k:
            return int(self._order[i])
        return None

    def row(self, i: int) -> tuple:
        sha = self.sha256[i].decode() if self.has_sha[i] else None
        label = int(self.label[i]) if self.label[i] >= 0 else None
        return (self.shard_names[self.shard[i]], label, sha)

    def unseen(self) -> tuple[int, str | None]:
        """How many looked-up rows no shard held, and the smallest such key."""
        rows = self._order[~self.seen[self._order]]
        if not rows.size:
            return 0, None
        return int(rows.size), min(self._sorted[~self.seen[self._order]]).decode()


def verify_shift(
    shift_dir: str | os.PathLike, progress: Callable[[int, int], None] | None = None
) -> VerifyReport:
    """Check a shift folder; the report lists its problems (none when it is consistent).
    ``progress(shards done, shards)`` is called after each shard."""
    shift_dir = Path(shift_dir)
    if not any((shift_dir / n).exists() for n in (MANIFEST, INDEX, SHARDS_DIR)):
        raise NotAShift(
            f"not a shift folder (no {MANIFEST}, {INDEX} or {SHARDS_DIR}/): {shift_dir}"
        )
    report = VerifyReport()
    problems = report.problems
    on_disk = sorted(p.name for p in (shift_dir / SHARDS_DIR).glob("*.tar"))

    manifest = _load_manifest(shift_dir, problems)
    entries = _shard_entries(manifest, problems)
    if entries is None:  # no usable shard list: still check what is on disk against the index
        entries = [_ShardEntry(n, None, None) for n in on_disk]
    else:
        listed = {e.name for e in entries}
        problems += [f"{n}: shard on disk but not in manifest" for n in on_disk if n not in listed]

    index = _load_index(shift_dir, problems)
    seen_elsewhere: set[str] = set()  # keys not in the index (all keys when there is no index)
    class_counts: Counter[str] = Counter()
    for done, entry in enumerate(entries):
        if progress is not None:
            progress(done, len(entries))
        path = shift_dir / SHARDS_DIR / entry.name
        if not path.is_file():
            problems.append(f"{entry.name}: missing")
            continue
        report.shards += 1
        try:
            if entry.sha256 is not None and sha256_file(path) != entry.sha256:
                problems.append(f"{entry.name}: sha256 differs from manifest")
        except OSError as e:
            problems.append(f"{entry.name}: unreadable: {e}")
            continue
        count, found_count, tar_problems, cap = 0, 0, [], MAX_SAMPLE_PROBLEMS_PER_SHARD
        for key, files in _iter_shard(path, tar_problems):
            count += 1
            found, wnid = _check_sample(key, files, entry.name, index)
            class_counts[wnid] += 1
            row = index.find(key) if index is not None else None
            if row is not None:
                twice = bool(index.seen[row])
                index.seen[row] = True
            else:
                twice = key in seen_elsewhere
                seen_elsewhere.add(key)
            if twice:
                found.append("key appears twice")
            for p in found:
                found_count += 1
                if found_count <= cap:
                    problems.append(f"{entry.name}/{key}: {p}")
        report.samples += count
        if found_count > cap:
            problems.append(f"{entry.name}: {found_count - cap} more sample problems not listed")
        problems += tar_problems
        if entry.samples is not None and count != entry.samples:
            problems.append(f"{entry.name}: {count} samples, manifest says {entry.samples}")

    if index is not None:
        missing, example = index.unseen()
        if missing:
            problems.append(f"index.parquet: {missing} keys in no shard, e.g. {example}")
    if manifest is not None:
        _check_totals(manifest, report.samples, class_counts, problems)
    return report


def _load_manifest(shift_dir: Path, problems: list[str]) -> dict | None:
    try:
        manifest = read_manifest(shift_dir)
    except (OSError, ValueError) as e:  # missing, not UTF-8, not JSON
        problems.append(f"manifest.json unreadable: {e}")
        return None
    if not isinstance(manifest, dict):
        problems.append("manifest.json: not a JSON object")
        return None
    return manifest


def _shard_entries(manifest: dict | None, problems: list[str]) -> list[_ShardEntry] | None:
    """The manifest's shard list, keeping what is usable of each entry; None if there is none."""
    if manifest is None:
        return None
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        problems.append("manifest.json: 'shards' missing or not a list")
        return None
    entries, names = [], set()
    for i, s in enumerate(shards):
        name = s.get("name") if isinstance(s, dict) else None
        # a plain file name only, so a manifest cannot point verify outside shards/
        if not isinstance(name, str) or not name or Path(name).name != name:
            problems.append(f"manifest.json: shards[{i}] has no valid 'name'")
            continue
        if name in names:
            problems.append(f"manifest.json: {name} listed twice")
            continue
        names.add(name)
        sha, samples = s.get("sha256"), s.get("samples")
        if not isinstance(sha, str):
            problems.append(f"manifest.json: {name} has no string 'sha256'")
            sha = None
        if not _is_int(samples):
            problems.append(f"manifest.json: {name} has no integer 'samples'")
            samples = None
        entries.append(_ShardEntry(name, sha, samples))
    return entries


def _load_index(shift_dir: Path, problems: list[str]) -> _Index | None:
    path = shift_dir / INDEX
    try:
        schema = pq.read_schema(path)
        lacking = [c for c in INDEX_COLUMNS if c not in schema.names]
        if lacking:
            problems.append(f"index.parquet lacks columns: {', '.join(lacking)}")
            return None
        return _Index(path, problems)
    except (OSError, ValueError, pa.ArrowException) as e:  # missing, garbage, truncated
        problems.append(f"index.parquet unreadable: {e}")
        return None


def _check_totals(manifest: dict, samples: int, counts: Counter[str], problems: list[str]) -> None:
    total = manifest.get("total_samples")
    if not _is_int(total):
        problems.append("manifest.json: 'total_samples' missing or not an integer")
    elif total != samples:
        problems.append(f"manifest total_samples {total} != {samples}")
    expected = manifest.get("class_counts")
    if not isinstance(expected, dict) or not all(_is_int(v) for v in expected.values()):
        problems.append("manifest.json: 'class_counts' missing or not {wnid: integer}")
        return
    expected = {k: v for k, v in expected.items() if v}  # classes with no sample are listed as 0
    if dict(counts) != expected:
        diff = sorted(w for w in expected.keys() | counts.keys() if expected.get(w, 0) != counts[w])
        shown = ", ".join(f"{w} {expected.get(w, 0)} vs {counts[w]}" for w in diff[:5])
        problems.append(
            f"per-class counts in shards differ from manifest class_counts "
            f"({len(diff)} classes, manifest vs shards: {shown})"
        )


def _iter_shard(path: Path, problems: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, like reader.iter_samples; a corrupt or truncated tar
    ends the walk with a problem (the reader itself stops silently at a cut)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CorruptTar("empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                key, files, end = None, {}, 0
                for name, offset, n in iter_entries(buf):
                    end = offset + -(-n // _BLOCK) * _BLOCK
                    k, ext = split_name(name)
                    if k != key or ext in files:  # a key written twice in a row: two samples
                        if key is not None:
                            yield key, files
                        key, files = k, {}
                    files[ext] = bytes(buf[offset : offset + n])
                # A complete tar ends with two zero blocks right after the last member; a cut
                # anywhere (inside a member or a header) ends the header walk early and lacks them.
                if buf[end : end + 2 * _BLOCK] != bytes(2 * _BLOCK) or size % _BLOCK:
                    raise CorruptTar(f"truncated: no end-of-archive blocks ({size} bytes)")
                if key is not None:
                    yield key, files
    except (OSError, ValueError) as e:  # CorruptTar is a ValueError; the rest is unreadable
        problems.append(f"{path.name}: corrupt tar: {e}")


def _check_sample(
    key: str, files: dict[str, bytes], shard: str, index: _Index | None
) -> tuple[list[str], str]:
    """(problems, wnid) of one sample; wnid is '?' when the json does not say."""
    out = [f"no .{ext}" for ext in ("jpg", "cls", "json") if ext not in files]
    if out:
        return out, "?"
    try:
        meta = json.loads(files["json"])
    except (ValueError, RecursionError):  # invalid UTF-8 or JSON; absurd nesting
        return ["json does not parse"], "?"
    if not isinstance(meta, dict):
        return ["json is not an object"], "?"
    wnid = meta.get("wnid") if isinstance(meta.get("wnid"), str) else "?"
    out += [f"json lacks '{f}'" for f in REQUIRED_FIELDS if f not in meta]
    if meta.get("key") != key:
        out.append("json key differs from tar key")
    cls = files["cls"]
    if not (cls.isascii() and cls.isdigit()):
        out.append("cls is not ASCII digits")
    elif cls.decode() != str(meta.get("label")):
        out.append("cls differs from json label")
    if hashlib.sha256(files["jpg"]).hexdigest() != meta.get("sha256"):
        out.append("jpg sha256 differs from json")
    try:
        with Image.open(io.BytesIO(files["jpg"])) as img:
            img.load()
            if img.size != (meta.get("width"), meta.get("height")):
                out.append("image size differs from json width/height")
    except Exception as e:  # PIL raises many types on corrupt data; any of them is a bad jpg
        out.append(f"jpg does not decode: {e}")
    source = meta.get("source")
    if not isinstance(source, dict):
        if "source" in meta:
            out.append("json source is not an object")
    else:
        caption = source.get("caption")
        if caption and files.get("txt", b"").decode("utf-8", "replace") != caption:
            out.append("txt differs from json source.caption")
    if index is not None:
        row = index.find(key)
        if row is None:
            out.append("not in index.parquet")
        elif index.row(row) != (shard, meta.get("label"), meta.get("sha256")):
            out.append("index.parquet row differs from sample")
    return out, wnid


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
