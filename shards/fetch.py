"""The HTTP engine: one URL in, its bytes or a classified failure out. Knows nothing of classes.

Safe by default: http/https only; every hop's host is resolved once and the address checked
(private, loopback, link-local, metadata and other non-global addresses are refused unless
allowed) and then connected to directly, so DNS cannot answer differently after the check;
redirects capped; the body size bounded while streaming; `X-Robots-Tag: noai` (and the other
opt-out values img2dataset honours) refused. Transient failures (timeouts, connection errors,
429, 5xx, a body cut short) are retried with exponential backoff and jitter, honouring
`Retry-After`; everything else fails at once. Concurrency is the caller's (a thread pool);
``Fetcher`` adds a per-host limit.
"""

from __future__ import annotations

import http.client
import ipaddress
import random
import socket
import ssl
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

USER_AGENT = "imagenetpp/0.1 (+https://github.com/imagenetpp/imagenetpp)"
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
OPT_OUT = ("noai", "noimageai", "none")  # X-Robots-Tag values img2dataset honours
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Error kinds a later --retry-failed tries again; the others (404, not an image) never change.
TRANSIENT_KINDS = frozenset({"timeout", "connection", "dns", "http_transient", "cut"})


def host_port(url_text: str) -> tuple[str, int]:
    """(host, port) a URL connects to, the scheme's port when none is given."""
    from urllib.parse import urlparse

    url = urlparse(url_text)
    return url.hostname or "", url.port or (80 if url.scheme == "http" else 443)


@dataclass(frozen=True)
class FetchPolicy:
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5  # first wait; doubles, with +-50% jitter
    max_wait: float = 30.0  # a Retry-After longer than this ends the URL (a transient failure)
    max_bytes: int = 20 << 20
    max_redirects: int = 5
    user_agent: str = USER_AGENT
    per_host: int = 16  # requests in flight to one host
    allow_private: bool = False  # private, loopback, link-local, ... addresses
    allow_networks: tuple[str, ...] = ()  # CIDRs allowed even when private, e.g. 127.0.0.1/32
    opt_out: tuple[str, ...] = OPT_OUT  # () to ignore X-Robots-Tag
    # host -> "ip:port", as curl --resolve: a mirror or a local server answers for a host
    # named in URLs, the URLs (and the provenance that records them) unchanged
    resolve: tuple[tuple[str, str], ...] = ()
    accept_types: tuple[str, ...] = ("image/",)  # content types taken (prefixes): an API's JSON

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.allow_networks]


@dataclass(frozen=True)
class Fetched:
    url: str
    data: bytes | None  # None when it failed
    status: str  # ok | error
    error: str | None = None  # a readable reason
    http_status: int | None = None
    kind: str | None = None  # the error's kind: http, timeout, blocked_address, opt_out, ...
    content_type: str | None = None
    headers: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT_KINDS


