"""The ImageNet-1k label set: index, wnid, name, WordNet lemmas, gloss, hypernym chain and the
nearest hypernym's lemmas.

The table (data/imagenet1k.tsv) is derived from WordNet 3.0 by scripts/derive_labels.py.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources


@dataclass(frozen=True)
class ImageNetClass:
    index: int
    wnid: str
    name: str
    lemmas: tuple[str, ...]
    gloss: str
    hypernyms: tuple[str, ...]  # wnids, nearest first
    parent_lemmas: tuple[str, ...] = ()  # the nearest hypernym's lemmas ("retriever")


@lru_cache(maxsize=1)
def label_set() -> tuple[ImageNetClass, ...]:
    text = resources.files("curators").joinpath("data/imagenet1k.tsv").read_text("utf-8")
    rows = csv.DictReader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    return tuple(
        ImageNetClass(
            index=int(r["index"]),
            wnid=r["wnid"],
            name=r["name"],
            lemmas=tuple(r["lemmas"].split("|")),
            gloss=r["gloss"],
            hypernyms=tuple(h for h in r["hypernyms"].split("|") if h),
            parent_lemmas=tuple(p for p in r["parent_lemmas"].split("|") if p),
        )
        for r in rows
    )


@lru_cache(maxsize=1)
def by_wnid() -> dict[str, ImageNetClass]:
    return {c.wnid: c for c in label_set()}


def select_classes(first: int | None = None, wnids: list[str] | None = None) -> list[ImageNetClass]:
    """All 1000 classes, the first N, or the listed wnids (in class-index order).

    Raises KeyError naming the first unknown wnid.
    """
    classes = label_set()
    if wnids is not None:
        table = by_wnid()
        for w in wnids:
            if w not in table:
                raise KeyError(w)
        wanted = set(wnids)
        return [c for c in classes if c.wnid in wanted]
    if first is not None:
        return list(classes[:first])
    return list(classes)
