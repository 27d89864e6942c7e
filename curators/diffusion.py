"""Diffusion synthesis: the SD1000 recipes. Stable-Diffusion-family text-to-image from class
prompts, or image-to-image from class exemplars, seeded per sample, with quality control.

1. Units are (class, sample-index range) slices (the generate shape). Sample ``i`` of a class
   is made with seed ``first_seed + i`` (plus a per-class offset when ``distinct_class_seeds``),
   so any sample can be made again alone, and a resumed run gives the same bytes.
2. Quality control, per sample: an output that is black or blank (what a safety checker
   returns; the published SD1000 img2img shift silently lost three classes to it) is made
   again with the sample's next seed, ``seed + k * images_per_class`` for try ``k``; so is
   one whose CLIP similarity to its prompt is under ``min_clip_similarity`` (optional). Every
   replaced try is recorded in the sample's provenance. A sample that fails all
   ``max_attempts`` is not made (it is yielded as ``Rejected``, with why): its class comes
   up short, and the manifest says so.
3. The bytes go back to the candidates stage (``Candidate.data``), which stores them; a
   committed unit is never generated again.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .base import (
    Candidate,
    Rejected,
    Resources,
    SourceUnreadable,
    Unit,
    class_units,
    exemplar_files,
    unit_class,
)
from .diffusion_models import MODES, SCHEDULERS, check_model, is_hub_id, scheduler_class
from .labels import ImageNetClass

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TEMPLATE_FIELDS = ("name", "gloss", "parent", "wnid")


@dataclass
class DiffusionParams:
    model: str = DEFAULT_MODEL  # a hub id or a local folder saved by save_pretrained
    model_name: str | None = None  # provenance name (default: the hub id or the folder's name)
    mode: Literal["txt2img", "img2img"] = "txt2img"
    scheduler: str = "unipc"  # a name in SCHEDULERS or a diffusers scheduler class name
    steps: int = 20
    guidance: float = 7.5
    size: int = 512
    strength: float = 0.75  # img2img: how far from the exemplar (1.0 ignores it)
    prompts: list[str] = field(default_factory=lambda: ["A photo of {name}"])  # sample i: i % n
    negative_prompt: str | None = None
    exemplars: str | None = None  # img2img: ImageNet-train layout, <dir>/<wnid>/*.JPEG
    images_per_class: int | None = None  # sample indices 0..n-1 per class; None: the target
    first_seed: int = 1  # SD1000: seeds 1..1300, the same for every class
    distinct_class_seeds: bool = False  # add label * images_per_class * max_attempts
    unit_size: int = 100  # samples per unit (the resume granularity)
    max_attempts: int = 4  # tries per sample (the first and its replacements)
    blank_max_std: float = 2.0  # pixel standard deviation (0-255) at or below which it is blank
    min_clip_similarity: float | None = None  # optional CLIP filter against the prompt
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = "openai"
    blob_format: Literal["jpeg", "png"] = "jpeg"  # how made images wait in _work (PNG: lossless)
    blob_quality: int = 95
    license: str = "creativeml-openrail-m"  # SD 1.5's licence (its use restrictions carry over)
    device: str = "auto"
    dtype: str = "auto"  # float16 on GPU, float32 on CPU
    batch_size: int = 8  # part of what fixes the bytes: float rounding differs by batch
    cpu_threads: int = 1  # on CPU, torch threads per worker: the bytes depend on it too
    gpus: float = 1.0  # per worker, where the cluster has GPUs (fractions share one)

    def check(self) -> dict[str, str]:
        problems = {}
        if scheduler_class(self.scheduler) is None:
            problems["scheduler"] = f"unknown scheduler {self.scheduler!r} (known: {', '.join(SCHEDULERS)}, or a diffusers class name)"  # fmt: skip
        if self.mode not in MODES:
            problems["mode"] = f"must be one of {', '.join(MODES)}"
        if self.mode == "img2img":
            if not self.exemplars:
                problems["exemplars"] = "img2img needs an exemplar folder"
            elif not Path(self.exemplars).is_dir():
                problems["exemplars"] = f"no such folder: {self.exemplars}"
            if not 0.0 < self.strength <= 1.0:
                problems["strength"] = "must lie in (0, 1]"
        if not self.prompts:
            problems["prompts"] = "give at least one template"
        for template in self.prompts:
            try:
                template.format(**{k: "" for k in TEMPLATE_FIELDS})
            except (KeyError, IndexError, ValueError) as e:
                problems["prompts"] = f"template {template!r}: {e!r} (fields: {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)})"  # fmt: skip
        if self.images_per_class is None:
            problems["images_per_class"] = "give a number (a shift config fills in its target_per_class)"  # fmt: skip
        for name in ("steps", "unit_size", "max_attempts", "batch_size", "size", "cpu_threads"):  # fmt: skip
            if getattr(self, name) < 1:
                problems[name] = "must be at least 1"
        if (self.images_per_class or 1) < 1:
            problems["images_per_class"] = "must be at least 1"
        if self.size % 8:
            problems["size"] = "must be a multiple of 8 (the VAE's scale)"
        if self.min_clip_similarity is not None and not -1.0 <= self.min_clip_similarity <= 1.0:
            problems["min_clip_similarity"] = "must lie in [-1, 1]"
        if self.dtype not in ("auto", "float16", "bfloat16", "float32"):
            problems["dtype"] = "must be auto, float16, bfloat16 or float32"
        if self.gpus < 0 or (self.gpus > 1 and not float(self.gpus).is_integer()):
            problems["gpus"] = "a fraction of one GPU or a whole number"
        if not problems.get("scheduler") and (problem := check_model(self.model)):
            problems["model"] = problem
        return problems

    @property
    def provenance_name(self) -> str:
        if self.model_name:
            return self.model_name
        return self.model if is_hub_id(self.model) else Path(self.model).name

    def seed(self, label: int, index: int, attempt: int) -> int:
        offset = label * self.images_per_class * self.max_attempts if self.distinct_class_seeds else 0  # fmt: skip
        return self.first_seed + offset + index + attempt * self.images_per_class


def prompt_for(template: str, cls: ImageNetClass) -> str:
    parent = cls.parent_lemmas[0] if cls.parent_lemmas else cls.name
    return template.format(name=cls.name, gloss=cls.gloss, parent=parent, wnid=cls.wnid)


@dataclass
class _Try:
    index: int
    seed: int  # of this attempt
    prompt: str
    attempt: int = 0
    replaced: list[dict[str, Any]] = field(default_factory=list)


class DiffusionCurator:
    """The generate shape: (class, index range) units; returns the images it makes."""

    Params = DiffusionParams
    name = "diffusion"

    def __init__(self, params: DiffusionParams) -> None:
        self.params = params
        self.resources = Resources(cpus=float(params.cpu_threads), gpus=params.gpus)
        self.license = params.license
        self._pipe = None
        self._clip = None

    @property
    def model(self) -> dict[str, str | None]:
        from .diffusion_models import model_folder, weights_digest

        # weights_digest is cached per folder: hashing the weights happens once per process.
        return {"name": self.params.provenance_name, "weights": weights_digest(str(model_folder(self.params.model)))}  # fmt: skip

    def embedding_model(self) -> tuple[str, str | None] | None:
        """The CLIP filter's model embeds the shift (its embeddings are already made)."""
        p = self.params
        return (p.clip_model, p.clip_pretrained) if p.min_clip_similarity is not None else None

    def units(self, classes: Sequence[ImageNetClass]) -> list[Unit]:
        p = self.params
        out = []
        for u in class_units(classes):
            for first in range(0, p.images_per_class, p.unit_size):
                count = min(p.unit_size, p.images_per_class - first)
                out.append(Unit(f"{u.id}-i{first:05d}", u.labels, (("first", first), ("count", count))))  # fmt: skip
        return out

    @property
    def pipe(self):
        if self._pipe is None:
            from .diffusion_models import load_pipeline

            # The safety checker's "NSFW content detected" warning: we detect and record it.
            logging.getLogger("diffusers.pipelines.stable_diffusion.safety_checker").setLevel(logging.ERROR)  # fmt: skip
            p = self.params
            self._pipe = load_pipeline(p.model, p.mode, p.scheduler, p.device, p.dtype)
        return self._pipe

    @property
    def clip(self):
        if self._clip is None and self.params.min_clip_similarity is not None:
            from .clip_models import ClipEncoder

            p = self.params
            self._clip = ClipEncoder(p.clip_model, p.clip_pretrained, p.device, p.batch_size)
        return self._clip

    def candidates(self, unit: Unit) -> Iterator[Candidate | Rejected]:
        p = self.params
        cls = unit_class(unit)
        first, count = unit.params["first"], unit.params["count"]
        indices = range(first, first + count)
        exemplars, unreadable = self._exemplars(cls, indices) if p.mode == "img2img" else ({}, [])
        model = self.model  # hashed once per worker, before the first image
        settings = self._settings()

        def aim(index: int, attempt: int = 0) -> tuple[int, str]:
            return p.seed(cls.index, index, attempt), prompt_for(p.prompts[index % len(p.prompts)], cls)  # fmt: skip

        pending = [_Try(i, *aim(i)) for i in indices]
        done: dict[int, Candidate | None] = {}  # index -> candidate; None: every try failed
        failed: list[Rejected] = []
        next_index = first  # candidates go out in index order, each as soon as it and all
        # before it are settled: the stage's bar moves within the unit, the order stays fixed
        while pending:
            batch, pending = pending[: p.batch_size], pending[p.batch_size :]
            retry = []
            for t, image, flagged, sim, emb in self._make(cls, batch, exemplars):
                check, reason = self._rejection(image, flagged, sim)
                if check is None:
                    done[t.index] = self._candidate(cls, t, image, sim, emb, exemplars, model, settings)  # fmt: skip
                    continue
                t.replaced.append({"seed": t.seed, "check": check, "reason": reason})
                t.attempt += 1
                t.seed, t.prompt = aim(t.index, t.attempt)
                if t.attempt < p.max_attempts:
                    retry.append(t)
                else:
                    checks = Counter(r["check"] for r in t.replaced)
                    why = ", ".join(f"{k} x{n}" for k, n in sorted(checks.items()))
                    failed.append(Rejected(cls.index, f"{cls.wnid}/{t.index:05d}", f"quality control: all {p.max_attempts} tries failed ({why})"))  # fmt: skip
                    done[t.index] = None
            pending = retry + pending  # replacements first: a unit's order never depends on timing
            while next_index in done:
                if (made := done.pop(next_index)) is not None:
                    yield made
                next_index += 1
        yield from (*failed, *unreadable)

    def _settings(self) -> dict[str, Any]:
        p = self.params
        out: dict[str, Any] = {
            "mode": p.mode, "scheduler": scheduler_class(p.scheduler), "steps": p.steps,
            "guidance": p.guidance, "size": p.size, "negative_prompt": p.negative_prompt,
        }  # fmt: skip
        if p.mode == "img2img":
            out["strength"] = p.strength
        return out

    def _exemplars(
        self, cls: ImageNetClass, indices: range
    ) -> tuple[dict[int, tuple[str, Any]], list[Rejected]]:
        """Sample index -> (key "<wnid>/<file>", RGB image at size x size, centre-cropped):
        sample i starts from exemplar i mod n (by file name), or, when that one is unreadable,
        from the next readable one; unreadable ones come back as Rejected, to be recorded.
        Only this unit's are loaded."""
        from PIL import Image, ImageOps

        files = exemplar_files(self.params.exemplars, cls.wnid, 1 << 30)
        if not files:
            raise SourceUnreadable(f"no exemplar images for {cls.wnid} in {self.params.exemplars}")  # fmt: skip
        size = (self.params.size, self.params.size)
        loaded: dict[int, tuple[str, Any] | None] = {}  # None: unreadable
        rejected: list[Rejected] = []

        def load(j: int) -> tuple[str, Any] | None:
            if j not in loaded:
                path = files[j]
                try:
                    with Image.open(path) as img:
                        img = ImageOps.exif_transpose(img).convert("RGB")
                        loaded[j] = (f"{cls.wnid}/{path.name}", ImageOps.fit(img, size, Image.Resampling.BICUBIC))  # fmt: skip
                except Exception as e:  # noqa: BLE001  PIL raises many types for a bad file
                    loaded[j] = None
                    rejected.append(Rejected(cls.index, f"exemplar {cls.wnid}/{path.name}", f"unreadable exemplar: {type(e).__name__}"))  # fmt: skip
            return loaded[j]

        def start(i: int) -> tuple[str, Any]:
            for step in range(len(files)):
                if (found := load((i + step) % len(files))) is not None:
                    return found
            raise SourceUnreadable(f"no readable exemplar images for {cls.wnid} in {self.params.exemplars}")  # fmt: skip

        return {i: start(i) for i in indices}, rejected

    def _make(self, cls: ImageNetClass, batch: list[_Try], exemplars: dict) -> list:
        """One pipeline call for a batch of tries: (try, image, flagged, clip sim, embedding)."""
        import torch

        p = self.params
        prompts = [t.prompt for t in batch]
        # CPU generators: the starting noise is the same on every device.
        gens = [torch.Generator("cpu").manual_seed(t.seed) for t in batch]
        kwargs: dict[str, Any] = dict(
            prompt=prompts, num_inference_steps=p.steps, guidance_scale=p.guidance,
            generator=gens, output_type="pil",
        )  # fmt: skip
        if p.negative_prompt:
            kwargs["negative_prompt"] = [p.negative_prompt] * len(batch)
        if p.mode == "img2img":
            kwargs.update(image=[exemplars[t.index][1] for t in batch], strength=p.strength)  # fmt: skip
        else:
            kwargs.update(height=p.size, width=p.size)
        sims: list[float | None] = [None] * len(batch)
        embs: list[np.ndarray | None] = [None] * len(batch)
        threads = torch.get_num_threads()
        if self.pipe.device.type == "cpu":  # a fixed count, whatever the executor gives us
            torch.set_num_threads(p.cpu_threads)
        try:
            with torch.inference_mode():
                out = self.pipe(**kwargs)
            if self.clip is not None:
                image_emb = self.clip.encode_images(out.images)
                text_emb = self.clip.encode_texts(prompts)
                sims = [float(s) for s in (image_emb * text_emb).sum(axis=1)]
                embs = list(image_emb)
        finally:
            torch.set_num_threads(threads)
        flags = getattr(out, "nsfw_content_detected", None) or [False] * len(batch)
        return list(zip(batch, out.images, flags, sims, embs, strict=True))

    def _rejection(self, image, flagged: bool, sim: float | None) -> tuple[str | None, str]:
        """(which check failed: "blank" | "clip", why), or (None, "") for a keeper. Blank is
        judged by the pixels, whatever made them so (a safety checker, a NaN in fp16)."""
        std = float(np.asarray(image, dtype=np.float32).std())
        if std <= self.params.blank_max_std:
            return "blank", "black (safety checker)" if flagged else f"blank (pixel std {std:.2f})"
        if sim is not None and sim < self.params.min_clip_similarity:
            return "clip", f"clip similarity {sim:.4f} < {self.params.min_clip_similarity}"
        return None, ""

    def _encode(self, image) -> bytes:
        buf = io.BytesIO()
        if self.params.blob_format == "png":
            image.save(buf, format="PNG", optimize=False)
        else:
            image.save(buf, format="JPEG", quality=self.params.blob_quality)
        return buf.getvalue()

    def _candidate(self, cls, t: _Try, image, sim, emb, exemplars, model, settings) -> Candidate:
        p = self.params
        seed, prompt = t.seed, t.prompt
        generation = {**settings, "index": t.index, "attempt": t.attempt, "replaced": t.replaced}
        exemplar = None
        if exemplars:
            exemplar = exemplars[t.index][0]
            generation["exemplar"] = exemplar
        if sim is not None:
            generation["clip_similarity"] = sim
        return Candidate(
            label=cls.index, source_id=f"{cls.wnid}/{t.index:05d}",
            # The CLIP filter's similarity where there is one; otherwise earlier indices first.
            score=sim if sim is not None else 1.0 - t.index / p.images_per_class,
            query_kind="image" if exemplar else "prompt", query_value=exemplar or prompt,
            source_dataset=f"synthetic:{model['name']}", license=p.license, seed=seed,
            prompt=prompt, data=self._encode(image), generation=generation,
            embedding=emb,
        )  # fmt: skip
