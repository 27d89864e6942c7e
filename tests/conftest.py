"""Shared fixtures: the demo world (built once, cached) and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "imagenetpp")
DEMO_CONFIG = REPO / "configs" / "demo_knn_img.yaml"

os.environ.setdefault("IMAGENETPP_CACHE", str(REPO / ".cache" / "imagenetpp"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def run_cli(*args: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, cwd=REPO, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """A user error: exit 2, exactly one stderr line naming the culprit, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagenetpp: error:"), proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def demo_world() -> Path:
    from pipelines.demo_world import ensure_demo_world

    return ensure_demo_world()


@pytest.fixture(scope="session")
def demo_shift(demo_world, tmp_path_factory) -> Path:
    """The demo shift, curated once through the CLI on a local Ray."""
    out = tmp_path_factory.mktemp("demo-out")
    run_cli("curate", str(DEMO_CONFIG), "--out", str(out), "--no-progress", check=True)
    return out / "demo-knn-img"
