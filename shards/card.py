"""The dataset card (README.md with a Hugging Face YAML header) of a finished shift."""

from __future__ import annotations

import re


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):  # fmt: skip
        if n < limit:
            return name
    return "1M<n<10M"


# The identifiers the Hub accepts in a card's `license` (huggingface.co/docs/hub/repositories-licenses);
# anything else is `other`, named by `license_name`.
HUB_LICENSES = frozenset(
    """
    apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause
    bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0
    cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
    cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0
    cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1
    eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research
    intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openrail++ osl-3.0
    postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 llama3
    llama3.1 llama3.2 llama3.3 gemma unknown other
""".split()
)


def _stated_licence(manifest: dict) -> str | None:
    """The one licence of every sample, lower-cased, or None when they differ or say none: the
    curator's (first word: "CC0-1.0 (synthetic demo)"), else the one every sample states."""
    text = ((manifest.get("curator_facts") or {}).get("license") or "").strip()
    if not text:
        counts = manifest.get("licenses") or {}
        stated = [k for k in counts if k != "unstated"]
        text = stated[0].strip() if len(stated) == 1 and len(counts) == 1 else ""
    return text.split(" ")[0].lower() or None


def license_header(manifest: dict) -> list[str]:
    """`license:` as the Hub accepts it (it refuses a card with an identifier it does not
    know); another licence is `other`, with `license_name` and, for Creative Commons and
    the public-domain mark, `license_link`."""
    stated = _stated_licence(manifest)
    if stated in HUB_LICENSES:
        return [f"license: {stated}"]
    name = re.sub(r"[^a-z0-9.+-]+", "-", stated).strip("-") if stated else ""
    lines = ["license: other", f"license_name: {name or 'mixed'}"]
    if m := re.fullmatch(r"cc-(by(?:-nc)?(?:-nd|-sa)?)-(\d\.\d)", name):
        lines.append(f"license_link: https://creativecommons.org/licenses/{m[1]}/{m[2]}/")
    elif name in ("pdm", "pdm-1.0"):
        lines.append("license_link: https://creativecommons.org/publicdomain/mark/1.0/")
    return lines


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
        "`generation.replaced` lists the seeds it replaced and why (JSON text)."
    )


PROVENANCE = (
    ("key, label, wnid, class_name", "the sample's key (`<wnid>_<rank>`), ImageNet-1k index, WordNet id and class name"),
    ("shift, curator, config_hash, version", "which shift, curator, resolved config and imagenetpp version made it"),
    ("source {dataset, id, url, caption, creator, landing_page}", "where the pixels came from (\"\" where the source says nothing)"),
    ("query {kind, value}", "what found or made it: an exemplar image, a text, a lemma, a prompt, a label"),
    ("score", "the curator's confidence or similarity (comparable within one curator)"),
    ("model {name, weights}", "the model that scored or made it, weights by content hash"),
    ("seed, prompt, generation", "for generated samples: the seed, prompt and how it was made"),
    ("sha256, width, height", "of the stored JPEG bytes"),
    ("license", "where the source states one (otherwise \"\")"),
)  # fmt: skip


def _metrics_lines(metrics: dict) -> list[str]:
    c = metrics["classes"]
    rows = [
        ("classes covered (at least one image)", f"{c['covered']} / {c['classes']}"),
        ("classes under 500 images (LT@500)", str(c["lt500"])),
        ("share of images in the top 5% of classes (LS@5pct)", f"{c['ls5pct']:.3f}"),
        ("images per class: min / median / max", f"{c['min']} / {c['median']:g} / {c['max']}"),
    ]
    if metrics.get("clipscore"):
        rows.append(("CLIPScore against the class prompt (mean)", f"{metrics['clipscore']['mean']:.2f}"))  # fmt: skip
    if metrics.get("diversity"):
        d = metrics["diversity"]
        rows.append(("mean intra-class cosine similarity", f"{d['mean_intra_class_cosine']:.3f}"))
        rows.append((f"near-duplicate rate (cosine >= {d['near_duplicate_cosine']})", f"{d['near_duplicate_rate']:.3f}"))  # fmt: skip
    if metrics.get("reference"):
        r = metrics["reference"]
        rows.append((f"CMMD to `{r['name']}` ({r['images']} images)", f"{r['cmmd']:.3f}"))
    if metrics.get("contamination"):
        for e in metrics["contamination"]["sets"]:
            rows.append((f"samples near-duplicating `{e['name']}` ({e['images']} images)", str(e["samples"])))  # fmt: skip
    out = ["## Metrics", "", "From `report/metrics.json` (`report/index.html` has the plots).", "",
           "| metric | value |", "|---|---|"]  # fmt: skip
    return out + [f"| {k} | {v} |" for k, v in rows] + [""]


def _curation_lines(manifest: dict) -> list[str]:
    import json

    config = dict(manifest.get("config") or {})
    config.pop("run", None)
    params = (config.get("curator") or {}).get("params") or {}
    select = config.get("select") or {}
    lines = [
        "## How it was curated",
        "",
        f"- curator: `{manifest['curator']}`",
        f"- near-duplicate threshold within the shift (CLIP cosine): {select.get('near_duplicate_cosine')}",  # fmt: skip
    ]
    if select.get("exclude"):
        lines.append(f"- evaluation sets kept out (cosine >= {select.get('exclude_cosine')}): {', '.join(select['exclude'])}")  # fmt: skip
    embeddings = manifest.get("embeddings") or {}
    if embeddings.get("model"):
        lines.append(f"- CLIP model of `embeddings.npy` ({embeddings['dim']}-d, fp16, row-aligned with `index.parquet`): `{embeddings['model']['name']}`")  # fmt: skip
    for key in ("min_similarity", "k_per_query", "queries", "mode", "steps", "guidance", "strength", "scheduler"):  # fmt: skip
        if params.get(key) is not None:
            lines.append(f"- `{key}`: {params[key]}")
    lines += ["", "<details><summary>Resolved config</summary>", "", "```json",
              json.dumps(config, indent=2, sort_keys=True, default=str), "```", "", "</details>", ""]  # fmt: skip
    return lines


def _class_lines(manifest: dict) -> list[str]:
    rows = manifest["per_class"]
    out = ["<details><summary>Images per class</summary>", "", "| class | wnid | images | target |", "|---|---|---|---|"]  # fmt: skip
    out += [f"| {r['name']} | {r['wnid']} | {r['kept']} | {r['target']} |" for r in rows]
    return out + ["", "</details>", ""]


def dataset_card(
    manifest: dict,
    metrics: dict | None = None,
    shards: str = "shards/*.tar",
    repo_id: str | None = None,
) -> str:
    """The card: Hub YAML header (with the data_files pattern `datasets.load_dataset` uses),
    what the shift is, how it was made, its metrics (when reported) and its provenance."""
    shift = manifest["shift"]
    shortfalls = manifest["shortfalls"]
    lines = [
        "---",
        *license_header(manifest),
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
        f"    path: {shards}",
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
        "## Load it",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("{repo_id or "NAMESPACE/NAME"}", split="train")  # webdataset: jpg, cls, json (, txt)',
        "```",
        "",
        "or stream the tars with `webdataset`.",
        "",
    ]
    if metrics and metrics.get("classes"):
        lines += _metrics_lines(metrics)
    lines += _curation_lines(manifest)
    lines += ["## Provenance fields (`<key>.json`)", "", "| field | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in PROVENANCE] + [""]
    lines += _class_lines(manifest)
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
