"""The curator interface: one ImageNet class in, scored candidates out.

A curator knows nothing of Ray, shards or the output directory. It is built once per worker
from its parameters (models and indexes load in ``__init__``) and then asked class by class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .labels import ImageNetClass


@dataclass
class Candidate:
    """One pool item (or generated image) proposed for a class, with where it came from."""

    source_id: str  # stable id of the pixels' origin (pool key, generation id)
    score: float  # higher is better; comparable within one curator
    query_kind: str  # image | text | lemma | prompt | label
    query_value: str  # which exemplar / prompt / lemma found or made it
    source_dataset: str
    url: str | None = None
    caption: str | None = None
    license: str | None = None
    sha256: str | None = None  # of the source bytes: exact duplicates share it
    duplicate_group: str | None = None  # shared by near duplicates: one per shift is kept
    locator: dict[str, Any] = field(default_factory=dict)  # how to fetch the bytes
    embedding: np.ndarray | None = None  # L2-normalised, for near-duplicate removal
    seed: int | None = None
    prompt: str | None = None


class Curator(Protocol):
    name: str

    @property
    def model(self) -> dict[str, str | None]:
        """{"name": ..., "weights": ...} of the model that scored or made the candidates."""
        ...

    def candidates(self, cls: ImageNetClass) -> list[Candidate]: ...


class ResourceError(Exception):
    """A resource the user named (index, model weights, exemplar folder) is missing or unusable."""
