"""Stage 2, select: per-class balancing of all candidates, then a seeded plan of shards.

1. Claims: every distinct image (its near-duplicate group where the curator knows one, else
   the sha256 of its bytes, else its source id) goes to the one class where it scores best,
   so duplicates and multiply-claimed items count once in the whole shift.
2. Per class, in score order, drop near duplicates (cosine above a threshold to an already
   kept candidate) and keep up to the target. A class that falls short says why.
3. Keys are <wnid>_<rank>; a seeded permutation spreads classes across shards.

Candidates come in unit files (a unit may hold many classes), one parquet row group per
label. Only scalar columns of all units are held at once; a class's rows, embeddings included,
are read from its row groups when that class is selected.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curators import ImageNetClass
from shards.atomic import commit

from .executor import report_progress

_BLOCK = 256


PLAN_UNIT = "plan"  # the select stage's one unit


@dataclass(frozen=True)
class ClassSlice:
    """One class's rows in a unit file: a row group, and where it starts in the file."""

    path: Path
    row_group: int
    start: int
    rows: int


def class_slices(paths: list[Path]) -> dict[int, list[ClassSlice]]:
    """label -> its row groups across unit files, from the files' own statistics."""
    out: dict[int, list[ClassSlice]] = {}
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        col = meta.schema.names.index("label")
        start = 0
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            if group.num_rows:
                stats = group.column(col).statistics
                out.setdefault(int(stats.min), []).append(
                    ClassSlice(path, rg, start, group.num_rows)
                )
            start += group.num_rows
    return out


@dataclass
class Claims:
    """Every candidate row of every unit file (in file order), and which rows a class holds.

    An image (its near-duplicate group, else its sha256, else its source id) is held by one
    class at a time: first where it scores best; when that class fills up without needing it,
    by its next-best class that still has room."""

    offsets: dict[Path, int]  # global row of each file's first row
    code: np.ndarray  # image identity per row
    score: np.ndarray
    label: np.ndarray
    win: np.ndarray  # held by its row's class
    tried: np.ndarray  # has been held at some point

    def rows(self, sl: ClassSlice) -> np.ndarray:
        first = self.offsets[sl.path] + sl.start
        return np.arange(first, first + sl.rows)

    def hand_on(self, released: np.ndarray, full: set[int]) -> np.ndarray:
        """Give each released image to its best untried row in a class with room; returns
        those rows."""
        self.win[released] = False
        codes = np.unique(self.code[released])
        open_rows = np.isin(self.code, codes) & ~self.tried & ~np.isin(self.label, list(full))
        cand = np.flatnonzero(open_rows)
        if not cand.size:
            return cand
        order = cand[np.lexsort((self.label[cand], -self.score[cand], self.code[cand]))]
        first = np.ones(order.size, bool)
        first[1:] = self.code[order[1:]] != self.code[order[:-1]]
        chosen = order[first]
        self.win[chosen] = self.tried[chosen] = True
        return chosen


def resolve_claims(paths: list[Path]) -> Claims:
    """First claims: each image to the class where it scores best (ties: lower class index)."""
    labels, scores, keys, offsets, total = [], [], [], {}, 0
    for path in paths:
        t = pq.ParquetFile(path).read(columns=["label", "source_id", "sha256", "duplicate_group", "score"])  # fmt: skip
        keys.append(pc.coalesce(t["duplicate_group"], t["sha256"], t["source_id"]))
        scores.append(t["score"].to_numpy())
        labels.append(t["label"].to_numpy())
        offsets[path] = total
        total += t.num_rows
    if total == 0:
        empty = np.zeros(0, bool)
        return Claims(offsets, np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), empty, empty)  # fmt: skip
    codes = pa.chunked_array([c for k in keys for c in k.chunks], pa.string()).combine_chunks()
    codes = pc.dictionary_encode(codes).indices.to_numpy()
    score = np.concatenate(scores)
    label = np.concatenate(labels)
    order = np.lexsort((label, -score, codes))
    first = np.ones(order.size, bool)
    first[1:] = codes[order[1:]] != codes[order[:-1]]
    win = np.zeros(order.size, bool)
    win[order[first]] = True
    return Claims(offsets, codes, score, label, win, win.copy())


