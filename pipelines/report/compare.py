"""Shifts side by side: one row per shift, from its manifest and report/metrics.json."""

from __future__ import annotations

from html import escape

COLUMNS = (
    "shift", "curator", "classes", "samples", "coverage", "LT@500", "short", "LS@5pct",
    "CLIPScore", "intra-cos", "dup-rate", "CMMD", "contam.", "skipped", "urls ok/asked", "remade",
)  # fmt: skip


def _num(v, fmt: str) -> str:
    return "-" if v is None or v != v else format(v, fmt)


def compare_rows(manifests: list[dict], metrics: list[dict | None]) -> list[tuple[str, ...]]:
    rows = []
    for man, met in zip(manifests, metrics, strict=True):
        met = met or {}
        c = met.get("classes") or {}
        acquire = man.get("acquire") or {}
        replaced = man.get("replaced")
        curator = man["curator"]["name"] if isinstance(man["curator"], dict) else str(man["curator"])  # fmt: skip
        per = man["per_class"]
        contamination = met.get("contamination")
        rows.append((
            man["shift"], curator, str(len(per)), str(man["total_samples"]),
            _num(c.get("coverage"), ".0%"), str(c.get("lt500", "-")),
            str(sum(r["kept"] < r["target"] for r in per)), _num(c.get("ls5pct"), ".3f"),
            _num((met.get("clipscore") or {}).get("mean"), ".1f"),
            _num((met.get("diversity") or {}).get("mean_intra_class_cosine"), ".3f"),
            _num((met.get("diversity") or {}).get("near_duplicate_rate"), ".3f"),
            _num((met.get("reference") or {}).get("cmmd"), ".3f"),
            str(contamination["samples"]) if contamination else "-",
            str(man["skipped"]["count"]),
            f"{acquire.get('fetched', 0)}/{acquire.get('urls', 0)}" if acquire else "-",
            str(replaced["samples"]) if replaced else "-",
        ))  # fmt: skip
    return rows


def compare_table(manifests: list[dict], metrics: list[dict | None]) -> str:
    """A plain-text table for the terminal: names left, numbers right."""
    rows = compare_rows(manifests, metrics)
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]

    def line(r: tuple) -> str:
        cells = zip(r, widths, strict=True)
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(cells))

    return "\n".join([line(COLUMNS), *map(line, rows)])


def compare_html(manifests: list[dict], metrics: list[dict | None], links: list[str]) -> str:
    """The same table as a page, each shift linking to its own report."""
    rows = compare_rows(manifests, metrics)
    head = "".join(f"<th>{escape(h)}</th>" for h in COLUMNS)
    body = ""
    for row, link in zip(rows, links, strict=True):
        cells = [f'<a href="{escape(link)}">{escape(row[0])}</a>', *map(escape, row[1:])]
        body += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    style = "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"  # fmt: skip
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>shifts compared</title>'
        f"<style>{style}</style></head><body><h1>Shifts compared</h1>"
        f"<table><tr>{head}</tr>{body}</table>"
        "<p>coverage: classes with at least one image; LT@500: classes under 500 images; "
        "LS@5pct: share of images in the top 5% of classes (SELECT's statistics); CMMD: "
        "distance to the reference set (x1000); contam.: samples near-duplicating an "
        "evaluation image.</p></body></html>\n"
    )
