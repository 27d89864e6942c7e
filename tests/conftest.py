"""Shared fixtures: the demo world (built once, cached) and a CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "imagenetpp")
DEMO_CONFIG = REPO / "configs" / "demo_knn_img.yaml"

os.environ.setdefault("IMAGENETPP_CACHE", str(REPO / ".cache" / "imagenetpp"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# curate ends with report/ (~10 s, mostly importing torch and open_clip in a fresh process):
# tests of other things skip it; the report's own tests and the demo's ask for it.
os.environ["IMAGENETPP_NO_REPORT"] = "1"


def with_report() -> dict:
    """The environment of a command that writes its report as a user's would."""
    return {k: v for k, v in os.environ.items() if k != "IMAGENETPP_NO_REPORT"}


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

    world = ensure_demo_world()
    _start_other_world()
    return world


@pytest.fixture(scope="session")
def demo_shift(demo_world, tmp_path_factory) -> Path:
    """The demo shift, curated once through the CLI on a local Ray."""
    out = tmp_path_factory.mktemp("demo-out")
    run_cli("curate", str(DEMO_CONFIG), "--out", str(out), "--no-progress", check=True, env=with_report())  # fmt: skip
    return out / "demo-knn-img"


# A second demo world, built from scratch in another folder for test_reproducible. The build is
# single-threaded (its CLIP training pins one thread, for identical bytes anywhere), so it runs
# in the background, started once the shared world is ready (not competing with that build),
# and overlaps the other tests.
_OTHER_WORLD: dict = {}


def pytest_collection_finish(session) -> None:
    _OTHER_WORLD["wanted"] = any(
        item.nodeid.startswith("tests/test_reproducible.py") for item in session.items
    )


def _start_other_world() -> None:
    if not _OTHER_WORLD.get("wanted") or "proc" in _OTHER_WORLD:
        return
    root = Path(tempfile.mkdtemp(prefix="imagenetpp-other-world-"))
    env = {**os.environ, "IMAGENETPP_CACHE": str(root / "other-cache"), "PYTHONPATH": str(REPO)}
    with open(root / "build.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from pipelines.demo_world import ensure_demo_world as e; e()"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    _OTHER_WORLD.update(proc=proc, root=root)


def pytest_sessionfinish(session) -> None:
    if proc := _OTHER_WORLD.get("proc"):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(_OTHER_WORLD["root"], ignore_errors=True)


@pytest.fixture
def other_demo_world(demo_world) -> tuple[Path, str]:
    """(cache folder, build log) of the demo world built in the background in another folder."""
    _start_other_world()  # already running unless this test runs first
    proc, root = _OTHER_WORLD["proc"], _OTHER_WORLD["root"]
    proc.wait()
    log = (root / "build.log").read_text()
    assert proc.returncode == 0, log
    return root / "other-cache", log
