"""`imagenetpp index` against what users actually hand it: moved checkpoints, no weights, no
network, damaged or duplicated pool tars, empty pools, a reused --out folder, garbage index
files; and near-duplicate grouping that cannot chain a whole pool into one group."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from curators.base import ResourceError
from curators.knn_index import (
    DUP_GROUPS,
    PoolIndex,
    build_faiss_index,
    dedup_search_index,
    group_stats,
    group_stats_warning,
    near_duplicate_groups,
    part_paths,
    read_info,
)
from pipelines.demo_world import _draw, _jpeg
from shards.reader import CorruptTar, iter_entries, iter_sample_members
from shards.writer import ShardWriter

from .conftest import REPO, one_line_error, run_cli


def skipped_rows(index_dir) -> list[dict]:
    return [
        row
        for path in sorted((index_dir / "skipped").glob("skipped_*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]


def write_tar(path, samples: list[tuple[str, bytes]]) -> None:
    with ShardWriter(path) as w:
        for key, jpg in samples:
            w.write(key, {"jpg": jpg, "json": json.dumps({"url": f"http://x.invalid/{key}"}).encode()})  # fmt: skip
        w.close()


@pytest.fixture(scope="module")
def tiny(demo_world) -> list[str]:
    ckpt = demo_world / "model" / "imagenetpp-tiny.pt"
    return ["--model", "imagenetpp-tiny", "--pretrained", str(ckpt), "--executor", "local",
            "--no-progress"]  # fmt: skip


def with_pretrained(args: list[str], value: str) -> list[str]:
    args = list(args)
    args[args.index("--pretrained") + 1] = value
    return args


@pytest.fixture(scope="module")
def rng_images():
    rng = np.random.default_rng(11)
    return [_jpeg(_draw(i % 8, rng)) for i in range(40)]


# --- 1. weights: location-free description, refused empties, seeded random, offline -------


def test_weights_description_is_location_free(demo_world, tmp_path):
    from curators.clip_models import ClipEncoder, resolve_weights

    ckpt = demo_world / "model" / "imagenetpp-tiny.pt"
    moved = tmp_path / "elsewhere" / "imagenetpp-tiny.pt"
    moved.parent.mkdir()
    shutil.copyfile(ckpt, moved)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    want = f"imagenetpp-tiny.pt sha256:{digest}"
    assert resolve_weights("imagenetpp-tiny", str(moved)).description == want
    encoder = ClipEncoder("imagenetpp-tiny", str(ckpt), "cpu")
    assert encoder.description == {"name": "imagenetpp-tiny", "weights": want}
    assert encoder.pretrained == str(ckpt.resolve())  # the path stays, for loading only
    assert str(tmp_path) not in want and "/" not in want


def test_random_weights_are_explicit_and_seeded(tiny, rng_images, tmp_path):
    import torch

    from curators.clip_models import ClipEncoder

    # An empty --pretrained used to mean unseeded random weights: now it is refused, before Ray.
    pool = tmp_path / "pool"
    write_tar(pool / "00000.tar", [(f"k{i}", im) for i, im in enumerate(rng_images[:6])])
    for value in ("", "  "):
        proc = run_cli("index", str(pool), "--out", str(tmp_path / "a"), *with_pretrained(tiny, value))  # fmt: skip
        one_line_error(proc, "imagenetpp-tiny", "--pretrained random")
    assert not (tmp_path / "a").exists()
    # Asked for explicitly, random weights are the same in every worker (seed 0).
    torch.manual_seed(123)
    first = ClipEncoder("imagenetpp-tiny", "random", "cpu")
    torch.rand(10)
    second = ClipEncoder("imagenetpp-tiny", "random", "cpu")
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    assert first.description["weights"] == "random (seed 0)"
    proc = run_cli("index", str(pool), "--out", str(tmp_path / "b"), *with_pretrained(tiny, "random"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = read_info(tmp_path / "b")
    assert (info.pretrained, info.weights) == ("random", "random (seed 0)")


def test_uncached_tag_offline_fails_fast_in_one_line(tmp_path, rng_images):
    pool = tmp_path / "pool"
    write_tar(pool / "00000.tar", [("k0", rng_images[0])])
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    # The default model: ViT-L-14 with the 'openai' tag, as a user without internet runs it.
    proc = run_cli("index", str(pool), "--out", str(tmp_path / "a"), "--no-progress", env=env, timeout=60)  # fmt: skip
    line = one_line_error(proc, "ViT-L-14", "'openai'", "not in the local cache", "--pretrained")
    assert "HF_HUB_OFFLINE" in line
    assert not (tmp_path / "a").exists()  # refused before anything started
    # Not flagged offline, but the hub does not answer: the same, after one quick connect.
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = run_cli("index", str(pool), "--out", str(tmp_path / "b"), "--model", "ViT-B-32", "--no-progress", env=env, timeout=60)  # fmt: skip
    one_line_error(proc, "ViT-B-32", "'openai'", "cannot be reached")


def test_cached_but_damaged_weights_load_offline_and_fail_in_one_line(tmp_path, tiny, rng_images):
    pool = tmp_path / "pool"
    write_tar(pool / "00000.tar", [("k0", rng_images[0])])
    # A tag found in the hub cache loads without asking the (unreachable) hub: no retries.
    repo = tmp_path / "hf" / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "open_clip_model.safetensors").write_bytes(b"not weights")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = run_cli("index", str(pool), "--out", str(tmp_path / "a"), "--model", "ViT-B-32", "--executor", "local", "--no-progress", env=env, timeout=120)  # fmt: skip
    one_line_error(proc, "cannot load ViT-B-32 weights 'openai'")
    # A damaged local checkpoint: one line too, not a pickle traceback.
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80garbage" * 10)
    proc = run_cli("index", str(pool), "--out", str(tmp_path / "b"), *with_pretrained(tiny, str(bad)))  # fmt: skip
    one_line_error(proc, "imagenetpp-tiny", str(bad))


# --- 4. pool handling ----------------------------------------------------------------------


def _header_offset(tar: bytes, member: str) -> int:
    return next(off for name, off, _ in iter_entries(tar) if name == member) - 512


def test_damaged_duplicated_and_empty_tars_are_skipped_and_recorded(tiny, rng_images, tmp_path):
    pool = tmp_path / "crawl-2024"
    # 00000: ten samples, the header of the seventh overwritten with garbage.
    write_tar(pool / "00000.tar", [(f"a{i}", rng_images[i]) for i in range(10)])
    data = bytearray((pool / "00000.tar").read_bytes())
    at = _header_offset(bytes(data), "a6.jpg")
    data[at : at + 512] = np.random.default_rng(0).integers(1, 256, 512, dtype=np.uint8).tobytes()
    (pool / "00000.tar").write_bytes(bytes(data))
    # 00001: key b1 twice in a row, b2 again after b3.
    write_tar(pool / "00001.tar", [("b1", rng_images[10]), ("b1", rng_images[11]),
                                   ("b2", rng_images[12]), ("b3", rng_images[13]),
                                   ("b2", rng_images[14])])  # fmt: skip
    (pool / "00002.tar").write_bytes(b"")  # a zero-byte tar
    # 00003: sixty copies of one picture (a class slot no other tar uses): one group, more
    # than k=16 neighbours, and implausibly large for near duplicates.
    write_tar(pool / "00003.tar", [(f"c{i}", rng_images[23]) for i in range(60)])
    out = tmp_path / "idx"
    proc = run_cli("index", str(pool / "{00000..00003}.tar"), "--out", str(out), *tiny)
    assert proc.returncode == 0, proc.stderr
    meta = [pq.read_table(part_paths(out, i)["metadata"]).to_pylist() for i in range(4)]
    assert [r["key"] for r in meta[0]] == [f"a{i}" for i in range(6)]  # all before the damage
    assert [r["key"] for r in meta[1]] == ["b1", "b2", "b3"]
    sha = {r["key"]: r["sha256"] for r in meta[1]}
    assert sha["b1"] == hashlib.sha256(rng_images[10]).hexdigest()  # the first one is kept
    assert sha["b2"] == hashlib.sha256(rng_images[12]).hexdigest()
    skipped = skipped_rows(out)
    by_shard = {}
    for row in skipped:
        by_shard.setdefault(os.path.basename(row["shard"]), []).append(row)
    (damaged,) = by_shard["00000.tar"]
    assert damaged["reason"].startswith("CorruptTar: ")
    assert [(r["key"], r["reason"]) for r in by_shard["00001.tar"]] == [
        ("b1", "duplicate key"),
        ("b2", "duplicate key"),
    ]
    assert [r["reason"] for r in by_shard["00002.tar"]] == ["empty file (0 bytes)"]
    info = read_info(out)
    assert (info.count, info.skipped) == (6 + 3 + 60, 4)
    assert info.pool == "crawl-2024"  # the shards' folder, not '{00000..00003}.tar'
    # The group-size distribution is printed; the 60-image group draws a warning.
    assert "near-duplicate groups" in proc.stdout and "largest" in proc.stdout
    assert any(line.startswith("warning:") for line in proc.stderr.splitlines()), proc.stderr
    groups = np.load(out / DUP_GROUPS)
    assert len(set(groups[-60:].tolist())) == 1  # the copies are one group
    assert info.dedup_stats["largest"] >= 60
    # --pool-name overrides the folder name.
    named = tmp_path / "named"
    proc = run_cli("index", str(pool / "00001.tar"), "--out", str(named), "--pool-name", "laion-x", *tiny)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert read_info(named).pool == "laion-x"


def test_a_pool_without_images_names_the_pool_and_keeps_its_skips(tiny, tmp_path):
    pool = tmp_path / "emptypool"
    pool.mkdir()
    (pool / "00000.tar").write_bytes(b"")
    with ShardWriter(pool / "00001.tar") as w:
        w.write("t0", {"txt": b"a caption without its picture"})
        w.close()
    out = tmp_path / "idx"
    proc = run_cli("index", str(pool), "--out", str(out), *tiny)
    line = one_line_error(proc, str(pool), "no decodable image")
    assert str(out) not in line.split("(")[0]  # the culprit is the pool, not --out
    reasons = sorted(r["reason"] for r in skipped_rows(out))
    assert reasons == ["empty file (0 bytes)", "no image member"]  # committed before the error
    assert not (out / "index_info.json").exists()


def test_resuming_with_other_weights_or_pool_is_refused(tiny, rng_images, tmp_path):
    pool = tmp_path / "pool"
    write_tar(pool / "00000.tar", [(f"k{i}", im) for i, im in enumerate(rng_images[:8])])
    write_tar(pool / "00001.tar", [(f"m{i}", im) for i, im in enumerate(rng_images[8:16])])
    out = tmp_path / "idx"
    assert run_cli("index", str(pool), "--out", str(out), *tiny).returncode == 0
    ckpt_desc = read_info(out).weights
    assert ckpt_desc.startswith("imagenetpp-tiny.pt sha256:")
    assert json.loads((out / "index_run.json").read_text())["weights"] == ckpt_desc
    before = {p.name: p.read_bytes() for p in (out / "img_emb").iterdir()}
    info_bytes = (out / "index_info.json").read_bytes()
    rand = with_pretrained(tiny, "random")
    # An unfinished run (parts only) resumed with other weights: refused, naming both.
    (out / "index_info.json").unlink()
    proc = run_cli("index", str(pool), "--out", str(out), *rand)
    one_line_error(proc, str(out), ckpt_desc, "random (seed 0)")
    # ... or with another pool.
    proc = run_cli("index", str(pool / "00000.tar"), "--out", str(out), *tiny)
    one_line_error(proc, str(out), "another pool")
    # A finished index (even one without index_run.json) is not returned for other weights.
    (out / "index_info.json").write_bytes(info_bytes)
    (out / "index_run.json").unlink()
    proc = run_cli("index", str(pool), "--out", str(out), *rand)
    one_line_error(proc, "finished index", ckpt_desc, "random (seed 0)")
    # Nothing committed was touched; the same command still finds its finished index.
    assert {p.name: p.read_bytes() for p in (out / "img_emb").iterdir()} == before
    assert (out / "index_info.json").read_bytes() == info_bytes
    proc = run_cli("index", str(pool), "--out", str(out), *tiny)
    assert proc.returncode == 0, proc.stderr
    assert (out / "index_info.json").read_bytes() == info_bytes


def test_garbage_index_files_are_one_line_errors(tiny, rng_images, tmp_path):
    pool = tmp_path / "pool"
    write_tar(pool / "00000.tar", [(f"k{i}", im) for i, im in enumerate(rng_images[:8])])
    out = tmp_path / "idx"
    assert run_cli("index", str(pool), "--out", str(out), *tiny).returncode == 0
    good_info = (out / "index_info.json").read_bytes()
    for garbage in (b"{not json", b"[1, 2]", b'{"model": "x"}', b"\xff\xfe"):
        (out / "index_info.json").write_bytes(garbage)
        with pytest.raises(ResourceError, match="index_info.json") as err:
            PoolIndex(out)
        assert "\n" not in str(err.value)
    one_line_error(run_cli("index", str(pool), "--out", str(out), *tiny), "index_info.json")
    (out / "index_info.json").write_bytes(good_info)
    good_index = (out / "image.index").read_bytes()
    (out / "image.index").write_bytes(b"garbage" * 100)
    with pytest.raises(ResourceError, match="image.index") as err:
        PoolIndex(out)
    assert "\n" not in str(err.value)
    (out / "image.index").write_bytes(good_index)
    (out / "metadata.arrow").write_bytes(b"garbage")
    with pytest.raises(ResourceError, match="unreadable index files") as err:
        PoolIndex(out)
    assert "\n" not in str(err.value)


# --- 5. near-duplicate grouping ------------------------------------------------------------


def _write_parts(root, emb: np.ndarray, parts: int) -> None:
    for i, chunk in enumerate(np.array_split(emb, parts)):
        path = part_paths(root, i)["img_emb"]
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.ascontiguousarray(chunk, dtype=np.float32))


def _chain(n: int, step_cos: float, dim: int = 8) -> np.ndarray:
    """Unit vectors on a great circle: each within ``step_cos`` of the next, the ends far apart."""
    angles = np.arange(n) * np.arccos(step_cos)
    emb = np.zeros((n, dim), np.float32)
    emb[:, 0], emb[:, 1] = np.cos(angles), np.sin(angles)
    return emb


def test_leader_groups_do_not_chain(tmp_path):
    # 20 steps of ~16 degrees: consecutive cosine 0.96 >= 0.95, the ends ~50 degrees apart
    # (under a full turn, so no point comes back near another).
    emb = _chain(20, 0.96)
    assert float(emb[0] @ emb[-1]) < 0.7
    _write_parts(tmp_path, emb, parts=3)
    index = build_faiss_index(tmp_path, 3, "Flat")
    stats = near_duplicate_groups(tmp_path, 3, threshold=0.95, index=index)
    groups = np.load(tmp_path / DUP_GROUPS)
    assert groups.dtype == np.int64 and groups.shape == (20,)
    assert len(set(groups.tolist())) >= 10  # connected components made this one group
    for row, leader in enumerate(groups.tolist()):
        assert groups[leader] == leader and leader <= row  # leaders lead their own group
        assert float(emb[row] @ emb[leader]) >= 0.95 - 1e-6  # every member near its leader
    assert stats["rows"] == 20 and stats["groups"] == len(set(groups.tolist()))
    assert sum(stats["sizes"].values()) == stats["groups"]
    assert stats["largest"] == 2 and group_stats_warning(stats, 0.95) is None


def test_exact_duplicates_join_their_first_copy(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(30, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    emb = np.concatenate([base, base[:5], base[:5]])  # rows 30..39 copy rows 0..4 twice
    _write_parts(tmp_path, emb, parts=2)
    index = build_faiss_index(tmp_path, 2, "Flat")
    stats = near_duplicate_groups(tmp_path, 2, threshold=0.99, index=index)
    groups = np.load(tmp_path / DUP_GROUPS)
    assert groups[:30].tolist() == list(range(30))
    assert groups[30:].tolist() == [0, 1, 2, 3, 4] * 2
    assert stats["sizes"]["3-5"] == 5 and stats["sizes"]["1"] == 25 and stats["joined"] == 10


def test_copies_beyond_k_stay_one_group(tmp_path):
    rng = np.random.default_rng(5)
    base = rng.normal(size=(20, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    emb = np.concatenate([base, np.repeat(base[3:4], 100, axis=0)])  # 100 copies of row 3
    _write_parts(tmp_path, emb, parts=2)

    class NoRangeSearch:  # an index type without range search: the k-widening fallback
        def __init__(self, index) -> None:
            self.index, self.ntotal = index, index.ntotal

        def search(self, queries, k):
            return self.index.search(queries, k)

        def range_search(self, queries, radius):
            raise RuntimeError("range search not implemented")

    for factory in ("Flat", "IVF2,Flat", "no range search"):
        if factory == "no range search":
            index = NoRangeSearch(build_faiss_index(tmp_path, 2, "Flat"))
        else:
            index = build_faiss_index(tmp_path, 2, factory)
        stats = near_duplicate_groups(tmp_path, 2, threshold=0.99, k=16, index=index)
        groups = np.load(tmp_path / DUP_GROUPS)
        assert (groups[20:] == 3).all() and groups[3] == 3, factory
        assert stats["largest"] == 101 and stats["groups"] == 20


def test_big_pools_group_through_ivf_cells_like_the_exact_search(tmp_path):
    # 30k rows, 10% planted near copies (some copied 30 times): the IVF search used above
    # EXACT_DEDUP_ROWS must find the same groups as comparing every pair.
    rng = np.random.default_rng(11)
    n, dim = 30_000, 32
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    src = rng.integers(0, n, n // 10)
    dst = rng.choice(n, n // 10, replace=False)
    emb[dst] = emb[src] + 0.03 * rng.normal(size=(len(dst), dim)).astype(np.float32)
    emb[n - 30 :] = emb[7] + 0.01 * rng.normal(size=(30, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    _write_parts(tmp_path, emb, parts=3)
    seen = []
    ivf = dedup_search_index(tmp_path, 3, exact_below=1000)
    assert ivf.nlist > 16 and ivf.nprobe < ivf.nlist  # really searches a few cells per query
    stats = near_duplicate_groups(
        tmp_path, 3, 0.95, index=ivf, progress=lambda d, t: seen.append((d, t))
    )
    fast = np.load(tmp_path / DUP_GROUPS)
    assert seen[-1] == (n, n) and len(seen) >= 3  # progress after every batch
    exact = near_duplicate_groups(tmp_path, 3, 0.95, index=build_faiss_index(tmp_path, 3, "Flat"))
    assert (np.load(tmp_path / DUP_GROUPS) == fast).all() and stats == exact
    assert stats["joined"] > n // 20 and stats["largest"] >= 31


def test_an_opened_index_is_shared_not_copied(tmp_path):
    # Every worker opens the index: its vectors must stay file-backed pages (one copy per node
    # in the page cache), not private memory that grows with the number of workers.
    code = """
