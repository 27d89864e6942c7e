"""Stage 2, select: per-class balancing of all candidates, then a seeded plan of shards.

1. Claims: every distinct image (by sha256 of its bytes, else its source id) goes to the one
   class where it scores best, so exact duplicates and multiply-claimed items count once.
2. Per class, in score order, drop near duplicates (cosine above a threshold to an already
   kept candidate) and keep up to the target. A class that falls short says why.
3. Keys are <wnid>_<rank>; a seeded permutation spreads classes across shards.

Only scalar columns of all classes are held at once; embeddings are read one class at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curators import ImageNetClass

from .candidates import read_model

_BLOCK = 1024


@dataclass(frozen=True)
class ClassFile:
    cls: ImageNetClass
    path: Path


def resolve_claims(files: list[ClassFile]) -> list[np.ndarray]:
    """Per file, a boolean mask of the rows that win their image's claim."""
    labels, scores, keys, sizes = [], [], [], []
    for f in files:
        t = pq.read_table(f.path, columns=["source_id", "sha256", "score"])
        keys.append(pc.coalesce(t["sha256"], t["source_id"]))
        scores.append(t["score"].to_numpy())
        labels.append(np.full(t.num_rows, f.cls.index, np.int32))
        sizes.append(t.num_rows)
    if not sizes or sum(sizes) == 0:
        return [np.zeros(n, bool) for n in sizes]
    codes = pa.chunked_array([c for k in keys for c in k.chunks], pa.string())
    codes = pc.dictionary_encode(codes).combine_chunks().indices.to_numpy()
    score = np.concatenate(scores)
    label = np.concatenate(labels)
    # Winner per image: highest score, ties to the lower class index.
    order = np.lexsort((label, -score, codes))
    first = np.ones(order.size, bool)
    first[1:] = codes[order[1:]] != codes[order[:-1]]
    win = np.zeros(order.size, bool)
    win[order[first]] = True
    return np.split(win, np.cumsum(sizes)[:-1])


def greedy_dedupe(emb: np.ndarray, target: int, threshold: float) -> np.ndarray:
    """Indices (into score-ordered rows) kept: skip a row too similar to an already kept one."""
    if threshold >= 1.0 or emb.size == 0:
        return np.arange(min(target, len(emb)))
    kept: list[int] = []
    kept_emb = np.zeros((0, emb.shape[1]), np.float32)
    for start in range(0, len(emb), _BLOCK):
        block = emb[start : start + _BLOCK]
        near_kept = (block @ kept_emb.T).max(axis=1, initial=-1.0) >= threshold
        inner = block @ block.T >= threshold
        # Only rows with an earlier near-duplicate inside the block need the sequential walk.
        inner = np.triu(inner, k=1).T  # inner[i, j]: j < i and near
        kept_in_block: list[int] = []
        for i in range(len(block)):
            if near_kept[i]:
                continue
            if kept_in_block and inner[i, kept_in_block].any():
                continue
            kept_in_block.append(i)
            if len(kept) + len(kept_in_block) == target:
                break
        kept.extend(start + i for i in kept_in_block)
        if len(kept) >= target:
            break
        kept_emb = np.concatenate([kept_emb, block[kept_in_block]])
    return np.asarray(kept[:target], dtype=np.int64)


def select_class(
    f: ClassFile, win: np.ndarray, target: int, threshold: float
) -> tuple[pa.Table, dict]:
    table = pq.read_table(f.path)
    total = table.num_rows
    table = table.filter(pa.array(win))
    claimed = table.num_rows
    # Score order, ties by source id, so the choice never depends on file order.
    order = pc.sort_indices(table, [("score", "descending"), ("source_id", "ascending")])
    table = table.take(order)
    col = table["embedding"]
    if col.null_count == 0 and table.num_rows:
        flat = col.combine_chunks()
        emb = flat.values.to_numpy().reshape(table.num_rows, -1)
        keep = greedy_dedupe(emb, target, threshold)
    else:
        keep = np.arange(min(target, table.num_rows))
    # Rows looked at: up to the last kept one when the target was met, else all of them.
    considered = int(keep[-1]) + 1 if keep.size == target else table.num_rows
    near = considered - keep.size
    table = table.take(pa.array(keep)).drop_columns(["embedding"])
    model = read_model(f.path)
    n = table.num_rows
    table = table.append_column("label", pa.array(np.full(n, f.cls.index, np.int32)))
    table = table.append_column("rank", pa.array(np.arange(n, dtype=np.int32)))
    table = table.append_column(
        "model", pa.array([json.dumps(model, sort_keys=True)] * n, pa.string())
    )
    stats = {
        "label": f.cls.index,
        "wnid": f.cls.wnid,
        "name": f.cls.name,
        "target": target,
        "candidates": total,
        "claimed_elsewhere_or_duplicate": total - claimed,
        "near_duplicates": near,
        "selected": n,
    }
    return table, stats


def shortfall_reason(s: dict) -> str:
    if s["candidates"] == 0:
        return "the curator found no candidates"
    return (
        f"pool ran out: {s['candidates']} candidates, {s['claimed_elsewhere_or_duplicate']} "
        f"claimed by another class or exact duplicates, {s['near_duplicates']} near duplicates"
    )


def select_all(
    files: list[ClassFile], target: int, threshold: float
) -> tuple[pa.Table, list[dict]]:
    wins = resolve_claims(files)
    tables, stats = [], []
    for f, win in zip(files, wins, strict=True):
        t, s = select_class(f, win, target, threshold)
        tables.append(t)
        stats.append(s)
    return pa.concat_tables(tables) if tables else pa.table({}), stats


def plan_shards(
    selected: pa.Table, wnids: dict[int, str], samples_per_shard: int, seed: int
) -> list[pa.Table]:
    """Keys <wnid>_<rank>, then a seeded permutation cut into shards of fixed size."""
    n = selected.num_rows
    keys = [f"{wnids[lab]}_{r:05d}" for lab, r in zip(selected["label"].to_pylist(), selected["rank"].to_pylist(), strict=True)]  # fmt: skip
    selected = selected.append_column("key", pa.array(keys, pa.string()))
    order = np.random.default_rng(seed).permutation(n)
    return [
        selected.take(pa.array(order[i : i + samples_per_shard]))
        for i in range(0, n, samples_per_shard)
    ]


def shard_name(shift: str, i: int) -> str:
    return f"{shift}-{i:06d}.tar"


def run_select(config, classes: list[ImageNetClass], work) -> dict:
    """Writes _work/plan/ (one parquet per shard, stats.json) atomically as a whole."""
    if (work.plan / "stats.json").exists():
        return {"units": 1, "run": 0}
    from .candidates import candidates_path

    files = [ClassFile(c, candidates_path(work.candidates, c)) for c in classes]
    selected, stats = select_all(
        files, config.target_per_class, config.select.near_duplicate_cosine
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
    shutil.rmtree(work.plan, ignore_errors=True)  # a stale, uncommitted plan of a killed run
    os.replace(tmp, work.plan)
    return {"units": 1, "run": 1, "selected": selected.num_rows, "shards": len(shards)}
