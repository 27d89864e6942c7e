"""Stage 3, materialize: one unit per shard. Fetch each planned sample's bytes, re-encode,
write the tar. A sample that cannot be fetched or decoded is skipped with its reason.

Commit order: the tar is renamed into place, then _work/shard_rows/<shard>.parquet (the
unit's marker, holding the index rows and the skipped rows). A kill between the two only
means the tar is written again, to the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shards.atomic import atomic_path
from shards.images import BadImage, reencode
from shards.manifest import dumps_canonical
from shards.sources import SourceError, read_source
from shards.writer import ShardWriter

from . import __version__
from .executor import report_progress

ROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("position", pa.int32()),
        ("label", pa.int32()),
        ("wnid", pa.string()),
        ("class_name", pa.string()),
        ("curator", pa.string()),
        ("score", pa.float64()),
        ("source_id", pa.string()),
        ("source_dataset", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("license", pa.string()),
        ("creator", pa.string()),
        ("landing_page", pa.string()),
        ("query_kind", pa.string()),
        ("query_value", pa.string()),
        ("model", pa.string()),
        ("seed", pa.int64()),
        ("prompt", pa.string()),
        ("generation", pa.string()),  # JSON: how a generated sample was made (None otherwise)
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("embedding", pa.list_(pa.float16())),  # the shift model's, for report and checks
        ("status", pa.string()),  # ok | skipped
        ("reason", pa.string()),
    ]
)


@dataclass(frozen=True)
class SampleContext:
    """What every sample of a shift shares."""

    shift: str
    curator: str
    config_hash: str
    class_names: dict[int, tuple[str, str]]  # label -> (wnid, name)
    max_side: int
    jpeg_quality: int
    work_root: Path  # blob locators are relative to it


def sample_metadata(ctx: SampleContext, row: dict, sha256: str, width: int, height: int) -> dict:
    """A sample's JSON. Every key keeps one type across a shift, because loaders that infer a
    schema from a shard's first samples (Hugging Face ``datasets`` reads five) type a field
    that is null there as null and then fail on the first sample that has a value: text a
    sample lacks is "" (index.parquet, typed, keeps the nulls)."""
    wnid, name = ctx.class_names[row["label"]]
    meta = {
        "key": row["key"],
        "label": row["label"],
        "wnid": wnid,
        "class_name": name,
        "shift": ctx.shift,
        "curator": ctx.curator,
        "source": {
            "dataset": row["source_dataset"],
            "id": row["source_id"],
            "url": _text(row["url"]),
            "caption": _text(row["caption"]),
            "creator": _text(row.get("creator")),
            "landing_page": _text(row.get("landing_page")),
        },
        "query": {"kind": row["query_kind"], "value": _text(row["query_value"])},
        "score": row["score"],
        "model": json.loads(row["model"]),
        "seed": row["seed"],
        "prompt": _text(row["prompt"]),
        "sha256": sha256,
        "width": width,
        "height": height,
        "license": _text(row["license"]),
        "config_hash": ctx.config_hash,
        "version": __version__,
    }
    if row.get("generation"):  # only generated samples carry it: others' bytes stay as they were
        meta["generation"] = _lists_as_text(json.loads(row["generation"]))
    return meta


def _text(value: str | None) -> str:
    return "" if value is None else value


def _lists_as_text(record: dict) -> dict:
    """A curator's free-form record with its lists as JSON text: a list empty in a shard's first
    samples would be typed as a list of nulls (see sample_metadata)."""
    return {k: dumps_canonical(v).decode() if isinstance(v, list) else v for k, v in record.items()}


def write_shard(ctx: SampleContext, plan_file: Path, shard_path: Path, rows_path: Path) -> dict:
    plan = pq.read_table(plan_file).to_pylist()
    out_rows = []
    with ShardWriter(shard_path) as writer:
        for row in plan:
            wnid, name = ctx.class_names[row["label"]]
            base = {k: row.get(k) for k in ROW_SCHEMA.names if k in row}
            base.update(shard=shard_path.name, wnid=wnid, class_name=name, curator=ctx.curator)
            try:
                data = read_source(json.loads(row["locator"]), ctx.work_root)
                img = reencode(data, ctx.max_side, ctx.jpeg_quality)
            except (SourceError, BadImage) as e:
                reason = f"{type(e).__name__}: {e}"[:500]
                out_rows.append({**base, "status": "skipped", "reason": reason})
                continue
            sha = hashlib.sha256(img.data).hexdigest()
            meta = sample_metadata(ctx, row, sha, img.width, img.height)
            files = {
                "jpg": img.data,
                "cls": str(row["label"]).encode(),
                "json": dumps_canonical(meta),
            }
            if row["caption"]:
                files["txt"] = row["caption"].encode()
            out_rows.append(
                {**base, "position": writer.samples, "sha256": sha, "width": img.width,
                 "height": img.height, "status": "ok", "reason": None}
            )  # fmt: skip
            writer.write(row["key"], files)
            report_progress(1)
        info = writer.close()
    table = pa.Table.from_pylist(out_rows, schema=ROW_SCHEMA).replace_schema_metadata(
        {"shard": json.dumps({"name": info.name, "sha256": info.sha256, "samples": info.samples, "bytes": info.bytes})}
    )  # fmt: skip
    with atomic_path(rows_path) as tmp:
        pq.write_table(table, tmp)
    return {"shard": info.name, "samples": info.samples, "skipped": len(plan) - info.samples}


def shard_work(
    ctx: SampleContext, shards_dir: Path, rows_dir: Path, _state, plan_file: Path
) -> dict:
    """The materialize unit: one planned shard."""
    name = plan_file.name.removesuffix(".parquet")
    return write_shard(ctx, plan_file, shards_dir / name, rows_dir / f"{name}.parquet")
