"""The dataset card (README.md with a Hugging Face YAML header) of a finished shift."""

from __future__ import annotations

import re


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):  # fmt: skip
        if n < limit:
            return name
    return "1M<n<10M"


def _license_id(manifest: dict) -> str:
    """The curator's licence when it is a plain identifier (cc0-1.0, cc-by-4.0), else 'other'."""
    text = ((manifest.get("curator_facts") or {}).get("license") or "").strip().lower()
    return text if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", text) else "other"


def _licence_line(manifest: dict) -> str:
    licence = (manifest.get("curator_facts") or {}).get("license")
    if licence:
        return f"Licence of every sample, as the curator states it: {licence}."
    counts = manifest.get("licenses") or {}
    line = "Licences are those of the sources, per sample in `license` where the source states one."
    if counts:
        line += " Samples per licence: " + ", ".join(f"{k} {n}" for k, n in counts.items()) + "."
    return line


def _model_line(manifest: dict) -> str:
    model = (manifest.get("curator_facts") or {}).get("model") or {}
    if not model.get("name"):
        return ""
    return f"Candidates were scored or made by `{model['name']}` (weights: {model.get('weights')})."


def _replaced_line(manifest: dict) -> str:
    replaced = manifest.get("replaced")
    if not replaced:
        return ""
    checks = ", ".join(f"{k} {n}" for k, n in replaced["by_check"].items()) or "none"
    return (
        f"Generated samples: {replaced['samples']} replaced an output that failed quality "
        f"control ({replaced['tries']} tries replaced; by check: {checks}); each sample's "
        "`generation.replaced` lists the seeds it replaced and why."
    )


def dataset_card(manifest: dict) -> str:
    shift = manifest["shift"]
    shortfalls = manifest["shortfalls"]
    lines = [
        "---",
        f"license: {_license_id(manifest)}",
        "task_categories:",
        "- image-classification",
        "size_categories:",
        f"- {_size_category(manifest['total_samples'])}",
        f"pretty_name: {shift}",
        "tags:",
        "- imagenet",
        "- imagenetpp",
        "- webdataset",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: shards/*.tar",
        "---",
        "",
        f"# {shift}",
        "",
        f"An ImageNet-1k training-data shift made by the `{manifest['curator']}` curator of "
        f"imagenetpp {manifest['version']} (config hash `{manifest['config_hash']}`).",
        "",
        f"- samples: {manifest['total_samples']} in {len(manifest['shards'])} webdataset shards",
        f"- classes: {manifest['classes']} requested, target {manifest['target_per_class']} per class",
        f"- classes short of the target: {len(shortfalls)}",
        f"- samples skipped while writing (undecodable or unreachable): {manifest['skipped']['count']}",
        "",
        "Each sample is `<key>.jpg`, `<key>.cls` (ImageNet-1k index), `<key>.json` (provenance:",
        "source, query, score, model, sha256, size, licence) and `<key>.txt` where a caption exists.",
        "`index.parquet` has one row per sample; `manifest.json` has the resolved config, shard",
        "checksums, per-class counts and shortfalls.",
        "",
        _licence_line(manifest),
        _model_line(manifest),
        _replaced_line(manifest),
        "",
    ]
    if shortfalls:
        lines += [
            "## Shortfalls",
            "",
            "| class | wnid | kept | target | why |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {s['name']} | {s['wnid']} | {s['kept']} | {s['target']} | {s['reason']} |"
            for s in shortfalls
        ]
        lines.append("")
    return "\n".join(lines)
