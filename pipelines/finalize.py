"""Stage 4, finalize: index.parquet, skipped.parquet, manifest.json and the dataset card."""

from __future__ import annotations

import json
import os
import platform
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards.atomic import atomic_path, atomic_write_bytes
from shards.card import dataset_card
from shards.manifest import EMBEDDINGS, FORMAT, INDEX, MANIFEST, read_manifest, write_json

from . import __version__
from .candidates import rejected_table, skipped_sources
from .materialize import ROW_SCHEMA
from .select import shortfall_reason


def finalize(
    shift_dir: Path, work, config, classes, run_facts: dict, clip: tuple[str, str | None] | None
) -> dict:
    """Write the shift's index, skips, manifest and card. A re-run that did no work (a user
    checking a finished shift) keeps the manifest of the run that did, adding itself to the
    run history. ``clip`` is the (model, weights) that made the embeddings: report needs it."""
    work.log_run(
        {"pid": os.getpid(), "started": run_facts["started"], "finished": run_facts["finished"],
         "units_run": {k: v.get("run", 0) for k, v in run_facts["stages"].items()}}
    )  # fmt: skip
    history = work.run_history()
    did_work = any(v.get("run") for v in run_facts["stages"].values())
    if not did_work and (shift_dir / MANIFEST).exists():
        manifest = read_manifest(shift_dir)
        if manifest.get("config_hash") == config.content_hash():
            manifest["run_history"] = history
            write_json(shift_dir / MANIFEST, manifest)
            return manifest
    row_files = sorted(work.shard_rows.glob("*.tar.parquet"))
    shards = []
    tables = []
    for f in row_files:
        t = pq.read_table(f, schema=ROW_SCHEMA)
        shards.append(json.loads(pq.read_schema(f).metadata[b"shard"]))
        tables.append(t)
    rows = pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()
    ok = rows.filter(pc.equal(rows["status"], "ok")).drop_columns(["status", "reason"])
    embeddings = write_embeddings(shift_dir, ok["embedding"])
    if embeddings and clip:
        embeddings["model"] = {"name": clip[0], "pretrained": clip[1]}
    ok = ok.drop_columns(["embedding"])
    skipped = rows.filter(pc.equal(rows["status"], "skipped"))
    with atomic_path(shift_dir / INDEX) as tmp:
        pq.write_table(ok, tmp)
    with atomic_path(shift_dir / "skipped.parquet") as tmp:
        pq.write_table(skipped.select(["key", "label", "wnid", "source_id", "url", "reason"]), tmp)

    stats = {s["label"]: s for s in json.loads((work.plan / "stats.json").read_text())["classes"]}
    kept = Counter(ok["wnid"].to_pylist())
    lost = Counter(skipped["wnid"].to_pylist())
    rejected = rejected_table(work.root)
    gave_up: dict[int, Counter] = {}
    for label, reason in zip(rejected["label"].to_pylist(), rejected["reason"].to_pylist(), strict=True):  # fmt: skip
        gave_up.setdefault(label, Counter())[reason] += 1
    per_class, shortfalls = [], []
    for c in classes:
        s = stats[c.index]
        entry = {
            "label": c.index, "wnid": c.wnid, "name": c.name, "target": config.target_per_class,
            "candidates": s["candidates"], "selected": s["selected"], "kept": kept[c.wnid],
            "skipped": lost[c.wnid], "rejected": sum(gave_up.get(c.index, {}).values()),
            "excluded_eval": s.get("excluded_eval", 0),
        }  # fmt: skip
        per_class.append(entry)
        if entry["kept"] < entry["target"]:
            reason = shortfall_reason(s)
            if entry["rejected"]:
                why, n = gave_up[c.index].most_common(1)[0]
                reason = f"{entry['rejected']} tried and rejected by the curator (most: {why}, {n}); {reason}"  # fmt: skip
            if entry["skipped"]:
                reason += f"; {entry['skipped']} skipped while writing"
            shortfalls.append(
                {**entry, "shortfall": entry["target"] - entry["kept"], "reason": reason}
            )
    manifest = {
        "format": FORMAT,
        "shift": config.shift,
        "curator": config.curator.name,
        "curator_facts": curator_facts(config, ok),
        "acquire": acquire_summary(work.acquired),
        "version": __version__,
        "config": config.to_dict(),
        "config_hash": config.content_hash(),
        "classes": len(classes),
        "target_per_class": config.target_per_class,
        "total_samples": ok.num_rows,
        "shards": shards,
        "class_counts": {c.wnid: kept[c.wnid] for c in classes},
        "per_class": per_class,
        "shortfalls": shortfalls,
        "skipped": {"count": skipped.num_rows, "by_reason": _reason_counts(skipped)},
        "sources_skipped": skipped_sources(work.root),
        "rejected": {"count": rejected.num_rows, "by_reason": _reason_counts(rejected)},
        "excluded_eval": {
            "count": sum(e["excluded_eval"] for e in per_class),
            "sets": config.select.exclude,
            "cosine": config.select.exclude_cosine,
        },  # fmt: skip
        "licenses": _licence_counts(ok["license"]),
        "replaced": replacement_counts(ok["generation"]),
        "embeddings": embeddings,
        "run": {**run_facts, "host": socket.gethostname(), "python": platform.python_version()},
        "run_history": history,
    }
    write_json(shift_dir / MANIFEST, manifest)
    atomic_write_bytes(shift_dir / "README.md", dataset_card(manifest).encode())
    return manifest


