"""Synthetic img2dataset-style pools for the benchmarks, generated once into bench/work and
regenerated when this file (the generator) or the requested shape changes.

A pool folder holds tars of ``<key>.jpg``, ``<key>.txt`` (the caption) and ``<key>.json``
({key, url, caption, status}), the layout `imagenetpp index` reads. Pictures are photo-like
enough for the codecs to do real work: smooth low-frequency colour fields (a few random
colours upsampled bicubically) with sensor-like noise, saved as JPEG at quality 90.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TEMPLATES = ("a photo of a {}", "a picture of a {}", "{} in the wild", "my {}",
             "close-up of a {}", "the {} i saw today")  # fmt: skip


def photo_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """A smooth gradient field with a few blobs of colour plus noise, as a JPEG."""
    from PIL import Image

    cells = int(rng.integers(2, 6))
    coarse = rng.integers(0, 256, (cells, cells + 1, 3), dtype=np.uint8)
    field = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32
    )
    noise = rng.normal(0.0, 5.0, (height, width, 1)).astype(np.float32)  # luminance grain
    pixels = np.clip(field + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _stamp(kind: str, params: dict) -> str:
    source = Path(__file__).read_bytes()
    blob = source + json.dumps({"kind": kind, **params}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _cached(folder: Path, stamp: str) -> bool:
    marker = folder / "DONE"
    return marker.exists() and marker.read_text() == stamp


def write_pool(
    folder: Path,
    count: int,
    per_shard: int,
    size: tuple[int, int],
    labels: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """``count`` photo-like JPEGs of ``size`` (w, h) in tars of ``per_shard``, captions naming
    ``labels[i % len(labels)]`` (or a generic caption). Returns ``folder`` (cached)."""
    from shards.writer import ShardWriter

    params = {"count": count, "per_shard": per_shard, "size": list(size), "seed": seed,
              "labels": hashlib.sha256("\n".join(labels or []).encode()).hexdigest()}  # fmt: skip
    stamp = _stamp("pool", params)
    if _cached(folder, stamp):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    writer = None
    for i in range(count):
        if i % per_shard == 0:
            if writer is not None:
                writer.close()
            writer = ShardWriter(folder / f"{i // per_shard:05d}.tar")
        rng = np.random.default_rng([seed, i])
        key = f"{i // per_shard:05d}{i % per_shard:04d}"
        name = labels[i % len(labels)] if labels else "thing"
        caption = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(name)
        meta = {"key": key, "url": f"https://bench.invalid/{key}.jpg", "caption": caption,
                "status": "success"}  # fmt: skip
        writer.write(
            key,
            {
                "jpg": photo_jpeg(rng, *size),
                "txt": caption.encode(),
                "json": json.dumps(meta).encode(),
            },
        )
    writer.close()
    (folder / "DONE").write_text(stamp)
    return folder
