"""Curators of the other shapes, small enough for tests, run through the real stages.

Named in a config as "tests.fake_curators:ScanCurator" (the test runs the CLI with the
repository on PYTHONPATH, so Ray workers import them too).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from curators.base import Candidate, Resources, Unit, class_units
from curators.labels import ImageNetClass


def _score(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


@dataclass
class ScanParams:
    source: str  # folder of parts: <source>/part-N/<label>_<i>.jpg
    fail_part: str | None = None  # a part whose scan always raises (a deterministic failure)


class ScanCurator:
    """The scan shape: one unit per source part, each part holding many classes."""

    Params = ScanParams
    name = "fake_scan"
    resources = Resources(cpus=1.0)
    license = "CC0-1.0 (test)"
    model = {"name": "none", "weights": None}

    def __init__(self, params: ScanParams) -> None:
        self.params = params

    def units(self, classes: Sequence[ImageNetClass]) -> list[Unit]:
        labels = tuple(sorted(c.index for c in classes))
        parts = sorted(p.name for p in Path(self.params.source).iterdir() if p.is_dir())
        return [Unit(part, labels, (("part", part),)) for part in parts]

    def candidates(self, unit: Unit) -> Iterator[Candidate]:
        part = unit.params["part"]
        if part == self.params.fail_part:
            raise RuntimeError(f"cannot parse {part}")
        for path in sorted((Path(self.params.source) / part).glob("*.jpg")):
            label = int(path.stem.split("_")[0])
            if label not in unit.labels:
                continue
            # Only some items say who made them, as in web pools: text null in most samples.
            said = path.stem.endswith("_3")
            yield Candidate(
                label=label, source_id=f"{part}/{path.name}", score=_score(path.name),
                query_kind="label", query_value=str(label), source_dataset="fake-scan",
                locator={"kind": "file", "path": str(path)},
                caption=f"picture {path.stem}" if said else None,
                creator="a photographer" if said else None, license="CC0" if said else None,
            )  # fmt: skip


@dataclass
class GenerateParams:
    per_unit: int = 4  # seeds per unit
    units_per_class: int = 2
    log: str | None = None  # a file that gets one line per image made (to count regeneration)
    delay: float = 0.0  # seconds per image, so a test can catch a unit mid-way
    duplicate_every: int = 0  # every k-th image repeats the one before it (near-dup removal)


class GenerateCurator:
    """The generate shape: (class, seed range) units; returns the bytes it makes."""

    Params = GenerateParams
    name = "fake_generate"
    resources = Resources(cpus=1.0)
    license = "CC0-1.0 (synthetic)"
    model = {"name": "fake-painter", "weights": "none"}

    def __init__(self, params: GenerateParams) -> None:
        self.params = params

    def units(self, classes: Sequence[ImageNetClass]) -> list[Unit]:
        out = []
        for u in class_units(classes):
            for k in range(self.params.units_per_class):
                first = k * self.params.per_unit
                out.append(Unit(f"{u.id}-s{first:05d}", u.labels, (("first_seed", first),)))
        return out

    def candidates(self, unit: Unit) -> Iterator[Candidate]:
        import numpy as np
        from PIL import Image

        (label,) = unit.labels
        first = unit.params["first_seed"]
        for seed in range(first, first + self.params.per_unit):
            k = self.params.duplicate_every
            repeat = bool(k) and seed % k == k - 1
            rng = np.random.default_rng([label, seed - 1 if repeat else seed])
            pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            if repeat:  # the same picture in other bytes: only an embedding can tell
                pixels[0, 0, 0] ^= 1
            buf = io.BytesIO()
            Image.fromarray(pixels).resize((48, 48)).save(buf, format="PNG")
            time.sleep(self.params.delay)
            if self.params.log:
                with open(self.params.log, "a") as f:
                    f.write(f"{os.getpid()} {label} {seed}\n")
            yield Candidate(
                label=label, source_id=f"gen-{label}-{seed}", score=1.0 - seed / 1000,
                query_kind="prompt", query_value=f"a photo of class {label}",
                source_dataset="fake-generate", seed=seed,
                prompt=f"a photo of class {label}", data=buf.getvalue(),
            )  # fmt: skip


@dataclass
class UrlParams:
    listing: str  # a JSON file: [{"label": 1, "url": "http://...", "score": 0.9}, ...]


class UrlCurator:
    """A curator whose candidates are URLs (web search, LAION metadata): acquire fetches them."""

    Params = UrlParams
    name = "fake_url"
    resources = Resources(cpus=1.0)
    license = None
    model = {"name": "none", "weights": None}

    def __init__(self, params: UrlParams) -> None:
        self.params = params

    def units(self, classes: Sequence[ImageNetClass]) -> list[Unit]:
        return class_units(classes)

    def candidates(self, unit: Unit) -> Iterator[Candidate]:
        import json

        for row in json.loads(Path(self.params.listing).read_text()):
            if row["label"] in unit.labels:
                yield Candidate(
                    label=row["label"], source_id=row["url"].rsplit("/", 2)[-1] + row["url"].split("/")[3],
                    score=row["score"], query_kind="lemma", query_value=str(row["label"]),
                    source_dataset="fake-web", url=row["url"],
                    locator={"kind": "url", "url": row["url"]},
                )  # fmt: skip
