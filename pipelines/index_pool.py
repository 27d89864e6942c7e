"""`imagenetpp index`: embed an image-text webdataset pool with CLIP and index it with faiss.

The pool is img2dataset-style: tars of <key>.jpg with <key>.txt (caption) and/or <key>.json
({url, caption, license, ...}). One unit per pool shard writes one part of the index; an
undecodable image, a repeated key, or the rest of a tar after a damaged header is skipped and
recorded in skipped/ with its reason.

Everything a user can get wrong (pool pattern, weights, faiss factory, an --out folder holding
another model's parts) is checked by plan_index before any worker starts.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curators.base import Resources
from curators.knn_index import (
    DUP_GROUPS,
    INFO,
    METADATA_SCHEMA,
    SKIPPED_SCHEMA,
    IndexInfo,
    build_faiss_index,
    make_faiss_index,
    near_duplicate_groups,
    part_paths,
    read_info,
    write_info,
    write_metadata_arrow,
)
from shards.atomic import atomic_path, atomic_write_bytes
from shards.images import BadImage, decode
from shards.reader import CorruptTar, iter_sample_members

from .errors import PartialFailure, UserError
from .executor import FAILED, RowProgress, report_progress
from .workdir import RunLock


class IndexPartsFailed(PartialFailure):
    """Some pool shards failed to embed; the others are committed and a re-run retries these."""


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
RUN_FILE = "index_run.json"  # what this folder's parts are made with
DUPLICATE_KEY = "duplicate key"
# Decode + preprocess threads per embedding worker (PIL releases the GIL); one core stays
# with the model.
PREP_THREADS = max(1, min(4, (os.cpu_count() or 2) - 1))


def pool_shards(pool: str) -> list[Path]:
    """A folder of .tar files, a glob, or a brace pattern as img2dataset users write them
    (``laion/{00000..00999}.tar``)."""
    from braceexpand import braceexpand

    path = Path(pool)
    if path.is_dir():
        found = sorted(path.glob("*.tar"))
    else:
        found = sorted({Path(p) for pattern in braceexpand(pool) for p in glob.glob(pattern)})
    if not found:
        raise UserError(f"no pool shards (.tar) at {pool}")
    return [p.resolve() for p in found]


def pool_label(shards: list[Path]) -> str:
    """The pool's name for provenance (source.dataset): the folder holding its shards, not a
    pattern such as '*.tar' or '{00000..00004}.tar'."""
    common = Path(os.path.commonpath([str(s.parent) for s in shards]))
    return common.name or "pool"


@dataclass(frozen=True)
class IndexPlan:
    """What an index run will do, checked before any worker starts."""

    pool: str  # as the user wrote it
    shards: list[Path]
    pool_name: str
    model: str  # the open_clip model name
    pretrained: str  # what loads the weights: tag, absolute checkpoint path, or "random"
    weights: str  # location-free description
    factory: str

    def binding(self) -> dict:
        digest = hashlib.sha256("\n".join(map(str, self.shards)).encode()).hexdigest()
        return {
            "model": self.model,
            "weights": self.weights,
            "pool": self.pool,
            "shards": len(self.shards),
            "shards_sha256": digest,
        }


def plan_index(
    pool: str,
    model: str,
    pretrained: str | None,
    factory: str = "Flat",
    pool_name: str | None = None,
) -> IndexPlan:
    """Resolve the pool, the model, its weights (cache / hub reachability) and the faiss factory:
    cheap checks that turn a missing resource into one line before Ray or a model starts."""
    from curators.clip_models import check_weights, precheck_weights, resolve_model_name

    # First what needs no open_clip: a wrong path answers before its ~6 s import.
    shards = pool_shards(pool)
    precheck_weights(model, pretrained)
    import open_clip

    name = resolve_model_name(model)
    weights = check_weights(name, pretrained)
    make_faiss_index(int(open_clip.get_model_config(name)["embed_dim"]), factory)
    return IndexPlan(pool, shards, pool_name or pool_label(shards), name, weights.pretrained,
                     weights.description, factory)  # fmt: skip


def check_binding(out: Path, plan: IndexPlan) -> bool:
    """Refuse to resume an --out folder whose parts come from other weights or another pool.
    True when the folder is bound to this plan, False when it is not bound yet."""
    path = out / RUN_FILE
    want = plan.binding()
    if path.exists():
        try:
            held = json.loads(path.read_text())
            held = {k: held[k] for k in want}
        except (ValueError, TypeError, KeyError):
            raise UserError(f"unreadable {path}: delete it, or use another --out") from None
        if held["model"] != want["model"] or held["weights"] != want["weights"]:
            raise UserError(
                f"{out} holds index parts of {held['model']} ({held['weights']}), this run "
                f"embeds with {want['model']} ({want['weights']}); use another --out or delete it"
            )
        if (held["shards"], held["shards_sha256"]) != (want["shards"], want["shards_sha256"]):
            # the shards themselves, not how the pool was spelt ('pool/' vs 'pool/*.tar')
            raise UserError(
                f"{out} holds index parts of another pool ({held['pool']}, {held['shards']} "
                f"shards), this run indexes {want['pool']} ({want['shards']} shards); use "
                "another --out or delete it"
            )
        return True
    return False


def write_binding(out: Path, plan: IndexPlan) -> None:
    """Record what this folder's parts are made with (only once every check has passed)."""
    blob = json.dumps(plan.binding(), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(out / RUN_FILE, blob.encode())


def _check_finished(out: Path, plan: IndexPlan, dedup_cosine: float | None) -> IndexInfo:
    """A finished index is returned as is only when it is what this run asks for."""
    from curators.clip_models import checkpoint_description

    info = read_info(out)
    held = info.weights
    if held is None:  # an index from before `weights` existed: describe what it names
        old = info.pretrained or ""
        held = checkpoint_description(old) if Path(old).is_file() else old
    if (info.model, held) != (plan.model, plan.weights):
        raise UserError(
            f"{out} holds a finished index of {info.model} ({held}), this run asks for "
            f"{plan.model} ({plan.weights}); use another --out or delete it"
        )
    if (info.factory, info.dedup_cosine) != (plan.factory, dedup_cosine):
        raise UserError(
            f"{out} holds a finished index made with --factory {info.factory} --dedup-cosine "
            f"{info.dedup_cosine}, this run asks for {plan.factory} and {dedup_cosine}; use "
            f"another --out, or delete {out / INFO} to rebuild from the committed parts"
        )
    return info


def _describe(key: str, shard: Path, files: dict) -> tuple[dict | None, bytes | None, str | None]:
    files = {ext.lower(): v for ext, v in files.items()}
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        return None, None, "no image member"
    offset, data = files[ext]
    meta = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"][1])
        except ValueError:
            meta = {}
    caption = files["txt"][1].decode("utf-8", "replace") if "txt" in files else meta.get("caption")
    row = {
        "key": key,
        "url": meta.get("url"),
        "caption": caption,
        "license": meta.get("license"),
        "sha256": hashlib.sha256(data).hexdigest(),
        "shard": str(shard),
        "offset": offset,
        "size": len(data),
    }
    return row, data, None


def _prepare_batch(preprocess, datas: list[bytes]) -> list[tuple]:
    """Decode and preprocess a batch: (tensor, (w, h), None) or (None, None, reason) each."""
    out = []
    for data in datas:
        try:
            img = decode(data)
        except BadImage as e:
            out.append((None, None, str(e)))
            continue
        out.append((preprocess(img), img.size, None))
    return out


def _samples(shard: Path, skipped: list[dict]):
    """(key, files) of a pool tar: a repeated key is skipped (the first is kept); a damaged
    header ends the tar, keeping what came before it; an empty file is recorded."""
    if shard.stat().st_size == 0:
        skipped.append({"key": None, "shard": str(shard), "reason": "empty file (0 bytes)"})
        return
    seen: set[str] = set()
    try:
        for key, files in iter_sample_members(shard, split_repeats=True, flush_on_error=True):
            if key in seen:
                skipped.append({"key": key, "shard": str(shard), "reason": DUPLICATE_KEY})
                continue
            seen.add(key)
            yield key, files
    except CorruptTar as e:
        reason = f"CorruptTar: {e}; the rest of the tar is skipped"
        skipped.append({"key": None, "shard": str(shard), "reason": reason})


def embed_shard(root: Path, batch_size: int, encoder, unit: tuple[int, str]) -> dict:
    """One pool shard -> one index part. A helper thread decodes batch i+1 while batch i encodes."""
    import torch

    part, shard = unit[0], Path(unit[1])
    paths = part_paths(root, part)
    rows, skipped, img_out = [], [], []

    def consume(batch: list[dict], prepared: list[tuple]) -> None:
        good = []
        for row, (pixels, size, problem) in zip(batch, prepared, strict=True):
            if problem is not None:
                skipped.append(
                    {"key": row["key"], "shard": row["shard"], "reason": f"BadImage: {problem}"}
                )
            else:
                row["width"], row["height"] = size
                rows.append(row)
                good.append(pixels)
        if good:
            img_out.append(encoder.encode_pixels(torch.stack(good)))
        report_progress(len(batch))

    with ThreadPoolExecutor(PREP_THREADS) as pool:
        pending: tuple[list[dict], object] | None = None
        batch: list[dict] = []
        datas: list[bytes] = []

        def consume_pending() -> None:
            if pending is not None:
                consume(pending[0], [r for f in pending[1] for r in f.result()])

        def submit() -> None:
            nonlocal pending, batch, datas
            step = -(-len(datas) // PREP_THREADS)
            futures = [pool.submit(_prepare_batch, encoder.preprocess, datas[i : i + step]) for i in range(0, len(datas), step)]  # fmt: skip
            consume_pending()
            pending, batch, datas = (batch, futures), [], []

        for key, files in _samples(shard, skipped):
            row, data, problem = _describe(key, shard, files)
            if problem:
                skipped.append({"key": key, "shard": str(shard), "reason": problem})
                continue
            batch.append(row)
            datas.append(data)
            if len(batch) == batch_size:
                submit()
        if batch:
            submit()
        consume_pending()
    captions = [r["caption"] or "" for r in rows]
    txt = np.zeros((len(rows), encoder.dim), np.float32)
    has = [i for i, c in enumerate(captions) if c]
    if has:
        txt[has] = encoder.encode_texts([captions[i] for i in has])
    img = np.concatenate(img_out) if img_out else np.zeros((0, encoder.dim), np.float32)
    for name, arr in (("img_emb", img), ("text_emb", txt)):
        with atomic_path(paths[name]) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    with atomic_path(paths["skipped"]) as tmp:
        pq.write_table(pa.Table.from_pylist(skipped, schema=SKIPPED_SCHEMA), tmp)
    with atomic_path(paths["metadata"]) as tmp:  # last: the part's commit marker
        pq.write_table(pa.Table.from_pylist(rows, schema=METADATA_SCHEMA), tmp)
    return {"part": part, "samples": len(rows), "skipped": len(skipped)}


def _make_encoder(model: str, pretrained: str | None, device: str, batch_size: int):
    from curators.clip_models import ClipEncoder

    return ClipEncoder(model, pretrained, device, batch_size)


def build_index(
    executor,
    pool: str,
    out: str | Path,
    model: str,
    pretrained: str | None,
    factory: str = "Flat",
    batch_size: int = 64,
    device: str = "auto",
    pool_name: str | None = None,
    dedup_cosine: float | None = 0.95,
    plan: IndexPlan | None = None,
) -> IndexInfo:
    """Embed every pool shard (skipping committed parts) and build the faiss index.

    ``plan`` (from plan_index) saves checking again what the caller already checked."""
    out = Path(out)
    plan = plan or plan_index(pool, model, pretrained, factory, pool_name)
    shards = plan.shards
    with RunLock(out) as lock:
        executor.set_guard(lock.guard())  # workers commit parts only while this run holds out
        bound = check_binding(out, plan)
        if (out / INFO).exists():
            return _check_finished(out, plan, dedup_cosine)
        if not bound:
            write_binding(out, plan)
        todo = [
            (i, str(s)) for i, s in enumerate(shards) if not part_paths(out, i)["metadata"].exists()
        ]
        failed = [
            r
            for r in executor.map(
                "embed",
                todo,
                partial(embed_shard, out, batch_size),
                setup=partial(_make_encoder, plan.model, plan.pretrained, device, batch_size),
                resources=Resources(cpus=1.0, gpus=1.0),
            )
            if r.get(FAILED)
        ]  # each part is committed by its unit
        if failed:
            raise IndexPartsFailed(
                f"{len(failed)} pool shard(s) could not be embedded (first: part {failed[0]['unit']}: "
                f"{failed[0]['error']}); re-run the same command to retry them"
            )
        parts = [part_paths(out, i) for i in range(len(shards))]
        skipped = sum(pq.read_metadata(p["skipped"]).num_rows for p in parts)
        if sum(pq.read_metadata(p["metadata"]).num_rows for p in parts) == 0:
            raise UserError(
                f"the pool {plan.pool} holds no decodable image ({len(shards)} shards, {skipped} "
                f"items skipped: see {out / 'skipped'})"
            )
        index = build_faiss_index(out, len(shards), factory)
        dim, count = index.d, index.ntotal
        del index  # grouping builds its own search index: never two in memory
        write_metadata_arrow(out, len(shards))
        stats = None
        if dedup_cosine is not None and dedup_cosine < 1.0:
            with RowProgress("dedup", count, executor.progress) as bar:
                stats = near_duplicate_groups(out, len(shards), dedup_cosine, progress=bar)
        else:  # grouping off: no stale groups from a killed run with another setting
            (out / DUP_GROUPS).unlink(missing_ok=True)
        info = IndexInfo(
            model=plan.model, pretrained=plan.pretrained, dim=dim, count=count,
            factory=factory, parts=len(shards), skipped=skipped, pool=plan.pool_name,
            dedup_cosine=dedup_cosine, weights=plan.weights, dedup_stats=stats,
        )  # fmt: skip
        write_info(out, info)
        return info