def address_refusal(ip: str, policy: FetchPolicy) -> str | None:
    """Why connecting to ``ip`` is refused under ``policy``, or None when it is allowed."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    if any(addr in net for net in policy.networks()):
        return None
    if addr.is_global and not addr.is_multicast:
        return None
    if policy.allow_private and (addr.is_private or addr.is_loopback or addr.is_link_local):
        if str(addr) not in ("169.254.169.254", "fd00:ec2::254"):  # cloud metadata: never
            return None
    what = (
        "loopback" if addr.is_loopback else "link-local" if addr.is_link_local
        else "private" if addr.is_private else "non-global"
    )  # fmt: skip
    return f"{what} address {addr} refused (allow it with --allow-private or an allowed network)"


class Fetcher:
    """fetch(url) for many threads: a per-host limit shared by all of them."""

    def __init__(self, policy: FetchPolicy | None = None) -> None:
        self.policy = policy or FetchPolicy()
        self._hosts: dict[str, threading.Semaphore] = defaultdict(
            lambda: threading.Semaphore(self.policy.per_host)
        )
        self._lock = threading.Lock()

    def _host_slot(self, url: str) -> threading.Semaphore:
        try:
            host = (urlsplit(url).hostname or "").lower()
        except ValueError:  # a malformed URL: _fetch_once says why, under a shared slot
            host = ""
        with self._lock:
            return self._hosts[host]

    def fetch(self, url: str, headers: dict[str, str] | None = None) -> Fetched:
        """GET ``url`` with retries; never raises for what the network or the server does.
        ``headers`` are added to the request (an API token: never logged or recorded)."""
        policy = self.policy
        last = Fetched(url, None, "error", "not tried", kind="connection")
        for attempt in range(policy.retries + 1):
            with self._host_slot(url):
                try:
                    last = _fetch_once(url, policy, headers or {})
                except Exception as e:  # noqa: BLE001  a URL never crashes a run: it is a row
                    last = _fail(url, "error", f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")  # fmt: skip
            if last.status == "ok" or not last.transient or attempt == policy.retries:
                return last
            wait = _retry_after(last.headers.get("retry-after"))
            if wait is None:
                wait = policy.backoff * 2**attempt * random.uniform(0.5, 1.5)
            if wait > policy.max_wait:
                return last
            time.sleep(wait)
        return last


def fetch_url(url: str, policy: FetchPolicy | None = None) -> Fetched:
    """One URL with a fetcher of its own (no per-host limit shared with others)."""
    return Fetcher(policy).fetch(url)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _fail(url: str, kind: str, error: str, status: int | None = None, **kw) -> Fetched:
    return Fetched(url, None, "error", error, status, kind, **kw)


def _fetch_once(url: str, policy: FetchPolicy, extra: dict[str, str]) -> Fetched:
    original = url
    for _hop in range(policy.max_redirects + 1):
        try:
            parts = urlsplit(url)
        except ValueError as e:
            return _fail(original, "bad_url", f"bad URL: {e}")
        if parts.scheme not in ("http", "https"):
            return _fail(original, "scheme", f"unsupported scheme: {parts.scheme or 'none'}")
        host = parts.hostname
        if not host:
            return _fail(original, "bad_url", "no host in URL")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            pinned = dict(policy.resolve).get(host.lower())
            if pinned:
                ip, _, pinned_port = pinned.rpartition(":")
                port = int(pinned_port)
            else:
                ip = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
        except ValueError as e:
            return _fail(original, "bad_url", f"bad URL: {e}")
        except OSError as e:
            return _fail(original, "dns", f"cannot resolve {host}: {e}")
        refusal = address_refusal(ip, policy)
        if refusal:
            return _fail(original, "blocked_address", f"{host}: {refusal}")
        conn = _connection(parts.scheme, host, ip, port, policy)
        try:
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            conn.request("GET", path, headers={
                "Host": parts.netloc.rsplit("@", 1)[-1], "User-Agent": policy.user_agent,
                "Accept": "image/*,*/*;q=0.8", "Accept-Encoding": "identity", **extra,
            })  # fmt: skip
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            if resp.status in REDIRECTS and headers.get("location"):
                url = urljoin(url, headers["location"])
                if urlsplit(url).netloc != parts.netloc:
                    extra = {}  # a credential goes to the host it was meant for, no further
                continue
            if resp.status != 200:
                kind = "http_transient" if resp.status in TRANSIENT_HTTP else "http"
                return _fail(original, kind, f"HTTP {resp.status}", resp.status, headers=headers)
            tags = {t.strip().lower() for t in headers.get("x-robots-tag", "").replace(":", ",").split(",")}  # fmt: skip
            if policy.opt_out and tags & set(policy.opt_out):
                return _fail(original, "opt_out", f"opted out: X-Robots-Tag {headers['x-robots-tag']}", 200)  # fmt: skip
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            taken = any(ctype.startswith(t) for t in policy.accept_types) or (
                "image/" in policy.accept_types and ctype in _BINARY
            )
            if ctype and not taken:
                return _fail(original, "content_type", f"wrong content type: {ctype}", 200)
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > policy.max_bytes:
                return _fail(original, "too_large", f"too large: {declared} bytes", 200)
            chunks, size = [], 0
            while chunk := resp.read(65536):
                size += len(chunk)
                if size > policy.max_bytes:
                    return _fail(original, "too_large", f"too large: over {policy.max_bytes} bytes", 200)  # fmt: skip
                chunks.append(chunk)
            data = b"".join(chunks)
            if declared.isdigit() and len(data) != int(declared):
                return _fail(original, "cut", "body cut short", 200)
            return Fetched(original, data, "ok", None, 200, None, ctype or None, headers)
        except TimeoutError as e:
            return _fail(original, "timeout", f"timed out: {e}")
        except http.client.IncompleteRead:
            return _fail(original, "cut", "body cut short", 200)
        except (OSError, http.client.HTTPException) as e:
            return _fail(original, "connection", f"{type(e).__name__}: {e}")
        finally:
            conn.close()
    return _fail(original, "redirects", f"more than {policy.max_redirects} redirects")


_BINARY = frozenset({"application/octet-stream", "binary/octet-stream", "application/binary"})


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address already checked, whatever DNS would answer now."""

    def __init__(self, ip: str, port: int, policy: FetchPolicy) -> None:
        super().__init__(ip, port, timeout=policy.connect_timeout)
        self._read_timeout = policy.read_timeout

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self._read_timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, ip: str, port: int, policy: FetchPolicy) -> None:
        super().__init__(ip, port, timeout=policy.connect_timeout, context=ssl.create_default_context())  # fmt: skip
        self._server_name = host
        self._read_timeout = policy.read_timeout

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._server_name)
        self.sock.settimeout(self._read_timeout)


def _connection(scheme: str, host: str, ip: str, port: int, policy: FetchPolicy):
    if scheme == "https":
        return _PinnedHTTPS(host, ip, port, policy)
    return _PinnedHTTP(ip, port, policy)
