"""Caption search: the LA1000 txt2img recipe (LAIONet). Scan caption metadata for captions
that name exactly one class by its own lemmas, then keep those CLIP finds close to the
class's definition.

1. Units are metadata parts (the scan shape): each part is read once, in row batches, for
   all classes (lemma_match.py: one pass, every class).
2. A caption naming one class is compared, in CLIP's text space, with the class definition
   "<name>, which is <gloss>"; kept at ``min_text_similarity`` or above (LAIONet: 0.82 with
   ViT-B/32). That similarity is the score.
3. Optionally, where the pool's image embeddings exist (an `imagenetpp index`, or a
   clip-retrieval index whose vectors can be read back), the image must also agree with its
   caption: CLIP image-caption similarity at ``min_image_similarity`` or above (LAION's own
   filter), which drops captions that name the wrong thing.

Candidates are pool tar ranges when the metadata says where the pixels are (an
`imagenetpp index`), URLs otherwise (the acquire stage downloads them in rounds).
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import Candidate, ResourceError, Resources, SourceUnreadable, Unit
from .labels import ImageNetClass, label_set

DEFINITION = "{name}, which is {gloss}"  # LAIONet's class definition text


@dataclass
class CaptionSearchParams:
    metadata: str  # parquet parts: a folder, a glob, or an index folder (its metadata/)
    model: str = "ViT-B-32"
    pretrained: str | None = "openai"
    min_text_similarity: float = 0.82
    min_image_similarity: float | None = None  # image-caption floor; needs ``index``
    index: str | None = None  # the index whose vectors are the metadata rows' images
    caption_col: str = "caption"
    url_col: str = "url"
    key_col: str = "key"
    definition: str = DEFINITION
    source: str | None = None  # provenance name of the pool (default: the folder's name)
    batch_rows: int = 262_144
    device: str = "auto"
    batch_size: int = 256

    def parts(self) -> list[Path]:
        root = Path(self.metadata)
        if root.is_dir():
            inner = root / "metadata"
            folder = inner if inner.is_dir() else root
            return sorted(folder.glob("*.parquet"))
        return sorted(Path(p) for p in glob.glob(self.metadata) if p.endswith(".parquet"))

    def check(self) -> dict[str, str]:
        problems = {}
        if not self.parts():
            problems["metadata"] = f"no parquet parts at {self.metadata}"
        if not (self.pretrained or "").strip():
            problems["pretrained"] = f"model {self.model} needs weights: an open_clip tag, a checkpoint path, or 'random'"  # fmt: skip
        if not -1.0 <= self.min_text_similarity <= 1.0:
            problems["min_text_similarity"] = "must lie in [-1, 1]"
        if self.min_image_similarity is not None:
            if not -1.0 <= self.min_image_similarity <= 1.0:
                problems["min_image_similarity"] = "must lie in [-1, 1]"
            elif not self.index:
                problems["index"] = "min_image_similarity needs the index holding the images' embeddings"  # fmt: skip
        if self.index and not (Path(self.index) / "image.index").is_file():
            problems["index"] = f"no image.index in {self.index}"
        if "{name}" not in self.definition:
            problems["definition"] = "must contain {name}"
        for name in ("batch_rows", "batch_size"):
            if getattr(self, name) < 1:
                problems[name] = "must be at least 1"
        return problems


class CaptionSearchCurator:
    """The scan shape: one unit per metadata part, candidates for every class at once."""

    Params = CaptionSearchParams
    name = "caption_search"
    resources = Resources(cpus=1.0, gpus=0.25)  # where there are GPUs, four scanners share one
    license = None  # the pool's own, per sample

    def __init__(self, params: CaptionSearchParams) -> None:
        self.params = params
        self._encoder = None
        self._matcher = None
        self._index = None
        self._definitions: dict[int, np.ndarray] = {}

    def units(self, classes: Sequence[ImageNetClass]) -> list[Unit]:
        import pyarrow.parquet as pq

        labels = tuple(sorted(c.index for c in classes))
        units, first = [], 0
        for n, part in enumerate(self.params.parts()):
            try:
                rows = pq.ParquetFile(part).metadata.num_rows
            except Exception:  # noqa: BLE001  a corrupt part is the unit's to report
                rows = 0
            spec = (("part", str(part)), ("first_row", first))
            units.append(Unit(f"part{n:05d}", labels, spec))
            first += rows
        return units

    @property
    def encoder(self):
        if self._encoder is None:
            from .clip_models import ClipEncoder

            p = self.params
            self._encoder = ClipEncoder(p.model, p.pretrained, p.device, p.batch_size)
        return self._encoder

    @property
    def matcher(self):
        if self._matcher is None:
            from .lemma_match import LemmaMatcher

            self._matcher = LemmaMatcher.for_classes(label_set())  # all 1000: "names one class"
        return self._matcher

    def embedding_model(self) -> tuple[str, str | None]:
        return self.params.model, self.params.pretrained

    @property
    def model(self) -> dict[str, str | None]:
        return self.encoder.description

    def _definition(self, label: int) -> np.ndarray:
        if label not in self._definitions:
            c = label_set()[label]
            text = self.params.definition.format(name=c.name, gloss=c.gloss)
            self._definitions[label] = self.encoder.encode_texts([text])[0]
        return self._definitions[label]

    def _image_vectors(self, rows: np.ndarray) -> np.ndarray:
        if self._index is None:
            from .knn_index import open_faiss_shared

            self._index = open_faiss_shared(str(Path(self.params.index) / "image.index"))
        try:
            vectors = self._index.reconstruct_batch(rows.astype(np.int64))
        except RuntimeError as e:
            raise ResourceError(f"{self.params.index}: cannot read its vectors back ({' '.join(str(e).split())[:120]})") from None  # fmt: skip
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def candidates(self, unit: Unit) -> Iterator[Candidate]:
        import pyarrow.parquet as pq

        p, spec = self.params, unit.params
        part, first = Path(spec["part"]), int(spec["first_row"])
        wanted = np.zeros(len(label_set()), dtype=bool)
        wanted[list(unit.labels)] = True
        source = p.source or Path(p.metadata.rstrip("/")).name
        try:
            pf = pq.ParquetFile(part)
            names = set(pf.schema_arrow.names)
            if p.caption_col not in names:
                raise SourceUnreadable(f"{part.name}: no column {p.caption_col!r}")
            extra = [c for c in (p.url_col, p.key_col, "shard", "offset", "size", "sha256", "license") if c in names]  # fmt: skip
            batches = pf.iter_batches(batch_size=p.batch_rows, columns=[p.caption_col, *extra])
            row0 = first
            for batch in batches:
                yield from self._batch(batch, row0, wanted, source)
                row0 += batch.num_rows
        except SourceUnreadable:
            raise
        except (OSError, ValueError) as e:  # pyarrow's errors: a corrupt or truncated part
            raise SourceUnreadable(f"{part.name}: {' '.join(str(e).split())[:200]}") from None

    def _batch(self, batch, row0: int, wanted: np.ndarray, source: str) -> Iterator[Candidate]:
        p = self.params
        found = self.matcher.match(batch.column(p.caption_col))
        hit = np.flatnonzero((found.label >= 0) & wanted[np.maximum(found.label, 0)])
        if not len(hit):
            return
        cols = {name: batch.column(name).take(hit).to_pylist() for name in batch.schema.names}
        captions = cols[p.caption_col]
        texts = self.encoder.encode_texts(captions)
        labels = found.label[hit]
        defs = np.stack([self._definition(int(lab)) for lab in labels])
        text_sim = np.einsum("ij,ij->i", texts, defs)
        keep = text_sim >= p.min_text_similarity
        images = None
        if p.index:
            images = self._image_vectors(row0 + hit)
            if p.min_image_similarity is not None:
                keep &= np.einsum("ij,ij->i", images, texts) >= p.min_image_similarity
        for j in np.flatnonzero(keep):
            row = {name: values[j] for name, values in cols.items()}
            url = row.get(p.url_col)
            key = row.get(p.key_col) or f"row{row0 + int(hit[j])}"
            if row.get("shard") is not None:
                locator = {"kind": "tar", "path": row["shard"], "offset": row["offset"], "size": row["size"]}  # fmt: skip
            elif url:
                locator = {"kind": "url", "url": url}
            else:
                continue  # neither pixels nor a URL: nothing to fetch
            yield Candidate(
                label=int(labels[j]),
                source_id=str(key),
                score=round(float(text_sim[j]), 6),
                query_kind="lemma",
                query_value=" ".join(self.matcher.lemmas[found.lemma[hit[j]]]),
                source_dataset=source,
                url=url,
                caption=captions[j],
                license=row.get("license"),
                sha256=row.get("sha256"),
                locator=locator,
                embedding=None if images is None else images[j].astype(np.float32),
            )
