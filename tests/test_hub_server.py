"""Self-test of tests/hub_server.py against the real huggingface_hub client (no network)."""

from __future__ import annotations

import hashlib

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, RepoFile, RepoFolder, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from tests.hub_server import HubServer, git_oid

REPO = "ns/shift"
FILES = {
    "README.md": b"---\nlicense: mit\n---\n# A test shift\n",
    "shards/00000.tar": bytes(range(256)) * 40,
    "meta/deep/info.json": b'{"n": 3}\n',
}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer() as server:
        # For subprocesses: huggingface_hub reads these once, when it is imported.
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        # In this process it is already imported: patch its copies, and pass endpoint= and
        # cache_dir= to every call (constants.ENDPOINT / HF_HUB_CACHE stay huggingface.co's).
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


def _upload(api: HfApi, files: dict[str, bytes], message: str, revision: str | None = None):
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=d) for p, d in files.items()]
    return api.create_commit(
        REPO, ops, commit_message=message, repo_type="dataset", revision=revision
    )


def test_round_trip_private_dataset(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    api.create_repo(REPO, repo_type="dataset", private=True)
    api.create_repo(REPO, repo_type="dataset", private=True, exist_ok=True)  # 409 -> fine
    info = _upload(api, FILES, "add shift")
    assert hub.files(REPO) == {".gitattributes": hub.files(REPO)[".gitattributes"], **FILES}
    assert [c.message for c in hub.commits(REPO)] == ["initial commit", "add shift"]
    assert sorted(hub.commits(REPO)[-1].changed) == sorted(FILES)
    assert info.oid == hub.commits(REPO)[-1].oid
    assert hub.tokens_seen == {"Bearer hf_test"}
    assert ("POST", "/api/validate-yaml", "validate") in hub.requests

    hub.tree_page_size = 2  # make the client follow Link pagination
    tree = {e.path: e for e in api.list_repo_tree(REPO, repo_type="dataset", recursive=True)}
    assert isinstance(tree["meta/deep"], RepoFolder) and isinstance(tree["meta"], RepoFolder)
    tar, readme = tree["shards/00000.tar"], tree["README.md"]
    assert isinstance(tar, RepoFile) and tar.lfs is not None and readme.lfs is None
    assert tar.lfs.sha256 == hashlib.sha256(FILES["shards/00000.tar"]).hexdigest()
    assert tar.size == tar.lfs.size == len(FILES["shards/00000.tar"])
    assert readme.blob_id == git_oid(FILES["README.md"])

    # Private: anonymous readers see "not found", as on the Hub.
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).dataset_info(REPO)

    out = api.snapshot_download(
        REPO, repo_type="dataset", local_dir=tmp_path / "dl", cache_dir=tmp_path / "cache"
    )
    for path, data in FILES.items():
        assert (tmp_path / "dl" / path).read_bytes() == data, path
    assert out == str(tmp_path / "dl")

    # A branch from main, a commit on it; main is untouched. Revisions are percent-encoded.
    api.create_branch(REPO, repo_type="dataset", branch="refs-test/v1")
    _upload(api, {"extra.txt": b"on the branch\n"}, "branch only", revision="refs-test/v1")
    assert "extra.txt" in hub.files(REPO, "refs-test/v1") and "extra.txt" not in hub.files(REPO)
    branches = {b.name for b in api.list_repo_refs(REPO, repo_type="dataset").branches}
    assert branches == {"main", "refs-test/v1"}
    path = api.hf_hub_download(
        REPO, "extra.txt", repo_type="dataset", revision="refs-test/v1", cache_dir=tmp_path / "c2"
    )
    assert open(path, "rb").read() == b"on the branch\n"


def test_faults_and_forbid(hub):
    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    api.create_repo(REPO, repo_type="dataset")

    # create_commit posts the commit once: a 429 there surfaces, and nothing was committed.
    hub.fail_next("commit", 429)
    with pytest.raises(HfHubHTTPError) as err:
        _upload(api, {"a.txt": b"a"}, "first try")
    assert err.value.response.status_code == 429
    assert len(hub.commits(REPO)) == 1
    _upload(api, {"a.txt": b"a"}, "second try")
    assert [c.message for c in hub.commits(REPO)][-1] == "second try"

    # The preupload call goes through http_backoff: one 503 is retried (after ~1 s).
    hub.fail_next("preupload", 503)
    _upload(api, {"b.txt": b"b"}, "after a 503")
    kinds = [kind for _, _, kind in hub.requests]
    assert kinds[-3:] == ["preupload", "preupload", "commit"]

    hub.forbid = True
    n = len(hub.requests)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("other/shift", repo_type="dataset", exist_ok=True)
    assert err.value.response.status_code == 403
    assert "rights to create a dataset" in str(err.value)
    assert all(kind != "commit" for _, _, kind in hub.requests[n:])
    hub.forbid = False

    hub.required_token = "hf_right"
    with pytest.raises(HfHubHTTPError) as err:
        api.dataset_info(REPO)
    assert err.value.response.status_code == 401
    assert HfApi(endpoint=hub.endpoint, token="hf_right").dataset_info(REPO).id == REPO
