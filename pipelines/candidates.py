"""Stage 1, candidates: one unit per class; the curator proposes scored candidates.

Each class's candidates land in _work/candidates/<index>.parquet (the unit's commit marker).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curators import Candidate, ImageNetClass, create_curator
from shards.atomic import atomic_path

SCHEMA = pa.schema(
    [
        ("source_id", pa.string()),
        ("score", pa.float64()),
        ("query_kind", pa.string()),
        ("query_value", pa.string()),
        ("source_dataset", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("license", pa.string()),
        ("sha256", pa.string()),
        ("duplicate_group", pa.string()),
        ("locator", pa.string()),
        ("seed", pa.int64()),
        ("prompt", pa.string()),
        ("embedding", pa.list_(pa.float32())),
    ]
)


def candidates_path(folder: Path, cls: ImageNetClass) -> Path:
    return folder / f"{cls.index:04d}.parquet"


def write_candidates(path: Path, cands: list[Candidate], model: dict) -> None:
    cols: dict[str, list] = {name: [] for name in SCHEMA.names}
    for c in cands:
        for name in SCHEMA.names:
            if name == "locator":
                cols[name].append(json.dumps(c.locator, sort_keys=True))
            elif name == "embedding":
                cols[name].append(
                    None if c.embedding is None else np.asarray(c.embedding, np.float32)
                )
            else:
                cols[name].append(getattr(c, name))
    table = pa.table(cols, schema=SCHEMA).replace_schema_metadata(
        {"model": json.dumps(model, sort_keys=True)}
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _setup(curator_name: str, params: Any):
    return create_curator(curator_name, params)


def _work(folder: Path, curator, cls: ImageNetClass) -> dict:
    cands = curator.candidates(cls)
    write_candidates(candidates_path(folder, cls), cands, curator.model)
    return {"label": cls.index, "samples": len(cands)}


def run_candidates(executor, config, classes: list[ImageNetClass], folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    todo = [c for c in classes if not candidates_path(folder, c).exists()]
    results = list(
        executor.map(
            "candidates",
            todo,
            partial(_work, folder),
            setup=partial(_setup, config.curator.name, config.curator.params),
            gpu=True,
        )
    )
    return {
        "units": len(classes),
        "run": len(todo),
        "candidates": sum(r["samples"] for r in results),
    }
