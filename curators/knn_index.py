"""A clip-retrieval-compatible embedding index of an image-text pool.

Layout of an index folder (one part per pool shard, parts in pool-shard order)::

    img_emb/img_emb_00000.npy     float32 (n, dim), L2-normalised image embeddings
    text_emb/text_emb_00000.npy   float32 (n, dim), caption embeddings (zeros where no caption)
    metadata/metadata_00000.parquet  key, url, caption, license, sha256, width, height,
                                     shard, offset, size (where the bytes are)
    skipped/skipped_00000.parquet    pool items that could not be decoded, with the reason
    image.index                   faiss index over img_emb, inner product, ids = row number
    dup_groups.npy                int64 per row: the leader row of its near-duplicate group
    metadata.arrow                all metadata parts as one Arrow IPC file: memory-mapped by
                                  every worker, so the page cache holds one copy, not one each
    index_info.json               model, weights, dim, count, faiss factory; written last
    index_run.json                what the parts are made with (model, weights, pool): a resumed
                                  run with other settings is refused instead of mixing parts
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
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
    pretrained: str | None  # what loads the weights again: tag, checkpoint path or "random"
    dim: int
    count: int
    factory: str
    parts: int
    skipped: int
    pool: str
    dedup_cosine: float | None = None  # near-duplicate groups at this cosine; None: none
    weights: str | None = None  # location-free: tag, "<file> sha256:<hex>", "random (seed 0)"
    dedup_stats: dict | None = None  # group-size distribution (near_duplicate_groups)


def _one_line(text: object, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


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
    known = {f.name for f in fields(IndexInfo)}
    try:
        data = json.loads(path.read_text())
        # Unknown keys are ignored: an index written by a newer version still opens.
        info = IndexInfo(**{k: v for k, v in data.items() if k in known})
        ints = (info.dim, info.count, info.parts, info.skipped)
        if not all(isinstance(v, int) for v in ints) or not isinstance(info.model, str):
            raise TypeError("wrong field types")
    except (ValueError, TypeError, AttributeError) as e:
        raise ResourceError(
            f"unreadable {path} ({_one_line(e)}); rebuild the index with `imagenetpp index`"
        ) from None
    return info


def write_info(root: str | os.PathLike, info: IndexInfo) -> None:
    blob = json.dumps(asdict(info), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(Path(root) / INFO, blob.encode())


def build_faiss_index(root: str | os.PathLike, parts: int, factory: str, seed: int = 0):
    """Index every img_emb part (ids = global row numbers); writes and returns the index."""
    import faiss

    arrays = [np.load(part_paths(root, i)["img_emb"], mmap_mode="r") for i in range(parts)]
    if not any(a.shape[0] for a in arrays):
        raise ResourceError(f"the pool has no decodable images: {root}")
    index = build_faiss_index_from(arrays, factory, seed)
    with atomic_path(Path(root) / FAISS_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    return index


def build_faiss_index_from(arrays: list[np.ndarray], factory: str, seed: int = 0):
    """An index over the rows of ``arrays`` in order (memory-mapped parts are read in blocks)."""
    dim = next((a.shape[1] for a in arrays if a.ndim == 2 and a.shape[0]), 0)
    count = sum(a.shape[0] for a in arrays)
    if count == 0:
        raise ResourceError("the pool has no decodable images")
    index = make_faiss_index(dim, factory)
    if not index.is_trained:
        # Train on a seeded sample of at most 100k rows: enough for IVF/PQ, bounded memory.
        want = min(count, 100_000)
        rows = np.random.default_rng(seed).choice(count, size=want, replace=False)
        rows.sort()
        try:
            index.train(_take_rows(arrays, rows))
        except RuntimeError as e:  # e.g. fewer images than IVF lists
            raise ResourceError(
                f"faiss factory {factory!r} cannot be trained on {want} images: {_one_line(e)}"
            ) from None
    for a in arrays:
        for start in range(0, a.shape[0], 65536):
            index.add(np.ascontiguousarray(a[start : start + 65536], dtype=np.float32))
    return index


def make_faiss_index(dim: int, factory: str):
    """An empty inner-product index; a bad factory string is a ResourceError (one line)."""
    import faiss

    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ResourceError(f"bad faiss factory {factory!r}: {_one_line(e)}") from None


def open_faiss_shared(path: Path):
    """Open a faiss index so its vectors stay in the page cache, mapped in place: every worker
    on a node shares one copy (a plain read, or IO_FLAG_MMAP on a flat index, copies them into
    each process). Index types that cannot be mapped in place fall back to IO_FLAG_MMAP."""
    import faiss

    error: RuntimeError | None = None
    for flag in (faiss.IO_FLAG_MMAP_IFC, faiss.IO_FLAG_MMAP, 0):
        try:
            return faiss.read_index(str(path), flag)
        except RuntimeError as e:
            error = error or e
    # faiss's messages span lines: keep the CLI's one line
    raise ResourceError(f"unreadable faiss index {path}: {_one_line(error)}") from None


def write_metadata_arrow(root: str | os.PathLike, parts: int) -> None:
    with atomic_path(Path(root) / METADATA_ARROW) as tmp:
        with pa.ipc.new_file(str(tmp), METADATA_SCHEMA) as writer:
            for i in range(parts):
                writer.write_table(
                    pq.read_table(part_paths(root, i)["metadata"], schema=METADATA_SCHEMA)
                )


EXACT_DEDUP_ROWS = 20_000  # below this, every pair is compared (quadratic, but under a second)


def dedup_search_index(
    root: str | os.PathLike, parts: int, exact_below: int = EXACT_DEDUP_ROWS, seed: int = 0
):
    """The index near-duplicate grouping searches: exact (Flat) for a small pool; above
    ``exact_below`` rows an IVF index (k-means cells of ~sqrt(n) rows, 8 cells probed per
    query), so grouping costs ~n*sqrt(n) instead of n^2, as semantic deduplication does at web
    scale. Near duplicates lie far closer than cell widths, so the cells probed hold them."""
    import faiss

    arrays = [np.load(part_paths(root, i)["img_emb"], mmap_mode="r") for i in range(parts)]
    n = sum(a.shape[0] for a in arrays)
    if n <= exact_below:
        return build_faiss_index_from(arrays, "Flat", seed)
    train = min(n, 100_000)
    nlist = int(max(16, min(4 * np.sqrt(n), train // 39)))  # faiss wants >= 39 points a cell
    index = build_faiss_index_from(arrays, f"IVF{nlist},Flat", seed)
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", 8)
    return index


def near_duplicate_groups(
    root: str | os.PathLike,
    parts: int,
    threshold: float,
    k: int = 16,
    index=None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Group pool rows by leader clustering: rows are visited in row order; a row not yet in a
    group leads a new one, which takes every not-yet-grouped row among the leader's k nearest
    neighbours with cosine >= ``threshold`` (all rows within it, by a range search, when all k
    are: a picture copied a thousand times is one group, not one per k). Every member is thus
    within the threshold of its leader; similarity chains (A~B~C~...) cannot merge a whole class
    the way connected components did. ``index`` defaults to dedup_search_index (sub-quadratic
    for big pools); ``progress(rows_done, rows)`` is called after every batch. Writes
    dup_groups.npy (int64 per row: its leader's row) and returns group_stats."""
    index = index if index is not None else dedup_search_index(root, parts)
    n = int(index.ntotal)
    groups = np.full(n, -1, dtype=np.int64)
    k = max(1, min(k, n))
    row = 0
    for part in range(parts):
        emb = np.load(part_paths(root, part)["img_emb"], mmap_mode="r")
        for start in range(0, emb.shape[0], 8192):
            queries = np.ascontiguousarray(emb[start : start + 8192], dtype=np.float32)
            sims, ids = index.search(queries, k)
            first = row + start
            own = np.arange(first, first + len(queries))[:, None]
            near = (sims >= threshold) & (ids >= 0) & (ids != own)
            has_near = near.any(axis=1).tolist()
            full = ((sims[:, -1] >= threshold) & (k < n)).tolist()  # more may lie beyond k
            # Sequential by nature (a leader claims rows before later leaders can), but only
            # rows with near neighbours do any array work.
            for i, has in enumerate(has_near):
                r = first + i
                if groups[r] >= 0:
                    continue
                groups[r] = r
                if has:
                    members = ids[i][near[i]]
                    if full[i]:
                        members = _all_within(index, queries[i : i + 1], threshold, k)
                    groups[members[groups[members] < 0]] = r
            if progress is not None:
                progress(first + len(queries), n)
        row += emb.shape[0]
    with atomic_path(Path(root) / DUP_GROUPS) as tmp, open(tmp, "wb") as f:
        np.save(f, groups)
    return group_stats(groups)