def greedy_dedupe(emb: np.ndarray, target: int, threshold: float) -> np.ndarray:
    """Indices (into score-ordered rows) kept: skip a row too similar to an already kept one.

    Same result as the sequential walk, but only rows that have an earlier near duplicate in
    their block are decided one by one; all others are decided by a matrix product.
    """
    if threshold >= 1.0 or emb.size == 0:
        return np.arange(min(target, len(emb)))
    kept: list[np.ndarray] = []
    n_kept = 0
    kept_emb = np.zeros((0, emb.shape[1]), np.float32)
    for start in range(0, len(emb), _BLOCK):
        block = emb[start : start + _BLOCK]
        keep = (block @ kept_emb.T).max(axis=1, initial=-1.0) < threshold
        near = np.tril(block @ block.T >= threshold, k=-1)  # near[i, j]: j < i and similar
        for i in np.flatnonzero(keep & near.any(axis=1)):
            # Rows before i are final here: decided by the product, or earlier in this loop.
            if (near[i, :i] & keep[:i]).any():
                keep[i] = False
        rows = np.flatnonzero(keep)[: target - n_kept]
        kept.append(start + rows)
        n_kept += rows.size
        if n_kept >= target:
            break
        kept_emb = np.concatenate([kept_emb, block[rows]])
    return np.concatenate(kept) if kept else np.zeros(0, np.int64)


_file_locks: dict[Path, threading.Lock] = defaultdict(threading.Lock)


def _read_unit_file(path: Path) -> tuple[pa.Table, str]:
    """A whole unit file, kept while its neighbouring classes are selected: a file holding many
    classes is read once, not once per class (classes go in label order, files hold runs of
    labels). The lock makes threads selecting neighbouring classes wait for one read."""
    with _file_locks[path]:
        return _read_unit_file_cached(path)


@lru_cache(maxsize=8)
def _read_unit_file_cached(path: Path) -> tuple[pa.Table, str]:
    table = pq.read_table(path)
    model = (table.schema.metadata or {}).get(b"model", b"{}").decode()
    return table.replace_schema_metadata(None), model


def _read_class(slices: list[ClassSlice]) -> tuple[pa.Table, str]:
    tables, model = [], "{}"
    for sl in slices:
        table, model = _read_unit_file(sl.path)
        tables.append(table.slice(sl.start, sl.rows))
    if not tables:
        from .candidates import candidate_schema

        return candidate_schema().empty_table(), model
    return pa.concat_tables(tables), model


def _fp16_lists(matrix: np.ndarray) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(matrix, np.float16).ravel())
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1]).cast(pa.list_(pa.float16()))


