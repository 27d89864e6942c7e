"""The curator interface: units of work in, scored and labelled candidates out.

A curator knows nothing of Ray, shards or the output directory. It decides how its work is
cut (``units``: by default one per class; a scanner cuts by source part, a generator by
(class, seed range)), then turns each unit into candidates, each carrying its class label.
Construction must be cheap (the driver builds one to list units); models and indexes load
lazily, once per worker, on the first ``candidates`` call.

Every shape fits: a look-up (kNN) returns pool tar ranges, a scan returns ranges, files or
URLs for many classes at once, a generator returns the bytes it made in ``Candidate.data``
(the candidates stage, not the curator, stores them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .labels import ImageNetClass, label_set


class UserError(Exception):
    """A mistake on the user's side (bad config, missing file, unreachable resource): the CLI
    prints its one-line message and exits 2. The root of every such error, at the lowest
    floor that raises one, so curators and pipelines share it."""


class ResourceError(UserError):
    """A resource the user named (index, model weights, exemplar folder) is missing or unusable."""


class SourceUnreadable(Exception):
    """A unit's source cannot be read (a corrupt metadata part, a dead listing): the
    candidates stage commits the unit empty, records the reason, and the run goes on; the
    manifest lists it under ``sources_skipped``."""


@dataclass(frozen=True)
class Resources:
    """What one worker of this curator needs; fractional GPUs share a device."""

    cpus: float = 1.0
    gpus: float = 0.0


@dataclass(frozen=True)
class Unit:
    """A piece of curation work, committed as a whole: ``_work/candidates/<id>.parquet``."""

    id: str  # stable across runs, safe as a file name
    labels: tuple[int, ...]  # the classes it may yield candidates for
    spec: tuple[tuple[str, Any], ...] = ()  # curator-specific (a part path, a seed range)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.spec)


def class_units(classes: Sequence[ImageNetClass]) -> list[Unit]:
    """The default cut: one unit per class."""
    return [Unit(f"{c.index:04d}", (c.index,)) for c in classes]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def exemplar_files(folder: str | Path, wnid: str, limit: int) -> list[Path]:
    """A class's exemplar images in ImageNet-train layout (<folder>/<wnid>/*.JPEG), by name."""
    class_dir = Path(folder) / wnid
    if not class_dir.is_dir():
        return []
    files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:limit]


def unit_class(unit: Unit) -> ImageNetClass:
    """The one class of a per-class unit."""
    (label,) = unit.labels
    return label_set()[label]


@dataclass
class Candidate:
    """One pool item (or generated image) proposed for a class, with where it came from."""

    label: int  # ImageNet-1k index of the class it is proposed for
    source_id: str  # stable id of the pixels' origin (pool key, generation id)
    score: float  # higher is better; comparable within one curator
    query_kind: str  # image | text | lemma | prompt | label
    query_value: str  # which exemplar / prompt / lemma found or made it
    source_dataset: str
    url: str | None = None
    caption: str | None = None
    license: str | None = None
    creator: str | None = None  # who made the source image, where the source says
    landing_page: str | None = None  # the page the image is shown on (its licence's context)
    sha256: str | None = None  # of the source bytes: exact duplicates share it
    duplicate_group: str | None = None  # shared by near duplicates: one per shift is kept
    locator: dict[str, Any] = field(default_factory=dict)  # shards.sources: where the bytes are
    embedding: np.ndarray | None = None  # L2-normalised, for near-duplicate removal
    seed: int | None = None
    prompt: str | None = None
    data: bytes | None = None  # bytes the curator made; stored by the stage, never kept here
    generation: dict[str, Any] | None = None  # how it was made: sampler, steps, QC decisions


@dataclass(frozen=True)
class Rejected:
    """A sample the curator tried to make or find and gave up on, with why. Yielded beside
    the candidates; the stage records it, so a class's shortfall can say what happened."""

    label: int
    source_id: str
    reason: str


class Curator(Protocol):
    name: str
    resources: Resources

    @property
    def model(self) -> dict[str, str | None]:
        """{"name": ..., "weights": ...} of the model that scored or made the candidates."""
        ...

    @property
    def license(self) -> str | None:
        """The licence the curator's samples come under, where one holds for all of them."""
        ...

    def units(self, classes: Sequence[ImageNetClass]) -> list[Unit]: ...

    def candidates(self, unit: Unit) -> Iterable[Candidate | Rejected]: ...

    # Optional: embedding_model() -> (open_clip model, weights), the CLIP model that embeds
    # candidates returned without an embedding when the config names none (`embed`).
