"""`imagenetpp index`: embed an image-text webdataset pool with CLIP and index it with faiss.

The pool is img2dataset-style: tars of <key>.jpg with <key>.txt (caption) and/or <key>.json
({url, caption, license, ...}). One unit per pool shard writes one part of the index; an
undecodable image is skipped and recorded in skipped/ with its reason.
"""

from __future__ import annotations

import glob
import hashlib
import io
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
    part_paths,
    read_info,
    write_info,
)
from shards.images import BadImage, decode
from shards.reader import split_name

from .errors import UserError
from .workdir import RunLock

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def pool_shards(pool: str) -> list[Path]:
    """A folder of .tar files, or a glob pattern."""
    path = Path(pool)
    found = (
        sorted(path.glob("*.tar")) if path.is_dir() else sorted(Path(p) for p in glob.glob(pool))
    )
    if not found:
        raise UserError(f"no pool shards (.tar) at {pool}")
    return [p.resolve() for p in found]


def iter_pool_samples(path: Path):
    """(key, {ext: (offset, bytes)}) per sample, reading the tar once, in order."""
    import tarfile

    key, files = None, {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, ext = split_name(info.name)
            if k != key:
                if key is not None:
                    yield key, files
                key, files = k, {}
            files[ext.lower()] = (info.offset_data, tar.extractfile(info).read())
    if key is not None:
        yield key, files


def _describe(key: str, shard: Path, files: dict) -> tuple[dict | None, bytes | None, str | None]:
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


def _prepare(preprocess, data: bytes):
    try:
        img = decode(data)
    except BadImage as e:
        return None, None, str(e)
    return preprocess(img), img.size, None


def embed_shard(root: Path, batch_size: int, threads: int, encoder, unit: tuple[int, str]) -> dict:
    import torch

    part, shard = unit[0], Path(unit[1])
    paths = part_paths(root, part)
    rows, skipped, img_out = [], [], []
    pending: list[tuple[dict, object]] = []

    def flush(batch):
        if not batch:
            return
        results = [f.result() for _, f in batch]
        good = [(row, r) for (row, _), r in zip(batch, results, strict=True) if r[2] is None]
        for (row, _), r in zip(batch, results, strict=True):
            if r[2] is not None:
                skipped.append(
                    {"key": row["key"], "shard": row["shard"], "reason": f"BadImage: {r[2]}"}
                )
        if not good:
            return
        img_out.append(encoder.encode_pixels(torch.stack([r[0] for _, r in good])))
        for row, r in good:
            row["width"], row["height"] = r[1]
            rows.append(row)

    with ThreadPoolExecutor(threads) as pool:
        queued: list = []
        for key, files in iter_pool_samples(shard):
            row, data, problem = _describe(key, shard, files)
            if problem:
                skipped.append({"key": key, "shard": str(shard), "reason": problem})
                continue
            queued.append((row, pool.submit(_prepare, encoder.preprocess, data)))
            if len(queued) == batch_size:
                flush(pending)  # encode the previous batch while this one decodes
                pending, queued = queued, []
        flush(pending)
        flush(queued)
    captions = [r["caption"] or "" for r in rows]
    txt = np.zeros((len(rows), encoder.dim), np.float32)
    has = [i for i, c in enumerate(captions) if c]
    if has:
        txt[has] = encoder.encode_texts([captions[i] for i in has])
    img = np.concatenate(img_out) if img_out else np.zeros((0, encoder.dim), np.float32)
    for name, arr in (("img_emb", img), ("text_emb", txt)):
        _atomic_npy(paths[name], arr)
    _atomic_parquet(paths["skipped"], pa.Table.from_pylist(skipped, schema=SKIPPED_SCHEMA))
    _atomic_parquet(paths["metadata"], pa.Table.from_pylist(rows, schema=METADATA_SCHEMA))
    return {"part": part, "samples": len(rows), "skipped": len(skipped)}


def _atomic_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, arr)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _atomic_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


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
    threads: int = 2,
    pool_name: str | None = None,
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
        results = list(
            executor.map(
                "embed",
                todo,
                partial(embed_shard, out, batch_size, threads),
                setup=partial(_make_encoder, model, pretrained, device, batch_size),
                gpu=True,
            )
        )
        del results
        dim = int(np.load(part_paths(out, 0)["img_emb"], mmap_mode="r").shape[1])
        count = build_faiss_index(out, len(shards), factory)
        skipped = sum(
            pq.read_metadata(part_paths(out, i)["skipped"]).num_rows for i in range(len(shards))
        )
        info = IndexInfo(
            model=model, pretrained=pretrained, dim=dim, count=count, factory=factory,
            parts=len(shards), skipped=skipped, pool=pool_name or Path(pool).name,
        )  # fmt: skip
        write_info(out, info)
        return info
