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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curators import ImageNetClass
from shards.atomic import commit

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


def resolve_claims(paths: list[Path]) -> dict[Path, np.ndarray]:
    """Per unit file, a boolean mask of the rows that win their image's claim."""
    labels, scores, keys, sizes = [], [], [], []
    for path in paths:
        t = pq.ParquetFile(path).read(columns=["label", "source_id", "sha256", "duplicate_group", "score"])  # fmt: skip
        keys.append(pc.coalesce(t["duplicate_group"], t["sha256"], t["source_id"]))
        scores.append(t["score"].to_numpy())
        labels.append(t["label"].to_numpy())
        sizes.append(t.num_rows)
    if not sizes or sum(sizes) == 0:
        return {p: np.zeros(n, bool) for p, n in zip(paths, sizes, strict=True)}
    codes = pa.chunked_array([c for k in keys for c in k.chunks], pa.string()).combine_chunks()
    codes = pc.dictionary_encode(codes).indices.to_numpy()
    score = np.concatenate(scores)
    label = np.concatenate(labels)
    # Winner per image: highest score, ties to the lower class index.
    order = np.lexsort((label, -score, codes))
    first = np.ones(order.size, bool)
    first[1:] = codes[order[1:]] != codes[order[:-1]]
    win = np.zeros(order.size, bool)
    win[order[first]] = True
    return dict(zip(paths, np.split(win, np.cumsum(sizes)[:-1]), strict=True))


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


def _read_class(slices: list[ClassSlice]) -> tuple[pa.Table, str]:
    tables, model = [], "{}"
    for sl in slices:
        f = pq.ParquetFile(sl.path)
        model = (f.schema_arrow.metadata or {}).get(b"model", b"{}").decode()
        tables.append(f.read_row_group(sl.row_group).replace_schema_metadata(None))
    if not tables:
        from .candidates import candidate_schema

        return candidate_schema().empty_table(), model
    return pa.concat_tables(tables), model


def select_class(
    cls: ImageNetClass,
    slices: list[ClassSlice],
    wins: dict[Path, np.ndarray],
    target: int,
    threshold: float,
) -> tuple[pa.Table, dict]:
    table, model = _read_class(slices)
    win = (
        np.concatenate([wins[sl.path][sl.start : sl.start + sl.rows] for sl in slices])
        if slices
        else np.zeros(0, bool)
    )
    total = table.num_rows
    rows = np.flatnonzero(win)
    # Score order, ties by source id, so the choice never depends on file order.
    keys = table.select(["score", "source_id"]).take(pa.array(rows))
    rows = rows[
        pc.sort_indices(keys, [("score", "descending"), ("source_id", "ascending")]).to_numpy()
    ]
    col = table["embedding"].combine_chunks()
    if col.null_count == 0 and total:
        emb = col.flatten().to_numpy().reshape(total, -1)[rows].astype(np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # stored as fp16
        keep = greedy_dedupe(emb, target, threshold)
    else:
        keep = np.arange(min(target, rows.size))
    # Rows looked at: up to the last kept one when the target was met, else all of them.
    considered = int(keep[-1]) + 1 if keep.size == target else rows.size
    table = table.take(pa.array(rows[keep]))
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
        "selected": n,
    }
    return table, stats


def shortfall_reason(s: dict) -> str:
    if s["candidates"] == 0:
        return "the curator found no candidates"
    return (
        f"pool ran out: {s['candidates']} candidates, {s['claimed_elsewhere_or_duplicate']} "
        f"claimed by another class or duplicates of another image, {s['near_duplicates']} near duplicates"
    )


def select_all(
    classes: list[ImageNetClass],
    paths: list[Path],
    target: int,
    threshold: float,
    threads: int | None = None,
) -> tuple[pa.Table, list[dict]]:
    from threadpoolctl import threadpool_limits

    wins = resolve_claims(paths)
    slices = class_slices(paths)
    # Classes are independent once claims are settled: one thread per reserved core, each
    # with a single-threaded BLAS (nested BLAS threads would oversubscribe the cores).
    with threadpool_limits(1, "blas"), ThreadPoolExecutor(threads or os.cpu_count()) as pool:
        done = list(pool.map(lambda c: select_class(c, slices.get(c.index, []), wins, target, threshold), classes))  # fmt: skip
    tables = [t for t, _ in done]
    stats = [s for _, s in done]
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
    shuffled = selected.take(pa.array(np.random.default_rng(seed).permutation(n)))
    return [shuffled.slice(i, samples_per_shard) for i in range(0, n, samples_per_shard)]


def shard_name(shift: str, i: int) -> str:
    return f"{shift}-{i:06d}.tar"


def write_plan(
    config, classes: list[ImageNetClass], units, work, threads: int | None = None,
    _state=None, _unit=None,
) -> dict:  # fmt: skip
    """The select unit: writes _work/plan/ (a parquet per shard, stats.json) as a whole."""
    from .embed import unit_source

    paths = [unit_source(work, u) for u in units]
    selected, stats = select_all(
        classes, paths, config.target_per_class, config.select.near_duplicate_cosine, threads
    )
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
