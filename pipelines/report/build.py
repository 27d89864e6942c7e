"""Write OUT/<shift>/report/: metrics.json, plots, a contact sheet, contamination pairs and
index.html, reading only the shift folder (and the image folders the user names).

Streaming: embeddings are memory-mapped and read one class at a time; shards are read once,
in order, only when perceptual hashes are needed; what is kept per sample is a label.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from shards.atomic import atomic_path
from shards.images import BadImage, perceptual_hash
from shards.manifest import EMBEDDINGS, INDEX, MANIFEST, SHARDS_DIR, read_manifest, write_json
from shards.reader import iter_samples

from ..config import ReportConfig, build_dataclass
from ..errors import UserError
from ..image_sets import EncodedSet, ImageSet, encode_set
from . import metrics as m

REPORT_DIR = "report"
PAIRS_SHOWN = 24  # contamination pairs with thumbnails in index.html (all go to the parquet)
WORST_SHOWN = 10


class NotAShift(UserError):
    pass


@dataclass
class ShiftFiles:
    root: Path
    manifest: dict
    labels: np.ndarray  # int32 per sample, index.parquet order
    embeddings: np.ndarray | None  # memory-mapped fp16, same order
    _names: object = None  # key/shard/wnid columns, read on first use

    @classmethod
    def open(cls, folder: str | Path) -> ShiftFiles:
        root = Path(folder)
        if not (root / MANIFEST).is_file() or not (root / INDEX).is_file():
            raise NotAShift(f"not a finished shift folder (no {MANIFEST} or {INDEX}): {folder}")
        manifest = read_manifest(root)
        labels = pq.read_table(root / INDEX, columns=["label"])["label"].to_numpy()
        emb = None
        if (root / EMBEDDINGS).is_file():
            emb = np.load(root / EMBEDDINGS, mmap_mode="r")
            if emb.shape[0] != len(labels):
                raise NotAShift(f"{EMBEDDINGS} has {emb.shape[0]} rows, {INDEX} {len(labels)}")
        return cls(root, manifest, labels.astype(np.int32), emb)

    def rows_of(self, rows: list[int]) -> list[dict]:
        """key, shard and wnid of a few rows. index.parquet's string columns are read once
        per report (contact sheet, thumbnails and pairs all ask), not once per use."""
        if not rows:
            return []
        if self._names is None:
            self._names = pq.read_table(self.root / INDEX, columns=["key", "shard", "wnid"])
        return self._names.take(rows).to_pylist()

    def release(self) -> None:
        """Let the kernel take back the embedding pages read so far: memory-mapped pages count
        in the process's resident memory until dropped, and a 1.3M-sample shift's are GBs."""
        mm = getattr(self.embeddings, "_mmap", None)
        if mm is not None:
            mm.madvise(mmap.MADV_DONTNEED)

    def shards(self) -> list[Path]:
        return sorted((self.root / SHARDS_DIR).glob("*.tar"))

    def iter_images(self) -> Iterator[tuple[int, str, bytes]]:
        """(row, key, image bytes) for every sample, in index order (shards are written so)."""
        keys = pq.ParquetFile(self.root / INDEX).iter_batches(columns=["key"], batch_size=8192)
        expected = (k for batch in keys for k in batch.column(0).to_pylist())
        for row, (shard, (key, files)) in enumerate(
            (s, item) for s in self.shards() for item in iter_samples(s)
        ):
            if key != next(expected, None):
                raise NotAShift(
                    f"{shard.name}: sample {key} out of step with {INDEX}; run `imagenetpp verify`"
                )
            yield row, key, files.get("jpg", b"")


@dataclass
class Report:
    """What report() measured; `metrics` is what metrics.json holds."""

    folder: Path
    metrics: dict
    notes: list[str] = field(default_factory=list)


def report_options(manifest: dict, **overrides) -> ReportConfig:
    """The shift config's `report` section (defaults where absent), then the given overrides."""
    data = (manifest.get("config") or {}).get("report") or {}
    options = build_dataclass(ReportConfig, data, "report")
    given = {k: v for k, v in overrides.items() if v not in (None, [], ())}
    return dataclasses.replace(options, **given)


def shift_encoder(shift: ShiftFiles, device: str = "auto", batch_size: int = 64):
    """The CLIP model that embedded the shift (the manifest names it), or None with why not."""
    model = (shift.manifest.get("embeddings") or {}).get("model")
    if shift.embeddings is None:
        return None, "the shift has no embeddings"
    if not model:
        return None, "the manifest names no CLIP model for its embeddings"
    from curators.clip_models import ClipEncoder

    return ClipEncoder(model["name"], model["pretrained"], device, batch_size), None


