"""One factory for CLIP encoders: any open_clip architecture, hub tag or local checkpoint.

``ClipEncoder("ViT-L-14", "openai")`` loads real weights; ``ClipEncoder("imagenetpp-tiny",
"path/to/ckpt.pt")`` loads the demo model. A model name may also be a path to an open_clip
model-config JSON, which is registered first (its file stem becomes the model name).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from .base import ResourceError


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
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def looks_like_path(pretrained: str | None) -> bool:
    return bool(pretrained) and (
        "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    )


class ClipEncoder:
    """An open_clip model in eval mode with its preprocessing and tokenizer."""

    def __init__(
        self, model: str, pretrained: str | None = None, device: str = "auto", batch_size: int = 64
    ) -> None:
        import open_clip
        import torch

        self.name = resolve_model_name(model)
        self.pretrained = pretrained
        if looks_like_path(pretrained) and not Path(pretrained).is_file():
            raise ResourceError(f"model checkpoint not found: {pretrained}")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                self.name, pretrained=pretrained or None, device=self.device
            )
        except (RuntimeError, OSError, ValueError) as e:
            raise ResourceError(f"cannot load {self.name} weights {pretrained!r}: {e}") from None
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(self.name)
        self.dim = int(open_clip.get_model_config(self.name)["embed_dim"])
        self._torch = torch

    @property
    def description(self) -> dict[str, str | None]:
        return {"name": self.name, "weights": self.pretrained}

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
