"""What a person looks at: PNG plots, a contact sheet, pair thumbnails and a static index.html
(relative links only, so the folder can be copied, published or opened from disk)."""

from __future__ import annotations

import io
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

THUMB = 128


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    # No timestamp in the PNG: the same shift gives the same report bytes.
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)


def plot_class_counts(path: Path, metrics: dict, per_class: list[dict]) -> None:
    plt = _pyplot()
    counts = sorted((c["kept"] for c in per_class), reverse=True)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    # One filled step outline, not a bar per class: 1000 bar patches take seconds to draw.
    ax.stairs(counts, np.arange(len(counts) + 1) - 0.5, fill=True, color="#4c72b0")
    ax.axhline(metrics["classes"]["target"], color="#55a868", lw=1, label="target")
    if max(counts, default=0) >= 500 or metrics["classes"]["target"] >= 500:
        ax.axhline(500, color="#c44e52", lw=1, ls="--", label="LT@500")
    ax.set_xlabel("classes, most images first")
    ax.set_ylabel("images")
    ax.set_title(f"{metrics['shift']}: images per class")
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)


def plot_clipscore(path: Path, metrics: dict) -> None:
    plt = _pyplot()
    counts = np.asarray(metrics["clipscore"]["histogram"]["counts"])
    edges = np.linspace(0.0, 100.0, len(counts) + 1)
    nz = np.flatnonzero(counts)
    lo, hi = (edges[nz[0]], edges[nz[-1] + 1]) if len(nz) else (0.0, 100.0)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.stairs(counts, edges, fill=True, color="#8172b3")
    ax.set_xlim(max(0.0, lo - 2), min(100.0, hi + 2))
    ax.set_xlabel(f"CLIPScore against '{metrics['clipscore']['prompt']}'")
    ax.set_ylabel("images")
    ax.set_title(f"{metrics['shift']}: image-text alignment")
    _save(fig, path)


def plot_diversity(path: Path, metrics: dict, classes: dict[int, dict]) -> None:
    plt = _pyplot()
    values = [v["intra_cosine"] for v in classes.values() if v["intra_cosine"] == v["intra_cosine"]]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.hist(values, bins=30, color="#dd8452")
    ax.set_xlabel("mean cosine similarity within a class (lower: more diverse)")
    ax.set_ylabel("classes")
    ax.set_title(f"{metrics['shift']}: intra-class similarity")
    _save(fig, path)


