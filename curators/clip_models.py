"""One factory for CLIP encoders: any open_clip architecture, hub tag or local checkpoint.

``ClipEncoder("ViT-L-14", "openai")`` loads real weights; ``ClipEncoder("imagenetpp-tiny",
"path/to/ckpt.pt")`` loads the demo model; ``pretrained="random"`` gives untrained weights
seeded identically in every worker. A model name may also be a path to an open_clip
model-config JSON, which is registered first (its file stem becomes the model name).

Weights are resolved and checked before anything loads (:func:`check_weights`): an empty
value, a missing file, an unknown tag, or a tag that is not cached while the hub cannot be
reached is a one-line ResourceError, not a minute of download retries. Their description
(what goes into provenance and index_info.json) never holds a local path: a tag, or the
checkpoint's file name and content hash, so the same weights describe the same anywhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from shards.fetch import host_port

from .base import ResourceError

RANDOM = "random"  # --pretrained value asking for untrained weights
RANDOM_SEED = 0
HUB_TIMEOUT_S = 3.0
_HASH_CHUNK = 1 << 20


@lru_cache(maxsize=1)
def _register_bundled_configs() -> None:
    import open_clip

    folder = resources.files("curators").joinpath("model_configs")
    with resources.as_file(folder) as path:
        open_clip.add_model_config(str(path))


def resolve_model_name(name: str) -> str:
    """Register bundled and path-given configs; return the open_clip model name."""
    import open_clip

    _register_bundled_configs()
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ResourceError(f"model config not found: {name}")
        open_clip.add_model_config(str(path))
        name = path.stem
    if name not in open_clip.list_models():
        raise ResourceError(f"unknown open_clip model: {name}")
    return name


def resolve_device(device: str) -> str:
    """auto: the GPU when torch sees one. A device asked for by name must exist here: torch
    would otherwise fail deep inside model loading with a driver message."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        asked = torch.device(device)
    except (RuntimeError, ValueError):
        raise ResourceError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N, mps, auto)") from None  # fmt: skip
    if asked.type == "cuda":
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if seen == 0 or (asked.index or 0) >= seen:
            raise ResourceError(f"device {device!r}: torch sees {seen} CUDA GPU(s) here (use cpu or auto)")  # fmt: skip
    return device


