"""Resume: a run SIGKILLed mid-way and re-run gives the same shards as a run never interrupted."""

import fcntl
import json
import os
import signal
import subprocess
import time

import pytest

from shards.manifest import sha256_file

from .conftest import CLI, DEMO_CONFIG, REPO, run_cli

# Small shards and one worker make each stage last long enough to be hit mid-way.
ARGS = ["--no-progress", "--workers", "1", "--set", "shards.samples_per_shard=10"]


def shard_hashes(shift):
    return {p.name: sha256_file(p) for p in sorted((shift / "shards").glob("*.tar"))}


@pytest.fixture(scope="module")
def clean_run(demo_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    run_cli("curate", str(DEMO_CONFIG), "--out", str(out), *ARGS, check=True)
    return out / "demo-knn-img"


def kill_when(out, ready, timeout=120.0):
    """Start a run, SIGKILL it as soon as ready(shift_dir) holds; True if it was killed mid-way."""
    shift = out / "demo-knn-img"
    proc = subprocess.Popen(
        [CLI, "curate", str(DEMO_CONFIG), "--out", str(out), *ARGS],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready(shift):
                proc.send_signal(signal.SIGKILL)  # the driver only, at an arbitrary instant
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        time.sleep(0.5)
        try:  # reap what the dead driver left (Ray workers) so they cannot outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode == -signal.SIGKILL


def count(folder, pattern):
    return len(list(folder.glob(pattern))) if folder.exists() else 0


KILL_POINTS = {
    "during-candidates": lambda s: count(s / "_work" / "candidates", "*.parquet") >= 2,
    "after-select": lambda s: (s / "_work" / "plan" / "stats.json").exists(),
    # Shards committed, and the next one half-written under its temporary name.
    "mid-materialize": lambda s: (
        count(s / "_work" / "shard_rows", "*.parquet") >= 3 and count(s / "shards", ".*.tmp") >= 1
    ),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_gives_identical_shards(clean_run, tmp_path, point):
    assert kill_when(tmp_path, KILL_POINTS[point]), "the run finished before it could be killed"
    shift = tmp_path / "demo-knn-img"
    assert not (shift / "manifest.json").exists()
    status = run_cli("status", str(shift), check=True).stdout
    assert "finalize: not yet" in status and "re-run the same command to resume" in status
    proc = run_cli("curate", str(DEMO_CONFIG), "--out", str(tmp_path), *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert shard_hashes(shift) == shard_hashes(clean_run)
    assert (shift / "index.parquet").read_bytes() == (clean_run / "index.parquet").read_bytes()
    manifest = json.loads((shift / "manifest.json").read_text())
    assert (
        manifest["total_samples"]
        == json.loads((clean_run / "manifest.json").read_text())["total_samples"]
    )
    leftovers = [p for p in shift.rglob(".*") if p.name != ".lock"]
    assert leftovers == []  # temporaries of the killed run are cleared
    assert run_cli("verify", str(shift)).returncode == 0
    assert "finalize: done" in run_cli("status", str(shift), check=True).stdout


def test_rerun_of_a_finished_shift_skips_all_work(clean_run):
    before = shard_hashes(clean_run)
    mtimes = {p: p.stat().st_mtime_ns for p in (clean_run / "shards").glob("*.tar")}
    proc = run_cli("curate", str(DEMO_CONFIG), "--out", str(clean_run.parent), *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert shard_hashes(clean_run) == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rewritten
    history = json.loads((clean_run / "manifest.json").read_text())["run_history"]
    assert history[-1]["units_run"] == dict.fromkeys(
        ["candidates", "acquire", "embed", "select", "materialize"], 0
    )


def test_a_shard_committed_without_its_marker_is_rewritten_on_resume(clean_run, tmp_path):
    """A kill between a shard's rename and its _work/shard_rows marker: the tar exists, the
    unit is not committed. Resume must redo that unit, not count the tar as done."""
    import shutil

    shift = tmp_path / "demo-knn-img"
    shutil.copytree(clean_run, shift)
    markers = sorted((shift / "_work" / "shard_rows").glob("*.parquet"))
    markers[1].unlink()
    (shift / "manifest.json").unlink()
    (shift / "index.parquet").unlink()
    proc = run_cli("curate", str(DEMO_CONFIG), "--out", str(tmp_path), *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert shard_hashes(shift) == shard_hashes(clean_run)
    assert (shift / "index.parquet").read_bytes() == (clean_run / "index.parquet").read_bytes()
    manifest = json.loads((shift / "manifest.json").read_text())
    assert manifest["total_samples"] == json.loads((clean_run / "manifest.json").read_text())["total_samples"]  # fmt: skip
    assert manifest["run"]["stages"]["materialize"]["run"] == 1
    assert run_cli("verify", str(shift)).returncode == 0


def test_a_second_concurrent_run_is_refused(demo_world, tmp_path):
    shift = tmp_path / "demo-knn-img"
    shift.mkdir()
    with open(shift / ".lock", "w") as held:  # as a running curate holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345 on testhost\n")
        held.flush()
        proc = run_cli("curate", str(DEMO_CONFIG), "--out", str(tmp_path), *ARGS)
        assert proc.returncode == 2, proc.stderr
        assert "in use by another run" in proc.stderr and "pid 12345" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        # Refused before touching anything: the output holds only the lock.
        assert [p.name for p in shift.iterdir()] == [".lock"]
        from pipelines.config import load_config

        three = "classes.wnids=[n01443537,n01614925,n02007558]"
        config = load_config(DEMO_CONFIG, [three], check_resources=False)
        (shift / "_work").mkdir()
        record = {"config_hash": "x", "config": config.to_dict()}
        (shift / "_work" / "run.json").write_text(json.dumps(record))
        status = run_cli("status", str(shift), check=True).stdout
    assert "run: active, pid 12345 on testhost" in status and "candidates: 0/3 units" in status
    assert "materialize: 0/? units" in status


def test_resuming_with_another_config_is_refused(clean_run):
    proc = run_cli(
        "curate",
        str(DEMO_CONFIG),
        "--out",
        str(clean_run.parent),
        *ARGS,
        "--set",
        "target_per_class=5",
    )
    assert proc.returncode == 2 and "another config" in proc.stderr
