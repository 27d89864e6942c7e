"""CLIP kNN retrieval: query a pool index with class exemplar images or class prompts.

The LA1000 (img2img) recipe: every ImageNet-train image of a class is a query; its nearest
pool images are candidates, scored by their best cosine similarity to any of the class's
queries. Text mode queries with the mean embedding of prompt templates over the class name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .base import (
    Candidate,
    Rejected,
    ResourceError,
    Resources,
    Unit,
    class_units,
    exemplar_files,
    unit_class,
)
from .labels import ImageNetClass

TEMPLATES = {
    "simple": (
        "a photo of a {}.",
        "itap of a {}.",
        "a photo of the {}.",
        "a close-up photo of a {}.",
    ),
    "name": ("{}",),
}


@dataclass
class ClipKnnParams:
    index: str  # folder written by `imagenetpp index`
    queries: Literal["image", "text"] = "image"
    exemplars: str | None = None  # ImageNet-train layout: <dir>/<wnid>/*.JPEG (image mode)
    exemplars_per_class: int = 1300
    k_per_query: int = 50
    min_similarity: float = 0.0
    max_candidates: int = 5000
    templates: Literal["simple", "openai", "name"] = "simple"
    model: str | None = None  # default: the model that built the index
    pretrained: str | None = None
    device: str = "auto"
    batch_size: int = 64
    nprobe: int = 16

    def check(self) -> dict[str, str]:
        """Problems with the resources the params name, keyed by param name."""
        from .knn_index import INFO, is_url_index, read_info

        problems = {}
        if is_url_index(self.index):
            if not self.model:
                problems["model"] = (
                    f"{self.index} is a clip-retrieval index (no {INFO}): name the CLIP model "
                    "that embedded it, and its weights (pretrained)"
                )
        elif not (Path(self.index) / INFO).is_file():
            problems["index"] = f"no finished index at {self.index}"
        else:
            try:
                read_info(self.index)
            except ResourceError as e:
                problems["index"] = str(e)
        if self.model and not (self.pretrained or "").strip():
            problems["pretrained"] = (
                f"model {self.model} needs weights: an open_clip tag, a checkpoint path, "
                "or 'random'"
            )
        if self.queries == "image":
            if not self.exemplars:
                problems["exemplars"] = "image queries need an exemplar folder"
            elif not Path(self.exemplars).is_dir():
                problems["exemplars"] = f"no such folder: {self.exemplars}"
        for name in ("exemplars_per_class", "k_per_query", "max_candidates", "batch_size"):
            if getattr(self, name) < 1:
                problems[name] = "must be at least 1"
        if not -1.0 <= self.min_similarity <= 1.0:
            problems["min_similarity"] = "must lie in [-1, 1]"
        return problems


class ClipKnnCurator:
    """The look-up shape: one unit per class, candidates are pool tar ranges."""

    name = "clip_knn"
    resources = Resources(cpus=1.0, gpus=1.0)  # the GPU, where a cluster has one, encodes queries
    license = None  # the pool's own, per sample

    def __init__(self, params: ClipKnnParams) -> None:
        self.params = params
        self._index = None
        self._encoder = None

    def units(self, classes: Sequence[ImageNetClass]) -> list[Unit]:
        return class_units(classes)

    def _load(self) -> None:
        """Index and model, once per worker, on first use (the driver never loads them)."""
        from .clip_models import ClipEncoder
        from .knn_index import PoolIndex

        params = self.params
        index = PoolIndex(params.index, params.nprobe, params.model, params.pretrained)
        model = params.model or index.info.model
        pretrained = params.pretrained if params.model else index.info.pretrained
        encoder = ClipEncoder(model, pretrained, params.device, params.batch_size)
        if encoder.dim != index.info.dim:
            raise ResourceError(
                f"model {model} embeds in {encoder.dim} dims, the index in {index.info.dim}"
            )
        self._index, self._encoder = index, encoder

    @property
    def index(self):
        if self._index is None:
            self._load()
        return self._index

    @property
    def encoder(self):
        if self._encoder is None:
            self._load()
        return self._encoder

    def embedding_model(self) -> tuple[str, str | None]:
        """The CLIP model (and weights) that embeds this shift's fetched images: the index's."""
        from .knn_index import is_url_index, read_info

        if self.params.model:
            return self.params.model, self.params.pretrained
        if is_url_index(self.params.index):
            raise ResourceError(f"{self.params.index}: a clip-retrieval index needs params.model")
        info = read_info(self.params.index)
        return info.model, info.pretrained

    @property
    def model(self) -> dict[str, str | None]:
        return self.encoder.description

    def _image_queries(self, cls: ImageNetClass) -> tuple[np.ndarray, list[str], list[Rejected]]:
        from shards.images import BadImage, decode

        images, names, unreadable = [], [], []
        for path in exemplar_files(
            self.params.exemplars, cls.wnid, self.params.exemplars_per_class
        ):
            try:
                images.append(decode(path.read_bytes()))
            except BadImage as e:  # only weakens the query set: recorded, the class goes on
                why = f"unreadable exemplar: {' '.join(str(e).split())[:200]}"
                unreadable.append(Rejected(cls.index, f"exemplar {cls.wnid}/{path.name}", why))
                continue
            names.append(path.name)
        return self.encoder.encode_images(images), names, unreadable

    def _text_queries(self, cls: ImageNetClass) -> tuple[np.ndarray, list[str]]:
        if self.params.templates == "openai":
            from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

            prompts = [t(cls.name) for t in OPENAI_IMAGENET_TEMPLATES]
        else:
            prompts = [t.format(cls.name) for t in TEMPLATES[self.params.templates]]
        mean = self.encoder.encode_texts(prompts).mean(axis=0, keepdims=True)
        mean /= max(float(np.linalg.norm(mean)), 1e-12)
        return mean, [f"{self.params.templates} templates: {cls.name}"]

    def candidates(self, unit: Unit) -> list[Candidate | Rejected]:
        cls = unit_class(unit)
        p = self.params
        unreadable: list[Rejected] = []
        if p.queries == "image":
            queries, labels, unreadable = self._image_queries(cls)
        else:
            queries, labels = self._text_queries(cls)
        if len(labels) == 0:
            return list(unreadable)
        k = p.k_per_query if p.queries == "image" else p.max_candidates
        sims, ids = self.index.search(queries, k)
        # Best similarity per pool row over all queries, remembering which query gave it.
        best: dict[int, tuple[float, int]] = {}
        for q in range(sims.shape[0]):
            for s, i in zip(sims[q], ids[q], strict=True):
                if i < 0 or s < p.min_similarity:
                    continue
                s = round(float(s), 6)  # stable across BLAS thread counts
                if int(i) not in best or s > best[int(i)][0]:
                    best[int(i)] = (s, q)
        ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))[: p.max_candidates]
        rows = np.array([r for r, _ in ranked], dtype=np.int64)
        meta = self.index.rows(rows)
        # A URL index without img_emb parts: the embed stage embeds what acquire fetched.
        emb = self.index.embeddings(rows) if self.index.has_embeddings else [None] * len(rows)
        groups = self.index.dup_groups
        out: list[Candidate | Rejected] = list(unreadable)
        for (row, (score, q)), m, e in zip(ranked, meta, emb, strict=True):
            if m["shard"] is None:
                locator = {"kind": "url", "url": m["url"]}
            else:
                locator = {"kind": "tar", "path": m["shard"], "offset": m["offset"], "size": m["size"]}  # fmt: skip
            out.append(
                Candidate(
                    label=cls.index,
                    source_id=m["key"],
                    score=score,
                    query_kind=p.queries,
                    query_value=labels[q],
                    source_dataset=self.index.info.pool,
                    url=m["url"],
                    caption=m["caption"],
                    license=m["license"],
                    sha256=m["sha256"],
                    duplicate_group=None
                    if groups is None
                    else f"{self.index.info.pool}:{groups[row]}",
                    locator=locator,
                    embedding=e,
                )
            )
        return out
