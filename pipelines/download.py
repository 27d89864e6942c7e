"""`imagenetpp download URL_LIST --out POOL`: a URL list in, an img2dataset-compatible pool out.

    POOL/00000.tar          <key>.jpg, <key>.txt (caption), <key>.json (url, caption, key,
                            status, sizes, sha256, extra columns); successes only
    POOL/00000.parquet      every row of the shard: status, error, HTTP status, sizes, sha256
    POOL/00000_stats.json   counts per status and error kind; written last: the shard's commit

Keys are the row's position: shard number (5 digits) then position in the shard, so the same
list gives the same keys and, with the same answers from the servers, the same bytes. Rows are
streamed in and at most ``window`` are in flight: memory does not grow with the list. A
finished shard is skipped on a re-run; ``retry_failed`` re-fetches, in finished shards, only
the rows that failed transiently (timeouts, 5xx, 429, connection errors).
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shards.atomic import atomic_path, atomic_write_bytes
from shards.fetch import TRANSIENT_KINDS, Fetcher, FetchPolicy
from shards.images import BadImage, ImagePolicy, store_image
from shards.reader import iter_samples
from shards.writer import ShardWriter

from .errors import UserError

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}  # fmt: skip
ROW_FIELDS = [
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
    ("status", pa.string()), ("error_message", pa.string()), ("error_kind", pa.string()),
    ("http_status", pa.int32()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("sha256", pa.string()),
]  # fmt: skip
SUCCESS, FAILED_DOWNLOAD, FAILED_RESIZE = "success", "failed_to_download", "failed_to_resize"


@dataclass(frozen=True)
class ListSpec:
    url_col: str = "url"
    caption_col: str | None = "caption"
    extra_cols: tuple[str, ...] = ()
    input_format: str | None = None  # default: from each file's extension


@dataclass
class DownloadOptions:
    shard_size: int = 10_000
    threads: int = 32  # in flight, over all processes
    processes: int = 0  # 0: one per usable core
    retry_failed: bool = False
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    image: ImagePolicy = field(default_factory=ImagePolicy)


def list_files(path: str | Path, spec: ListSpec) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in FORMATS and p.is_file())
        if not files:
            raise UserError(f"no URL list in {path} (looked for {', '.join(sorted(FORMATS))})")
        return files
    if not path.is_file():
        raise UserError(f"URL list not found: {path}")
    if spec.input_format is None and path.suffix not in FORMATS:
        raise UserError(f"{path}: unknown format {path.suffix!r}; give --input-format")
    return [path]


def read_rows(files: list[Path], spec: ListSpec) -> Iterator[dict]:
    """{url, caption, <extra columns>} per row, streamed, in file then row order."""
    for path in files:
        fmt = spec.input_format or FORMATS[path.suffix]
        try:
            yield from _read_file(path, fmt, spec)
        except UserError:
            raise
        except (OSError, ValueError, csv.Error) as e:  # pyarrow's errors are ValueErrors
            raise UserError(f"{path}: unreadable {fmt} URL list ({' '.join(str(e).split())[:200]})") from None  # fmt: skip


def _pick(record: dict, spec: ListSpec, path: Path) -> dict:
    if spec.url_col not in record:
        raise UserError(f"{path}: no column {spec.url_col!r} (columns: {', '.join(map(str, record))}); use --url-col")  # fmt: skip
    row = {"url": str(record[spec.url_col] or "").strip()}
    row["caption"] = None
    if spec.caption_col and record.get(spec.caption_col) is not None:
        row["caption"] = str(record[spec.caption_col])
    for col in spec.extra_cols:
        row[col] = record.get(col)
    return row


def _read_file(path: Path, fmt: str, spec: ListSpec) -> Iterator[dict]:
    if fmt == "parquet":
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        cols = [c for c in (spec.url_col, spec.caption_col, *spec.extra_cols) if c and c in names]
        if spec.url_col not in names:
            raise UserError(f"{path}: no column {spec.url_col!r} (columns: {', '.join(sorted(names))}); use --url-col")  # fmt: skip
        for batch in pf.iter_batches(batch_size=8192, columns=cols):
            for record in batch.to_pylist():
                yield _pick(record, spec, path)
    elif fmt in ("csv", "tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            for record in csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ","):
                yield _pick(record, spec, path)
    elif fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
                    yield _pick(record if isinstance(record, dict) else {"url": record}, spec, path)
    else:  # txt: one URL per line
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield {"url": line.strip(), "caption": None, **dict.fromkeys(spec.extra_cols)}


def count_rows(files: list[Path], spec: ListSpec) -> int | None:
    """Rows in the list when cheap to know (parquet footers), else None."""
    if all((spec.input_format or FORMATS[p.suffix]) == "parquet" for p in files):
        return sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    return None


def shard_paths(out: Path, shard: int) -> dict[str, Path]:
    return {
        "tar": out / f"{shard:05d}.tar",
        "parquet": out / f"{shard:05d}.parquet",
        "stats": out / f"{shard:05d}_stats.json",
    }


def _retryable(out: Path, shard: int) -> bool:
    table = pq.read_table(shard_paths(out, shard)["parquet"], columns=["error_kind"])
    return any(k in TRANSIENT_KINDS for k in table["error_kind"].to_pylist())


def _fetch_row(fetcher: Fetcher, image: ImagePolicy, cpu: threading.Semaphore, row: dict) -> dict:
    got = fetcher.fetch(row["url"]) if row["url"] else None
    if got is None:
        return {"status": FAILED_DOWNLOAD, "error_message": "empty URL", "error_kind": "bad_url"}
    if got.data is None:
        return {"status": FAILED_DOWNLOAD, "error_message": got.error, "error_kind": got.kind,
                "http_status": got.http_status}  # fmt: skip
    try:
        with cpu:  # many threads wait on sockets; only a core's worth decode at once
            stored = store_image(got.data, image)
    except BadImage as e:
        kind = "bomb" if "decompression bomb" in str(e) else "not_image"
        return {"status": FAILED_RESIZE, "error_message": str(e)[:300], "error_kind": kind,
                "http_status": got.http_status}  # fmt: skip
    return {"status": SUCCESS, "http_status": got.http_status, "width": stored.width,
            "height": stored.height, "original_width": stored.original_width,
            "original_height": stored.original_height, "data": stored.data}  # fmt: skip


class FetchProcesses:
    """Rows fetched and stored by worker processes, each with its own threads, per-host limit
    and interpreter lock: HTTP parsing and image work in one process never wait for the lock
    another holds. ``submit(ticket, row)``; ``result()`` gives (ticket, result) as they finish.
    A process takes a row only when it has a free thread, so the work spreads by capacity."""

    def __init__(self, options: DownloadOptions) -> None:
        count = options.processes or len(os.sched_getaffinity(0))
        threads = max(1, math.ceil(options.threads / count))
        fetch = replace(options.fetch, per_host=max(1, math.ceil(options.fetch.per_host / count)))
        # fork: the children start at once, with everything imported (no re-import per child)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        gc.freeze()  # what is alive now lives on: no collection in any process walks it again
        gc.set_threshold(50_000, 20, 20)  # rows make many short-lived containers, few cycles
        self._todo, self._done = ctx.Queue(), ctx.Queue()
        self._procs = [
            ctx.Process(target=_serve, args=(self._todo, self._done, fetch, options.image, threads),
                        name=f"imagenetpp-download-{i}", daemon=True)
            for i in range(count)
        ]  # fmt: skip
        for p in self._procs:
            p.start()

    def submit(self, ticket: str, row: dict) -> None:
        self._todo.put((ticket, row))

    def result(self) -> tuple[str, dict]:
        while True:
            try:
                return self._done.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"download worker {dead[0].name} died (exit code {dead[0].exitcode})") from None  # fmt: skip

    def close(self) -> None:
        for _ in self._procs:
            self._todo.put(None)
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        for q in (self._todo, self._done):
            q.cancel_join_thread()  # rows left unsent after an error must not block the exit
            q.close()

    def __enter__(self) -> FetchProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(todo, done, fetch: FetchPolicy, image: ImagePolicy, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    parent = os.getppid()
    _die_with_parent()
    fetcher, cpu, free = Fetcher(fetch), threading.Semaphore(1), threading.Semaphore(threads)
    with ThreadPoolExecutor(threads) as pool:
        while True:
            free.acquire()  # take a row only with a thread free for it
            try:
                item = todo.get(timeout=1.0)
            except queue.Empty:
                free.release()
                if os.getppid() != parent:  # the parent was killed: nobody wants our rows
                    os._exit(1)
                continue
            if item is None:
                break
            ticket, row = item
            pool.submit(_fetch_row, fetcher, image, cpu, row).add_done_callback(
                partial(_send, done, free, ticket)
            )


def _die_with_parent() -> None:
    """On Linux the kernel kills this process when its parent dies (SIGKILL included)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the parent-pid check in _serve's loop does it, within a second


