"""imagenetpp publish against a loopback Hugging Face Hub (tests/hub_server.py): the round trip
back through snapshot_download and datasets, resume by content, retries, refusals, the token."""

from __future__ import annotations

import fnmatch
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from shards.publish import FOLDER_LIMIT, Upload, commit_batches, shard_paths, shard_pattern
from shards.reader import iter_samples

from .conftest import CLI, REPO, one_line_error
from .hub_server import DROP, HubServer

TOKEN = "hf_loopback_secret_7f3a"
REPO_ID = "imagenetpp-tests/demo-knn-img"


@pytest.fixture
def hub(tmp_path):
    with HubServer() as server:
        server.required_token = TOKEN
        yield server


@pytest.fixture
def shift(demo_shift, tmp_path) -> Path:
    """A copy of the demo shift (publish writes its card), with a _work folder that must stay."""
    out = tmp_path / "shift"
    shutil.copytree(demo_shift, out)
    assert (out / "_work").is_dir() and (out / "report" / "index.html").is_file()
    return out


def hub_env(hub: HubServer, shift: Path, token: str | None = TOKEN) -> dict[str, str]:
    """A user's environment pointed at the loopback Hub, with no stored login."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(shift.parent / "hf"))
    if token:
        env["HF_TOKEN"] = token
    return env


def run_publish(hub, shift, *args, token=TOKEN) -> subprocess.CompletedProcess:
    env = hub_env(hub, shift, token)
    cmd = [CLI, "publish", str(shift), "--repo-id", REPO_ID, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert TOKEN not in proc.stdout + proc.stderr  # never printed, whatever happened
    return proc


def expected_files(shift: Path) -> dict[str, bytes]:
    keep = {}
    for p in sorted(shift.rglob("*")):
        rel = p.relative_to(shift).as_posix()
        if p.is_file() and not rel.startswith("_work/") and not p.name.startswith("."):
            keep[rel] = p.read_bytes()
    return keep


def test_publish_round_trip_through_snapshot_download_and_datasets(hub, shift, tmp_path):
    # A dry run lists what would go and touches nothing on the Hub.
    dry = run_publish(hub, shift, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "shards/demo-knn-img-000000.tar" in dry.stdout and "_work" not in dry.stdout
    assert not any(kind in ("create", "commit") for _, _, kind in hub.requests)

    proc = run_publish(hub, shift, "--private")
    assert proc.returncode == 0, proc.stderr
    assert hub.repos[("dataset", REPO_ID)].private
    assert hub.tokens_seen == {f"Bearer {TOKEN}"}
    local = expected_files(shift)
    remote = hub.files(REPO_ID)
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local
    assert "manifest.json" in local and "report/metrics.json" in local and "README.md" in local

    # The card's header: licence from the samples, size, and data_files that find the shards.
    card = local["README.md"].decode()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["license"] == "cc0-1.0" and header["size_categories"] == ["1K<n<10K"]
    pattern = header["configs"][0]["data_files"][0]["path"]
    shards = sorted(k for k in local if k.endswith(".tar"))
    assert shards and all(fnmatch.fnmatch(s, pattern) for s in shards)
    assert "LT@500" in card and "CLIPScore" in card and f'load_dataset("{REPO_ID}"' in card

    from huggingface_hub import snapshot_download

    down = tmp_path / "down"
    snapshot_download(REPO_ID, repo_type="dataset", endpoint=hub.endpoint, token=TOKEN,
                      local_dir=down, cache_dir=tmp_path / "hf-cache")  # fmt: skip
    for rel, data in local.items():
        assert (down / rel).read_bytes() == data, rel

    import datasets

    # The download folder as datasets sees a Hub repo: the card's `configs` find the shards.
    ds = datasets.load_dataset(str(down), split="train", cache_dir=str(tmp_path / "ds-cache"))
    want = {k: f for s in shards for k, f in iter_samples(shift / s)}
    assert sorted(ds["__key__"]) == sorted(want)
    for row in ds:
        files = want[row["__key__"]]
        assert row["cls"] == int(files["cls"]) and row["json"]["label"] == int(files["cls"])
        buf = io.BytesIO()
        row["jpg"].save(buf, format="PNG")  # decoded by datasets: compare pixels, not codecs
        from PIL import Image

        assert Image.open(buf).tobytes() == Image.open(io.BytesIO(files["jpg"])).tobytes()

    # Published again: nothing goes, no commit is made.
    commits = len(hub.commits(REPO_ID))
    again = run_publish(hub, shift)
    assert again.returncode == 0 and "0 files sent" in again.stdout, again.stdout
    assert len(hub.commits(REPO_ID)) == commits
    # A changed report file goes alone.
    edited = json.loads((shift / "report" / "metrics.json").read_text()) | {"edited": True}
    (shift / "report" / "metrics.json").write_text(json.dumps(edited))
    third = run_publish(hub, shift)
    assert third.returncode == 0 and "1 files sent" in third.stdout, third.stdout
    assert hub.commits(REPO_ID)[-1].changed == ["report/metrics.json"]


def test_publish_to_a_branch(hub, shift):
    proc = run_publish(hub, shift, "--revision", "v1")
    assert proc.returncode == 0, proc.stderr
    assert "README.md" in hub.files(REPO_ID, revision="v1")
    assert set(hub.files(REPO_ID, revision="main")) == {".gitattributes"}


def test_a_refusal_ends_with_one_line(hub, shift):
    hub.forbid = True
    line = one_line_error(run_publish(hub, shift), "403")
    assert "HF_TOKEN" in line
    hub.forbid = False
    one_line_error(run_publish(hub, shift, token="hf_wrong"), "401")
    one_line_error(run_publish(hub, shift, token=None), "no Hugging Face token")


def test_rate_limit_and_server_errors_are_retried(hub, shift):
    hub.fail_next("commit", 429, times=2)
    hub.fail_next("create", 503)
    hub.fail_next("commit", DROP)  # a connection dropped with no answer: retried too
    proc = run_publish(hub, shift)
    assert proc.returncode == 0, proc.stderr
    assert "429, retrying" in proc.stdout and "503, retrying" in proc.stdout
    assert "RemoteProtocolError, retrying" in proc.stdout
    assert {k: v for k, v in hub.files(REPO_ID).items() if k != ".gitattributes"} == expected_files(shift)  # fmt: skip


def test_sigkilled_publish_resumes_and_sends_each_file_once(hub, shift):
    hub.commit_delay_s = 0.3
    env = hub_env(hub, shift)
    cmd = [CLI, "publish", str(shift), "--repo-id", REPO_ID, "--files-per-commit", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while ("dataset", REPO_ID) not in hub.repos or len(hub.commits(REPO_ID)) < 4:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    landed = len(hub.commits(REPO_ID))
    assert landed < len(expected_files(shift))  # killed part-way
    done = run_publish(hub, shift, "--files-per-commit", "50")
    assert done.returncode == 0, done.stderr
    sent = [p for c in hub.commits(REPO_ID)[1:] for p in c.changed]
    assert sorted(sent) == sorted(expected_files(shift))  # each file once: nothing sent twice


def test_publish_mistakes_are_one_line(hub, shift, tmp_path):
    one_line_error(run_publish(hub, shift, "--files-per-commit", "0"), "--files-per-commit")
    env = hub_env(hub, shift)
    bad = subprocess.run([CLI, "publish", str(shift), "--repo-id", "no-namespace"], capture_output=True, text=True, env=env)  # fmt: skip
    one_line_error(bad, "NAMESPACE/NAME")
    missing = subprocess.run([CLI, "publish", str(tmp_path / "nope"), "--repo-id", REPO_ID], capture_output=True, text=True, env=env)  # fmt: skip
    one_line_error(missing, "not a finished shift folder")
    assert not hub.requests
    # A Hub that cannot be reached answers at once, not after half a minute of retries.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
        gone = subprocess.run([CLI, "publish", str(shift), "--repo-id", REPO_ID], capture_output=True, text=True, env={**env, "HF_ENDPOINT": nowhere})  # fmt: skip
    one_line_error(gone, "cannot reach the Hub", nowhere)


@pytest.mark.parametrize(
    ("curator_licence", "per_sample", "header"),
    [
        ("CC0-1.0 (synthetic demo)", {}, {"license": "cc0-1.0"}),
        (None, {"CC-BY-4.0": 5}, {"license": "cc-by-4.0"}),
        # Not identifiers the Hub knows: it would refuse the card, so they are `other`.
        (None, {"CC-BY-SA-2.0": 5}, {"license": "other", "license_name": "cc-by-sa-2.0",
                                    "license_link": "https://creativecommons.org/licenses/by-sa/2.0/"}),
        (None, {"PDM": 5}, {"license": "other", "license_name": "pdm",
                            "license_link": "https://creativecommons.org/publicdomain/mark/1.0/"}),
        (None, {"CC-BY-4.0": 3, "CC0-1.0": 2}, {"license": "other", "license_name": "mixed"}),
        (None, {"CC-BY-4.0": 3, "unstated": 2}, {"license": "other", "license_name": "mixed"}),
    ],
)  # fmt: skip
def test_the_card_names_licences_the_way_the_hub_accepts(curator_licence, per_sample, header):
    from shards.card import HUB_LICENSES, license_header

    manifest = {"licenses": per_sample, "curator_facts": {"license": curator_licence}}
    got = yaml.safe_load("\n".join(license_header(manifest)))
    assert got == header and got["license"] in HUB_LICENSES


def test_large_shifts_keep_folders_under_the_hub_limit():
    names = [f"s-{i:06d}.tar" for i in range(FOLDER_LIMIT + 5)]
    paths = shard_paths(names)
    folders: dict[str, int] = {}
    for p in paths.values():
        folders[p.rsplit("/", 1)[0]] = folders.get(p.rsplit("/", 1)[0], 0) + 1
    assert len(folders) == 2 and max(folders.values()) <= FOLDER_LIMIT
    assert all(fnmatch.fnmatch(p, shard_pattern(len(names))) for p in paths.values())
    assert shard_paths(names[:3]) == {n: f"shards/{n}" for n in names[:3]}

    files = [Upload(Path(n), n, 10, "") for n in ("README.md", "a", "b", "c", "d")]
    batches = commit_batches(files, max_files=2, max_bytes=25)
    assert [[f.path_in_repo for f in b] for b in batches] == [["a", "b"], ["c", "d"], ["README.md"]]  # fmt: skip