def _all_within(index, query: np.ndarray, threshold: float, k: int) -> np.ndarray:
    """Every row with cosine >= threshold to ``query`` (a 1-row batch)."""
    try:  # strict '>' in faiss: a hair below, then filtered
        _, sims, ids = index.range_search(query, threshold - 1e-6)
        return ids[sims >= threshold]
    except RuntimeError:  # an index type without range search: widen k until it is enough
        n = int(index.ntotal)
        while True:
            k = min(n, k * 8)
            sims, ids = index.search(query, k)
            if sims[0, -1] < threshold or k >= n:
                return ids[0][(sims[0] >= threshold) & (ids[0] >= 0)]


_MAX = np.iinfo(np.int64).max
SIZE_BUCKETS = (("1", 1, 1), ("2", 2, 2), ("3-5", 3, 5), ("6-20", 6, 20), (">20", 21, _MAX))


def group_stats(groups: np.ndarray) -> dict:
    """rows, groups, rows that joined another's group, groups per size bucket, the largest."""
    groups = np.asarray(groups, dtype=np.int64)
    sizes = np.bincount(groups, minlength=len(groups)) if len(groups) else np.zeros(0, np.int64)
    sizes = sizes[sizes > 0]
    buckets = {name: int(((sizes >= lo) & (sizes <= hi)).sum()) for name, lo, hi in SIZE_BUCKETS}
    return {
        "rows": int(len(groups)),
        "groups": int(len(sizes)),
        "joined": int(len(groups) - len(sizes)),
        "sizes": buckets,
        "largest": int(sizes.max(initial=0)),
    }


