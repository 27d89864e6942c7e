"""`imagenetpp download` against a loopback server with every fault a web crawl meets: each row
ends in the right status, the run finishes, the pool is what img2dataset would write (webdataset
and datasets read it, `imagenetpp index` indexes it), a SIGKILLed run resumes to identical
shards, and --retry-failed asks again only what failed transiently."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shards.fetch import FetchPolicy, address_refusal

from .conftest import CLI, REPO, one_line_error, run_cli
from .http_server import FaultServer

ALLOW = ("--allow-network", "127.0.0.1/32")


def _jpeg(rng, w, h, mode="RGB", fmt="JPEG", exif_orientation=None) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1) + rng.integers(0, 20, (h, w, 3))  # fmt: skip
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8)).convert(mode)
    buf, kw = io.BytesIO(), {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif.tobytes()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _bomb() -> bytes:  # a small PNG whose header declares 30000 x 30000 pixels
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(2)
    return {
        "rgb": _jpeg(rng, 120, 90), "cmyk": _jpeg(rng, 100, 80, "CMYK"),
        "alpha": _jpeg(rng, 90, 60, "RGBA", "PNG"), "palette": _jpeg(rng, 70, 70, "P", "PNG"),
        "rotated": _jpeg(rng, 120, 80, exif_orientation=6), "bomb": _bomb(),
        **{f"n{i}": _jpeg(rng, 80 + i, 60) for i in range(40)},
    }  # fmt: skip


CASES = [  # (path, status, error kind)
    ("img/rgb", "success", None),
    ("img/cmyk", "success", None),
    ("img/alpha", "success", None),
    ("img/palette", "success", None),
    ("img/rotated", "success", None),
    ("missing/x", "failed_to_download", "http"),
    ("flaky/n1", "success", None),  # 500, then fine on the retry
    ("ratelimit/n2", "success", None),  # 429 + Retry-After, then fine
    ("slow/n3", "failed_to_download", "timeout"),
    ("cut/n4", "failed_to_download", "cut"),
    ("html/x", "failed_to_download", "content_type"),
    ("wrongtype/n5", "failed_to_download", "content_type"),
    ("redirect/n6", "success", None),
    ("redirloop/x", "failed_to_download", "redirects"),
    ("offsite/n7", "failed_to_download", "blocked_address"),
    ("optout/n8", "failed_to_download", "opt_out"),
    ("big/x", "failed_to_download", "too_large"),
    ("img/bomb", "failed_to_resize", "bomb"),
    ("ftp://127.0.0.1/x.jpg", "failed_to_download", "scheme"),
]


def _download(url_list, out, *args, check=True):
    proc = run_cli("download", str(url_list), "--out", str(out), *ALLOW, "--timeout", "1",
                   "--retries", "1", "--max-bytes-mb", "1", "--image-size", "64",
                   "--no-progress", *args)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _rows(pool) -> list[dict]:
    return [r for p in sorted(pool.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_every_fault_ends_in_its_status_row(images, tmp_path):
    with FaultServer(images, slow_seconds=3) as server:
        urls = [c[0] if "://" in c[0] else server.url(*c[0].split("/")) for c in CASES]
        pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))],
                                 "license": ["cc-by"] * len(urls)}), tmp_path / "list.parquet")  # fmt: skip
        proc = _download(tmp_path / "list.parquet", tmp_path / "pool", "--shard-size", "8",
                         "--extra-cols", "license")  # fmt: skip
        hits = dict(server.hits)
    rows = _rows(tmp_path / "pool")
    assert [(r["status"], r["error_kind"]) for r in rows] == [(s, k) for _, s, k in CASES]
    assert [r["key"] for r in rows] == [f"{i // 8:05d}{i % 8:04d}" for i in range(len(CASES))]
    assert hits["/flaky/n1"] == 2 and hits["/ratelimit/n2"] == 2
    assert not any("127.0.0.2" in p for p in hits)  # refused before connecting
    assert "15 / 19 images" not in proc.stdout and "/ 19 images in 3 shards" in proc.stdout
    by_url = {r["url"].rsplit("/", 1)[-1]: r for r in rows}
    assert (by_url["rotated"]["original_width"], by_url["rotated"]["original_height"]) == (80, 120)
    assert (by_url["rotated"]["width"], by_url["rotated"]["height"]) == (43, 64)  # turned upright
    assert (by_url["rgb"]["width"], by_url["rgb"]["height"]) == (64, 48)

    import webdataset as wds

    tars = sorted(str(p) for p in (tmp_path / "pool").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    ok = [r for r in rows if r["status"] == "success"]
    assert [s["__key__"] for s in samples] == [r["key"] for r in ok]
    for s, r in zip(samples, ok, strict=True):
        meta = json.loads(s["json"])
        assert (
            meta["url"] == r["url"] and meta["license"] == "cc-by" and meta["status"] == "success"
        )
        assert meta["sha256"] == r["sha256"] and s["txt"].decode() == r["caption"]
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.mode == "RGB" and img.size == (meta["width"], meta["height"])
    white = np.asarray(Image.open(io.BytesIO(samples[2]["jpg"])))  # alpha flattened on white
    assert white.mean() > 100
    stats = json.loads((tmp_path / "pool" / "00000_stats.json").read_text())
    assert stats["count"] == 8 and stats["successes"] + stats["failed_to_download"] + stats["failed_to_resize"] == 8  # fmt: skip

    from datasets import load_dataset

    ds = load_dataset("webdataset", data_files={"train": tars}, split="train")
    assert ds.num_rows == len(ok) and {"jpg", "json", "txt"} <= set(ds.column_names)


def test_a_downloaded_pool_is_indexed_unchanged(images, tmp_path, demo_world):
    with FaultServer(images) as server:
        urls = [server.url("img", f"n{i}") for i in range(12)] + [server.url("missing", "y")]
        (tmp_path / "list.txt").write_text("\n".join(urls) + "\n")
        _download(tmp_path / "list.txt", tmp_path / "pool", "--shard-size", "5")
    tiny = demo_world / "model" / "imagenetpp-tiny.pt"
    proc = run_cli("index", str(tmp_path / "pool"), "--out", str(tmp_path / "index"),
                   "--model", "imagenetpp-tiny", "--pretrained", str(tiny), "--executor", "local",
                   "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "12 images, 0 skipped" in proc.stdout


def test_killed_download_resumes_to_identical_shards_and_retry_asks_only_transient(
    images, tmp_path
):
    with FaultServer(images, slow_seconds=0.05) as server:
        rows = []
        for i in range(120):
            kind = "missing" if i % 10 == 3 else "slow"
            rows.append({"url": server.url(kind, f"n{i % 40}"), "caption": f"c{i}"})
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "list.parquet")
        _download(
            tmp_path / "list.parquet", tmp_path / "clean", "--shard-size", "20", "--threads", "4"
        )

        args = [CLI, "download", str(tmp_path / "list.parquet"), "--out", str(tmp_path / "killed"),
                *ALLOW, "--shard-size", "20", "--threads", "4", "--image-size", "64",
                "--max-bytes-mb", "1", "--timeout", "1", "--retries", "1", "--no-progress"]  # fmt: skip
        proc = subprocess.Popen(
            args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while proc.poll() is None and len(list((tmp_path / "killed").glob("*_stats.json"))) < 2:
            time.sleep(0.01)
        workers = psutil.Process(proc.pid).children()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert workers  # its fetch processes die with it, not left waiting for rows
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
        assert len(list((tmp_path / "killed").glob("*_stats.json"))) < 6
        server.hits.clear()
        proc = _download(tmp_path / "list.parquet", tmp_path / "killed", "--shard-size", "20")
        assert "finished before, skipped" in proc.stdout
        for tar in sorted((tmp_path / "clean").glob("*.tar")):
            assert tar.read_bytes() == (tmp_path / "killed" / tar.name).read_bytes(), tar.name

        # Now slow answers time out: those rows failed transiently, the 404s did not.
        server.slow_seconds = 3
        _download(tmp_path / "list.parquet", tmp_path / "flaky", "--shard-size", "20")
        failed = [r for r in _rows(tmp_path / "flaky") if r["status"] != "success"]
        assert {r["error_kind"] for r in failed} == {"timeout", "http"}
        server.slow_seconds = 0.0
        server.hits.clear()
        _download(tmp_path / "list.parquet", tmp_path / "flaky", "--shard-size", "20", "--retry-failed")  # fmt: skip
        asked = sum(server.hits.values())
        missing = sum(n for p, n in server.hits.items() if p.startswith("/missing/"))
    assert missing == 0 and asked == sum(r["error_kind"] == "timeout" for r in failed)
    for tar in sorted((tmp_path / "clean").glob("*.tar")):  # now whole, and the same bytes
        assert tar.read_bytes() == (tmp_path / "flaky" / tar.name).read_bytes(), tar.name


@pytest.mark.parametrize(
    "ip, allowed",
    [("8.8.8.8", True), ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.5", False),
     ("169.254.169.254", False), ("::1", False), ("::ffff:10.0.0.1", False), ("fe80::1", False),
     ("2606:4700::1111", True)],
)  # fmt: skip
def test_private_addresses_are_refused_by_default(ip, allowed):
    assert (address_refusal(ip, FetchPolicy()) is None) == allowed
    private_ok = FetchPolicy(allow_private=True)
    if ip != "169.254.169.254":  # cloud metadata stays refused even then
        assert address_refusal(ip, private_ok) is None
    else:
        assert address_refusal(ip, private_ok) is not None
    assert address_refusal("127.0.0.1", FetchPolicy(allow_networks=("127.0.0.1/32",))) is None
    assert address_refusal("127.0.0.2", FetchPolicy(allow_networks=("127.0.0.1/32",))) is not None


def test_download_bad_input_is_one_line(tmp_path):
    one_line_error(run_cli("download", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "p")), "nope.parquet")  # fmt: skip
    pq.write_table(pa.table({"link": ["http://x/1.jpg"]}), tmp_path / "l.parquet")
    one_line_error(run_cli("download", str(tmp_path / "l.parquet"), "--out", str(tmp_path / "p")), "'url'", "--url-col")  # fmt: skip
    (tmp_path / "l.jsonl").write_text('{"url": "http://x/1.jpg"}\nnot json\n')
    one_line_error(run_cli("download", str(tmp_path / "l.jsonl"), "--out", str(tmp_path / "p2"), "--no-progress"), "l.jsonl:2")  # fmt: skip
    one_line_error(run_cli("download", str(tmp_path / "l.parquet"), "--out", str(tmp_path / "p"), "--allow-network", "localhost"), "--allow-network")  # fmt: skip
    for flag, value in (("--timeout", "0"), ("--retries", "-1"), ("--threads", "0")):
        one_line_error(run_cli("download", str(tmp_path / "l.parquet"), "--out", str(tmp_path / "p3"), flag, value), flag)  # fmt: skip
    assert not (tmp_path / "p3").exists()


def test_malformed_urls_are_rows_not_crashes():
    from shards.fetch import fetch_url

    policy = FetchPolicy(allow_private=True, retries=0)
    kinds = {u: fetch_url(u, policy).kind for u in ("http://[::1/x", "http:///x", "javascript:alert(1)", "", "http://127.0.0.1:99999/x")}  # fmt: skip
    assert kinds == {"http://[::1/x": "bad_url", "http:///x": "bad_url", "javascript:alert(1)": "scheme",
                     "": "scheme", "http://127.0.0.1:99999/x": "bad_url"}  # fmt: skip


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_scaled_jpeg_decode_matches_a_full_decode(orientation, mode):
    """The 1/8..7/8-scale JPEG path gives the picture a full decode gives: upright by EXIF,
    same size, pixels within JPEG noise; a truncated stream is refused, never padded."""
    from PIL import ImageOps

    from shards.images import BadImage, ImagePolicy, store_image

    data = _jpeg(np.random.default_rng(5), 500, 300, mode, exif_orientation=orientation)
    policy = ImagePolicy("keep_ratio_largest", image_size=200, jpeg_quality=95)
    stored = store_image(data, policy)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    reference = reference.resize((stored.width, stored.height), Image.Resampling.LANCZOS)
    got = np.asarray(Image.open(io.BytesIO(stored.data)), dtype=np.float32)
    assert got.shape[:2] == (stored.height, stored.width) == reference.size[::-1]
    assert max(stored.width, stored.height) == 200
    assert np.abs(got - np.asarray(reference, dtype=np.float32)).mean() < 6
    with pytest.raises(BadImage):
        store_image(data[: len(data) // 2], policy)
