"""Stage acquire: URL candidates are downloaded in rounds, so a dead link costs a replacement,
not a hole, and nothing beyond need is fetched.

Round 1 takes, per class, its best-ranked URL candidates up to the target plus a margin;
each later round takes, for the classes still short of their target after failures, the
next-ranked ones, until every class is met or has no candidates left. A round is cut into
chunks of URLs; each chunk is a unit that commits _work/blobs/<chunk>.tar (the fetched bytes)
and then _work/acquire/<chunk>.parquet (url, status, error, size, sha256, where in the tar).
A round is a pure function of the candidates and the committed earlier rounds, so a resumed
run asks for the same URLs; same config and same committed downloads give the same shards.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shards.atomic import atomic_path
from shards.fetch import Fetched, Fetcher, FetchPolicy
from shards.images import BadImage, decode
from shards.sources import blob_path
from shards.writer import ShardWriter

from .executor import report_progress

STATUS_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),
        ("http_status", pa.int32()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("offset", pa.int64()),  # of the bytes in _work/blobs/<chunk>.tar
    ]
)
CHUNK = 256  # URLs per unit
MARGIN = 0.1  # first-round extra per class, for the links that will be dead


@dataclass(frozen=True)
class Chunk:
    id: str  # r<round>-<chunk>
    urls: tuple[str, ...]


def status_path(folder: Path, chunk_id: str) -> Path:
    return folder / f"{chunk_id}.parquet"


def url_candidates(paths: list[Path]) -> dict[int, list[tuple[str, float]]]:
    """label -> its URL candidates' (URL, score), best first (score, then source id)."""
    ranked: dict[int, list[tuple[float, str, str]]] = {}
    for path in paths:
        t = pq.read_table(path, columns=["label", "score", "source_id", "locator"])
        for label, score, sid, loc in zip(*(t[c].to_pylist() for c in t.column_names), strict=True):  # fmt: skip
            locator = json.loads(loc)
            if locator.get("kind") == "url":
                ranked.setdefault(label, []).append((-score, sid, locator["url"]))
    return {label: [(u, -s) for s, _, u in sorted(rows)] for label, rows in ranked.items()}


def read_statuses(folder: Path, chunk_ids: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for cid in chunk_ids:
        for row in pq.read_table(status_path(folder, cid)).to_pylist():
            out[row["url"]] = {**row, "chunk": cid}
    return out


def plan_rounds(
    scored: dict[int, list[tuple[str, float]]], target: int, folder: Path, chunk: int = CHUNK
) -> Iterator[list[Chunk]]:
    """Each round's chunks, given the committed statuses of the rounds before it. Stops after
    the first round that is not fully committed (its chunks are what must run next)."""
    ranked = {label: [u for u, _ in rows] for label, rows in scored.items()}
    asked: set[str] = set()
    cursor = {label: 0 for label in ranked}
    want = {label: target + math.ceil(MARGIN * target) for label in ranked}
    statuses: dict[str, dict] = {}
    # Select gives an image to the class scoring it highest (ties: the lower label): a URL
    # fetched for a class that scores it lower does not fill this one.
    owner: dict[str, tuple[float, int]] = {}
    for label in sorted(scored):
        for url, score in scored[label]:
            if url not in owner or score > owner[url][0]:
                owner[url] = (score, label)

    def usable(label: int) -> int:
        """Fetched images this class will keep: its own by claim, one per distinct picture."""
        seen: set[str] = set()
        for u in ranked[label][: cursor[label]]:
            st = statuses.get(u, {})
            if st.get("status") == "ok" and owner[u][1] == label:
                seen.add(st.get("sha256") or u)
        return len(seen)

    for r in range(1, 1000):
        urls: list[str] = []
        this_round: set[str] = set()  # urls as a set: a membership test per candidate
        for label in sorted(ranked):
            ok = usable(label)
            need = want[label] - ok  # the margin stays: near duplicates are found only later
            while need > 0 and cursor[label] < len(ranked[label]):
                url = ranked[label][cursor[label]]
                cursor[label] += 1
                if url in asked or url in this_round:
                    if statuses.get(url, {}).get("status") == "ok" and owner[url][1] == label:
                        need -= 1  # fetched for another class already, but this one keeps it
                    continue
                urls.append(url)
                this_round.add(url)
                need -= 1
        if not urls:
            return
        asked.update(urls)
        urls.sort()
        chunks = [
            Chunk(f"r{r:02d}-{i // chunk:05d}", tuple(urls[i : i + chunk]))
            for i in range(0, len(urls), chunk)
        ]
        yield chunks
        if not all(status_path(folder, c.id).exists() for c in chunks):
            return
        statuses.update(read_statuses(folder, [c.id for c in chunks]))


def _fetch_image(fetcher: Fetcher, url: str) -> Fetched:
    """Fetch, and count what does not decode as an image (an HTML page, a cut JPEG) as a
    failure here, where the next-ranked candidate can still replace it."""
    got = fetcher.fetch(url)
    report_progress(1)
    if got.data is None:
        return got
    try:
        decode(got.data)
    except BadImage as e:
        return Fetched(url, None, "error", f"not an image: {e}", got.http_status, "not_image")
    return got


@dataclass
class FetchWorker:
    """The acquire stage's per-worker state: one per-host limit and one thread pool for all
    its chunks (threads started once, not once per chunk)."""

    fetcher: Fetcher
    pool: ThreadPoolExecutor


def make_fetcher(policy: FetchPolicy, threads: int = 16) -> FetchWorker:
    return FetchWorker(Fetcher(policy), ThreadPoolExecutor(threads))


def fetch_chunk(status_dir: Path, work_root: Path, state: FetchWorker, chunk: Chunk) -> dict:
    """The acquire unit: fetch a chunk's URLs; the tar first, the status table last. Results
    are written as they come, in URL order, while later URLs are still in flight."""
    results = state.pool.map(partial(_fetch_image, state.fetcher), chunk.urls)
    rows = []
    with ShardWriter(blob_path(work_root, chunk.id)) as writer:
        for i, r in enumerate(results):
            row = {"url": r.url, "status": r.status, "error": r.error, "http_status": r.http_status,
                   "bytes": None, "sha256": None, "offset": None}  # fmt: skip
            if r.data is not None:
                offset, size = writer.write(f"{i:06d}", {"bin": r.data})["bin"]
                row.update(bytes=size, sha256=hashlib.sha256(r.data).hexdigest(), offset=offset)
            rows.append(row)
        writer.close()
    with atomic_path(status_path(status_dir, chunk.id)) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=STATUS_SCHEMA), tmp)
    ok = sum(r["status"] == "ok" for r in rows)
    return {"unit": chunk.id, "samples": ok, "failed_urls": len(rows) - ok}


def fetched_locators(status_dir: Path) -> dict[str, dict]:
    """url -> {locator, sha256} for every fetched URL; url -> {error} for every failed one."""
    out: dict[str, dict] = {}
    if not status_dir.exists():
        return out
    for path in sorted(status_dir.glob("*.parquet")):
        chunk_id = path.stem
        for row in pq.read_table(path).to_pylist():
            if row["status"] == "ok":
                loc = {"kind": "blob", "unit": chunk_id, "offset": row["offset"], "size": row["bytes"]}  # fmt: skip
                out[row["url"]] = {"locator": loc, "sha256": row["sha256"]}
            else:
                out[row["url"]] = {"error": row["error"]}
    return out
