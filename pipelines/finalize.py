"""Stage 4, finalize: index.parquet, skipped.parquet, manifest.json and the dataset card."""

from __future__ import annotations

import json
import os
import platform
import socket
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards.atomic import atomic_path, atomic_write_bytes
from shards.card import dataset_card
from shards.manifest import FORMAT, INDEX, MANIFEST, read_manifest, write_json

from . import __version__
from .materialize import ROW_SCHEMA
from .select import shortfall_reason


def finalize(shift_dir: Path, work, config, classes, run_facts: dict) -> dict:
    """Write the shift's index, skips, manifest and card. A re-run that did no work (a user
    checking a finished shift) keeps the manifest of the run that did, adding itself to the
    run history."""
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
    skipped = rows.filter(pc.equal(rows["status"], "skipped"))
    with atomic_path(shift_dir / INDEX) as tmp:
        pq.write_table(ok, tmp)
    with atomic_path(shift_dir / "skipped.parquet") as tmp:
        pq.write_table(skipped.select(["key", "label", "wnid", "source_id", "url", "reason"]), tmp)

    stats = {s["label"]: s for s in json.loads((work.plan / "stats.json").read_text())["classes"]}
    kept = Counter(ok["wnid"].to_pylist())
    lost = Counter(skipped["wnid"].to_pylist())
    per_class, shortfalls = [], []
    for c in classes:
        s = stats[c.index]
        entry = {
            "label": c.index, "wnid": c.wnid, "name": c.name, "target": config.target_per_class,
            "candidates": s["candidates"], "selected": s["selected"], "kept": kept[c.wnid],
            "skipped": lost[c.wnid],
        }  # fmt: skip
        per_class.append(entry)
        if entry["kept"] < entry["target"]:
            reason = shortfall_reason(s)
            if entry["skipped"]:
                reason += f"; {entry['skipped']} skipped while writing"
            shortfalls.append(
                {**entry, "shortfall": entry["target"] - entry["kept"], "reason": reason}
            )
    manifest = {
        "format": FORMAT,
        "shift": config.shift,
        "curator": config.curator.name,
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
        "run": {**run_facts, "host": socket.gethostname(), "python": platform.python_version()},
        "run_history": history,
    }
    write_json(shift_dir / MANIFEST, manifest)
    atomic_write_bytes(shift_dir / "README.md", dataset_card(manifest).encode())
    return manifest


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
