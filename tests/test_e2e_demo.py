"""The demo shift end to end, through the CLI on a local Ray, checked as a user would."""

import json
from collections import Counter

import pyarrow.parquet as pq
import webdataset as wds

from shards.manifest import sha256_file
from shards.verify import REQUIRED_FIELDS

from .conftest import DEMO_CONFIG, run_cli, with_report


def shard_files(shift):
    return sorted(str(p) for p in (shift / "shards").glob("*.tar"))


def test_layout(demo_shift):
    for name in ("manifest.json", "index.parquet", "README.md", "skipped.parquet"):
        assert (demo_shift / name).is_file(), name
    manifest = json.loads((demo_shift / "manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    assert names == [f"demo-knn-img-{i:06d}.tar" for i in range(len(names))]
    assert sorted((demo_shift / "shards").iterdir()) == [demo_shift / "shards" / n for n in names]
    card = (demo_shift / "README.md").read_text()
    assert card.startswith("---\n") and "path: shards/*.tar" in card


def test_every_sample_carries_its_provenance(demo_shift):
    samples = list(wds.WebDataset(shard_files(demo_shift), shardshuffle=False))
    manifest = json.loads((demo_shift / "manifest.json").read_text())
    assert len(samples) == manifest["total_samples"] > 0
    for s in samples:
        meta = json.loads(s["json"])
        assert set(REQUIRED_FIELDS) <= set(meta)
        assert int(s["cls"]) == meta["label"]
        assert meta["key"] == s["__key__"] and meta["wnid"] in s["__key__"]
        assert meta["curator"] == "clip_knn" and meta["query"]["kind"] == "image"
        assert meta["model"]["name"] == "imagenetpp-tiny" and meta["model"]["weights"]
        assert meta["source"]["id"] and meta["source"]["url"].startswith("https://demo.invalid/")
        assert s["txt"].decode() == meta["source"]["caption"]
        assert meta["config_hash"] == manifest["config_hash"]
        assert meta["score"] >= 0.8  # the config's min_similarity


def test_counts_meet_target_or_record_shortfall(demo_shift):
    manifest = json.loads((demo_shift / "manifest.json").read_text())
    index = pq.read_table(demo_shift / "index.parquet").to_pylist()
    counts = Counter(r["wnid"] for r in index)
    assert counts == Counter({k: v for k, v in manifest["class_counts"].items() if v})
    short = {s["wnid"]: s for s in manifest["shortfalls"]}
    for wnid, n in manifest["class_counts"].items():
        assert n == 120 or short[wnid]["kept"] == n and short[wnid]["shortfall"] == 120 - n
    # The demo's scarce class (banana) runs out, and says why.
    assert "n07753592" in short and "pool ran out" in short["n07753592"]["reason"]
    assert len(short) == 1
    # No pool item twice, no exact duplicate twice.
    assert len({r["source_id"] for r in index}) == len(index)


def test_shard_hashes_match_manifest_and_verify_passes(demo_shift):
    manifest = json.loads((demo_shift / "manifest.json").read_text())
    for shard in manifest["shards"]:
        assert sha256_file(demo_shift / "shards" / shard["name"]) == shard["sha256"]
    proc = run_cli("verify", str(demo_shift))
    assert proc.returncode == 0 and "OK" in proc.stdout


def test_label_precision_against_hidden_truth(demo_shift, demo_world):
    truth = {
        r["key"]: r["label"] for r in pq.read_table(demo_world / "ground_truth.parquet").to_pylist()
    }
    index = pq.read_table(demo_shift / "index.parquet").to_pylist()
    precision = sum(truth[r["source_id"]] == r["label"] for r in index) / len(index)
    assert precision >= 0.9, precision


def test_huggingface_datasets_reads_the_shards(demo_shift):
    import datasets

    files = shard_files(demo_shift)
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train")
    manifest = json.loads((demo_shift / "manifest.json").read_text())
    assert ds.num_rows == manifest["total_samples"]
    row = ds[0]
    assert int(row["cls"]) == row["json"]["label"] and row["jpg"].size[0] <= 64


def test_verify_catches_a_tampered_shard(demo_shift, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(demo_shift, copy, ignore=shutil.ignore_patterns("_work"))
    victim = sorted((copy / "shards").glob("*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[2000] ^= 0xFF  # inside the first sample's image
    victim.write_bytes(bytes(data))
    proc = run_cli("verify", str(copy))
    assert proc.returncode == 1
    assert "sha256 differs from manifest" in proc.stdout


def test_same_config_same_bytes_with_the_local_executor(demo_shift, tmp_path):
    run_cli("curate", str(DEMO_CONFIG), "--out", str(tmp_path), "--executor", "local", "--no-progress", check=True)  # fmt: skip
    ours = {p.name: sha256_file(p) for p in (tmp_path / "demo-knn-img" / "shards").glob("*.tar")}
    ray = {p.name: sha256_file(p) for p in (demo_shift / "shards").glob("*.tar")}
    assert ours == ray


def test_text_queries_find_the_class(demo_world, tmp_path):
    proc = run_cli(
        "curate", str(DEMO_CONFIG), "--out", str(tmp_path), "--executor", "local", "--no-progress",
        "--set", "curator.params.queries=text", "--set", "curator.params.templates=simple",
        "--set", "curator.params.min_similarity=0.0", "--set", "target_per_class=40",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    truth = {
        r["key"]: r["label"] for r in pq.read_table(demo_world / "ground_truth.parquet").to_pylist()
    }
    index = pq.read_table(tmp_path / "demo-knn-img" / "index.parquet").to_pylist()
    assert {r["query_kind"] for r in index} == {"text"}
    precision = sum(truth[r["source_id"]] == r["label"] for r in index) / len(index)
    assert precision >= 0.6, precision  # text-image alignment of a one-minute model


def test_url_index_shift_downloads_replaces_dead_links_and_is_port_free(demo_world, tmp_path):
    # The LA1000 path: a clip-retrieval index (URLs, no pixels, no embeddings) -> URL
    # candidates -> acquire (rounds) -> embed -> select. Two runs served on different ports
    # give the same bytes: the port is how to reach the host, not part of any sample.
    from pipelines.demo_world import DEMO_POOL_HOST, serve_pool

    outs = []
    for run in ("a", "b"):
        with serve_pool(demo_world) as address:
            resolve = f"run.resolve={{{DEMO_POOL_HOST}: '{address}'}}"
            # Run a ends with its report, as a user's would: it must find the eval set kept out.
            env = with_report() if run == "a" else None
            proc = run_cli("curate", "configs/demo_knn_url.yaml", "--out", str(tmp_path / run),
                           "--executor", "local", "--no-progress", "--set", resolve, env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        outs.append(tmp_path / run / "demo-knn-url")
    a, b = outs
    assert [p.read_bytes() for p in sorted((a / "shards").glob("*.tar"))] == [
        p.read_bytes() for p in sorted((b / "shards").glob("*.tar"))
    ]
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["total_samples"] == 600 and not manifest["shortfalls"]
    acquire = manifest["acquire"]
    assert acquire["failed"] > 0 and acquire["rounds"] >= 2  # dead links were replaced
    assert manifest["embeddings"]["rows"] == 600  # fetched images embedded by the index model
    # select.exclude kept the demo eval set's leaked pool images out, and the classes refilled:
    # the report finds none of them by embedding at the same threshold.
    assert manifest["excluded_eval"]["count"] > 0 and manifest["excluded_eval"]["cosine"] == 0.996
    report = json.loads((a / "report" / "metrics.json").read_text())
    assert report["contamination"]["cosine"] == 0.996
    assert report["contamination"]["sets"][0]["by_embedding"] == 0
    truth = {r["key"]: r["label"] for r in pq.read_table(demo_world / "ground_truth.parquet").to_pylist()}  # fmt: skip
    right = 0
    for s in wds.WebDataset(shard_files(a), shardshuffle=False):
        meta = json.loads(s["json"])
        assert meta["source"]["url"].startswith(f"http://{DEMO_POOL_HOST}/pool/")
        right += truth[meta["source"]["id"]] == meta["label"]
    assert right / 600 >= 0.8
    assert run_cli("verify", str(a)).returncode == 0
