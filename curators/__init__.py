"""Curation strategies. Each cuts its work into units and turns a unit into labelled,
scored candidates (see base.py).

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
    "caption_search": ("curators.caption_search", "CaptionSearchCurator", "CaptionSearchParams"),
    "web_search": ("curators.web_search", "WebSearchCurator", "WebSearchParams"),
    "diffusion": ("curators.diffusion", "DiffusionCurator", "DiffusionParams"),
}


def _lookup(name: str, which: int) -> Any:
    """A registered curator by name, or any importable one as "package.module:ClassName"
    (its params dataclass is the class's ``Params`` attribute): curators outside this
    package plug in without editing the registry."""
    if name in REGISTRY:
        entry = REGISTRY[name]
        return getattr(importlib.import_module(entry[0]), entry[which])
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise KeyError(name)
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        raise KeyError(name) from None
    return cls if which == 1 else cls.Params


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
