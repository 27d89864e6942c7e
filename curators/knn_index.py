"""A clip-retrieval-compatible embedding index of an image-text pool.

Layout of an index folder (one part per pool shard, parts in pool-shard order)::

    img_emb/img_emb_00000.npy     float32 (n, dim), L2-normalised image embeddings
    text_emb/text_emb_00000.npy   float32 (n, dim), caption embeddings (zeros where no caption)
    metadata/metadata_00000.parquet  key, url, caption, license, sha256, width, height,
                                     shard, offset, size (where the bytes are)
    skipped/skipped_00000.parquet    pool items that could not be decoded, with the reason
    image.index                   faiss index over img_emb, inner product, ids = row number
    dup_groups.npy                int64 per row: the lowest row of its near-duplicate group
    metadata.arrow                all metadata parts as one Arrow IPC file: memory-mapped by
                                  every worker, so the page cache holds one copy, not one each
    index_info.json               model, weights, dim, count, faiss factory; written last
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards.atomic import atomic_path, atomic_write_bytes

from .base import ResourceError

INFO = "index_info.json"
FAISS_FILE = "image.index"
METADATA_ARROW = "metadata.arrow"
DUP_GROUPS = "dup_groups.npy"
METADATA_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("license", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
    ]
)
SKIPPED_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("reason", pa.string())])


@dataclass
class IndexInfo:
    model: str
    pretrained: str | None
    dim: int
    count: int
    factory: str
    parts: int
    skipped: int
    pool: str
    dedup_cosine: float | None = None  # near-duplicate groups at this cosine; None: none


def part_paths(root: str | os.PathLike, part: int) -> dict[str, Path]:
    root = Path(root)
    return {
        "img_emb": root / "img_emb" / f"img_emb_{part:05d}.npy",
        "text_emb": root / "text_emb" / f"text_emb_{part:05d}.npy",
        "metadata": root / "metadata" / f"metadata_{part:05d}.parquet",
        "skipped": root / "skipped" / f"skipped_{part:05d}.parquet",
    }


def read_info(root: str | os.PathLike) -> IndexInfo:
    path = Path(root) / INFO
    if not path.is_file():
        raise ResourceError(f"not a finished index (no {INFO}): {root}")
    return IndexInfo(**json.loads(path.read_text()))


def write_info(root: str | os.PathLike, info: IndexInfo) -> None:
    blob = json.dumps(asdict(info), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(Path(root) / INFO, blob.encode())


def build_faiss_index(root: str | os.PathLike, parts: int, factory: str, seed: int = 0):
    """Index every img_emb part (ids = global row numbers); writes and returns the index."""
    import faiss

    arrays = [np.load(part_paths(root, i)["img_emb"], mmap_mode="r") for i in range(parts)]
    dim = next((a.shape[1] for a in arrays if a.ndim == 2 and a.shape[0]), 0)
    count = sum(a.shape[0] for a in arrays)
    if count == 0:
        raise ResourceError(f"the pool has no decodable images: {root}")
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        # Train on a seeded sample of at most 100k rows: enough for IVF/PQ, bounded memory.
        want = min(count, 100_000)
        rows = np.random.default_rng(seed).choice(count, size=want, replace=False)
        rows.sort()
        index.train(_take_rows(arrays, rows))
    for a in arrays:
        for start in range(0, a.shape[0], 65536):
            index.add(np.ascontiguousarray(a[start : start + 65536], dtype=np.float32))
    with atomic_path(Path(root) / FAISS_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    return index


def write_metadata_arrow(root: str | os.PathLike, parts: int) -> None:
    with atomic_path(Path(root) / METADATA_ARROW) as tmp:
        with pa.ipc.new_file(str(tmp), METADATA_SCHEMA) as writer:
            for i in range(parts):
                writer.write_table(
                    pq.read_table(part_paths(root, i)["metadata"], schema=METADATA_SCHEMA)
                )


def near_duplicate_groups(
    root: str | os.PathLike, index, parts: int, threshold: float, k: int = 16
) -> int:
    """Group pool rows whose image embeddings are at least ``threshold`` similar (connected
    components over each row's k nearest neighbours); writes dup_groups.npy, returns the
    number of rows that joined another's group."""
    parent = np.arange(index.ntotal, dtype=np.int64)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    row = 0
    for part in range(parts):
        emb = np.load(part_paths(root, part)["img_emb"], mmap_mode="r")
        for start in range(0, emb.shape[0], 8192):
            queries = np.ascontiguousarray(emb[start : start + 8192], dtype=np.float32)
            sims, ids = index.search(queries, min(k, index.ntotal))
            src = np.repeat(np.arange(row + start, row + start + len(queries)), ids.shape[1])
            near = (sims.ravel() >= threshold) & (ids.ravel() >= 0) & (ids.ravel() != src)
            for a, b in zip(src[near].tolist(), ids.ravel()[near].tolist(), strict=True):
                ra, rb = find(a), find(b)
                if ra != rb:  # the lower row becomes the root: groups do not depend on order
                    parent[max(ra, rb)] = min(ra, rb)
        row += emb.shape[0]
    groups = np.array([find(i) for i in range(len(parent))], dtype=np.int64)
    with atomic_path(Path(root) / DUP_GROUPS) as tmp, open(tmp, "wb") as f:
        np.save(f, groups)
    return int((groups != np.arange(len(groups))).sum())


def _take_rows(arrays: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    offsets = np.cumsum([0] + [a.shape[0] for a in arrays])
    out = []
    for i, a in enumerate(arrays):
        sel = rows[(rows >= offsets[i]) & (rows < offsets[i + 1])] - offsets[i]
        if sel.size:
            out.append(np.asarray(a[sel], dtype=np.float32))
    return np.ascontiguousarray(np.concatenate(out))


class PoolIndex:
    """A finished index opened for querying: faiss search plus row metadata and embeddings."""

    def __init__(self, root: str | os.PathLike, nprobe: int = 16) -> None:
        import faiss

        self.root = Path(root)
        self.info = read_info(root)
        self.faiss = faiss.read_index(str(self.root / FAISS_FILE), faiss.IO_FLAG_MMAP)
        try:
            faiss.ParameterSpace().set_index_parameter(self.faiss, "nprobe", nprobe)
        except RuntimeError:
            pass  # flat indexes have no nprobe
        parts = [part_paths(root, i) for i in range(self.info.parts)]
        arrow = self.root / METADATA_ARROW
        if arrow.exists():  # zero-copy: take() touches only the pages of the rows it returns
            self.metadata = pa.ipc.open_file(pa.memory_map(str(arrow))).read_all()
        else:  # an index written before metadata.arrow existed
            self.metadata = pa.concat_tables(
                [pq.read_table(p["metadata"], schema=METADATA_SCHEMA) for p in parts]
            )
        self._emb = [np.load(p["img_emb"], mmap_mode="r") for p in parts]
        groups = self.root / DUP_GROUPS
        self.dup_groups = np.load(groups, mmap_mode="r") if groups.exists() else None
        self._offsets = np.cumsum([0] + [a.shape[0] for a in self._emb])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.faiss.ntotal)
        return self.faiss.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def rows(self, ids: np.ndarray) -> list[dict]:
        return self.metadata.take(pa.array(ids, pa.int64())).to_pylist()

    def embeddings(self, ids: np.ndarray) -> np.ndarray:
        part = np.searchsorted(self._offsets, ids, side="right") - 1
        return (
            np.stack(
                [self._emb[p][i - self._offsets[p]] for p, i in zip(part, ids, strict=True)]
            ).astype(np.float32)
            if len(ids)
            else np.zeros((0, self.info.dim), np.float32)
        )