def _take(table: pa.Table, rows: np.ndarray, emb: np.ndarray | None) -> pa.Table:
    """table.take(rows), with the embedding column moved through numpy: Arrow's take on a
    list<halffloat> column is several times slower than the rest of select."""
    i = table.schema.get_field_index("embedding")
    col = table.column(i)
    out = table.remove_column(i).take(pa.array(rows, pa.int64()))
    if emb is None:
        if col.null_count == 0 and len(col):
            flat = col.combine_chunks().flatten().to_numpy()
            emb = flat.reshape(len(col), flat.size // len(col))[rows]
        else:
            return out.add_column(i, "embedding", col.combine_chunks().take(pa.array(rows, pa.int64())))  # fmt: skip
    return out.add_column(i, "embedding", _fp16_lists(emb))


@dataclass(frozen=True)
class Exclusion:
    """Evaluation-set images no candidate may near-duplicate (config select.exclude): by CLIP
    cosine, and by perceptual hash, the two tests report's contamination check makes."""

    index: object  # faiss.IndexFlatIP over their normalised CLIP embeddings
    cosine: float
    hashes: object = None  # faiss.IndexBinaryFlat over their perceptual hashes; None: off
    phash_distance: int = 0
    work_root: Path | None = None  # blob locators are relative to it

    @classmethod
    def of(
        cls, embeddings: np.ndarray, cosine: float, hashes: np.ndarray | None = None,
        phash_distance: int | None = None, work_root: Path | None = None,
    ) -> Exclusion:  # fmt: skip
        import faiss

        index = faiss.IndexFlatIP(embeddings.shape[1])
        index.add(np.ascontiguousarray(embeddings, np.float32))
        binary = None
        if phash_distance is not None and hashes is not None and len(hashes):
            binary = faiss.IndexBinaryFlat(64)
            binary.add(np.ascontiguousarray(hashes, np.uint8))
        return cls(index, cosine, binary, phash_distance or 0, work_root)

    def hits(self, unit: np.ndarray) -> np.ndarray:
        if not len(unit):
            return np.zeros(0, bool)
        sims, _ = self.index.search(np.ascontiguousarray(unit, np.float32), 1)
        return sims[:, 0] >= self.cosine

    def phash_hits(self, locators: list[str]) -> np.ndarray:
        """Which candidates' pixels hash within phash_distance bits of an evaluation image.
        Bytes that cannot be read or decoded are no hit: materialize skips and records them."""
        from shards.images import BadImage, perceptual_hash
        from shards.sources import SourceError, read_source

        hashes, readable = [], []
        for i, loc in enumerate(locators):
            try:
                hashes.append(perceptual_hash(read_source(json.loads(loc), self.work_root)))
                readable.append(i)
            except (SourceError, BadImage):
                continue
        out = np.zeros(len(locators), bool)
        if hashes:
            packed = np.frombuffer(b"".join(hashes), np.uint8).reshape(len(hashes), 8)
            dist, _ = self.hashes.search(packed, 1)
            out[np.asarray(readable)] = dist[:, 0] <= self.phash_distance
        return out


def select_class(
    cls: ImageNetClass,
    slices: list[ClassSlice],
    claims: Claims,
    target: int,
    threshold: float,
    exclusion: Exclusion | None = None,
) -> tuple[pa.Table, dict, np.ndarray]:
    """The class's selection, its stats, and the global rows it held but did not need (it
    filled up before reaching them): those go on to their next-best class."""
    table, model = _read_class(slices)
    global_rows = (
        np.concatenate([claims.rows(sl) for sl in slices]) if slices else np.zeros(0, np.int64)
    )
    win = claims.win[global_rows]
    total = table.num_rows
    rows = np.flatnonzero(win)
    # Score order, ties by source id, so the choice never depends on file order.
    keys = table.select(["score", "source_id"]).take(pa.array(rows))
    rows = rows[
        pc.sort_indices(keys, [("score", "descending"), ("source_id", "ascending")]).to_numpy()
    ]
    col = table["embedding"].combine_chunks()
    emb = None
    excluded = 0
    if col.null_count == 0 and total:
        emb = col.flatten().to_numpy().reshape(total, -1)[rows]
        unit = emb.astype(np.float32)
        unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)  # stored as fp16
        if exclusion is not None:
            held_out = exclusion.hits(unit)
            excluded = int(held_out.sum())
            rows, emb, unit = rows[~held_out], emb[~held_out], unit[~held_out]
        keep = greedy_dedupe(unit, target, threshold)
        if exclusion is not None and exclusion.hashes is not None:
            # Hashing needs the pixels: only what the class would keep is read, then refilled
            # from the next candidates until none of the kept is a near-copy.
            locators = table["locator"]
            checked = np.zeros(rows.size, bool)
            while True:
                fresh = keep[~checked[keep]]
                if not fresh.size:
                    break
                checked[fresh] = True
                hit = exclusion.phash_hits([locators[int(r)].as_py() for r in rows[fresh]])
                if not hit.any():
                    break
                gone = np.zeros(rows.size, bool)
                gone[fresh[hit]] = True
                excluded += int(hit.sum())
                rows, emb, unit, checked = rows[~gone], emb[~gone], unit[~gone], checked[~gone]
                keep = greedy_dedupe(unit, target, threshold)
    else:
        keep = np.arange(min(target, rows.size))
    # Rows looked at: up to the last kept one when the target was met, else all of them.
    considered = int(keep[-1]) + 1 if keep.size == target else rows.size
    table = _take(table, rows[keep], None if emb is None else emb[keep])
    table = table.replace_schema_metadata(None)
    n = table.num_rows
    table = table.set_column(
        table.schema.get_field_index("label"), "label", pa.array(np.full(n, cls.index, np.int32))
    )
    table = table.append_column("rank", pa.array(np.arange(n, dtype=np.int32)))
    table = table.append_column("model", pa.array([model] * n, pa.string()))
    stats = {
        "label": cls.index,
        "wnid": cls.wnid,
        "name": cls.name,
        "target": target,
        "candidates": total,
        "claimed_elsewhere_or_duplicate": total - int(win.sum()),
        "near_duplicates": considered - n,
        "excluded_eval": excluded,
        "selected": n,
    }
    released = global_rows[rows[considered:]] if n == target else np.zeros(0, np.int64)
    report_progress(total)  # candidates looked at: the select bar moves class by class
    return table, stats, released