import sys, numpy as np, faiss
from pathlib import Path
from curators.knn_index import open_faiss_shared
def anon():
    return next(int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('Anonymous:'))
x = np.random.default_rng(0).normal(size=(40000, 256)).astype('float32')
for factory in ('Flat', 'IVF64,Flat'):
    index = faiss.index_factory(256, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x[:10000]); index.add(x)
    path = Path(sys.argv[1]) / (factory.replace(',', '_') + '.index')
    faiss.write_index(index, str(path)); del index
    before = anon()
    opened = open_faiss_shared(path)
    opened.search(x[:50], 5)
    print(factory, (anon() - before) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout  # fmt: skip
    added = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()}
    assert set(added) == {"Flat", "IVF64,Flat"}
    for factory, mb in added.items():
        assert mb < 10, f"{factory}: opening a 41 MB index added {mb} MB of private memory"


def test_group_size_warning():
    groups = np.concatenate([np.zeros(60, np.int64), np.arange(60, 100)])
    stats = group_stats(groups)
    assert stats["largest"] == 60 and stats["sizes"][">20"] == 1 and stats["sizes"]["1"] == 40
    assert "60 of 100" in group_stats_warning(stats, 0.95)
    big = group_stats(np.concatenate([np.zeros(60, np.int64), np.arange(60, 10_000)]))
    assert group_stats_warning(big, 0.95) is None  # under 1% of a 10k pool


# --- the reader additions ------------------------------------------------------------------


def test_reader_split_repeats_and_flush_on_error(tmp_path):
    path = tmp_path / "t.tar"
    with ShardWriter(path) as w:
        for key, body in (("a", b"1"), ("a", b"2"), ("b", b"3"), ("c", b"4")):
            w.write(key, {"txt": body})
        w.close()
    keys = [(k, f["txt"][1]) for k, f in iter_sample_members(path)]
    assert keys == [("a", b"2"), ("b", b"3"), ("c", b"4")]  # default unchanged: merged
    keys = [(k, f["txt"][1]) for k, f in iter_sample_members(path, split_repeats=True)]
    assert keys == [("a", b"1"), ("a", b"2"), ("b", b"3"), ("c", b"4")]
    data = bytearray(path.read_bytes())
    at = _header_offset(bytes(data), "c.txt")
    data[at + 148 : at + 156] = b"zz\0zz\0\0\0"  # not octal: a damaged header
    path.write_bytes(bytes(data))
    seen = []
    with pytest.raises(CorruptTar):
        for key, _ in iter_sample_members(path, flush_on_error=True):
            seen.append(key)
    assert seen == ["a", "b"]
