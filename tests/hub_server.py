"""A loopback stand-in for the Hugging Face Hub, for tests (standard library only).

It answers the subset of the Hub API that huggingface_hub 2.4 uses to upload a repo
(create_repo, create_commit, upload_folder with HF_HUB_DISABLE_XET, create_branch) and to read
it back (repo_info, list_repo_tree, list_repo_refs, hf_hub_download, snapshot_download):

    POST /api/repos/create                       409 when it exists (create_repo(exist_ok=True))
    POST /api/validate-yaml                      always valid
    GET  /api/whoami-v2
    GET  /api/{type}s/{ns}/{name}[/revision/{rev}]    repo info (?blobs=true adds sizes/oids)
    GET  /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]?recursive=&cursor=   Link-header pages
    GET  /api/{type}s/{ns}/{name}/refs
    POST /api/{type}s/{ns}/{name}/preupload/{rev}     "regular" for every file: bytes come inline
    POST /api/{type}s/{ns}/{name}/commit/{rev}        ndjson: header, file, deletedFile/-Folder
    POST|DELETE /api/{type}s/{ns}/{name}/branch/{branch}
    HEAD|GET /[{type}s/]{ns}/{name}/resolve/{rev}/{path}   X-Repo-Commit, ETag, X-Linked-*, Range

Repo ids must be "namespace/name". Everything lives in memory; each commit is a full snapshot.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

# Request kinds, for fail_next() and the request log.
KINDS = tuple("create validate whoami info tree refs preupload commit branch resolve other".split())
# The Hub's default .gitattributes sends these to LFS; any file over 10 MB goes there too.
LFS_SUFFIXES = (".tar", ".parquet", ".npy", ".png", ".jpg", ".jpeg", ".arrow", ".bin", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024
DROP = 0  # fail_next(kind, DROP): close the connection instead of answering
GITATTRIBUTES = b"".join(
    b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode() for s in LFS_SUFFIXES
)
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ACTIONS = "revision|tree|refs|preupload|commit|branch"
API = re.compile(
    rf"/api/(?P<type>model|dataset|space)s/{_REPO}(?:/(?P<action>{_ACTIONS})(?:/(?P<rev>[^/]+)(?P<rest>/.*)?)?)?"
)
RESOLVE = re.compile(rf"/(?:(?P<type>dataset|space)s/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<rest>.+)")
Answer = tuple[int, dict[str, str], bytes]


def git_oid(data: bytes) -> str:
    """The git blob sha1: the Hub's "oid" of a file, and the ETag of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_info(path: str, data: bytes) -> dict[str, Any] | None:
    """The "lfs" field the Hub lists for LFS-tracked files (sha256 as "oid"), else None."""
    if not (path.lower().endswith(LFS_SUFFIXES) or len(data) > LFS_MIN_SIZE):
        return None
    return {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    files: dict[str, bytes]  # the whole snapshot after this commit
    changed: list[str]  # paths this commit added or modified
    deleted: list[str]
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)  # oid -> commit


@dataclass
class Request:
    method: str
    path: str  # raw (percent-encoded), without the query
    query: dict[str, str]
    headers: HTTPMessage  # case-insensitive get()
    body: bytes
    kind: str = "other"
    route: dict[str, str] = field(default_factory=dict)  # type, repo, rev, rest (decoded)

    @property
    def auth(self) -> str | None:
        return self.headers.get("Authorization")


