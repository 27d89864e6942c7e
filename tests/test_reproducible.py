"""Same config and seed, same bytes, wherever the project and its demo world live."""

import os
import subprocess
from pathlib import Path

from pipelines.demo_world import world_dir
from shards.manifest import sha256_file

from .conftest import CLI, DEMO_CONFIG


def test_demo_world_in_another_folder_gives_identical_shards(demo_shift, other_demo_world, tmp_path):  # fmt: skip
    """A second checkout elsewhere: its own demo world (built from scratch there, by another
    process, started in the background at collection), run from another working directory.
    Nothing about either location may reach a shard."""
    cache, build_log = other_demo_world
    assert "building the demo world in " + str(cache) in build_log
    env = {**os.environ, "IMAGENETPP_CACHE": str(cache)}
    out = tmp_path / "out"
    proc = subprocess.run(
        [CLI, "curate", str(DEMO_CONFIG), "--out", str(out), "--executor", "local", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "building the demo world" not in proc.stderr  # the one built above, not a new one
    ours = out / "demo-knn-img"
    hashes = {p.name: sha256_file(p) for p in sorted((ours / "shards").glob("*.tar"))}
    theirs = {p.name: sha256_file(p) for p in sorted((demo_shift / "shards").glob("*.tar"))}
    assert hashes == theirs and hashes
    assert (ours / "index.parquet").read_bytes() == (demo_shift / "index.parquet").read_bytes()
    assert str(tmp_path) not in (ours / "index.parquet").read_bytes().decode("latin-1")
    assert str(cache) not in (ours / "index.parquet").read_bytes().decode("latin-1")
    # The tiny diffusion pipeline, random weights and calibrated safety checker, is rebuilt
    # identically too (the demo SD shifts' bytes rest on it).
    from curators.diffusion_models import weights_digest

    here = weights_digest(str(Path(os.environ["IMAGENETPP_CACHE"]) / world_dir().name / "model" / "tiny-sd"))  # fmt: skip
    there = weights_digest(str(cache / world_dir().name / "model" / "tiny-sd"))
    assert here == there