def _class_rows(labels: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    present, starts = np.unique(sorted_labels, return_index=True)
    ends = np.append(starts[1:], len(order))
    return {int(c): order[s:e] for c, s, e in zip(present, starts, ends, strict=True)}


def per_class_measures(
    shift: ShiftFiles, options: ReportConfig, text: np.ndarray | None, reference: EncodedSet | None
) -> tuple[dict[int, dict], np.ndarray]:
    """One pass over the classes: CLIPScore, intra-class similarity, near duplicates and CMMD
    against the reference's images of that class. Only one class's embeddings are in memory."""
    out: dict[int, dict] = {}
    hist = np.zeros(len(m.CLIPSCORE_BINS) - 1, np.int64)
    ref_by_wnid: dict[str, list[int]] = {}
    if reference is not None:
        for j, file_row in enumerate(reference.rows):
            wnid = reference.images.wnids[file_row]
            if wnid:
                ref_by_wnid.setdefault(wnid, []).append(j)
    wnids = {c["label"]: c["wnid"] for c in shift.manifest["per_class"]}
    slot = {label: i for i, label in enumerate(wnids)}
    for n, (label, rows) in enumerate(_class_rows(shift.labels).items()):
        if n % 64 == 63:
            shift.release()
        x = m.normalise(shift.embeddings[np.sort(rows)])
        entry: dict = {"samples": len(rows)}
        mean, dup = m.intra_class(x, options.near_duplicate_cosine)
        entry.update(intra_cosine=mean, near_duplicates=dup)
        if text is not None and label in slot:
            scores = m.clip_scores(x, text[slot[label]])
            hist += np.histogram(scores, m.CLIPSCORE_BINS)[0]
            entry["clipscore"] = float(scores.mean())
        ref_rows = ref_by_wnid.get(wnids.get(label, ""))
        if ref_rows:
            entry["cmmd"] = m.cmmd(x, reference.embeddings[ref_rows])
        out[label] = entry
    return out, hist


def sample_rows(n: int, k: int, seed: int = 0) -> np.ndarray:
    """A seeded, sorted sample of k of n rows (all when n <= k)."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def find_contamination(
    shift: ShiftFiles, sets: list[EncodedSet], options: ReportConfig, log: Callable[[str], None]
) -> list[dict]:
    """Pairs (sample, eval image) that are near duplicates by CLIP embedding or by perceptual
    hash. Embeddings are searched against a faiss index of the eval images in blocks; the
    shift's hashes are computed in one streaming pass over its shards."""
    import faiss

    pairs: dict[tuple[int, int, int], dict] = {}
    if shift.embeddings is not None:
        for s, es in enumerate(sets):
            if not len(es.embeddings):
                continue
            index = faiss.IndexFlatIP(es.embeddings.shape[1])
            index.add(np.ascontiguousarray(es.embeddings, np.float32))
            for start in range(0, len(shift.labels), 8192):
                x = m.normalise(shift.embeddings[start : start + 8192])
                shift.release()
                sims, nearest = index.search(x, 1)
                for r in np.flatnonzero(sims[:, 0] >= options.contamination_cosine):
                    pair = pairs.setdefault((start + int(r), s, int(nearest[r, 0])), {})
                    pair["cosine"] = float(sims[r, 0])
    if options.phash_max_distance is None:
        return _pairs_list(pairs, sets)
    indexes = []
    for es in sets:
        index = faiss.IndexBinaryFlat(64)
        if len(es.hashes):
            index.add(np.ascontiguousarray(es.hashes))
        indexes.append(index)
    block: list[tuple[int, bytes]] = []
    unreadable = 0

    def search(block: list[tuple[int, bytes]]) -> None:
        hashes = np.stack([np.frombuffer(h, np.uint8) for _, h in block])
        for s, index in enumerate(indexes):
            if not index.ntotal:
                continue
            dist, nearest = index.search(hashes, 1)
            for r in np.flatnonzero(dist[:, 0] <= options.phash_max_distance):
                pair = pairs.setdefault((block[r][0], s, int(nearest[r, 0])), {})
                pair["phash_distance"] = int(dist[r, 0])

    for row, _, data in shift.iter_images():
        try:
            block.append((row, perceptual_hash(data)))
        except BadImage:
            unreadable += 1
            continue
        if len(block) == 4096:
            search(block)
            block = []
    if block:
        search(block)
    if unreadable:
        log(f"report: {unreadable} samples could not be hashed (undecodable)")
    return _pairs_list(pairs, sets)


def _pairs_list(pairs: dict[tuple[int, int, int], dict], sets: list[EncodedSet]) -> list[dict]:
    out = []
    for (row, s, j), found in sorted(pairs.items()):
        es = sets[s]
        out.append({
            "row": row, "eval_set": es.images.name,
            "eval_file": str(es.images.files[es.rows[j]].relative_to(es.images.root)),
            "cosine": found.get("cosine"), "phash_distance": found.get("phash_distance"),
        })  # fmt: skip
    return out


def closest(pairs: list[dict]) -> list[dict]:
    """The pairs index.html shows: the most similar first."""
    ranked = sorted(pairs, key=lambda p: (-(p["cosine"] or 0.0), p["phash_distance"] or 65, p["row"]))  # fmt: skip
    return ranked[:PAIRS_SHOWN]


def read_rows(shift: ShiftFiles, rows: set[int]) -> dict[int, bytes]:
    """Image bytes of a few rows: only the shards holding them are read."""
    if not rows:
        return {}
    wanted: dict[str, dict[str, int]] = {}
    for row, names in zip(sorted(rows), shift.rows_of(sorted(rows)), strict=True):
        wanted.setdefault(names["shard"], {})[names["key"]] = row
    out = {}
    for shard, keys in wanted.items():
        for key, files in iter_samples(shift.root / SHARDS_DIR / shard):
            if key in keys:
                out[keys[key]] = files.get("jpg", b"")
    return out


def write_report(
    shift_dir: str | Path,
    options: ReportConfig | None = None,
    device: str = "auto",
    batch_size: int = 64,
    log: Callable[[str], None] = print,
) -> Report:
    from . import render

    def say(line: str) -> None:
        log(f"report: {line}")

    shift = ShiftFiles.open(shift_dir)
    options = options or report_options(shift.manifest)
    # Folders are checked before any model loads: a typo answers at once.
    reference_set = ImageSet.open(options.reference, "reference") if options.reference else None
    eval_images = [ImageSet.open(f, "eval set") for f in options.eval_sets]
    manifest = shift.manifest
    per_class = manifest["per_class"]
    counts = [c["kept"] for c in per_class]
    metrics: dict = {
        "shift": manifest["shift"],
        "curator": manifest["curator"],
        "samples": int(len(shift.labels)),
        "config_hash": manifest.get("config_hash"),
        "classes": m.class_statistics(counts, manifest["target_per_class"]),
        "options": dataclasses.asdict(options),
    }
    notes: list[str] = []
    encoder, why = shift_encoder(shift, device, batch_size)
    if encoder is None:
        notes.append(f"CLIP measures skipped: {why}")
    text = reference = None
    sets: list[EncodedSet] = []
    if encoder is not None:
        metrics["model"] = manifest["embeddings"]["model"] | {"weights": encoder.weights.description}  # fmt: skip
        prompts = [options.prompt.format(name=c["name"], wnid=c["wnid"]) for c in per_class]
        text = encoder.encode_texts(prompts)
        if reference_set:
            reference = encode_set(reference_set, encoder, say)
    # Without a CLIP model, contamination is still looked for, by perceptual hash alone.
    sets = [encode_set(s, encoder, say) for s in eval_images]
    classes: dict[int, dict] = {}
    if shift.embeddings is not None:
        classes, hist = per_class_measures(shift, options, text, reference)
        metrics["diversity"] = _diversity(classes, per_class, options)
        if text is not None:
            metrics["clipscore"] = _clipscore(classes, per_class, hist, options)
        if reference is not None:
            metrics["reference"] = _reference(shift, reference, classes, per_class, options)
    pairs: list[dict] = []
    if sets:
        pairs = find_contamination(shift, sets, options, log)
        metrics["contamination"] = _contamination(shift, sets, pairs, options)
    folder = shift.root / REPORT_DIR
    tmp = shift.root / f".{REPORT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    contact = _contact_rows(shift, options)
    shown = {r for rows in contact.values() for r in rows} | {p["row"] for p in closest(pairs)}
    images = read_rows(shift, shown)
    metrics["files"] = render.render_all(tmp, metrics, classes, per_class, contact, images, pairs, sets)  # fmt: skip
    metrics["notes"] = notes
    if pairs:
        _write_pairs(tmp / "contamination.parquet", shift, pairs)
    write_json(tmp / "metrics.json", metrics)
    (tmp / "index.html").write_text(render.index_html(metrics, per_class, classes, pairs), "utf-8")
    # The folder is replaced whole: a killed report leaves the previous one, never half of each.
    old = shift.root / f".{REPORT_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return Report(folder, metrics, notes)


def _worst(per_class: list[dict], classes: dict[int, dict], key: str, high: bool) -> list[dict]:
    rows = []
    for c in per_class:
        value = classes.get(c["label"], {}).get(key)
        if value is not None and value == value:  # measured, and not NaN (a 1-sample class)
            rows.append({"wnid": c["wnid"], "name": c["name"], key: value})
    return sorted(rows, key=lambda r: (-r[key] if high else r[key], r["wnid"]))[:WORST_SHOWN]


def _diversity(classes: dict[int, dict], per_class: list[dict], options: ReportConfig) -> dict:
    means = [v["intra_cosine"] for v in classes.values() if v["intra_cosine"] == v["intra_cosine"]]
    dups = sum(v["near_duplicates"] for v in classes.values())
    samples = sum(v["samples"] for v in classes.values())
    return {
        "mean_intra_class_cosine": float(np.mean(means)) if means else None,
        "near_duplicate_rate": dups / samples if samples else None,
        "near_duplicate_cosine": options.near_duplicate_cosine,
        "least_diverse": _worst(per_class, classes, "intra_cosine", high=True),
    }


def _clipscore(classes: dict, per_class: list[dict], hist: np.ndarray, options) -> dict:
    total = int(hist.sum())
    mean = sum(v["clipscore"] * v["samples"] for v in classes.values() if "clipscore" in v)
    return {
        "prompt": options.prompt,
        "mean": mean / total if total else None,
        "median": m.histogram_quantile(hist, m.CLIPSCORE_BINS, 0.5),
        "p05": m.histogram_quantile(hist, m.CLIPSCORE_BINS, 0.05),
        "histogram": {"edges": [0.0, 100.0], "counts": hist.tolist()},
        "worst_classes": _worst(per_class, classes, "clipscore", high=False),
    }


def _reference(shift, reference: EncodedSet, classes, per_class, options) -> dict:
    rows = sample_rows(len(shift.labels), options.cmmd_max_samples)
    ref_rows = sample_rows(len(reference.embeddings), options.cmmd_max_samples)
    overall = m.cmmd(m.normalise(shift.embeddings[rows]), reference.embeddings[ref_rows])
    per = [v["cmmd"] for v in classes.values() if "cmmd" in v]
    return {
        "name": reference.images.name,
        "images": len(reference.rows),
        "cmmd": overall,
        "cmmd_samples": int(len(rows)),
        "mean_class_cmmd": float(np.mean(per)) if per else None,
        "classes_compared": len(per),
        "farthest_classes": _worst(per_class, classes, "cmmd", high=True),
    }


def _contamination(shift, sets: list[EncodedSet], pairs: list[dict], options) -> dict:
    out = {"cosine": options.contamination_cosine, "phash_max_distance": options.phash_max_distance, "sets": []}  # fmt: skip
    for es in sets:
        mine = [p for p in pairs if p["eval_set"] == es.images.name]
        out["sets"].append({
            "name": es.images.name, "images": len(es.rows), "unreadable": es.unreadable,
            "pairs": len(mine),
            "samples": len({p["row"] for p in mine}),
            "by_embedding": sum(p["cosine"] is not None for p in mine),
            "by_phash": sum(p["phash_distance"] is not None for p in mine),
        })  # fmt: skip
    rows = {p["row"] for p in pairs}
    out["samples"] = len(rows)
    out["rate"] = len(rows) / len(shift.labels) if len(shift.labels) else 0.0
    return out


def _contact_rows(shift: ShiftFiles, options: ReportConfig) -> dict[str, list[int]]:
    """wnid -> the rows shown for it: its best-ranked samples (keys are <wnid>_<rank>)."""
    per_class = shift.manifest["per_class"]
    wnids = options.contact_classes or [c["wnid"] for c in per_class[:8]]
    label_of = {c["wnid"]: c["label"] for c in per_class}
    out: dict[str, list[int]] = {}
    for wnid in wnids:
        rows = np.flatnonzero(shift.labels == label_of.get(wnid, -1)).tolist()
        keys = [n["key"] for n in shift.rows_of(rows)]
        ranked = [r for _, r in sorted(zip(keys, rows, strict=True))]
        out[wnid] = ranked[: options.contact_per_class]
    return out


def _write_pairs(path: Path, shift: ShiftFiles, pairs: list[dict]) -> None:
    import pyarrow as pa

    names = shift.rows_of([p["row"] for p in pairs])
    table = pa.table({
        "key": [n["key"] for n in names],
        "wnid": [n["wnid"] for n in names],
        "shard": [n["shard"] for n in names],
        "eval_set": [p["eval_set"] for p in pairs],
        "eval_file": [p["eval_file"] for p in pairs],
        "cosine": pa.array([p["cosine"] for p in pairs], pa.float64()),
        "phash_distance": pa.array([p["phash_distance"] for p in pairs], pa.int32()),
    })  # fmt: skip
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def load_metrics(shift_dir: str | Path) -> dict:
    path = Path(shift_dir) / REPORT_DIR / "metrics.json"
    if not path.is_file():
        raise UserError(f"no report in {shift_dir} (run `imagenetpp report {shift_dir}` first)")
    return json.loads(path.read_text("utf-8"))
