"""`imagenetpp index` on a small pool with bad items, then curation from it with bad cases."""

import hashlib
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from curators.knn_index import PoolIndex, read_info
from pipelines.demo_world import _draw, _jpeg
from shards.reader import read_range
from shards.writer import ShardWriter

from .conftest import run_cli

GOLDFISH, ZEBRA, TENCH = "n01443537", "n02391049", "n01440764"  # tench: no exemplars at all


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory):
    """40 goldfish and 40 zebra pictures in 2 shards, plus a truncated JPEG and a text file."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(7)
    for shard in range(2):
        with ShardWriter(root / f"{shard:05d}.tar") as w:
            for i in range(40):
                slot = 0 if i % 2 == 0 else 4
                key = f"{shard}{i:04d}"
                meta = {
                    "url": f"http://pool.invalid/{key}",
                    "caption": f"item {key}",
                    "license": "CC-BY",
                }
                w.write(key, {"jpg": _jpeg(_draw(slot, rng)), "json": json.dumps(meta).encode()})
            good = _jpeg(_draw(0, rng))
            w.write(f"{shard}bad", {"jpg": good[: len(good) // 3], "txt": b"a truncated goldfish"})
            w.write(f"{shard}txt", {"txt": b"no image at all"})
            w.close()
    return root


@pytest.fixture(scope="module")
def small_index(small_pool, demo_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    ckpt = demo_world / "model" / "imagenetpp-tiny.pt"
    proc = run_cli(
        "index", str(small_pool), "--out", str(out), "--model", "imagenetpp-tiny",
        "--pretrained", str(ckpt), "--factory", "IVF4,Flat", "--no-progress",
        "--executor", "ray",  # the default (auto) runs one process here: keep Ray covered
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


def test_index_layout_and_contents(small_index, small_pool):
    info = read_info(small_index)
    assert (info.count, info.parts, info.skipped, info.dim) == (80, 2, 4, 32)
    assert info.factory == "IVF4,Flat"
    skipped = pq.read_table(small_index / "skipped" / "skipped_00000.parquet").to_pylist()
    reasons = {r["key"]: r["reason"] for r in skipped}
    assert reasons["0txt"] == "no image member" and reasons["0bad"].startswith("BadImage")
    index = PoolIndex(small_index)
    assert index.faiss.ntotal == 80
    row = index.rows(np.array([3]))[0]
    data = read_range(row["shard"], row["offset"], row["size"])
    assert hashlib.sha256(data).hexdigest() == row["sha256"]
    assert row["url"] == f"http://pool.invalid/{row['key']}" and row["license"] == "CC-BY"
    emb = np.load(small_index / "img_emb" / "img_emb_00000.npy")
    assert emb.shape == (40, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    # An image is its own nearest neighbour.
    sims, ids = index.search(emb[:5], 1)
    assert list(ids[:, 0]) == [0, 1, 2, 3, 4]


def write_config(path, index, exemplars, **extra):
    config = {
        "shift": "small",
        "classes": {"wnids": [GOLDFISH, ZEBRA, TENCH]},
        "target_per_class": 15,
        "curator": {
            "name": "clip_knn",
            "params": {
                "index": str(index),
                "exemplars": str(exemplars),
                "exemplars_per_class": 5,
                "k_per_query": 20,
                "min_similarity": 0.5,
            },
        },  # fmt: skip
        "shards": {"samples_per_shard": 8},
        "image": {"max_side": 32},
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_empty_class_is_a_shortfall_not_a_crash(small_index, demo_world, tmp_path):
    # One of goldfish's exemplar queries does not decode: recorded, the other four query.
    exemplars = tmp_path / "exemplars"
    shutil.copytree(demo_world / "exemplars", exemplars)
    bad = sorted((exemplars / GOLDFISH).iterdir())[0]
    bad.write_bytes(b"not a jpeg")
    config = write_config(tmp_path / "c.yaml", small_index, exemplars)
    proc = run_cli("curate", str(config), "--out", str(tmp_path / "out"), "--executor", "local", "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "small" / "manifest.json").read_text())
    short = {s["wnid"]: s for s in manifest["shortfalls"]}
    assert short[TENCH]["kept"] == 0 and short[TENCH]["reason"] == "the curator found no candidates"
    assert manifest["class_counts"][GOLDFISH] == manifest["class_counts"][ZEBRA] == 15
    assert manifest["rejected"]["count"] == 1
    assert manifest["rejected"]["by_reason"] == {"unreadable exemplar": 1}
    assert "tench" in proc.stdout  # the printed summary names it


def test_corrupt_pool_item_at_write_time_is_skipped_and_recorded(
    small_index, small_pool, demo_world, tmp_path
):
    config = write_config(tmp_path / "c.yaml", small_index, demo_world / "exemplars")
    first = run_cli("curate", str(config), "--out", str(tmp_path / "a"), "--executor", "local", "--no-progress")  # fmt: skip
    assert first.returncode == 0, first.stderr
    chosen = pq.read_table(tmp_path / "a" / "small" / "index.parquet").to_pylist()[0]["source_id"]
    # Overwrite that item's bytes inside the pool tar, after indexing: it no longer decodes.
    index = PoolIndex(small_index)
    row = next(r for r in index.metadata.to_pylist() if r["key"] == chosen)
    original = read_range(row["shard"], row["offset"], row["size"])
    with open(row["shard"], "r+b") as f:
        f.seek(row["offset"])
        f.write(b"\0" * row["size"])
    try:
        proc = run_cli("curate", str(config), "--out", str(tmp_path / "b"), "--executor", "local", "--no-progress")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        shift = tmp_path / "b" / "small"
        skipped = pq.read_table(shift / "skipped.parquet").to_pylist()
        assert [r["source_id"] for r in skipped] == [chosen]
        assert skipped[0]["reason"].startswith("BadImage")
        manifest = json.loads((shift / "manifest.json").read_text())
        assert manifest["skipped"]["count"] == 1
        # The class lost a sample it had selected: counted from what was written, not planned.
        wnid = skipped[0]["wnid"]
        short = {s["wnid"]: s for s in manifest["shortfalls"]}
        assert short[wnid]["selected"] == 15 and short[wnid]["kept"] == 14
        assert short[wnid]["skipped"] == 1 and short[wnid]["shortfall"] == 1
        assert "1 skipped while writing" in short[wnid]["reason"]
        assert manifest["class_counts"][wnid] == 14
        assert chosen not in {
            r["source_id"] for r in pq.read_table(shift / "index.parquet").to_pylist()
        }
        assert run_cli("verify", str(shift)).returncode == 0
    finally:
        with open(row["shard"], "r+b") as f:
            f.seek(row["offset"])
            f.write(original)  # the pool fixture is shared by the module


def test_index_killed_midway_resumes_to_the_same_bytes(demo_world, tmp_path):
    import signal
    import subprocess
    import time

    from .conftest import CLI, REPO

    ckpt = str(demo_world / "model" / "imagenetpp-tiny.pt")
    pool = str(demo_world / "pool" / "pool-{00000..00001}.tar")  # two shards: one done, one left
    args = ["index", pool, "--model", "imagenetpp-tiny", "--pretrained", ckpt,
            "--executor", "local", "--no-progress", "--batch-size", "32"]  # fmt: skip
    assert run_cli(*args, "--out", str(tmp_path / "clean")).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([CLI, *args, "--out", str(out)], cwd=REPO, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (out / "metadata" / "metadata_00000.parquet").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "index_info.json").exists()
    assert not (out / "metadata" / "metadata_00001.parquet").exists()  # killed with work left
    assert run_cli(*args, "--out", str(out)).returncode == 0
    for rel in ["image.index", "img_emb/img_emb_00001.npy", "text_emb/text_emb_00000.npy", "metadata/metadata_00001.parquet"]:  # fmt: skip
        assert (out / rel).read_bytes() == (tmp_path / "clean" / rel).read_bytes(), rel


def test_pool_patterns(small_pool):
    from pipelines.errors import UserError
    from pipelines.index_pool import pool_shards

    both = [small_pool / "00000.tar", small_pool / "00001.tar"]
    assert pool_shards(str(small_pool)) == both
    assert pool_shards(str(small_pool / "{00000..00001}.tar")) == both
    assert pool_shards(str(small_pool / "*1.tar")) == both[1:]
    with pytest.raises(UserError, match="no pool shards"):
        pool_shards(str(small_pool / "{00005..00009}.tar"))


def test_planted_pool_duplicates_share_a_group(demo_world):
    truth = {
        r["key"]: r["kind"] for r in pq.read_table(demo_world / "ground_truth.parquet").to_pylist()
    }
    index = PoolIndex(demo_world / "index")
    assert index.info.dedup_cosine == 0.995 and index.dup_groups is not None
    keys = index.metadata["key"].to_pylist()
    joined = {k for row, k in enumerate(keys) if index.dup_groups[row] != row}
    exact = {k for k in keys if truth[k] == "exact_duplicate"}
    near = {k for k in keys if truth[k] == "near_duplicate"}
    assert exact and exact <= joined  # identical bytes, identical embeddings
    # Re-encoded, brightened copies mostly clear a 0.995 cosine with a 3.4M-parameter model.
    assert len(near & joined) >= 0.6 * len(near)
    # Groups stay small: similarity chains do not swallow a class.
    assert np.bincount(np.asarray(index.dup_groups)).max() < 20