def _send(done, free: threading.Semaphore, ticket: str, job: Future) -> None:
    try:
        result = job.result()
    except Exception as e:  # noqa: BLE001  a row never crashes a run
        result = {"status": FAILED_DOWNLOAD, "error_kind": "error",
                  "error_message": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"}  # fmt: skip
    done.put((ticket, result))
    free.release()


def download_shard(
    out: Path,
    shard: int,
    rows: list[dict],
    workers: FetchProcesses,
    options: DownloadOptions,
    on_row: Callable[[dict], None] | None = None,
) -> dict:
    """Fetch one shard's rows (in flight: a bounded window, written in row order) and commit
    tar, parquet, then stats. With ``options.retry_failed`` and a finished shard, only rows
    that failed transiently are fetched again; the others are carried over."""
    paths = shard_paths(out, shard)
    digits = max(4, len(str(options.shard_size - 1)))
    old_rows: dict[str, dict] = {}
    old_samples: Iterator[tuple[str, dict[str, bytes]]] = iter(())
    if options.retry_failed and paths["stats"].exists():
        old_rows = {r["key"]: r for r in pq.read_table(paths["parquet"]).to_pylist()}
        old_samples = iter_samples(paths["tar"])
    started = time.time()
    extra_cols = [k for k in (rows[0] if rows else {}) if k not in ("url", "caption")]
    out_rows: list[dict] = []
    window: deque[tuple[dict, dict | None]] = deque()  # None: the workers' result, awaited
    finished: dict[str, dict] = {}  # results that came back before rows ahead of them
    limit = max(64, 4 * options.threads)
    with ShardWriter(paths["tar"]) as writer:

        def drain(until: int) -> None:
            while len(window) > until:
                row, result = window.popleft()
                while result is None and (result := finished.pop(row["key"], None)) is None:
                    ticket, done = workers.result()
                    finished[ticket] = done
                data = result.pop("data", None)
                record = {**dict.fromkeys(n for n, _ in ROW_FIELDS), **row, **result}
                record["sha256"] = hashlib.sha256(data).hexdigest() if data else record.get("sha256")  # fmt: skip
                if record["status"] == SUCCESS:
                    meta = {k: record.get(k) for k, _ in ROW_FIELDS if k not in ("error_kind",)}
                    meta.update({c: row.get(c) for c in extra_cols})
                    files = {"jpg": data, "json": json.dumps(meta, sort_keys=True).encode()}
                    if row.get("caption") is not None:
                        files["txt"] = row["caption"].encode()
                    writer.write(record["key"], files)
                out_rows.append(record)
                if on_row is not None:
                    on_row(record)

        for i, row in enumerate(rows):
            row = {"key": f"{shard:05d}{i:0{digits}d}", **row}
            old = old_rows.get(row["key"])
            if old is not None and old["error_kind"] not in TRANSIENT_KINDS:
                carried = {k: old[k] for k, _ in ROW_FIELDS if k not in row}
                if old["status"] == SUCCESS:
                    key, files = next(old_samples)
                    while key != row["key"]:  # samples are in key order, successes only
                        key, files = next(old_samples)
                    carried["data"] = files["jpg"]
                window.append((row, carried))
            else:  # a new row, or one that failed transiently: fetch (again)
                workers.submit(row["key"], row)
                window.append((row, None))
            drain(limit)
        drain(0)
        info = writer.close()
    schema = pa.schema(ROW_FIELDS + [(c, pa.string()) for c in extra_cols])
    table = pa.Table.from_pylist(
        [{**r, **{c: None if r.get(c) is None else str(r[c]) for c in extra_cols}} for r in out_rows],
        schema=schema,
    )  # fmt: skip
    with atomic_path(paths["parquet"]) as tmp:
        pq.write_table(table, tmp)
    statuses = Counter(r["status"] for r in out_rows)
    kinds = Counter(r["error_kind"] for r in out_rows if r["status"] != SUCCESS)
    stats = {
        "count": len(out_rows), "successes": statuses[SUCCESS],
        "failed_to_download": statuses[FAILED_DOWNLOAD], "failed_to_resize": statuses[FAILED_RESIZE],
        "status_dict": dict(sorted(Counter(r["error_message"] for r in out_rows if r["error_message"]).most_common(20))),
        "error_kinds": dict(sorted(kinds.items())), "start_time": started, "end_time": time.time(),
        "duration": round(time.time() - started, 3), "shard": f"{shard:05d}", "tar_sha256": info.sha256,
    }  # fmt: skip
    atomic_write_bytes(
        paths["stats"], (json.dumps(stats, indent=2, sort_keys=True) + "\n").encode()
    )
    return {"samples": statuses[SUCCESS], "rows": len(out_rows), "errors": dict(kinds)}


class DownloadBar:
    """rows done / total, images/s, success rate, the commonest error kinds."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.ok, self.done, self.kinds, self.start = 0, 0, Counter(), time.monotonic()
        self.bar = None
        if enabled:
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="download", unit="row", file=sys.stderr)

    def row(self, record: dict) -> None:
        self.done += 1
        if record["status"] == SUCCESS:
            self.ok += 1
        else:
            self.kinds[record["error_kind"]] += 1
        if self.bar is not None:
            rate = self.ok / max(time.monotonic() - self.start, 1e-9)
            top = ", ".join(f"{k} {n}" for k, n in self.kinds.most_common(3))
            self.bar.set_postfix_str(
                f"{rate:.0f} img/s, {100 * self.ok / self.done:.1f}% ok" + (f"; {top}" if top else ""),
                refresh=False,
            )  # fmt: skip
            self.bar.update(1)

    def skip(self, rows: int) -> None:
        self.done += rows
        if self.bar is not None:
            self.bar.update(rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def download(
    url_list: str | Path,
    out: str | Path,
    spec: ListSpec | None = None,
    options: DownloadOptions | None = None,
    progress: bool = True,
) -> dict:
    """Download a URL list into a pool folder; returns totals. Resumable (see module doc)."""
    spec, options = spec or ListSpec(), options or DownloadOptions()
    files = list_files(url_list, spec)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    rows = read_rows(files, spec)
    batch = list(islice(rows, options.shard_size))  # a bad list fails here, before any output
    out.mkdir(parents=True, exist_ok=True)
    bar = DownloadBar(count_rows(files, spec), progress)
    totals: Counter[str] = Counter()
    shards = 0
    workers: FetchProcesses | None = None  # started when a shard has rows to fetch
    try:
        for shard in range(10**5):
            if shard:
                batch = list(islice(rows, options.shard_size))
            if not batch:
                break
            shards += 1
            done = shard_paths(out, shard)["stats"].exists()
            if done and not (options.retry_failed and _retryable(out, shard)):
                stats = json.loads(shard_paths(out, shard)["stats"].read_text())
                totals.update(samples=stats["successes"], rows=stats["count"], skipped_shards=1)
                bar.skip(len(batch))
                continue
            workers = workers or FetchProcesses(options)
            result = download_shard(out, shard, batch, workers, options, bar.row)
            totals.update(samples=result["samples"], rows=result["rows"])
            totals.update({f"error:{k}": n for k, n in result["errors"].items()})
    finally:
        bar.close()
        if workers is not None:
            workers.close()
    return {"shards": shards, **totals}
