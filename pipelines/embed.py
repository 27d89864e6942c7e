"""Stage embed: makes every candidate local and comparable before select.

A unit is a candidates file that needs it: URL candidates are swapped for the bytes the
acquire stage fetched (a blob locator and their sha256; a URL that was not fetched, because
it failed or was not needed, leaves the file), and candidates that came without an embedding
(generated, scanned, fetched) get one from the shift's CLIP model (config ``embed``), so
near-duplicate removal and the shift's embeddings work for every curator.

The output is _work/embedded/<unit>.parquet, the same schema, which select reads instead of
the candidates file. Bytes that do not decode keep no embedding (materialize records them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curators.base import Unit
from shards.images import BadImage, decode
from shards.sources import SourceError, read_source

from .candidates import candidates_path, footer_count, write_candidate_table


def embedded_path(folder: Path, unit: Unit) -> Path:
    return folder / f"{unit.id}.parquet"


def needs_localizing(path: Path, embed_model: str | None) -> bool:
    return footer_count(path, b"url_candidates") > 0 or bool(
        embed_model and footer_count(path, b"missing_embeddings") > 0
    )


def unit_source(work, unit: Unit) -> Path:
    """The candidates file select reads for a unit: the embedded one once it exists."""
    done = embedded_path(work.embedded, unit)
    return done if done.exists() else candidates_path(work.candidates, unit)


def resolve_urls(table: pa.Table, fetched: dict[str, dict]) -> pa.Table:
    """URL rows become blob rows where acquire fetched them; the others leave."""
    locators = table["locator"].to_pylist()
    sha = table["sha256"].to_pylist()
    keep = []
    for i, raw in enumerate(locators):
        loc = json.loads(raw)
        if loc.get("kind") != "url":
            keep.append(True)
            continue
        got = fetched.get(loc["url"], {})
        keep.append("locator" in got)
        if "locator" in got:
            locators[i] = json.dumps(got["locator"], sort_keys=True)
            sha[i] = got["sha256"]
    table = table.set_column(table.schema.get_field_index("locator"), "locator", pa.array(locators, pa.string()))  # fmt: skip
    table = table.set_column(table.schema.get_field_index("sha256"), "sha256", pa.array(sha, pa.string()))  # fmt: skip
    return table.filter(pa.array(keep, pa.bool_()))


def embed_missing(table: pa.Table, work_root: Path, encoder: Any) -> tuple[pa.Table, int]:
    col = table["embedding"].combine_chunks()
    values: list[Any] = [None if v is None else np.asarray(v, np.float16) for v in col.to_pylist()]
    todo = [i for i, v in enumerate(values) if v is None]
    locators = table["locator"].to_pylist()
    made = 0
    for start in range(0, len(todo), encoder.batch_size):
        rows, images = [], []
        for i in todo[start : start + encoder.batch_size]:
            try:
                images.append(decode(read_source(json.loads(locators[i]), work_root)))
            except (SourceError, BadImage):
                continue  # stays without an embedding; materialize records why
            rows.append(i)
        if images:
            for i, e in zip(rows, encoder.encode_images(images), strict=True):
                values[i] = np.asarray(e, np.float16)
                made += 1
    column = pa.array(values, table.schema.field("embedding").type)
    return table.set_column(table.schema.get_field_index("embedding"), "embedding", column), made


def embed_work(work, fetched_dir: Path, encoder: Any, unit: Unit) -> dict:
    """The embed unit: one candidates file made local and embedded."""
    from .acquire import fetched_locators

    path = candidates_path(work.candidates, unit)
    table = pq.read_table(path)
    before = table.num_rows
    if footer_count(path, b"url_candidates"):
        table = resolve_urls(table, fetched_locators(fetched_dir))
    made = 0
    if encoder is not None:
        table, made = embed_missing(table, work.root, encoder)
    meta = dict(table.schema.metadata or {})
    meta[b"url_candidates"] = b"0"
    meta[b"missing_embeddings"] = str(table["embedding"].null_count).encode()
    write_candidate_table(embedded_path(work.embedded, unit), table.replace_schema_metadata(meta))
    return {"unit": unit.id, "samples": made, "unfetched": before - table.num_rows}