def _thumb(data: bytes, side: int = THUMB) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = ImageOps.contain(img.convert("RGB"), (side, side))  # small images scale up too
    except Exception:  # noqa: BLE001  an undecodable sample shows as grey, not a crash
        img = Image.new("RGB", (side, side), (128, 128, 128))
    tile = Image.new("RGB", (side, side), (255, 255, 255))
    tile.paste(img, ((side - img.size[0]) // 2, (side - img.size[1]) // 2))
    return tile


def contact_sheet(path: Path, contact: dict[str, list[int]], names: dict[str, str],
                  images: dict[int, bytes], side: int = 96) -> None:  # fmt: skip
    """One row per chosen class: its name, then its best-ranked samples."""
    label_w = 180
    cols = max((len(r) for r in contact.values()), default=1) or 1
    sheet = Image.new("RGB", (label_w + cols * (side + 4), max(1, len(contact)) * (side + 4)), "white")  # fmt: skip
    draw = ImageDraw.Draw(sheet)
    for y, (wnid, rows) in enumerate(contact.items()):
        top = y * (side + 4)
        draw.text((4, top + side // 2 - 12), names.get(wnid, wnid)[:28], fill="black")
        draw.text((4, top + side // 2 + 2), f"{wnid} ({len(rows)})", fill="grey")
        for x, row in enumerate(rows):
            sheet.paste(_thumb(images.get(row, b""), side), (label_w + x * (side + 4), top))
    sheet.save(path, format="PNG", optimize=True)


def render_all(folder: Path, metrics: dict, classes: dict[int, dict], per_class: list[dict],
               contact: dict[str, list[int]], images: dict[int, bytes], pairs: list[dict],
               sets: list) -> dict[str, str]:  # fmt: skip
    """Every picture of the report; returns name -> file, relative to the report folder."""
    from .build import closest

    files = {"class_counts": "class_counts.png"}
    plot_class_counts(folder / files["class_counts"], metrics, per_class)
    if "clipscore" in metrics:
        files["clipscore"] = "clipscore.png"
        plot_clipscore(folder / files["clipscore"], metrics)
    if classes:
        files["diversity"] = "diversity.png"
        plot_diversity(folder / files["diversity"], metrics, classes)
    files["contact_sheet"] = "contact_sheet.png"
    names = {c["wnid"]: c["name"] for c in per_class}
    contact_sheet(folder / files["contact_sheet"], contact, names, images)
    if pairs:
        (folder / "pairs").mkdir()
        by_name = {s.images.name: s.images for s in sets}
        for i, p in enumerate(closest(pairs)):
            _thumb(images.get(p["row"], b"")).save(folder / "pairs" / f"{i:03d}-sample.jpg", quality=85)  # fmt: skip
            src = by_name[p["eval_set"]].root / p["eval_file"]
            _thumb(src.read_bytes()).save(folder / "pairs" / f"{i:03d}-eval.jpg", quality=85)
            p["thumbs"] = [f"pairs/{i:03d}-sample.jpg", f"pairs/{i:03d}-eval.jpg"]
    return files


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return escape(str(v))


def _table(head: list[str], rows: list[list]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _worst_table(label: str, key: str, rows: list[dict]) -> str:
    """One of the report's 'classes at the far end of a measure' tables."""
    return _table(["class", "wnid", label], [[w["name"], w["wnid"], w[key]] for w in rows])


def _img(src: str, alt: str) -> str:
    return f'<img src="{escape(src)}" alt="{escape(alt)}">'


def index_html(metrics: dict, per_class: list[dict], classes: dict[int, dict], pairs: list[dict]) -> str:  # fmt: skip
    from .build import closest

    c = metrics["classes"]
    files = metrics["files"]
    parts = [
        f"<h1>{escape(metrics['shift'])}</h1>",
        f"<p>{metrics['samples']} samples by the <code>{escape(str(metrics['curator']))}</code> "
        f"curator (config <code>{escape(str(metrics.get('config_hash')))}</code>).</p>",
        "<h2>Classes (SELECT's statistics)</h2>",
        _table(
            [
                "classes",
                "covered",
                "coverage",
                "LT@500",
                "short of target",
                "LS@5pct",
                "min",
                "median",
                "max",
            ],  # fmt: skip
            [
                [
                    c["classes"],
                    c["covered"],
                    c["coverage"],
                    c["lt500"],
                    c["short_of_target"],
                    c["ls5pct"],
                    c["min"],
                    c["median"],
                    c["max"],
                ]
            ],
        ),  # fmt: skip
        _img(files["class_counts"], "images per class, sorted"),
    ]
    if "clipscore" in metrics:
        s = metrics["clipscore"]
        parts += [
            "<h2>Image-text alignment (CLIPScore)</h2>",
            _table(["mean", "median", "5th percentile"], [[s["mean"], s["median"], s["p05"]]]),
            _img(files["clipscore"], "CLIPScore distribution"),
            "<h3>Lowest classes</h3>",
            _worst_table("CLIPScore", "clipscore", s["worst_classes"]),
        ]
    if "diversity" in metrics:
        d = metrics["diversity"]
        parts += [
            "<h2>Diversity</h2>",
            _table(
                [
                    "mean intra-class cosine",
                    f"near-duplicate rate (cosine >= {d['near_duplicate_cosine']})",
                ],  # fmt: skip
                [[d["mean_intra_class_cosine"], d["near_duplicate_rate"]]],
            ),
            _img(files["diversity"], "intra-class similarity per class"),
            "<h3>Least diverse classes</h3>",
            _worst_table("intra-class cosine", "intra_cosine", d["least_diverse"]),
        ]
    if "reference" in metrics:
        r = metrics["reference"]
        parts += [
            f"<h2>Distance to the reference set <code>{escape(r['name'])}</code></h2>",
            _table(
                ["reference images", "CMMD", "mean per-class CMMD", "classes compared"],
                [[r["images"], r["cmmd"], r["mean_class_cmmd"], r["classes_compared"]]],
            ),  # fmt: skip
            "<h3>Farthest classes</h3>",
            _worst_table("CMMD", "cmmd", r["farthest_classes"]),
        ]
    if "contamination" in metrics:
        t = metrics["contamination"]
        parts += [
            "<h2>Contamination: near-duplicates of evaluation sets</h2>",
            f"<p>{t['samples']} samples ({_fmt(100 * t['rate'], 2)}%) have a near-duplicate "
            f"(CLIP cosine &ge; {t['cosine']}"
            + (
                ""
                if t["phash_max_distance"] is None
                else f" or perceptual-hash distance &le; {t['phash_max_distance']}"
            )  # fmt: skip
            + "); "
            "all pairs are in <code>contamination.parquet</code>.</p>",
            _table(
                ["eval set", "images", "pairs", "samples", "by embedding", "by phash"],
                [
                    [
                        s["name"],
                        s["images"],
                        s["pairs"],
                        s["samples"],
                        s["by_embedding"],
                        s["by_phash"],
                    ]
                    for s in t["sets"]
                ],
            ),  # fmt: skip
        ]
        shown = [p for p in closest(pairs) if "thumbs" in p]
        if shown:
            cells = "".join(
                f"<figure>{_img(p['thumbs'][0], 'sample')}{_img(p['thumbs'][1], 'eval image')}"
                f"<figcaption>{escape(p['eval_set'])}: {escape(p['eval_file'])}<br>"
                f"cosine {_fmt(p['cosine'])}, phash {_fmt(p['phash_distance'])}</figcaption></figure>"
                for p in shown
            )
            parts.append(f'<div class="pairs">{cells}</div>')
    parts += ["<h2>Contact sheet</h2>", _img(files["contact_sheet"], "samples of chosen classes")]
    short = [r for r in per_class if r["kept"] < r["target"]]
    if short:
        parts += ["<h2>Classes short of the target</h2>",
                  _table(["class", "wnid", "kept", "target"], [[r["name"], r["wnid"], r["kept"], r["target"]] for r in short[:200]])]  # fmt: skip
    for note in metrics.get("notes", []):
        parts.append(f"<p><em>{escape(note)}</em></p>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}img{max-width:100%}.pairs{display:flex;flex-wrap:wrap;gap:8px}"
        "figure{margin:0;font-size:12px}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(metrics["shift"])} '
        f"report</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )
