"""Every mistake a user can make, driven through the CLI as they would make it: exit 2, one
line on stderr naming the culprit, no traceback, and nothing already in the output lost."""

from __future__ import annotations

import copy
import fcntl
import json
import os
from pathlib import Path

import pytest
import yaml

from .conftest import DEMO_CONFIG, one_line_error, run_cli

BASE = yaml.safe_load(DEMO_CONFIG.read_text())
GOLDFISH = "n01443537"


def edit(change):
    """A config derived from the demo one by ``change(config_dict)``."""

    def make():
        data = copy.deepcopy(BASE)
        change(data)
        return data

    return make


def setkey(path: str, value):
    def change(data):
        node = data
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return edit(change)


def delkey(path: str):
    def change(data):
        node = data
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        del node[last]

    return edit(change)


# name -> (config maker or raw text, extra CLI args, words the one error line must hold)
CONFIG_CASES = {
    "unknown-top-key": (setkey("colour", "red"), [], ["'colour'"]),
    "unknown-nested-key": (setkey("select.foo", 1), [], ["'select.foo'"]),
    "unknown-params-key": (setkey("curator.params.k", 3), [], ["'curator.params.k'"]),
    "curator-extra-key": (setkey("curator.weights", "x"), [], ["'curator.weights'"]),
    "curator-missing": (delkey("curator"), [], ["'curator.name'"]),
    "curator-unknown": (setkey("curator.name", "magic"), [], ["'curator.name'", "magic"]),
    "curator-name-a-list": (setkey("curator.name", ["a"]), [], ["'curator.name'"]),
    "params-not-mapping": (setkey("curator.params", [1, 2]), [], ["'curator.params'"]),
    "shift-missing": (delkey("shift"), [], ["'shift'"]),
    "shift-slash": (setkey("shift", "a/b"), [], ["'shift'"]),
    "shift-empty": (setkey("shift", ""), [], ["'shift'"]),
    "seed-negative": (setkey("seed", -1), [], ["'seed'"]),
    "seed-string": (setkey("seed", "zero"), [], ["'seed'", "integer"]),
    "seed-float": (setkey("seed", 1.5), [], ["'seed'"]),
    "seed-huge": (setkey("seed", 2**64), [], ["'seed'"]),
    "target-zero": (setkey("target_per_class", 0), [], ["'target_per_class'"]),
    "target-bool": (setkey("target_per_class", True), [], ["'target_per_class'"]),
    "target-text": (setkey("target_per_class", "many"), [], ["'target_per_class'"]),
    "classes-word": (setkey("classes", "some"), [], ["'classes'"]),
    "classes-first-zero": (setkey("classes", {"first": 0}), [], ["'classes.first'"]),
    "classes-first-1001": (setkey("classes", {"first": 1001}), [], ["'classes.first'"]),
    "classes-both": (setkey("classes", {"first": 3, "wnids": [GOLDFISH]}), [], ["'classes'"]),
    "wnids-empty": (setkey("classes", {"wnids": []}), [], ["'classes.wnids'", "at least one"]),
    "wnids-duplicate": (
        setkey("classes", {"wnids": [GOLDFISH, GOLDFISH]}),
        [],
        ["twice", GOLDFISH],
    ),  # fmt: skip
    "wnids-unknown": (setkey("classes", {"wnids": ["n00000000"]}), [], ["n00000000"]),
    "wnids-not-list": (setkey("classes", {"wnids": GOLDFISH}), [], ["'classes.wnids'"]),
    "dedupe-zero": (setkey("select.near_duplicate_cosine", 0), [], ["near_duplicate_cosine"]),
    "dedupe-above-one": (
        setkey("select.near_duplicate_cosine", 1.5),
        [],
        ["near_duplicate_cosine"],
    ),  # fmt: skip
    "shard-size-zero": (setkey("shards.samples_per_shard", 0), [], ["samples_per_shard"]),
    "max-side-tiny": (setkey("image.max_side", 8), [], ["'image.max_side'"]),
    "quality-101": (setkey("image.jpeg_quality", 101), [], ["'image.jpeg_quality'"]),
    "executor-slurm": (setkey("run.executor", "slurm"), [], ["'run.executor'"]),
    "workers-zero": (setkey("run.workers", 0), [], ["'run.workers'"]),
    "queries-video": (setkey("curator.params.queries", "video"), [], ["'curator.params.queries'"]),
    "k-zero": (setkey("curator.params.k_per_query", 0), [], ["k_per_query"]),
    "min-similarity-2": (setkey("curator.params.min_similarity", 2), [], ["min_similarity"]),
    "index-missing": (
        setkey("curator.params.index", "/nonexistent/idx"),
        [],
        ["'curator.params.index'", "/nonexistent/idx"],
    ),  # fmt: skip
    "exemplars-missing": (
        setkey("curator.params.exemplars", "/nonexistent/ex"),
        [],
        ["/nonexistent/ex"],
    ),  # fmt: skip
    "exemplars-absent": (delkey("curator.params.exemplars"), [], ["'curator.params.exemplars'"]),
    "model-without-weights": (
        setkey("curator.params.model", "ViT-B-32"),
        [],
        ["'curator.params.pretrained'"],
    ),  # fmt: skip
    "demo-typo": (setkey("curator.params.index", "demo:indx"), [], ["demo:indx"]),
    "not-yaml": ("shift: [unclosed\n", [], ["not valid YAML"]),
    "not-a-mapping": ("- 1\n- 2\n", [], ["mapping"]),
    "empty-file": ("", [], ["'curator.name'"]),
    "set-no-equals": (edit(lambda d: None), ["--set", "seed"], ["--set", "key=value"]),
    "set-through-scalar": (edit(lambda d: None), ["--set", "seed.x=1"], ["'seed'"]),
    "set-unknown": (edit(lambda d: None), ["--set", "colour=red"], ["'colour'"]),
    "set-bad-value": (edit(lambda d: None), ["--set", "seed=-3"], ["'seed'"]),
    "workers-flag-zero": (edit(lambda d: None), ["--workers", "0"], ["'run.workers'"]),
}