def write_embeddings(shift_dir: Path, column: pa.ChunkedArray) -> dict | None:
    """embeddings.npy: fp16 (samples, dim), row i the embedding of index.parquet's row i.
    None (and no file) when some sample has none (a curator without embeddings and no
    embed.model)."""
    column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if len(column) == 0 or column.null_count:
        (shift_dir / EMBEDDINGS).unlink(missing_ok=True)
        return None
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float16)
    matrix = values.reshape(len(column), -1)
    with atomic_path(shift_dir / EMBEDDINGS) as tmp, open(tmp, "wb") as f:
        np.save(f, matrix)
    return {
        "file": EMBEDDINGS,
        "rows": int(matrix.shape[0]),
        "dim": int(matrix.shape[1]),
        "dtype": "float16",
    }


def curator_facts(config, ok: pa.Table) -> dict:
    """What the curator says of its samples: the licence that holds for all of them (or
    none: per sample) and the model that scored or made them."""
    from curators import create_curator

    curator = create_curator(config.curator.name, config.curator.params)  # cheap: loads nothing
    model = json.loads(ok["model"][0].as_py()) if ok.num_rows else None
    return {"license": getattr(curator, "license", None), "model": model}


def replacement_counts(column: pa.ChunkedArray) -> dict | None:
    """Generated samples' quality control: how many kept samples replaced a try, and the tries
    replaced per failed check. None for a shift that generated nothing."""
    if column.null_count == len(column):
        return None
    samples = tries = 0
    by_check: Counter = Counter()
    made = column.drop_null()
    # Only the few samples that replaced a try are parsed (canonical JSON: sorted keys, ", ").
    remade = made.filter(pc.invert(pc.match_substring(made, '"replaced": []')))
    for text in remade.to_pylist():
        replaced = json.loads(text).get("replaced") or []
        samples += bool(replaced)
        tries += len(replaced)
        by_check.update(r.get("check", "other") for r in replaced)
    return {"samples": samples, "tries": tries, "by_check": dict(sorted(by_check.items()))}


def acquire_summary(folder: Path) -> dict | None:
    """URLs asked, fetched and failed (by error kind) over every acquire round."""
    files = sorted(folder.glob("*.parquet")) if folder.exists() else []
    if not files:
        return None
    t = pa.concat_tables([pq.read_table(f) for f in files])
    failed = t.filter(pc.not_equal(t["status"], "ok"))
    rounds = len({f.stem.split("-")[0] for f in files})
    kinds = Counter(e.split(":", 1)[0] for e in failed["error"].to_pylist())
    return {"urls": t.num_rows, "fetched": t.num_rows - failed.num_rows,
            "failed": failed.num_rows, "rounds": rounds, "failed_by_error": dict(kinds.most_common())}  # fmt: skip


def _licence_counts(column: pa.ChunkedArray) -> dict[str, int]:
    """Samples per licence, commonest first (ties in order of first appearance), counted
    by Arrow: a Python object per sample would cost seconds on a full-size shift."""
    counts = pc.value_counts(pc.fill_null(column, "unstated")).to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: -c["counts"])}


def _reason_counts(skipped: pa.Table) -> dict[str, int]:
    # Group by the reason's kind (text before the first ':'), not its per-sample detail.
    return dict(Counter(r.split(":", 1)[0] for r in skipped["reason"].to_pylist()).most_common())


def no_sample_reason(manifest: dict) -> str:
    """Why a shift kept nothing, from its shortfalls: the commonest reasons, counted."""
    reasons = Counter(s["reason"].split(":", 1)[0] for s in manifest["shortfalls"])
    n = len(manifest["per_class"])
    parts = [f"{reason} ({count} of {n} classes)" for reason, count in reasons.most_common(3)]
    return "; ".join(parts) + " (see manifest.json shortfalls)"


def summary_table(manifest: dict, limit: int = 40) -> str:
    """A per-class summary for the terminal: all classes when few, else the short ones."""
    rows = manifest["per_class"]
    short = [r for r in rows if r["kept"] < r["target"]]
    shown = rows if len(rows) <= limit else short[:limit]
    width = max([len(r["name"]) for r in shown] + [5])
    out = [f"{'class':<{width}}  wnid       target  kept  shortfall"]
    for r in shown:
        out.append(
            f"{r['name']:<{width}}  {r['wnid']}  {r['target']:>6}  {r['kept']:>4}  {r['target'] - r['kept']:>9}"
        )
    if len(shown) < len(rows):
        out.append(f"... {len(rows) - len(shown)} more classes (see manifest.json per_class)")
    total_target = sum(r["target"] for r in rows)
    out.append(
        f"total: {manifest['total_samples']} / {total_target} samples, "
        f"{len(short)} {'class' if len(short) == 1 else 'classes'} short, "
        f"{manifest['skipped']['count']} skipped, {len(manifest['shards'])} shards"
    )
    return "\n".join(out)
