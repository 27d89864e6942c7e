"""A simple HTTP fetcher: one URL in, its bytes or a reason out. Knows nothing of classes.

Bounded: a connect/read timeout, a maximum body size enforced while streaming, a few retries
with backoff on transient failures (connection errors, timeouts, 429, 5xx). Anything else (a
404, a wrong content type) fails at once. The acquire stage calls it from a thread pool; the
downloader issue replaces it with a faster engine behind the same function.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass

USER_AGENT = "imagenetpp/0.1 (+https://github.com/imagenetpp)"
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Fetched:
    url: str
    data: bytes | None  # None when it failed
    status: str  # ok | error
    error: str | None = None
    http_status: int | None = None
    transient: bool = False  # worth retrying later (timeouts, 429, 5xx)


def fetch_url(
    url: str,
    timeout: float = 10.0,
    max_bytes: int = 20 << 20,
    retries: int = 2,
    backoff: float = 0.2,
) -> Fetched:
    """GET ``url``; never raises for what the network or the server does."""
    if not url.startswith(("http://", "https://")):
        return Fetched(url, None, "error", f"unsupported scheme: {url.split(':', 1)[0]}")
    last = Fetched(url, None, "error", "not tried")
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        last = _fetch_once(url, timeout, max_bytes)
        if last.status == "ok" or not last.transient:
            return last
    return last


def _fetch_once(url: str, timeout: float, max_bytes: int) -> Fetched:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                return Fetched(url, None, "error", f"too large: {declared} bytes", response.status)
            chunks, size = [], 0
            while chunk := response.read(65536):
                size += len(chunk)
                if size > max_bytes:
                    return Fetched(url, None, "error", f"too large: over {max_bytes} bytes", response.status)  # fmt: skip
                chunks.append(chunk)
            data = b"".join(chunks)
            if declared and declared.isdigit() and len(data) != int(declared):
                return Fetched(url, None, "error", "body cut short", response.status, True)
            return Fetched(url, data, "ok", None, response.status)
    except urllib.error.HTTPError as e:
        return Fetched(url, None, "error", f"HTTP {e.code}", e.code, e.code in TRANSIENT_HTTP)
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        return Fetched(url, None, "error", f"{type(reason).__name__}: {reason}", None, True)
    except Exception as e:  # noqa: BLE001  http.client raises IncompleteRead and others
        return Fetched(url, None, "error", f"{type(e).__name__}: {e}", None, True)
