"""Curation strategies. Each turns one ImageNet class into scored candidates.

``create_curator(name, params)`` is the one factory; ``params_type(name)`` gives the
dataclass a config's ``curator.params`` is validated against. Modules load lazily so that
the CLI starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Candidate, Curator
from .labels import ImageNetClass, label_set, select_classes

# name -> (module, curator class, params dataclass)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "clip_knn": ("curators.knn_retrieval", "ClipKnnCurator", "ClipKnnParams"),
}


def _lookup(name: str, which: int) -> Any:
    if name not in REGISTRY:
        raise KeyError(name)
    entry = REGISTRY[name]
    return getattr(importlib.import_module(entry[0]), entry[which])


def params_type(name: str) -> type:
    return _lookup(name, 2)


def create_curator(name: str, params: Any) -> Curator:
    return _lookup(name, 1)(params)


__all__ = [
    "Candidate",
    "Curator",
    "ImageNetClass",
    "REGISTRY",
    "create_curator",
    "label_set",
    "params_type",
    "select_classes",
]
