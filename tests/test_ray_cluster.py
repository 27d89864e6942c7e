"""Joining an existing Ray cluster (`--ray-address`), and errors raised inside Ray workers."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from shards.manifest import sha256_file

from .conftest import DEMO_CONFIG, run_cli

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A real head node on loopback, owned by this test: stopping it touches no other Ray."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and head.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        assert head.poll() is None, "ray start --head failed"
        time.sleep(2)  # the GCS listens before the raylet has registered
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: ray start takes its processes down
        try:  # its graceful stop can take half a minute; nothing here depends on it
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_curate_on_an_existing_cluster_gives_the_same_shards(ray_head, demo_shift, tmp_path):
    proc = run_cli("curate", str(DEMO_CONFIG), "--out", str(tmp_path), "--no-progress", "--ray-address", ray_head)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shift = tmp_path / "demo-knn-img"
    manifest = json.loads((shift / "manifest.json").read_text())
    assert manifest["run"]["executor"] == "ray" and manifest["run"]["address"] == ray_head
    ours = {p.name: sha256_file(p) for p in (shift / "shards").glob("*.tar")}
    assert ours == {p.name: sha256_file(p) for p in (demo_shift / "shards").glob("*.tar")}


def test_unreachable_cluster_is_a_one_line_error(demo_world, tmp_path):
    proc = run_cli("curate", str(DEMO_CONFIG), "--out", str(tmp_path), "--ray-address", f"127.0.0.1:{free_port()}")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        line for line in proc.stderr.strip().splitlines() if "cannot reach Ray cluster" in line
    ]


def test_a_resource_error_inside_a_ray_worker_exits_2(demo_world, tmp_path):
    # The curator loads in a Ray actor; a model whose width differs from the index fails there.
    proc = run_cli(
        "curate", str(DEMO_CONFIG), "--out", str(tmp_path), "--no-progress",
        "--set", "curator.params.model=ViT-B-32", "--set", "curator.params.pretrained=random",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "imagenetpp: error: model ViT-B-32 embeds in 512 dims, the index in 32"  # fmt: skip