def existing_output(tmp_path: Path) -> Path:
    """An output root that already holds a user's file: a refused command must not touch it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return out


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_mistakes(case, tmp_path, demo_world):
    source, extra, words = CONFIG_CASES[case]
    path = tmp_path / "config.yaml"
    path.write_text(source if isinstance(source, str) else yaml.safe_dump(source()))
    out = existing_output(tmp_path)
    for command in ("check", "curate"):  # checking answers exactly as running would
        args = [command, str(path), *extra]
        if command == "curate":
            args += ["--out", str(out), "--no-progress"]
        one_line_error(run_cli(*args), *words)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_missing_config_file(tmp_path):
    one_line_error(run_cli("curate", str(tmp_path / "nope.yaml")), "nope.yaml", "not found")


def test_check_answers_at_once_without_side_effects(tmp_path, demo_world):
    proc = run_cli("check", str(DEMO_CONFIG), "--out", str(tmp_path / "never"))
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout and "10 classes x 120" in proc.stdout
    assert not (tmp_path / "never").exists()


def _demo_args(out) -> list[str]:
    return ["curate", str(DEMO_CONFIG), "--out", str(out), "--no-progress"]


def test_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    one_line_error(run_cli(*_demo_args(tmp_path / "f")), "not a folder")
    one_line_error(run_cli(*_demo_args(tmp_path / "f" / "deeper")), "not a folder")
    assert (tmp_path / "f").read_text() == "x"


def test_out_not_writable():
    one_line_error(run_cli(*_demo_args("/proc/imagenetpp-out")), "/proc/imagenetpp-out")


def test_unreachable_ray_address(tmp_path, demo_world):
    proc = run_cli(*_demo_args(tmp_path), "--ray-address", "127.0.0.1:1", timeout=60)
    one_line_error(proc, "127.0.0.1:1")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    one_line_error(run_cli(*_demo_args(tmp_path), env=env, timeout=60), "127.0.0.1:1")


def test_output_in_use_by_another_run(tmp_path, demo_world):
    shift = tmp_path / "demo-knn-img"
    shift.mkdir()
    (shift / "keep.txt").write_text("mine")
    with open(shift / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        one_line_error(run_cli(*_demo_args(tmp_path)), "in use", "pid 4242")
    assert sorted(p.name for p in shift.iterdir()) == [".lock", "keep.txt"]


def test_output_of_another_config(tmp_path, demo_world):
    work = tmp_path / "demo-knn-img" / "_work"
    work.mkdir(parents=True)
    run = json.dumps({"config_hash": "0123456789abcdef", "config": {}})
    (work / "run.json").write_text(run)
    one_line_error(run_cli(*_demo_args(tmp_path)), "another config", "0123456789abcdef")
    assert (work / "run.json").read_text() == run


@pytest.mark.parametrize(
    "argv, words",
    [
        (["curate"], ["config"]),
        (["frobnicate"], ["frobnicate"]),
        (["curate", str(DEMO_CONFIG), "--executor", "slurm"], ["--executor", "slurm"]),
        (["curate", str(DEMO_CONFIG), "--workers", "two"], ["--workers", "two"]),
        (["index", "pool"], ["--out"]),
        (["index", "pool", "--out", "x", "--batch-size", "big"], ["--batch-size"]),
    ],
    ids=[
        "no-config",
        "unknown-command",
        "bad-executor",
        "workers-not-int",
        "index-no-out",
        "batch-not-int",
    ],  # fmt: skip
)
def test_command_line_mistakes(argv, words):
    one_line_error(run_cli(*argv), *words)


def test_shift_folder_mistakes(tmp_path):
    one_line_error(run_cli("verify", str(tmp_path / "absent")), "absent")
    (tmp_path / "empty").mkdir()
    one_line_error(run_cli("verify", str(tmp_path / "empty")), "empty")
    one_line_error(run_cli("status", str(tmp_path / "empty")), "empty")
    one_line_error(run_cli("status", str(tmp_path / "absent")), "absent")


def test_index_mistakes(tmp_path, demo_world):
    ckpt = str(demo_world / "model" / "imagenetpp-tiny.pt")
    base = ["--model", "imagenetpp-tiny", "--pretrained", ckpt, "--executor", "local"]
    out = str(tmp_path / "idx")
    pool = str(demo_world / "pool")
    one_line_error(run_cli("index", str(tmp_path / "nopool"), "--out", out, *base), "nopool")
    one_line_error(run_cli("index", pool, "--out", out, *base, "--dedup-cosine", "0"), "--dedup-cosine")  # fmt: skip
    one_line_error(run_cli("index", pool, "--out", out, *base, "--batch-size", "0"), "--batch-size")  # fmt: skip
    one_line_error(run_cli("index", pool, "--out", out, *base, "--model", "ViT-Nope"), "ViT-Nope")
    one_line_error(run_cli("index", pool, "--out", out, "--model", "imagenetpp-tiny", "--pretrained", str(tmp_path / "w.pt")), "w.pt")  # fmt: skip
    one_line_error(run_cli("index", pool, "--out", out, "--model", "imagenetpp-tiny", "--pretrained", ""), "--pretrained")  # fmt: skip
    assert not (tmp_path / "idx").exists()


def test_demo_cache_that_is_a_file(tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    env = {**os.environ, "IMAGENETPP_CACHE": str(cache)}
    one_line_error(run_cli(*_demo_args(tmp_path / "out"), env=env), "IMAGENETPP_CACHE")
    assert cache.read_text() == "not a folder"


def test_waiting_for_another_demo_world_builder_says_for_whom(tmp_path):
    import subprocess
    import time

    from pipelines.demo_world import VERSION

    from .conftest import CLI

    cache = tmp_path / "cache"
    cache.mkdir()
    lock_path = cache / f".demo-world-v{VERSION}-seed0.lock"
    with open(lock_path, "w") as held:  # as a process building the world holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 31337\n")
        held.flush()
        proc = subprocess.Popen(
            [CLI, *_demo_args(tmp_path / "out")], stderr=subprocess.PIPE, text=True,
            env={**os.environ, "IMAGENETPP_CACHE": str(cache)},
        )  # fmt: skip
        try:
            line = proc.stderr.readline()  # blocks until the waiting process says something
            assert "waiting for the demo world" in line and "pid 31337" in line, line
            time.sleep(0.5)
            assert proc.poll() is None  # still waiting, not building a second world
        finally:
            proc.kill()
            proc.wait()
    assert not (cache / f"demo-world-v{VERSION}-seed0").exists()


def test_garbage_index_info_is_refused_before_anything_runs(tmp_path, demo_world):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(demo_world / "index", index)
    (index / "index_info.json").write_text("{not json")
    out = existing_output(tmp_path)
    args = [*_demo_args(out), "--set", f"curator.params.index={index}"]
    one_line_error(run_cli(*args), "'curator.params.index'", "index_info.json")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
