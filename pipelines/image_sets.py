"""Folders of images a user names (a reference set, evaluation sets): listed, labelled by
their <wnid>/ sub-folders where they have them, embedded with the shift's CLIP model and
perceptually hashed. Report measures against them; select can exclude them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.images import BadImage, decode, perceptual_hash

from .errors import UserError


@dataclass
class ImageSet:
    """A folder of images given by the user; <wnid>/ sub-folders label them (ImageNet layout)."""

    name: str
    root: Path
    files: list[Path]
    wnids: list[str | None]

    @classmethod
    def open(cls, folder: str, what: str) -> ImageSet:
        from curators.base import IMAGE_SUFFIXES
        from curators.labels import by_wnid

        from .demo_world import resolve_demo_path

        root = Path(resolve_demo_path(folder) if folder.startswith("demo:") else folder)
        root = root.expanduser()
        if not root.is_dir():
            raise UserError(f"{what}: no such folder: {folder}")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{what}: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        known = by_wnid()
        wnids = [p.parent.name if p.parent.name in known else None for p in files]
        name = folder.removeprefix("demo:") if folder.startswith("demo:") else root.name
        return cls(name, root, files, wnids)


@dataclass
class EncodedSet:
    images: ImageSet
    embeddings: np.ndarray  # (n, dim) float32, rows of the decodable files
    rows: list[int]  # which files those are
    hashes: np.ndarray  # (n, 8) uint8 perceptual hashes of the same rows
    unreadable: int


def encode_set(images: ImageSet, encoder, log: Callable[[str], None]) -> EncodedSet:
    """CLIP embeddings (none without an encoder) and perceptual hashes of an image folder.
    Cached by the files' names, sizes and times and the model: an evaluation set as big as
    ImageNet-val is embedded once, not on every report and curate that names it."""
    what = f"{'embedded and ' if encoder else ''}hashed"
    key = _cache_key(images, encoder)
    cached = _load_cached(key, images)
    if cached is not None:
        log(f"{images.name}: {len(cached.rows)} images {what} ({cached.unreadable} unreadable; cached)")  # fmt: skip
        return cached
    embs, rows, hashes, bad = [], [], [], 0
    batch: list = []

    def flush() -> None:
        if batch and encoder is not None:
            embs.append(encoder.encode_images([im for _, im in batch]))
            batch.clear()

    for i, path in enumerate(images.files):
        data = path.read_bytes()
        try:
            img = decode(data)
            h = perceptual_hash(data)
        except BadImage:
            bad += 1
            continue
        rows.append(i)
        hashes.append(np.frombuffer(h, np.uint8))
        batch.append((i, img))
        if len(batch) >= (encoder.batch_size if encoder is not None else 1):
            flush()
    flush()
    log(f"{images.name}: {len(rows)} images {what} ({bad} unreadable)")
    emb = np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)
    encoded = EncodedSet(images, emb, rows, np.stack(hashes) if hashes else np.zeros((0, 8), np.uint8), bad)  # fmt: skip
    _store(key, encoded)
    return encoded


def _cache_file(key: str) -> Path:
    from .demo_world import cache_dir

    return cache_dir() / "image-sets" / f"{key}.npz"


def _cache_key(images: ImageSet, encoder) -> str:
    """Changes when any file is added, removed or rewritten, or the model, device or batch
    size changes (select's exclusions must come out the same as when computed afresh)."""
    files = []
    for path in images.files:
        st = path.stat()
        files.append((str(path.relative_to(images.root)), st.st_size, st.st_mtime_ns))
    model = None
    if encoder is not None:
        model = [encoder.description, str(encoder.device), encoder.batch_size]
    text = json.dumps({"v": 1, "root": str(images.root.resolve()), "model": model, "files": files})
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _load_cached(key: str, images: ImageSet) -> EncodedSet | None:
    try:
        with np.load(_cache_file(key)) as z:
            return EncodedSet(images, z["embeddings"], z["rows"].tolist(), z["hashes"], int(z["unreadable"]))  # fmt: skip
    except (OSError, KeyError, ValueError):  # absent or damaged: computed again
        return None


def _store(key: str, encoded: EncodedSet) -> None:
    from shards.atomic import atomic_path

    try:
        with atomic_path(_cache_file(key)) as tmp, open(tmp, "wb") as f:
            np.savez(f, embeddings=encoded.embeddings, rows=np.asarray(encoded.rows, np.int64),
                     hashes=encoded.hashes, unreadable=encoded.unreadable)  # fmt: skip
    except OSError:  # a read-only cache costs the next run the time, nothing else
        pass


class _EncoderOnFirstUse:
    """A ClipEncoder's identity (what the cache key needs) at once, its model only when an
    image set is not cached: select loads CLIP for nothing else."""

    def __init__(self, model: str, pretrained: str | None, device: str, batch_size: int) -> None:
        from curators.clip_models import check_weights, resolve_device, resolve_model_name

        name = resolve_model_name(model)
        self.description = {"name": name, "weights": check_weights(name, pretrained).description}
        self.device, self.batch_size = resolve_device(device), batch_size
        self._args, self._encoder = (model, pretrained, device, batch_size), None

    def encode_images(self, images: list) -> np.ndarray:
        from curators.clip_models import ClipEncoder

        self._encoder = self._encoder or ClipEncoder(*self._args)
        return self._encoder.encode_images(images)


def exclusion_sets(folders: list[str], clip: tuple[str, str | None], device: str,
                   batch_size: int, log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The CLIP embeddings and perceptual hashes of every image in the given evaluation sets,
    for select to keep their near-duplicates out of a shift."""
    sets = [ImageSet.open(f, "select.exclude") for f in folders]
    encoder = _EncoderOnFirstUse(clip[0], clip[1], device, batch_size)
    encoded = [encode_set(s, encoder, log) for s in sets]
    return np.concatenate([e.embeddings for e in encoded]), np.concatenate([e.hashes for e in encoded])  # fmt: skip
