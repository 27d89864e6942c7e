"""Web image search (Openverse, Flickr) against a loopback server answering in each API's
documented format: paging, a 429 with Retry-After, bad keys; no credential in any output."""

from __future__ import annotations

import io
import json
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import yaml
from PIL import Image

from curators.labels import label_set

from .conftest import REPO, one_line_error, run_cli

TOKEN = "ovtok-SECRET-1234567890"
FLICKR_KEY = "flickrkey-SECRET-abcdef"
PER_QUERY = 45  # results each query has in the fake index


class FakeSearchApis:
    """Openverse's /v1/images/ and Flickr's flickr.photos.search, plus the images they name."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.throttled: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                outer.requests.append((parts.path, {**query, **dict(self.headers)}))
                if parts.path.startswith("/img/"):
                    return self._image(parts.path)
                if parts.path == "/v1/images/":
                    return self._openverse(query)
                if parts.path == "/services/rest/":
                    return self._flickr(query)
                self.send_error(404)

            def _send(self, status: int, body: bytes, ctype: str, **headers) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _image(self, path: str) -> None:
                seed = sum(path.encode())
                arr = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG")
                self._send(200, buf.getvalue(), "image/jpeg")

            def _page(self, q: str, page: int, size: int) -> list[int]:
                return list(range((page - 1) * size, min(page * size, PER_QUERY)))

            def _openverse(self, query: dict) -> None:
                page, size = int(query.get("page", 1)), int(query.get("page_size", 20))
                ticket = f"{query['q']}:{page}"
                if page == 2 and ticket not in outer.throttled:  # throttled once, then fine
                    outer.throttled.add(ticket)
                    body = json.dumps({"detail": "Request was throttled."}).encode()
                    return self._send(429, body, "application/json", **{"Retry-After": "0"})
                slug = query["q"].replace(" ", "_")
                results = [{
                    "id": f"{slug}-{i}", "title": f"{query['q']} number {i}",
                    "url": f"http://{self.headers['Host']}/img/ov/{slug}/{i}.jpg",
                    "creator": f"creator {i}", "license": "by", "license_version": "4.0",
                    "foreign_landing_url": f"https://example.org/{slug}/{i}",
                } for i in self._page(query["q"], page, size)]  # fmt: skip
                body = {"result_count": PER_QUERY, "page_count": math.ceil(PER_QUERY / size),
                        "page_size": size, "page": page, "results": results}  # fmt: skip
                self._send(200, json.dumps(body).encode(), "application/json")

            def _flickr(self, query: dict) -> None:
                if query.get("api_key") != FLICKR_KEY:
                    body = {"stat": "fail", "code": 100, "message": "Invalid API Key (Key has invalid format)"}  # fmt: skip
                    return self._send(200, json.dumps(body).encode(), "application/json")
                page, size = int(query.get("page", 1)), int(query.get("per_page", 100))
                slug = query["text"].replace(" ", "_")
                photos = [{
                    "id": f"{slug}{i}", "owner": "12345@N00", "secret": "abc", "server": "65535",
                    "title": f"{query['text']} {i}", "license": "4", "ownername": f"owner {i}",
                    "url_c": f"http://{self.headers['Host']}/img/fl/{slug}/{i}.jpg",
                } for i in self._page(query["text"], page, size)]  # fmt: skip
                body = {"photos": {"page": page, "pages": math.ceil(PER_QUERY / size),
                                   "perpage": size, "total": PER_QUERY, "photo": photos},
                        "stat": "ok"}  # fmt: skip
                self._send(200, json.dumps(body).encode(), "application/json")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def apis():
    server = FakeSearchApis()
    yield server
    server.close()


def _params(apis, provider: str, **kw):
    from curators.web_search import WebSearchParams

    path = "/v1/images/" if provider == "openverse" else "/services/rest/"
    return WebSearchParams(provider=provider, endpoint=f"http://127.0.0.1:{apis.port}{path}",
                           allow_networks=["127.0.0.1/32"], **kw)  # fmt: skip


def test_queries_use_own_lemmas_and_the_parent():
    from curators.web_search import WebSearchCurator, WebSearchParams

    curator = WebSearchCurator(WebSearchParams())
    classes = label_set()
    assert curator.queries(classes[1]) == ["goldfish cyprinid", "Carassius auratus cyprinid"]
    assert curator.queries(classes[207]) == ["golden retriever"]  # "retriever" is in it already
    # "crane" names two classes: each is searched by its display name, and its parent
    assert curator.queries(classes[134]) == ["crane bird wading bird"]
    assert curator.queries(classes[517]) == ["construction crane lifting device"]


def test_openverse_pages_until_wanted_and_honours_429(apis, monkeypatch):
    from curators.base import Unit
    from curators.web_search import WebSearchCurator

    monkeypatch.setenv("OPENVERSE_TOKEN", TOKEN)
    curator = WebSearchCurator(_params(apis, "openverse", wanted=70, page_size=20))
    cands = list(curator.candidates(Unit("0001", (1,))))
    assert len(cands) == 70 and len({c.url for c in cands}) == 70
    pages = [(q["q"], q["page"]) for p, q in apis.requests if p == "/v1/images/"]
    # goldfish cyprinid: pages 1, 2 (throttled, then again), 3; then the next query's first two
    assert pages == [("goldfish cyprinid", "1"), ("goldfish cyprinid", "2"), ("goldfish cyprinid", "2"),
                     ("goldfish cyprinid", "3"), ("Carassius auratus cyprinid", "1"),
                     ("Carassius auratus cyprinid", "2"), ("Carassius auratus cyprinid", "2")]  # fmt: skip
    assert all(q.get("Authorization") == f"Bearer {TOKEN}" for p, q in apis.requests)
    first = cands[0]
    assert (first.license, first.creator, first.landing_page) == ("CC-BY-4.0", "creator 0", "https://example.org/goldfish_cyprinid/0")  # fmt: skip
    assert first.query_kind == "lemma" and first.query_value == "goldfish cyprinid"
    assert [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)


def test_flickr_bad_key_is_a_clear_error_without_the_key(apis, monkeypatch):
    from curators.base import ResourceError, Unit
    from curators.web_search import WebSearchCurator

    monkeypatch.setenv("FLICKR_API_KEY", "wrong-key-SECRET")
    curator = WebSearchCurator(_params(apis, "flickr", wanted=10, page_size=10))
    with pytest.raises(ResourceError) as err:
        list(curator.candidates(Unit("0001", (1,))))
    assert "Invalid API Key" in str(err.value) and "SECRET" not in str(err.value)


def test_missing_flickr_key_exits_2_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FLICKR_API_KEY"}
    config = _config(tmp_path, {"provider": "flickr"})
    one_line_error(run_cli("check", str(config), env=env), "FLICKR_API_KEY")


def _config(tmp_path: Path, params: dict, world: Path | None = None) -> Path:
    config = {
        "shift": "web", "seed": 0, "classes": {"wnids": ["n01443537", "n02099601"]},
        "target_per_class": 12, "curator": {"name": "web_search", "params": params},
        "acquire": {"allow_networks": ["127.0.0.1/32"]}, "shards": {"samples_per_shard": 10},
        "image": {"max_side": 32}, "select": {"near_duplicate_cosine": 1.0},
    }  # fmt: skip
    if world is not None:  # the shift's CLIP model embeds what was fetched
        config["embed"] = {"model": "imagenetpp-tiny", "pretrained": str(world / "model" / "imagenetpp-tiny.pt")}  # fmt: skip
    path = tmp_path / "web.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("provider", ["openverse", "flickr"])
def test_web_shift_end_to_end_keeps_credentials_out_of_everything(apis, demo_world, tmp_path, provider):  # fmt: skip
    path = "/v1/images/" if provider == "openverse" else "/services/rest/"
    config = _config(tmp_path, {"provider": provider, "endpoint": f"http://127.0.0.1:{apis.port}{path}",
                                "allow_networks": ["127.0.0.1/32"], "wanted": 20, "page_size": 10},
                     demo_world)  # fmt: skip
    env = {**os.environ, "OPENVERSE_TOKEN": TOKEN, "FLICKR_API_KEY": FLICKR_KEY}
    proc = run_cli("curate", str(config), "--out", str(tmp_path / "out"), "--executor", "local", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shift = tmp_path / "out" / "web"
    manifest = json.loads((shift / "manifest.json").read_text())
    assert manifest["total_samples"] == 24 and not manifest["shortfalls"]
    assert manifest["licenses"] == {"CC-BY-4.0" if provider == "openverse" else "CC-BY-2.0": 24}
    assert "CC-BY" in (shift / "README.md").read_text()
    from shards.reader import iter_samples

    metas = [json.loads(files["json"]) for tar in sorted((shift / "shards").glob("*.tar"))
             for _, files in iter_samples(tar)]  # fmt: skip
    assert all(m["source"]["creator"] and m["source"]["landing_page"] and m["license"] for m in metas)  # fmt: skip
    assert {m["source"]["dataset"] for m in metas} == {provider}
    blobs = [proc.stdout, proc.stderr] + [p.read_bytes().decode("latin-1") for p in (tmp_path / "out").rglob("*") if p.is_file()]  # fmt: skip
    for secret in (TOKEN, FLICKR_KEY):
        assert not any(secret in b for b in blobs), secret
    assert any(q.get("api_key") == FLICKR_KEY for _, q in apis.requests) == (provider == "flickr")
    assert REPO  # the CLI ran from the repository
