"""Guards against single-line bugs the rest of the suite would miss: commits by rename,
near-duplicate boundaries, dedupe over many blocks, orphaned Ray workers, the run history."""

import json
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest

from pipelines.select import greedy_dedupe
from shards import atomic
from shards.atomic import atomic_path, atomic_write_bytes
from shards.writer import ShardWriter

from .conftest import CLI, DEMO_CONFIG, REPO, run_cli


class Boom(Exception):
    pass


def test_atomic_path_failing_half_way_leaves_nothing(tmp_path):
    final = tmp_path / "unit.parquet"
    with pytest.raises(Boom), atomic_path(final) as tmp:
        tmp.write_bytes(b"half of it")
        raise Boom
    assert not final.exists() and list(tmp_path.iterdir()) == []
    atomic_write_bytes(final, b"whole")
    assert final.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [final]


def test_shard_failing_half_way_leaves_nothing_under_its_name(tmp_path):
    final = tmp_path / "s-000000.tar"
    with pytest.raises(Boom), ShardWriter(final) as writer:
        writer.write("a", {"jpg": b"x" * 5000, "cls": b"1"})
        assert not final.exists()  # written elsewhere while open
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_refused_commit_leaves_nothing(tmp_path):
    def refuse():
        raise Boom

    atomic.set_commit_guard(refuse)
    try:
        with pytest.raises(Boom):
            atomic_write_bytes(tmp_path / "f", b"data")
        writer = ShardWriter(tmp_path / "s.tar")
        writer.write("a", {"cls": b"1"})
        with pytest.raises(Boom):
            writer.close()
    finally:
        atomic.set_commit_guard(None)
    assert list(tmp_path.iterdir()) == []


def test_near_duplicate_at_exactly_the_threshold_is_dropped():
    # cos(a, b) is exactly 0.5 in float32: "at least the threshold" counts as a duplicate.
    a = np.array([1.0, 0.0], np.float32)
    b = np.array([0.5, np.sqrt(0.75)], np.float32)
    assert float(a @ b) == 0.5
    emb = np.stack([a, b])
    assert list(greedy_dedupe(emb, 10, 0.5)) == [0]
    assert list(greedy_dedupe(emb, 10, 0.5000001)) == [0, 1]


def test_greedy_dedupe_over_many_blocks_matches_a_plain_loop():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(700, 16)).astype(np.float32)
    # Near copies of early rows placed far later, across more than two blocks of 256.
    copies = base[:500] + 0.005 * rng.normal(size=(500, 16)).astype(np.float32)
    emb = np.concatenate([base, copies])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert len(emb) == 1200
    kept: list[int] = []
    for i, e in enumerate(emb):
        if all(e @ emb[j] < 0.99 for j in kept):
            kept.append(i)
    assert len(kept) == 700
    for target in (100, 650, 5000):
        assert list(greedy_dedupe(emb, target, 0.99)) == kept[:target]


def test_dedupe_off_keeps_exactly_the_target():
    emb = np.tile(np.array([[1.0, 0.0]], np.float32), (50, 1))  # all identical
    assert list(greedy_dedupe(emb, 7, 1.0)) == list(range(7))
    assert list(greedy_dedupe(emb[:3], 7, 1.0)) == [0, 1, 2]


def test_sigkilled_driver_leaves_no_writer_and_no_ray_process(demo_world, tmp_path):
    shift = tmp_path / "demo-knn-img"
    rows = shift / "_work" / "shard_rows"
    proc = subprocess.Popen(
        [CLI, "curate", str(DEMO_CONFIG), "--out", str(tmp_path), "--no-progress",
         "--workers", "1", "--set", "shards.samples_per_shard=10"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    started: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 180
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for p in psutil.Process(proc.pid).children(recursive=True):
                started.setdefault(p.pid, p)
            if rows.exists() and len(list(rows.glob("*.parquet"))) >= 3:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        assert any("raylet" in p.name() or "ray::" in p.name() for p in started.values())

        def committed():  # temporaries (".name.pid.tmp") are not shards; the next run clears them
            return sorted(
                p.name for p in (shift / "shards").iterdir() if not p.name.startswith(".")
            )

        written = committed()
        time.sleep(5)
        assert committed() == written
        survivors = []
        for p in started.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    survivors.append(p.name())
            except psutil.NoSuchProcess:
                pass
        assert survivors == []
    finally:
        for p in started.values():  # never let a failure here leak processes into other tests
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def test_rerun_keeps_the_record_of_the_run_that_did_the_work(demo_world, tmp_path):
    args = ["curate", str(DEMO_CONFIG), "--out", str(tmp_path), "--executor", "local",
            "--no-progress", "--set", "target_per_class=10"]  # fmt: skip
    run_cli(*args, check=True)
    manifest_path = tmp_path / "demo-knn-img" / "manifest.json"
    first = json.loads(manifest_path.read_text())
    run_cli(*args, check=True)
    second = json.loads(manifest_path.read_text())
    assert second["run"] == first["run"] and first["run"]["stages"]["candidates"]["run"] == 10
    history = second["run_history"]
    assert len(history) == 2 and history[0]["units_run"]["materialize"] >= 1
    assert history[1]["units_run"] == dict.fromkeys(
        ["candidates", "acquire", "embed", "select", "materialize"], 0
    )
    assert {k: v for k, v in second.items() if k != "run_history"} == {
        k: v for k, v in first.items() if k != "run_history"
    }


def test_a_run_that_keeps_nothing_fails_and_says_why(demo_world, tmp_path):
    proc = run_cli(
        "curate", str(DEMO_CONFIG), "--out", str(tmp_path), "--executor", "local",
        "--no-progress", "--set", "curator.params.min_similarity=1.0",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("imagenetpp: error: no sample kept:")
    assert "the curator found no candidates (10 of 10 classes)" in last
    manifest = json.loads((tmp_path / "demo-knn-img" / "manifest.json").read_text())
    assert manifest["total_samples"] == 0 and len(manifest["shortfalls"]) == 10
