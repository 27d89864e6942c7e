"""Publish a finished shift folder to the Hugging Face Hub (or any HF_ENDPOINT) as a dataset.

What goes: shards, index.parquet, skipped.parquet, manifest.json, embeddings, report/ and the
dataset card; never _work/, the run lock or temporaries. Resumable by content: the remote
tree is listed and a file goes only when missing or different (LFS files by sha256, others by
their git blob id), so a re-run after a kill, or after a finished publish, sends only what is
left. Large shifts go in several commits; a folder never holds more than 10,000 files (the
Hub's limit). 429 and 5xx are retried with backoff; 401/403 stop at once with one line.
The token (HF_TOKEN, else the stored login) is handed to huggingface_hub and nowhere else.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .card import dataset_card
from .manifest import INDEX, MANIFEST, SHARDS_DIR, read_manifest, sha256_file

FOLDER_LIMIT = 10_000  # files per folder the Hub accepts
TOP_LEVEL = ("README.md", MANIFEST, INDEX, "skipped.parquet", "embeddings.npy")
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


class PublishError(Exception):
    """A user-facing stop: bad repo id, refused token, not a shift. One line."""


@dataclass(frozen=True)
class Upload:
    local: Path
    path_in_repo: str
    size: int
    sha256: str


@dataclass
class Plan:
    files: list[Upload]
    changed: list[Upload]

    @property
    def unchanged(self) -> int:
        return len(self.files) - len(self.changed)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    base_s: float = 1.0
    max_s: float = 60.0


def shard_paths(names: list[str]) -> dict[str, str]:
    """Shard name -> path in the repo: shards/<name>, or shards/<NNNN>/<name> in folders of
    10,000 when there are more (the Hub refuses larger folders)."""
    if len(names) <= FOLDER_LIMIT:
        return {n: f"{SHARDS_DIR}/{n}" for n in names}
    return {n: f"{SHARDS_DIR}/{i // FOLDER_LIMIT:04d}/{n}" for i, n in enumerate(sorted(names))}


def shard_pattern(count: int) -> str:
    """The data_files pattern that finds the shards as shard_paths lays them out."""
    return f"{SHARDS_DIR}/*.tar" if count <= FOLDER_LIMIT else f"{SHARDS_DIR}/*/*.tar"


def git_blob_id(path: Path) -> str:
    """What the Hub lists as a non-LFS file's oid: git's blob hash."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # noqa: S324  git's own id
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_card(shift_dir: Path, repo_id: str | None = None) -> Path:
    """README.md from the manifest and the report (when there is one): written before the
    upload so that the uploaded card is the local one, and a re-publish finds it unchanged."""
    import json

    manifest = read_manifest(shift_dir)
    metrics_file = shift_dir / "report" / "metrics.json"
    metrics = json.loads(metrics_file.read_text("utf-8")) if metrics_file.is_file() else None
    text = dataset_card(manifest, metrics, shard_pattern(len(manifest["shards"])), repo_id)
    card = shift_dir / "README.md"
    if not card.is_file() or card.read_text("utf-8") != text:
        from .atomic import atomic_write_bytes

        atomic_write_bytes(card, text.encode())
    return card


def check_shift(shift_dir: Path) -> None:
    if not (shift_dir / MANIFEST).is_file() or not (shift_dir / INDEX).is_file():
        raise PublishError(f"not a finished shift folder (no {MANIFEST} or {INDEX}): {shift_dir}")


def local_files(shift_dir: Path) -> list[Upload]:
    """Everything that goes, with its repo path; the shards' sha256 come from the manifest
    (verify checks them), everything else is hashed here."""
    check_shift(shift_dir)
    manifest = read_manifest(shift_dir)
    paths = shard_paths([s["name"] for s in manifest["shards"]])
    out = []
    for s in manifest["shards"]:
        local = shift_dir / SHARDS_DIR / s["name"]
        if not local.is_file():
            raise PublishError(f"shard missing: {local} (run `imagenetpp verify {shift_dir}`)")
        out.append(Upload(local, paths[s["name"]], local.stat().st_size, s["sha256"]))
    for name in TOP_LEVEL:
        if (shift_dir / name).is_file():
            local = shift_dir / name
            out.append(Upload(local, name, local.stat().st_size, sha256_file(local)))
    report = shift_dir / "report"
    if report.is_dir():
        for local in sorted(p for p in report.rglob("*") if p.is_file()):
            rel = local.relative_to(shift_dir).as_posix()
            out.append(Upload(local, rel, local.stat().st_size, sha256_file(local)))
    return out