class HubError(Exception):
    """An error answer shaped like the Hub's: JSON {"error"} plus X-Error-Message/-Code."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        body: dict | None = None,
        **headers: str,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.body, self.headers = status, message, body or {}, headers
        if code:
            self.headers["X-Error-Code"] = code
        if status == 429:
            self.headers.setdefault("Retry-After", "0")

    def answer(self) -> Answer:
        headers = {"Content-Type": "application/json", "X-Error-Message": self.message}
        body = json.dumps({"error": self.message, **self.body}).encode()
        return self.status, headers | self.headers, body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive as httpx expects; every answer has Content-Length
    hub: HubServer

    def log_message(self, *args: Any) -> None:  # keep pytest output quiet
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        body = self._read_body()
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        req = Request(self.command, url.path, dict(parse_qsl(url.query)), self.headers, body)
        status, headers, out = self.hub._answer(req)
        if status == DROP:  # the connection goes without an answer, as a dying proxy's would
            self.close_connection = True
            return
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(out)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":  # HEAD gets the GET's headers (Content-Length too), no body
            self.wfile.write(out)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


class HubServer:
    """`with HubServer() as hub:` serves on 127.0.0.1 at `hub.endpoint` until the block ends."""

    def __init__(self, username: str = "user") -> None:
        self.username = username  # namespace for create_repo calls without one
        self.repos: dict[tuple[str, str], Repo] = {}  # (repo_type, repo_id) -> repo
        self.requests: list[tuple[str, str, str]] = []  # (method, raw path, kind)
        self.tokens_seen: set[str] = set()  # Authorization header values ("Bearer ...")
        self.required_token: str | None = None
        self.forbid = False
        self.tree_page_size = 1000  # the Hub's page size for tree listings
        self.commit_delay_s = 0.0  # a slow Hub: time for a test to kill a client mid-publish
        self._faults: list[list[Any]] = []  # [kind, status, times left]
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Handler,), {"hub": self}))
        self._httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- for tests ---------------------------------------------------------------------------

    def fail_next(self, kind: str, status: int, times: int = 1) -> None:
        """The next `times` requests of `kind` (one of KINDS, or "any") answer `status`
        (DROP: the connection is closed with no answer)."""
        if kind not in (*KINDS, "any"):
            raise ValueError(f"unknown kind {kind!r}: one of {KINDS} or 'any'")
        with self._lock:
            self._faults.append([kind, status, times])

    def commits(
        self, repo_id: str, repo_type: str = "dataset", branch: str = "main"
    ) -> list[Commit]:
        """The commits behind `branch`, oldest first; the first is the Hub's "initial commit"."""
        repo = self.repos[(repo_type, repo_id)]
        out, oid = [], repo.branches[branch]
        while oid is not None:
            out.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return out[::-1]

    def files(
        self, repo_id: str, revision: str = "main", repo_type: str = "dataset"
    ) -> dict[str, bytes]:
        return dict(self._resolve(self.repos[(repo_type, repo_id)], revision).files)

    # -- request handling --------------------------------------------------------------------

    def _answer(self, req: Request) -> Answer:
        req.kind, req.route = _route(req.path)
        if req.kind == "meta":  # huggingface_hub's own agent-registry / telemetry calls
            return _json({"standardEnvVars": [], "harnesses": {}})
        with self._lock:  # one request at a time: the store is plain dicts
            self.requests.append((req.method, req.path, req.kind))
            if req.auth:
                self.tokens_seen.add(req.auth)
            try:
                return self._gate(req) or getattr(self, f"_on_{req.kind}")(req)
            except HubError as err:
                return err.answer()

    def _gate(self, req: Request) -> Answer | None:
        """Injected faults first (as a front-end rate limiter would), then forbid, then the
        token; an answer only for a dropped connection, errors are raised."""
        for fault in self._faults:
            if fault[0] in (req.kind, "any"):
                fault[2] -= 1
                if fault[2] <= 0:
                    self._faults.remove(fault)
                if fault[1] == DROP:
                    return DROP, {}, b""
                raise HubError(fault[1], f"{HTTPStatus(fault[1]).phrase} (HubServer.fail_next)")
        if self.forbid:
            payload = json.loads(req.body or b"{}") if req.kind == "create" else {}
            repo_type = payload.get("type") or req.route.get("type") or "model"
            namespace = payload.get("organization") or req.route.get("repo", self.username)
            namespace = namespace.split("/")[0]
            message = f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"'
            raise HubError(403, message)
        if self.required_token and req.auth != f"Bearer {self.required_token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return None

    def _repo(self, req: Request) -> Repo:
        repo = self.repos.get((req.route["type"], req.route["repo"]))
        token = self.required_token
        allowed = req.auth == f"Bearer {token}" if token else bool(req.auth)
        if repo is None or (repo.private and not allowed):  # the Hub hides private repos so
            raise HubError(401 if repo else 404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, rev: str) -> Commit:
        oid = repo.branches.get(rev.removeprefix("refs/heads/"), rev)
        if oid not in repo.commits:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[oid]

    def _new_commit(
        self,
        repo: Repo,
        branch: str,
        header: dict[str, str],
        files: dict[str, bytes],
        changed: list[str],
        deleted: list[str],
    ) -> Commit:
        parent = repo.branches.get(branch)
        message, description = header.get("summary", ""), header.get("description", "")
        # Deterministic: the same repo, parent, message and content give the same oid.
        seed = [repo.repo_id, parent, message, sorted((p, git_oid(d)) for p, d in files.items())]
        oid = hashlib.sha1(json.dumps(seed).encode()).hexdigest()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        repo.commits[oid] = Commit(oid, parent, message, description, files, changed, deleted, date)
        repo.branches[branch] = oid
        return repo.commits[oid]

    def _url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"

    def _on_create(self, req: Request) -> Answer:
        payload = json.loads(req.body)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.username}/{payload['name']}"
        url = self._url(repo_type, repo_id)
        if (repo_type, repo_id) in self.repos:  # create_repo(exist_ok=True) reads "url" from it
            raise HubError(409, f"You already created this {repo_type} repo", body={"url": url})
        private = payload.get("visibility", "private" if payload.get("private") else "public")
        repo = self.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private == "private")
        # The Hub starts every repo with an "initial commit" that adds .gitattributes.
        files = {".gitattributes": GITATTRIBUTES}
        self._new_commit(repo, "main", {"summary": "initial commit"}, files, [*files], [])
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _on_validate(self, req: Request) -> Answer:
        return _json({"errors": [], "warnings": []})

    def _on_whoami(self, req: Request) -> Answer:
        if not req.auth:
            raise HubError(401, "Invalid credentials in Authorization header")
        return _json({"type": "user", "name": self.username, "orgs": [], "auth": {}})

    def _on_other(self, req: Request) -> Answer:
        raise HubError(404, f"{req.method} {req.path} is not served by this test hub")

    def _on_info(self, req: Request) -> Answer:
        repo = self._repo(req)
        head = self._resolve(repo, req.route["rev"] or "main")
        siblings = []
        for path, data in sorted(head.files.items()):
            siblings.append({"rfilename": path})
            if req.query.get("blobs") == "true":  # repo_info(files_metadata=True)
                lfs = lfs_info(path, data)
                siblings[-1] |= {"size": len(data), "blobId": git_oid(data)}
                siblings[-1] |= {"lfs": lfs | {"sha256": lfs["oid"]}} if lfs else {}
        info = {"_id": repo.repo_id, "id": repo.repo_id, "author": repo.repo_id.split("/")[0]}
        info |= {"sha": head.oid, "private": repo.private, "lastModified": head.date}
        return _json(info | {"gated": False, "disabled": False, "tags": [], "siblings": siblings})

    def _on_tree(self, req: Request) -> Answer:
        files = self._resolve(self._repo(req), req.route["rev"]).files
        recursive = req.query.get("recursive", "").lower() in ("true", "1")
        entries = _tree(files, req.route["rest"].strip("/"), recursive)
        start, size = int(req.query.get("cursor", 0)), self.tree_page_size
        headers = {}
        if start + size < len(entries):  # the client follows rel="next" as is: carry every param
            query = urlencode(req.query | {"cursor": start + size})
            headers["Link"] = f'<{self.endpoint}{req.path}?{query}>; rel="next"'
        return _json(entries[start : start + size], headers)

    def _on_refs(self, req: Request) -> Answer:
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in sorted(self._repo(req).branches.items())
        ]
        return _json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _on_preupload(self, req: Request) -> Answer:
        head = self._resolve(self._repo(req), req.route["rev"])
        # "regular" makes the client send every file base64 inside the commit (no LFS API), and
        # "oid" (the current blob's) lets it drop unchanged files, as the Hub does.
        files = []
        for item in json.loads(req.body)["files"]:
            oid = git_oid(head.files[item["path"]]) if item["path"] in head.files else None
            files.append(
                {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid}
            )
        return _json({"files": files, "commitOid": head.oid})

    def _on_commit(self, req: Request) -> Answer:
        time.sleep(self.commit_delay_s)
        repo, branch = self._repo(req), req.route["rev"]
        if "create_pr" in req.query:
            raise HubError(400, "create_pr is not supported by this test hub")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "The first ndjson line must be the commit header")
        header, head = lines[0]["value"], repo.commits[repo.branches[branch]]
        if header.get("parentCommit") not in (None, head.oid):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files, changed, deleted = dict(head.files), [], []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                raw = value["content"]
                data = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                changed += [path] if files.get(path) != data else []
                files[path] = data
            elif key in ("deletedFile", "deletedFolder"):
                folder = path.rstrip("/") + "/" if key == "deletedFolder" else None
                gone = [p for p in files if p == path or (folder and p.startswith(folder))]
                if not gone:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                deleted += gone
                files = {p: d for p, d in files.items() if p not in gone}
            else:  # lfsFile / copies need the LFS API, which preupload never asks for
                raise HubError(400, f"{key!r} commit lines are not supported by this test hub")
        commit = self._new_commit(repo, branch, header, files, changed, deleted)
        url = f"{self._url(repo.repo_type, repo.repo_id)}/commit/{commit.oid}"
        return _json(
            {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None}
        )

    def _on_branch(self, req: Request) -> Answer:
        repo, branch = self._repo(req), req.route["rev"]
        if req.method == "DELETE":
            if repo.branches.pop(branch, None) is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            return _json({})
        if branch in repo.branches:
            raise HubError(409, "Reference already exists")
        start = json.loads(req.body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = self._resolve(repo, start).oid
        return _json({})

    def _on_resolve(self, req: Request) -> Answer:
        commit = self._resolve(self._repo(req), req.route["rev"])
        path = req.route["rest"]
        if path not in commit.files:  # X-Repo-Commit lets the client cache the absence
            raise HubError(404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": commit.oid})
        data = commit.files[path]
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{git_oid(data)}"',
            "Accept-Ranges": "bytes",
        }
        if lfs := lfs_info(path, data):  # an LFS file's etag is its sha256, sent as X-Linked-Etag
            etag = f'"{lfs["oid"]}"'
            headers |= {"ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(len(data))}
        headers["Content-Type"] = "application/octet-stream"
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range") or "")
        if not match:  # http_get only sends a Range to resume a partial download
            return 200, headers, data
        start, end = int(match[1]), min(int(match[2] or len(data) - 1), len(data) - 1)
        if start >= len(data):
            raise HubError(
                416, "Range not satisfiable", **{"Content-Range": f"bytes */{len(data)}"}
            )
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return 206, headers, data[start : end + 1]


def _route(path: str) -> tuple[str, dict[str, str]]:
    """(kind, parts) of a raw request path; rev and file paths come back percent-decoded."""
    fixed = {
        "/api/repos/create": "create",
        "/api/validate-yaml": "validate",
        "/api/whoami-v2": "whoami",
    }
    if path in fixed:
        return fixed[path], {}
    if path.startswith(("/api/agent-harnesses", "/api/telemetry")):
        return "meta", {}
    if m := API.fullmatch(path) or RESOLVE.fullmatch(path):
        action = m.groupdict().get("action", "resolve")
        kind = "info" if action in (None, "revision") else action
        parts = {"type": m["type"] or "model", "repo": m["repo"], "rev": unquote(m["rev"] or "")}
        return kind, parts | {"rest": unquote((m["rest"] or "").removeprefix("/"))}
    return "other", {}


def _json(value: Any, headers: dict[str, str] | None = None) -> Answer:
    return 200, {"Content-Type": "application/json", **(headers or {})}, json.dumps(value).encode()


def _tree(files: dict[str, bytes], base: str, recursive: bool) -> list[dict[str, Any]]:
    """Entries under `base` as the Hub lists them: folders too, and "lfs" on LFS files."""
    dirs = {p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)}
    if base and base not in dirs:
        raise HubError(404, f"{base} does not exist", "EntryNotFound")
    prefix = base + "/" if base else ""

    def listed(path: str) -> bool:
        return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

    entries: list[dict[str, Any]] = []
    for d in filter(listed, dirs):
        under = sorted((p, git_oid(data)) for p, data in files.items() if p.startswith(d + "/"))
        oid = hashlib.sha1(json.dumps(under).encode()).hexdigest()
        entries.append({"type": "directory", "oid": oid, "size": 0, "path": d})
    for p in filter(listed, files):
        entry = {"type": "file", "oid": git_oid(files[p]), "size": len(files[p]), "path": p}
        if lfs := lfs_info(p, files[p]):
            entry["lfs"] = lfs
        entries.append(entry)
    return sorted(entries, key=lambda e: e["path"])