def looks_like_path(pretrained: str | None) -> bool:
    return bool(pretrained) and (
        "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    )


def _one_line(text: object, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


@lru_cache(maxsize=64)
def _sha256_prefix(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too, so a checkpoint replaced in place is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def checkpoint_description(path: str | os.PathLike) -> str:
    """'<file name> sha256:<16 hex>': names the weights by content, not by location."""
    path = Path(path).resolve()
    st = path.stat()
    return f"{path.name} sha256:{_sha256_prefix(str(path), st.st_size, st.st_mtime_ns)}"


@dataclass(frozen=True)
class Weights:
    """Resolved ``pretrained``: what to hand open_clip (``load``) and how to describe it."""

    kind: str  # "tag" | "file" | "random"
    load: str | None  # tag, absolute checkpoint path, or None (random)
    description: str  # location-free: the tag, "<file> sha256:<hex>", "random (seed 0)"
    cached: str | None = None  # tag weights already in the local cache (their path)

    @property
    def pretrained(self) -> str:
        """The value to record for loading these weights again (index_info.json)."""
        return self.load if self.load is not None else RANDOM


def _no_weights_message(model: str) -> str:
    return (
        f"no weights given for {model}: pass --pretrained TAG (an open_clip tag such as "
        f"openai) or --pretrained /path/to/checkpoint.pt; --pretrained {RANDOM} asks for "
        f"untrained weights (seed {RANDOM_SEED})"
    )


def precheck_weights(model: str, pretrained: str | None) -> None:
    """The weights mistakes that need no open_clip (its import takes seconds): an empty value,
    a checkpoint path that is not there."""
    value = (pretrained or "").strip()
    if not value:
        raise ResourceError(_no_weights_message(model))
    if looks_like_path(value) and not Path(value).expanduser().is_file():
        raise ResourceError(f"model checkpoint not found: {value}")


def resolve_weights(model: str, pretrained: str | None) -> Weights:
    """Turn a ``pretrained`` value into Weights without loading anything; raises
    ResourceError for an empty value, a missing checkpoint or an unknown tag."""
    import open_clip

    name = resolve_model_name(model)
    value = (pretrained or "").strip()
    if not value:
        raise ResourceError(_no_weights_message(name))
    if value == RANDOM:
        return Weights("random", None, f"random (seed {RANDOM_SEED})")
    cfg = {} if looks_like_path(value) else open_clip.get_pretrained_cfg(name, value)
    if cfg:
        tag = value.lower().replace("-", "_")  # open_clip's own tag normalisation
        return Weights("tag", value, tag, _cached_tag_file(cfg))
    path = Path(value).expanduser()
    if path.is_file():
        return Weights("file", str(path.resolve()), checkpoint_description(path))
    if looks_like_path(value):
        raise ResourceError(f"model checkpoint not found: {value}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    shown = ", ".join(tags[:8]) + (f" and {len(tags) - 8} more" if len(tags) > 8 else "")
    known = f"its tags: {shown}" if tags else "it has no open_clip tags"
    raise ResourceError(
        f"{name} weights {value!r} are neither an open_clip tag nor a file ({known})"
    )


def _tag_source(cfg: dict) -> tuple[str, str]:
    """Where open_clip's download_pretrained will look for a tag's weights (same order)."""
    from open_clip.pretrained import has_hf_hub

    if "file" in cfg:
        return "file", cfg["file"]
    if has_hf_hub() and cfg.get("hf_hub"):
        return "hf_hub", cfg["hf_hub"]
    return "url", cfg.get("url", "")


def _cached_tag_file(cfg: dict) -> str | None:
    """The tag's weights file when it is already in open_clip's cache, else None."""
    kind, where = _tag_source(cfg)
    if kind == "file":
        return where if os.path.isfile(where) else None
    if kind == "url":
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(where))
        return target if where and os.path.isfile(target) else None
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, filename = os.path.split(where)
    filename = filename or HF_WEIGHTS_NAME
    names = [filename]
    if filename == HF_WEIGHTS_NAME:
        names.insert(0, HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    for candidate in names:
        found = try_to_load_from_cache(repo, candidate)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=8)
def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def _download_source(cfg: dict) -> tuple[str, int, str]:
    """(host, port, local cache folder) of where open_clip would fetch a tag's weights."""
    kind, where = _tag_source(cfg)
    cache = "~/.cache/clip"
    if kind == "hf_hub":
        from huggingface_hub import constants

        where, cache = constants.ENDPOINT, constants.HF_HUB_CACHE
    return (*host_port(where), cache)


def check_weights(model: str, pretrained: str | None) -> Weights:
    """resolve_weights, plus: tag weights that are not cached need a reachable hub. Cheap
    enough to run before any worker starts, so a missing resource fails in seconds."""
    import open_clip

    weights = resolve_weights(model, pretrained)
    if weights.kind != "tag" or weights.cached:
        return weights
    name = resolve_model_name(model)
    cfg = open_clip.get_pretrained_cfg(name, weights.load)
    host, port, cache = _download_source(cfg)
    offline = _hub_offline()
    if offline or not host or not _reachable(host, port):
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub ({host}) cannot be reached"
        raise ResourceError(
            f"{name} weights {weights.load!r} are not in the local cache and {why}; download "
            f"them once on a machine with internet (open_clip cache {cache}) or pass "
            "--pretrained /path/to/checkpoint.pt"
        )
    return weights


class _OnceFilter(logging.Filter):
    """Lets a message through once: download retries repeat one warning with new numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "open_clip" in record.pathname:
            return False  # open_clip logs the failure it raises; we raise it as one line
        shape = re.sub(r"\d+(\.\d+)?", "#", record.getMessage())
        if shape in self.seen:
            return False
        self.seen.add(shape)
        return True


@contextmanager
def _quiet_downloads(offline: bool) -> Iterator[None]:
    """While loading: duplicate hub warnings dropped; with cached weights, no network at all
    (the hub library would otherwise ask the hub for updates, retrying when it is down)."""
    once = _OnceFilter()
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub")]
    loggers += [
        logging.getLogger(n)
        for n in list(logging.root.manager.loggerDict)
        if n.startswith("huggingface_hub.")
    ]
    for logger in loggers:
        logger.addFilter(once)
    constants = None
    if offline:
        from huggingface_hub import constants
    held = constants.HF_HUB_OFFLINE if constants else None
    if constants:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants:
            constants.HF_HUB_OFFLINE = held
        for logger in loggers:
            logger.removeFilter(once)


class ClipEncoder:
    """An open_clip model in eval mode with its preprocessing and tokenizer."""

    def __init__(
        self, model: str, pretrained: str | None = None, device: str = "auto", batch_size: int = 64
    ) -> None:
        import open_clip
        import torch

        self.name = resolve_model_name(model)
        self.weights = check_weights(self.name, pretrained)
        self.pretrained = self.weights.load  # for loading only: provenance uses description
        self.device = resolve_device(device)
        self.batch_size = batch_size
        kwargs = {}
        if self.weights.kind == "tag":
            # OpenAI's weights were trained with QuickGELU, which ViT-L-14's config lacks:
            # without this, open_clip only warns and the embeddings come out degraded.
            cfg = open_clip.get_pretrained_cfg(self.name, self.weights.load)
            if cfg.get("quick_gelu") and not open_clip.get_model_config(self.name).get(
                "quick_gelu"
            ):
                kwargs["force_quick_gelu"] = True
        if self.weights.kind == "random":
            torch.manual_seed(RANDOM_SEED)  # the same untrained weights in every worker
        try:
            # Warnings are held back: after a failure, the one-line error says it all.
            with warnings.catch_warnings(record=True) as held:
                warnings.simplefilter("always")
                with _quiet_downloads(offline=self.weights.cached is not None):
                    self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                        self.name, pretrained=self.weights.load, device=self.device, **kwargs
                    )
        except Exception as e:  # noqa: BLE001  a damaged checkpoint raises pickle, safetensors,
            # torch or hub errors alike: all mean these weights cannot be used
            raise ResourceError(
                f"cannot load {self.name} weights {pretrained!r} ({type(e).__name__}: "
                f"{_one_line(e)})"
            ) from None
        for w in held:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(self.name)
        self.dim = int(open_clip.get_model_config(self.name)["embed_dim"])
        self._torch = torch

    @property
    def description(self) -> dict[str, str | None]:
        return {"name": self.name, "weights": self.weights.description}

    def _normalise(self, features) -> np.ndarray:
        features = features.float()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy().astype(np.float32)

    def encode_pixels(self, pixels) -> np.ndarray:
        """A preprocessed batch tensor (N, 3, H, W) -> (N, dim) L2-normalised float32."""
        with self._torch.inference_mode():
            return self._normalise(self.model.encode_image(pixels.to(self.device)))

    def encode_images(self, images: Sequence) -> np.ndarray:
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(images), self.batch_size):
            batch = self._torch.stack(
                [self.preprocess(im) for im in images[i : i + self.batch_size]]
            )
            out.append(self.encode_pixels(batch))
        return np.concatenate(out)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = [np.zeros((0, self.dim), np.float32)]
        with self._torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[i : i + self.batch_size])).to(self.device)
                out.append(self._normalise(self.model.encode_text(tokens)))
        return np.concatenate(out)
