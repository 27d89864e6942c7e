"""A loopback HTTP server for tests, with faults chosen by path.

    /img/<name>             the bytes registered under <name> (200, image/jpeg)
    /missing/<x>            404
    /flaky/<name>           500 the first time each path is asked, then the image
    /slow/<name>            answers after ``slow_seconds`` (past a client's timeout)
    /cut/<name>             declares the full length, sends half, closes
    /html/<x>               200 with an HTML page
    /ratelimit/<name>       429 with Retry-After: 1 the first time, then the image
    /redirect/<name>        302 to /img/<name>
    /redirloop/<x>          302 to itself
    /offsite/<name>         302 to the same path on 127.0.0.2 (outside an allowed 127.0.0.1/32)
    /optout/<name>          the image with X-Robots-Tag: noai
    /wrongtype/<name>       the image bytes, declared text/plain
    /big/<x>                a 3 MB body

Serves 127.0.0.1 only, on a free port, in a daemon thread; counts requests per path.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultServer:
    def __init__(self, images: dict[str, bytes], slow_seconds: float = 3.0) -> None:
        self.images = images
        self.slow_seconds = slow_seconds
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet test output
                pass

            def do_GET(self) -> None:  # noqa: N802  (http.server's name)
                with server._lock:
                    server.hits[self.path] += 1
                    first = server.hits[self.path] == 1
                kind, _, name = self.path.strip("/").partition("/")
                data = server.images.get(name)
                if kind == "missing" or (data is None and kind not in ("html", "redirloop", "big")):
                    return self._send(404, b"not found", "text/plain")
                if kind == "img":
                    return self._send(200, data, "image/jpeg")
                if kind == "flaky":
                    if first:
                        return self._send(500, b"try again", "text/plain")
                    return self._send(200, data, "image/jpeg")
                if kind == "slow":
                    time.sleep(server.slow_seconds)
                    return self._send(200, data, "image/jpeg")
                if kind == "cut":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return None
                if kind == "ratelimit":
                    if first:
                        return self._send(429, b"slow down", "text/plain", {"Retry-After": "1"})
                    return self._send(200, data, "image/jpeg")
                if kind in ("redirect", "redirloop", "offsite"):
                    target = {"redirect": f"/img/{name}", "redirloop": self.path,
                              "offsite": f"http://127.0.0.2:{server.port}/img/{name}"}[kind]  # fmt: skip
                    return self._send(302, b"", "text/plain", {"Location": target})
                if kind == "optout":
                    return self._send(200, data, "image/jpeg", {"X-Robots-Tag": "noai"})
                if kind == "wrongtype":
                    return self._send(200, data, "text/plain")
                if kind == "big":
                    return self._send(200, b"\xff" * (3 << 20), "image/jpeg")
                if kind == "html":
                    return self._send(200, b"<html><body>nothing here</body></html>", "text/html")
                return self._send(404, b"unknown", "text/plain")

            def _send(
                self, code: int, body: bytes, ctype: str, headers: dict | None = None
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None  # a client that hung up early is expected
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, kind: str, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{kind}/{name}"

    def __enter__(self) -> FaultServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
