"""Same config and seed, same bytes, wherever the project and its demo world live."""

import os
import subprocess

from shards.manifest import sha256_file

from .conftest import CLI, DEMO_CONFIG


def test_demo_world_in_another_folder_gives_identical_shards(demo_shift, tmp_path):
    """A second checkout elsewhere: its own demo world (built from scratch there), run from
    another working directory. Nothing about either location may reach a shard."""
    env = {**os.environ, "IMAGENETPP_CACHE": str(tmp_path / "other-cache")}
    out = tmp_path / "out"
    proc = subprocess.run(
        [CLI, "curate", str(DEMO_CONFIG), "--out", str(out), "--executor", "local", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "building the demo world in " + str(tmp_path / "other-cache") in proc.stderr
    ours = out / "demo-knn-img"
    hashes = {p.name: sha256_file(p) for p in sorted((ours / "shards").glob("*.tar"))}
    theirs = {p.name: sha256_file(p) for p in sorted((demo_shift / "shards").glob("*.tar"))}
    assert hashes == theirs and hashes
    assert (ours / "index.parquet").read_bytes() == (demo_shift / "index.parquet").read_bytes()
    assert str(tmp_path) not in (ours / "index.parquet").read_bytes().decode("latin-1")
