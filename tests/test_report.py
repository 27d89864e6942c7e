"""imagenetpp report / compare: hand-computed metrics, a planted contamination found, the page
rendered by a real browser, evaluation sets excluded at curation, mistakes in one line."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.demo_world import world_dir
from pipelines.report import metrics as m
from shards.images import perceptual_hash
from shards.reader import iter_samples
from shards.writer import ShardWriter

from .conftest import DEMO_CONFIG, one_line_error, run_cli

COUNTS = [6, 4, 3, 2, 1, 0, 0, 0, 0, 0]  # ten classes, target 5
E = np.eye(4, dtype=np.float32)
EMBEDDINGS = [
    [E[0]] * 6,  # all alike: intra-class cosine 1, every one a near duplicate
    [E[0], E[1], E[2], E[3]],  # orthogonal: cosine 0
    [E[0], [0.6, 0.8, 0, 0], E[1]],  # pairs 0.6, 0.0, 0.8: mean 0.4667
    [E[0], [0.96, 0.28, 0, 0]],  # one pair at 0.96: both near duplicates
    [E[2]],  # alone: no pair
]


def _picture(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(pixels).resize((64, 64), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def hand_built_shift(root: Path) -> Path:
    """A finished shift folder with known counts and embeddings, written without curating."""
    from curators import label_set

    classes = [label_set()[i] for i in range(len(COUNTS))]
    shift = root / "hand"
    (shift / "shards").mkdir(parents=True)
    rows, vectors = [], []
    writer = ShardWriter(shift / "shards" / "hand-000000.tar")
    for c, n in zip(classes, COUNTS, strict=True):
        for rank in range(n):
            key = f"{c.wnid}_{rank:05d}"
            writer.write(key, {"jpg": _picture(len(rows)), "cls": str(c.index).encode()})
            rows.append({"key": key, "shard": "hand-000000.tar", "position": len(rows), "label": c.index, "wnid": c.wnid})  # fmt: skip
            vectors.append(EMBEDDINGS[c.index][rank])
    writer.close()
    pq.write_table(pa.Table.from_pylist(rows), shift / "index.parquet")
    np.save(shift / "embeddings.npy", np.asarray(vectors, np.float16))
    manifest = {
        "shift": "hand", "curator": "by-hand", "config_hash": "0" * 16, "target_per_class": 5,
        "total_samples": len(rows), "skipped": {"count": 0}, "classes": len(classes),
        "shards": [{"name": "hand-000000.tar", "samples": len(rows)}],
        "embeddings": {"file": "embeddings.npy", "rows": len(rows), "dim": 4, "dtype": "float16"},
        "per_class": [{"label": c.index, "wnid": c.wnid, "name": c.name, "target": 5, "kept": n}
                      for c, n in zip(classes, COUNTS, strict=True)],
    }  # fmt: skip
    (shift / "manifest.json").write_text(json.dumps(manifest))
    return shift


def test_metrics_equal_hand_computed_values(tmp_path):
    shift = hand_built_shift(tmp_path)
    # An evaluation set holding one of the shift's pictures, made smaller and re-encoded:
    # with no CLIP model named, the perceptual hash alone must find it.
    evalset = tmp_path / "eval"
    evalset.mkdir()
    leaked = Image.open(io.BytesIO(_picture(7))).resize((48, 48))
    leaked.save(evalset / "leaked.jpg", quality=70)
    for i in range(5):
        (evalset / f"other{i}.jpg").write_bytes(_picture(1000 + i))
    proc = run_cli("report", str(shift), "--eval-set", str(evalset), check=True)
    assert "CLIP measures skipped" in proc.stdout
    got = json.loads((shift / "report" / "metrics.json").read_text())

    c = got["classes"]
    assert (c["classes"], c["covered"], c["lt500"], c["short_of_target"]) == (10, 5, 10, 9)
    assert c["coverage"] == 0.5
    assert c["ls5pct"] == pytest.approx(6 / 16)  # top 5% of 10 classes: the largest one
    assert (c["min"], c["median"], c["max"], c["samples"]) == (0, 0.5, 6, 16)

    d = got["diversity"]
    assert d["mean_intra_class_cosine"] == pytest.approx((1 + 0 + 1.4 / 3 + 0.96) / 4, abs=2e-3)
    assert d["near_duplicate_rate"] == pytest.approx((6 + 2) / 16)
    assert d["least_diverse"][0]["wnid"] == "n01440764"  # class 0: all alike
    assert "clipscore" not in got and "reference" not in got

    t = got["contamination"]
    assert t["samples"] == 1 and t["sets"][0]["by_phash"] == 1 and t["sets"][0]["by_embedding"] == 0
    pairs = pq.read_table(shift / "report" / "contamination.parquet").to_pylist()
    # Sample 7 in write order is class 1's fourth (6 + 2): n01443537_00001.
    assert [(p["key"], p["eval_file"]) for p in pairs] == [("n01443537_00001", "leaked.jpg")]
    for name in ("index.html", "class_counts.png", "diversity.png", "contact_sheet.png"):
        assert (shift / "report" / name).stat().st_size > 0, name


def test_metric_functions_by_hand():
    x, y = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    # One point each: k(x,x) = k(y,y) = 1, k(x,y) = exp(-|x-y|^2 / (2 sigma^2)) = exp(-0.01).
    assert m.cmmd(x, y) == pytest.approx(1000 * (2 - 2 * math.exp(-2 / 200)))
    assert m.cmmd(x, x) == 0.0
    assert m.clip_scores(np.array([[0.6, 0.8], [-1.0, 0.0]]), np.array([1.0, 0.0])).tolist() == [60.0, 0.0]  # fmt: skip
    hist = np.zeros(200, np.int64)
    hist[100] = 3  # three scores in [50, 50.5)
    assert m.histogram_quantile(hist, m.CLIPSCORE_BINS, 0.5) == 50.25
    # The perceptual hash survives resizing and re-encoding; another picture is far away.
    a = _picture(1)
    smaller = io.BytesIO()
    Image.open(io.BytesIO(a)).resize((40, 40)).save(smaller, format="JPEG", quality=60)
    near = m.hamming(np.frombuffer(perceptual_hash(a), np.uint8), np.frombuffer(perceptual_hash(smaller.getvalue()), np.uint8))  # fmt: skip
    far = m.hamming(np.frombuffer(perceptual_hash(a), np.uint8), np.frombuffer(perceptual_hash(_picture(2)), np.uint8))  # fmt: skip
    assert near <= 4 < 16 <= far


@pytest.fixture(scope="module")
def planted(demo_shift, tmp_path_factory):
    """A copy of the demo shift, and an evaluation set with three of its samples planted in it
    (made smaller and re-encoded, as a copy found on the web would be) among new pictures."""
    root = tmp_path_factory.mktemp("planted")
    shift = root / "shift"
    shutil.copytree(demo_shift, shift, ignore=shutil.ignore_patterns("_work"))
    evalset = root / "eval"
    evalset.mkdir()
    planted = {}
    shard = sorted((shift / "shards").glob("*.tar"))[1]
    for key, files in list(iter_samples(shard))[:3]:
        name = f"val_{key}.JPEG"
        Image.open(io.BytesIO(files["jpg"])).resize((56, 56)).save(evalset / name, quality=75)
        planted[key] = name
    fresh = world_dir()
    for p in sorted((fresh / "evalset").rglob("ILSVRC_val_00[01].JPEG")):
        shutil.copy(p, evalset / f"{p.parent.name}_{p.name}")
    proc = run_cli(
        "report", str(shift), "--eval-set", str(evalset), "--reference", str(fresh / "exemplars"),
        "--contamination-cosine", "0.99", "--phash-max-distance", "2", check=True,
    )  # fmt: skip
    return shift, planted, proc


def test_report_finds_planted_near_duplicates_of_an_eval_set(planted):
    shift, planted_keys, proc = planted
    got = json.loads((shift / "report" / "metrics.json").read_text())
    pairs = pq.read_table(shift / "report" / "contamination.parquet").to_pylist()
    found = {(p["key"], p["eval_file"]) for p in pairs}
    for key, name in planted_keys.items():
        assert (key, name) in found, (key, name)
        best = max((p for p in pairs if p["key"] == key), key=lambda p: p["cosine"] or 0)
        assert best["eval_file"] == name and best["cosine"] >= 0.99
    assert got["contamination"]["samples"] >= 3
    assert f"contaminated samples {got['contamination']['samples']}" in proc.stdout
    # The CLIP measures ran on the shift's own model, and CMMD against the reference per class.
    assert got["model"]["name"] == "imagenetpp-tiny"
    assert 0 < got["clipscore"]["mean"] < 100 and got["clipscore"]["worst_classes"]
    ref = got["reference"]
    assert ref["classes_compared"] == 10 and ref["cmmd"] >= 0 and ref["images"] == 200
    html = (shift / "report" / "index.html").read_text()
    assert "pairs/000-sample.jpg" in html and "Contamination" in html


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHECK = """<script>window.addEventListener("load", () => {
  const bad = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0));
  document.body.setAttribute("data-check", JSON.stringify(
    {images: document.images.length, broken: bad.map(i => i.getAttribute("src"))}));
});</script>"""


def test_index_html_renders_with_every_image_in_a_real_browser(planted, tmp_path):
    browser = _browser()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    shift, _, _ = planted
    page = tmp_path / "report"
    shutil.copytree(shift / "report", page)
    html = (page / "index.html").read_text().replace("</body>", CHECK + "</body>")
    (page / "index.html").write_text(html)
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         "--dump-dom", (page / "index.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    marker = proc.stdout.split('data-check="', 1)[1].split('"', 1)[0].replace("&quot;", '"')
    check = json.loads(marker)
    # Plots, contact sheet and the pair thumbnails: all there, all decoded by the browser.
    assert check["broken"] == [] and check["images"] >= 4 + 2 * 3, check


def test_compare_puts_shifts_side_by_side(planted, demo_shift, tmp_path):
    shift, _, _ = planted
    page = tmp_path / "compare.html"
    proc = run_cli("compare", str(demo_shift), str(shift), "--html", str(page), check=True)
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["shift", "curator", "classes"] and "CLIPScore" in lines[0]
    assert sum(line.startswith("demo-knn-img") for line in lines) == 2
    html = page.read_text()
    for link in (demo_shift / "report" / "index.html", shift / "report" / "index.html"):
        rel = os.path.relpath(link, tmp_path)
        assert f'href="{rel}"' in html and (tmp_path / rel).resolve().is_file()


def test_image_sets_are_embedded_once_and_again_when_they_change(planted, tmp_path):
    """A second report takes the reference and eval-set embeddings from the cache and finds
    the same; a set it has not seen is embedded."""
    shift, planted_keys, first = planted
    again = tmp_path / "shift"
    shutil.copytree(shift, again)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for p in sorted((world_dir() / "evalset").rglob("ILSVRC_val_002.JPEG"))[:3]:
        shutil.copy(p, fresh / f"{p.parent.name}.JPEG")
    proc = run_cli(
        "report", str(again), "--eval-set", str(shift.parent / "eval"), "--eval-set", str(fresh),
        "--reference", str(world_dir() / "exemplars"), "--contamination-cosine", "0.99",
        "--phash-max-distance", "2", check=True,
    )  # fmt: skip
    said = [line for line in proc.stdout.splitlines() if "images embedded and hashed" in line]
    assert len(said) == 3 and sum(line.endswith("; cached)") for line in said) == 2, said
    assert any(line.startswith("report: fresh:") and "cached" not in line for line in said)

    def pairs(d: Path) -> list:
        rows = pq.read_table(d / "report" / "contamination.parquet").to_pylist()
        return sorted((p["key"], p["eval_file"], p["cosine"]) for p in rows if p["eval_set"] == "eval")  # fmt: skip

    assert pairs(again) == pairs(shift) and {k for k, _, _ in pairs(again)} >= set(planted_keys)
    ref = [json.loads((d / "report" / "metrics.json").read_text())["reference"] for d in (shift, again)]  # fmt: skip
    assert ref[0] == ref[1]


def test_report_mistakes_are_one_line(planted, tmp_path):
    shift, _, _ = planted
    one_line_error(run_cli("report", str(tmp_path)), "not a finished shift folder")
    one_line_error(run_cli("report", str(shift), "--eval-set", str(tmp_path / "nope")), "eval set", "nope")  # fmt: skip
    (tmp_path / "empty").mkdir()
    one_line_error(run_cli("report", str(shift), "--reference", str(tmp_path / "empty")), "no images")  # fmt: skip
    one_line_error(run_cli("report", str(shift), "--contact-classes", "n09999999"), "n09999999")
    one_line_error(run_cli("report", str(shift), "--contamination-cosine", "2"), "--contamination-cosine")  # fmt: skip
    one_line_error(run_cli("report", str(shift), "--batch-size", "0"), "--batch-size")
    one_line_error(run_cli("report", str(shift), "--device", "tpu"), "'tpu'", "not a torch device")
    one_line_error(run_cli("report", str(shift), "--device", "cuda:99"), "'cuda:99'", "CUDA GPU")
    one_line_error(run_cli("compare", str(tmp_path)), "not a finished shift folder")


def test_report_and_exclude_config_mistakes_answer_at_once(tmp_path):
    """`check` names each bad report/select.exclude value, touching nothing."""
    for setting, named in (
        ("select.exclude=[/no/such/evalset]", "select.exclude[0]"),
        ("report.eval_sets=[/no/such/evalset]", "report.eval_sets[0]"),
        ("report.reference=/no/such/reference", "report.reference"),
        ("report.eval_sets=[demo:nothing]", "report.eval_sets[0]"),
        ("report.prompt='a photo of {label}'", "report.prompt"),
        ("report.contamination_cosine=0", "report.contamination_cosine"),
        ("report.phash_max_distance=65", "report.phash_max_distance"),
        ("report.contact_classes=[n00000000]", "report.contact_classes[0]"),
    ):
        proc = run_cli("check", str(DEMO_CONFIG), "--out", str(tmp_path / "out"), "--set", setting)
        one_line_error(proc, named)
    assert not (tmp_path / "out").exists()