def shortfall_reason(s: dict) -> str:
    if s["candidates"] == 0:
        return "the curator found no candidates"
    reason = (
        f"pool ran out: {s['candidates']} candidates, {s['claimed_elsewhere_or_duplicate']} "
        f"claimed by another class or duplicates of another image, {s['near_duplicates']} near duplicates"
    )
    if s.get("excluded_eval"):
        reason += f", {s['excluded_eval']} near-duplicates of an evaluation set (select.exclude)"
    return reason


def select_all(
    classes: list[ImageNetClass],
    paths: list[Path],
    target: int,
    threshold: float,
    threads: int | None = None,
    exclusion: Exclusion | None = None,
) -> tuple[pa.Table, list[dict]]:
    from threadpoolctl import threadpool_limits

    claims = resolve_claims(paths)
    slices = class_slices(paths)
    done: dict[int, tuple[pa.Table, dict]] = {}
    full: set[int] = set()
    pending = list(classes)
    by_label = {c.index: c for c in classes}
    # Classes are independent within a round: one thread per reserved core, each with a
    # single-threaded BLAS (nested BLAS threads would oversubscribe the cores). Rounds go on
    # while images a full class did not need can move to a class with room.
    with threadpool_limits(1, "blas"), ThreadPoolExecutor(threads or os.cpu_count()) as pool:
        while pending:
            results = list(pool.map(lambda c: select_class(c, slices.get(c.index, []), claims, target, threshold, exclusion), pending))  # fmt: skip
            released = [np.zeros(0, np.int64)]
            for cls, (table, stats, rel) in zip(pending, results, strict=True):
                done[cls.index] = (table, stats)
                if stats["selected"] == target:
                    full.add(cls.index)
                released.append(rel)
            moved = claims.hand_on(np.concatenate(released), full)
            pending = [by_label[int(x)] for x in np.unique(claims.label[moved]) if int(x) in by_label]  # fmt: skip
    _read_unit_file_cached.cache_clear()
    _file_locks.clear()
    tables = [done[c.index][0] for c in classes]
    stats = [done[c.index][1] for c in classes]
    return pa.concat_tables(tables) if tables else pa.table({}), stats


def plan_shards(
    selected: pa.Table, wnids: dict[int, str], samples_per_shard: int, seed: int
) -> list[pa.Table]:
    """Keys <wnid>_<rank>, then a seeded permutation cut into shards of fixed size."""
    n = selected.num_rows
    labels = selected["label"].to_numpy()
    names = pa.array(np.array([wnids.get(i, "") for i in range(max(wnids) + 1)], dtype=object)[labels] if n else [], pa.string())  # fmt: skip
    ranks = pc.utf8_lpad(pc.cast(selected["rank"], pa.string()), 5, "0")
    selected = selected.append_column("key", pc.binary_join_element_wise(names, ranks, "_"))
    shuffled = _take(selected, np.random.default_rng(seed).permutation(n), None)
    return [shuffled.slice(i, samples_per_shard) for i in range(0, n, samples_per_shard)]


def shard_name(shift: str, i: int) -> str:
    return f"{shift}-{i:06d}.tar"


def write_plan(
    config, classes: list[ImageNetClass], units, work, threads: int | None = None,
    clip: tuple[str, str | None] | None = None, _state=None, _unit=None,
) -> dict:  # fmt: skip
    """The select unit: writes _work/plan/ (a parquet per shard, stats.json) as a whole.
    ``clip`` is the shift's CLIP model, which embeds the evaluation sets to exclude."""
    from .embed import unit_source

    paths = [unit_source(work, u) for u in units]
    exclusion = None
    if config.select.exclude:
        from .image_sets import exclusion_sets

        e, sel = config.embed, config.select
        held_out, hashes = exclusion_sets(sel.exclude, clip, e.device, e.batch_size, lambda _: None)  # fmt: skip
        exclusion = Exclusion.of(held_out, sel.exclude_cosine, hashes, sel.exclude_phash_distance, work.root)  # fmt: skip
    selected, stats = select_all(
        classes, paths, config.target_per_class, config.select.near_duplicate_cosine, threads,
        exclusion,
    )  # fmt: skip
    shards = plan_shards(
        selected, {c.index: c.wnid for c in classes}, config.shards.samples_per_shard, config.seed
    )
    tmp = work.root / f".plan.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, t in enumerate(shards):
        pq.write_table(t, tmp / f"{shard_name(config.shift, i)}.parquet")
    (tmp / "stats.json").write_text(json.dumps({"classes": stats}, indent=2, sort_keys=True))
    commit(tmp, work.plan)  # the plan folder appears whole or not at all
    return {"samples": selected.num_rows, "shards": len(shards)}