def group_stats_warning(stats: dict, threshold: float | None) -> str | None:
    """A warning when the largest group is implausibly large for near duplicates: a model too
    weak for the threshold merges distinct images, and one group yields one sample per shift."""
    limit = max(50, int(0.01 * stats["rows"]))
    if stats["largest"] <= limit:
        return None
    return (
        f"the largest near-duplicate group holds {stats['largest']} of {stats['rows']} images "
        f"(cosine >= {threshold}); a shift keeps one image per group: check the model, or "
        "raise --dedup-cosine (1.0 turns grouping off)"
    )


def _take_rows(arrays: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    offsets = np.cumsum([0] + [a.shape[0] for a in arrays])
    out = []
    for i, a in enumerate(arrays):
        sel = rows[(rows >= offsets[i]) & (rows < offsets[i + 1])] - offsets[i]
        if sel.size:
            out.append(np.asarray(a[sel], dtype=np.float32))
    return np.ascontiguousarray(np.concatenate(out))


def is_url_index(root: str | os.PathLike) -> bool:
    """An index in clip-retrieval's published layout (LAION-5B's): image.index and metadata
    parquet parts (url, caption) whose rows follow the index's ids, no pool tars, no
    index_info.json. Its pixels are URLs; its model is the user's to name."""
    root = Path(root)
    return (
        not (root / INFO).exists()
        and (root / FAISS_FILE).exists()
        and any((root / "metadata").glob("*.parquet"))
    )


def _url_index_info(root: Path, index, model: str | None, pretrained: str | None) -> IndexInfo:
    if not model:
        raise ResourceError(
            f"{root} is a clip-retrieval index (no {INFO}): name its CLIP model and weights "
            "(curator.params.model and pretrained)"
        )
    return IndexInfo(
        model=model, pretrained=pretrained, dim=int(index.d), count=int(index.ntotal),
        factory="(clip-retrieval)", parts=len(list((root / "metadata").glob("*.parquet"))),
        skipped=0, pool=root.name, dedup_cosine=None, weights=None,
    )  # fmt: skip


class PoolIndex:
    """A finished index opened for querying: faiss search plus row metadata and embeddings.

    Also opens a clip-retrieval index (is_url_index): rows then carry URLs and no pool
    location, and embeddings only where img_emb parts exist."""

    def __init__(
        self,
        root: str | os.PathLike,
        nprobe: int = 16,
        model: str | None = None,
        pretrained: str | None = None,
    ) -> None:
        import faiss

        self.root = Path(root)
        path = self.root / FAISS_FILE
        self.urls_only = is_url_index(root)
        if self.urls_only:
            self.faiss = open_faiss_shared(path)
            self.info = _url_index_info(self.root, self.faiss, model, pretrained)
        else:
            self.info = read_info(root)
            self.faiss = open_faiss_shared(path)
        if (self.faiss.ntotal, self.faiss.d) != (self.info.count, self.info.dim):
            raise ResourceError(
                f"{path} holds {self.faiss.ntotal} vectors of dim {self.faiss.d}, but {INFO} "
                f"says {self.info.count} of dim {self.info.dim}; rebuild the index"
            )
        try:
            faiss.ParameterSpace().set_index_parameter(self.faiss, "nprobe", nprobe)
        except RuntimeError:
            pass  # flat indexes have no nprobe
        try:
            self._open_rows()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise ResourceError(f"unreadable index files in {root}: {_one_line(e)}") from None

    def _open_rows(self) -> None:
        root = self.root
        if self.urls_only:
            return self._open_url_rows()
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
        if not self.metadata.num_rows == self._offsets[-1] == self.faiss.ntotal:
            raise ValueError(
                f"{self.metadata.num_rows} metadata rows, {self._offsets[-1]} embeddings, "
                f"{self.faiss.ntotal} indexed vectors"
            )

    def _open_url_rows(self) -> None:
        """Metadata parts in name order (clip-retrieval's row order), fitted to our schema:
        missing columns are null, a missing key is the row number."""
        tables = []
        for path in sorted((self.root / "metadata").glob("*.parquet")):
            t = pq.read_table(path)
            if "url" not in t.column_names:
                raise ValueError(f"{path.name} has no url column")
            tables.append(t)
        table = pa.concat_tables(tables, promote_options="permissive")
        n = table.num_rows
        cols = {}
        for name in METADATA_SCHEMA.names:
            if name in table.column_names:
                cols[name] = table[name].cast(METADATA_SCHEMA.field(name).type)
            elif name == "key":
                cols[name] = pa.array([f"{i:09d}" for i in range(n)], pa.string())
            else:
                cols[name] = pa.nulls(n, METADATA_SCHEMA.field(name).type)
        self.metadata = pa.table(cols, schema=METADATA_SCHEMA)
        parts = sorted((self.root / "img_emb").glob("*.npy"))
        self._emb = [np.load(p, mmap_mode="r") for p in parts]
        self._offsets = np.cumsum([0] + [a.shape[0] for a in self._emb])
        if self._emb and self._offsets[-1] != n:
            raise ValueError(f"{n} metadata rows but {self._offsets[-1]} embeddings")
        self.dup_groups = None
        if n != self.faiss.ntotal:
            raise ValueError(f"{n} metadata rows, {self.faiss.ntotal} indexed vectors")

    @property
    def has_embeddings(self) -> bool:
        return bool(self._emb)

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
