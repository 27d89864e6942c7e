"""`imagenetpp index`: embed an image-text webdataset pool with CLIP and index it with faiss.

The pool is img2dataset-style: tars of <key>.jpg with <key>.txt (caption) and/or <key>.json
({url, caption, license, ...}). One unit per pool shard writes one part of the index; an
undecodable image is skipped and recorded in skipped/ with its reason.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curators.knn_index import (
    METADATA_SCHEMA,
    SKIPPED_SCHEMA,
    IndexInfo,
    build_faiss_index,
    near_duplicate_groups,
    part_paths,
    read_info,
    write_info,
    write_metadata_arrow,
)
from shards.atomic import atomic_path
from shards.images import BadImage, decode
from shards.reader import iter_sample_members

from .errors import UserError
from .workdir import RunLock

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
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

        for key, files in iter_sample_members(shard):
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
) -> IndexInfo:
    """Embed every pool shard (skipping committed parts) and build the faiss index."""
    out = Path(out)
    shards = pool_shards(pool)
    with RunLock(out):
        if (out / "index_info.json").exists():
            return read_info(out)
        todo = [
            (i, str(s)) for i, s in enumerate(shards) if not part_paths(out, i)["metadata"].exists()
        ]
        for _ in executor.map(
            "embed",
            todo,
            partial(embed_shard, out, batch_size),
            setup=partial(_make_encoder, model, pretrained, device, batch_size),
            gpu=True,
        ):
            pass  # each part is committed by its unit; results only drive the progress bar
        index = build_faiss_index(out, len(shards), factory)
        write_metadata_arrow(out, len(shards))
        if dedup_cosine is not None and dedup_cosine < 1.0:
            near_duplicate_groups(out, index, len(shards), dedup_cosine)
        skipped = sum(
            pq.read_metadata(part_paths(out, i)["skipped"]).num_rows for i in range(len(shards))
        )
        info = IndexInfo(
            model=model, pretrained=pretrained, dim=index.d, count=index.ntotal, factory=factory,
            parts=len(shards), skipped=skipped, pool=pool_name or Path(pool).name,
            dedup_cosine=dedup_cosine,
        )  # fmt: skip
        write_info(out, info)
        return info