def remote_tree(api, repo_id: str, revision: str) -> dict[str, tuple[str, str | None]]:
    """path -> (git blob id, LFS sha256 or None) of what the revision holds; {} when the repo
    or the revision does not exist yet."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        entries = api.list_repo_tree(repo_id, repo_type="dataset", revision=revision, recursive=True)  # fmt: skip
        return {
            e.path: (e.blob_id, e.lfs.sha256 if e.lfs else None)
            for e in entries
            if hasattr(e, "blob_id")
        }
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return {}


def plan_upload(files: list[Upload], remote: dict[str, tuple[str, str | None]]) -> Plan:
    changed = []
    for f in files:
        have = remote.get(f.path_in_repo)
        if have is None:
            changed.append(f)
        elif have[1] is not None:
            if have[1] != f.sha256:
                changed.append(f)
        elif have[0] != git_blob_id(f.local):
            changed.append(f)
    return Plan(files, changed)


def commit_batches(files: list[Upload], max_files: int, max_bytes: int) -> list[list[Upload]]:
    """Commits of at most max_files files and (unless one file is larger) max_bytes; the card
    goes last, so the repo presents itself as a dataset only once its data is there."""
    ordered = [f for f in files if f.path_in_repo != "README.md"] + [
        f for f in files if f.path_in_repo == "README.md"
    ]
    batches: list[list[Upload]] = []
    size = 0
    for f in ordered:
        if not batches or len(batches[-1]) >= max_files or (size + f.size > max_bytes and batches[-1]):  # fmt: skip
            batches.append([])
            size = 0
        batches[-1].append(f)
        size += f.size
    return batches


def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _server_message(e: Exception) -> str:
    response = getattr(e, "response", None)
    text = ""
    if response is not None:
        text = response.headers.get("X-Error-Message", "") or ""
        if not text:
            try:
                text = str(response.json().get("error", ""))
            except Exception:  # noqa: BLE001  a body that is not JSON: say nothing more
                text = ""
    return " ".join(text.split())[:200]


def with_retries(
    call: Callable[[], object], what: str, policy: RetryPolicy, log: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> object:  # fmt: skip
    """call(), again after 429, 5xx or a dropped connection (exponential backoff, honouring
    Retry-After); 401/403 and other 4xx stop at once."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except (HfHubHTTPError, httpx2.TransportError) as e:
            status = _status(e)
            if status in (401, 403):
                why = _server_message(e) or "the token cannot write there"
                raise PublishError(
                    f"the Hub refused {what} ({status}): {why}; check HF_TOKEN or `hf auth login`"
                ) from None
            transient = status is None or status == 429 or status >= 500
            if not transient or attempt == policy.attempts:
                detail = f"{status}" if status else type(e).__name__
                raise PublishError(f"{what} failed ({detail}): {_server_message(e) or 'no detail'}") from None  # fmt: skip
            wait = min(policy.max_s, policy.base_s * 2 ** (attempt - 1))
            after = getattr(getattr(e, "response", None), "headers", {}).get("Retry-After")
            if after and str(after).isdigit():
                wait = min(policy.max_s, float(after))
            log(f"publish: {what}: {status or type(e).__name__}, retrying in {wait:.0f} s")
            sleep(wait)
    raise AssertionError("unreachable")


def check_endpoint(endpoint: str, timeout: float = 5.0) -> None:
    """Refuse an unreachable Hub at once (huggingface_hub would retry it for half a minute,
    then print a traceback). Skipped behind a proxy, where only the proxy is dialled."""
    import socket

    from .fetch import host_port

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):  # fmt: skip
        return
    try:
        socket.create_connection(host_port(endpoint), timeout=timeout).close()
    except OSError as e:
        raise PublishError(f"cannot reach the Hub at {endpoint} (HF_ENDPOINT): {e.strerror or e}") from None  # fmt: skip


def publish(
    shift_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    max_files_per_commit: int = 100,
    max_bytes_per_commit: int = 4 << 30,
    retry: RetryPolicy = RetryPolicy(),
    log: Callable[[str], None] = print,
) -> Plan:
    """Upload what the repo lacks; returns the plan (what went, what was already there)."""
    shift_dir = Path(shift_dir)
    if not REPO_ID.fullmatch(repo_id):
        raise PublishError(f"--repo-id must be NAMESPACE/NAME, got {repo_id!r}")
    check_shift(shift_dir)  # one line if it is not a shift, before the card is written
    write_card(shift_dir, repo_id)
    files = local_files(shift_dir)  # hashed once, card included
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token and not dry_run:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    check_endpoint(constants.ENDPOINT)
    api = HfApi(token=token or False)
    branch = revision or "main"
    remote = with_retries(lambda: remote_tree(api, repo_id, branch), "listing the repo", retry, log)  # fmt: skip
    plan = plan_upload(files, remote)
    if dry_run:
        return plan
    if not plan.changed:
        return plan

    def create() -> None:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, repo_type="dataset", branch=branch, exist_ok=True)

    with_retries(create, f"creating {repo_id}", retry, log)
    batches = commit_batches(plan.changed, max_files_per_commit, max_bytes_per_commit)
    for i, batch in enumerate(batches, 1):
        ops = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local)) for f in batch]  # fmt: skip
        message = f"imagenetpp publish: {len(batch)} files ({i}/{len(batches)})"
        with_retries(
            lambda ops=ops, message=message: api.create_commit(
                repo_id, ops, commit_message=message, repo_type="dataset", revision=branch
            ),
            f"commit {i}/{len(batches)}", retry, log,
        )  # fmt: skip
        log(f"publish: commit {i}/{len(batches)}: {len(batch)} files, {sum(f.size for f in batch) / 1e6:.1f} MB")  # fmt: skip
    return plan
