"""verify_shift on small hand-made shifts: each check has a test that breaks exactly that."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shards import verify
from shards.manifest import INDEX, MANIFEST, SHARDS_DIR, dumps_canonical, write_json
from shards.reader import iter_members
from shards.verify import NotAShift, VerifyReport, verify_shift
from shards.writer import ShardWriter

SHIFT = "tiny"
CLASSES = [(0, "n01440764", "tench"), (1, "n01443537", "goldfish")]
SHARD_NAMES = [f"{SHIFT}-000000.tar", f"{SHIFT}-000001.tar"]
PER_SHARD = 3
INDEX_SCHEMA = pa.schema(
    [("key", pa.string()), ("shard", pa.string()), ("position", pa.int32()),
     ("label", pa.int32()), ("wnid", pa.string()), ("caption", pa.string()),
     ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32())]
)  # fmt: skip


def _jpeg(seed: int) -> bytes:
    # noise compresses badly, so the tar's content dwarfs its zero padding (truncation tests)
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (48, 40), bytes(rng.getrandbits(8) for _ in range(48 * 40 * 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_samples() -> list[dict]:
    """A shift's samples as data: (shard, key, tar members, index row), consistent by default."""
    samples = []
    for s, shard in enumerate(SHARD_NAMES):
        for i in range(PER_SHARD):
            n = s * PER_SHARD + i
            label, wnid, name = CLASSES[n % len(CLASSES)]
            key = f"{wnid}_{n:04d}"
            jpg = _jpeg(n)
            sha = hashlib.sha256(jpg).hexdigest()
            caption = f"a photo of a {name}" if n % 2 else None
            meta = {
                "key": key, "label": label, "wnid": wnid, "class_name": name, "shift": SHIFT,
                "curator": "test", "source": {"dataset": "t", "id": str(n), "url": None,
                "caption": caption}, "query": {"kind": "label", "value": name}, "score": 1.0,
                "model": {"name": "none", "weights": None}, "seed": None, "prompt": None,
                "sha256": sha, "width": 48, "height": 40, "license": None,
                "config_hash": "0" * 64, "version": "0.1.0",
            }  # fmt: skip
            files = {"jpg": jpg, "cls": str(label).encode(), "json": meta}
            if caption:
                files["txt"] = caption.encode()
            row = {"key": key, "shard": shard, "position": i, "label": label, "wnid": wnid,
                   "caption": caption, "sha256": sha, "width": 48, "height": 40}  # fmt: skip
            samples.append({"shard": shard, "key": key, "files": files, "row": row})
    return samples


def write_shift(root: Path, samples: list[dict], rows: list[dict] | None = None) -> Path:
    """Write shards, index.parquet and a manifest that matches the shards as written."""
    shift = root / SHIFT
    shards, class_counts = [], {wnid: 0 for _, wnid, _ in CLASSES}
    for name in SHARD_NAMES:
        with ShardWriter(shift / SHARDS_DIR / name) as w:
            for s in (s for s in samples if s["shard"] == name):
                files = dict(s["files"])
                if isinstance(files.get("json"), dict):
                    files["json"] = dumps_canonical(files["json"])
                w.write(s["key"], files)
                class_counts[s["row"]["wnid"]] += 1
            info = w.close()
        shards.append(
            {"name": info.name, "sha256": info.sha256, "samples": info.samples, "bytes": info.bytes}
        )
    rows = [s["row"] for s in samples] if rows is None else rows
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), shift / INDEX)
    manifest = {"shift": SHIFT, "shards": shards, "total_samples": len(samples),
                "class_counts": class_counts}  # fmt: skip
    write_json(shift / MANIFEST, manifest)
    return shift


@pytest.fixture(scope="module")
def clean_shift(tmp_path_factory) -> Path:
    return write_shift(tmp_path_factory.mktemp("clean"), make_samples())


@pytest.fixture
def shift(clean_shift, tmp_path) -> Path:
    """A private copy of the clean shift, to break."""
    return Path(shutil.copytree(clean_shift, tmp_path / SHIFT))


def edit_manifest(shift: Path, change) -> None:
    manifest = json.loads((shift / MANIFEST).read_text())
    change(manifest)
    write_json(shift / MANIFEST, manifest)


def has(report: VerifyReport, text: str) -> bool:
    return any(text in p for p in report.problems)


# --- the clean case and the API ------------------------------------------------------------


def test_clean_shift_is_ok_with_counts(clean_shift):
    report = verify_shift(clean_shift)
    assert report.problems == [] and report.ok
    assert (report.shards, report.samples) == (2, 2 * PER_SHARD)
    assert len(report) == 0 and list(report) == []  # old `problems = verify_shift()` callers


def test_not_a_shift(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotAShift) as e:
        verify_shift(tmp_path)
    assert isinstance(e.value, ValueError)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_missing_manifest_is_a_problem_not_a_non_shift(shift):
    (shift / MANIFEST).unlink()
    report = verify_shift(shift)
    assert has(report, "manifest.json unreadable")
    assert report.samples == 2 * PER_SHARD  # the shards on disk are still checked


# --- shift-level checks --------------------------------------------------------------------


def test_extra_index_row(tmp_path):
    samples = make_samples()
    extra = {**samples[0]["row"], "key": "n01440764_9999"}
    report = verify_shift(write_shift(tmp_path, samples, [s["row"] for s in samples] + [extra]))
    assert report.problems == ["index.parquet: 1 keys in no shard, e.g. n01440764_9999"]


def test_duplicate_index_key(tmp_path):
    samples = make_samples()
    rows = [s["row"] for s in samples] + [samples[2]["row"]]
    report = verify_shift(write_shift(tmp_path, samples, rows))
    assert len(report.problems) == 1 and has(report, "index.parquet: duplicate keys")
    assert samples[2]["key"] in report.problems[0]


@pytest.mark.parametrize("where", [1, 2 * PER_SHARD - 1])  # same shard in a row, other shard
def test_key_twice_in_shards(tmp_path, where):
    samples = make_samples()
    rows = [s["row"] for s in samples]
    samples.insert(where, {**samples[0], "shard": samples[where - 1]["shard"]})
    report = verify_shift(write_shift(tmp_path, samples, rows))
    assert f"{samples[where]['shard']}/{samples[0]['key']}: key appears twice" in report.problems


def test_sample_count_differs_from_manifest(shift):
    edit_manifest(shift, lambda m: m["shards"][1].update(samples=PER_SHARD + 1))
    report = verify_shift(shift)
    assert report.problems == [f"{SHARD_NAMES[1]}: {PER_SHARD} samples, manifest says 4"]


def test_total_samples_differs_from_manifest(shift):
    edit_manifest(shift, lambda m: m.update(total_samples=7))
    assert verify_shift(shift).problems == ["manifest total_samples 7 != 6"]


def test_class_counts_differ_from_manifest(shift):
    edit_manifest(shift, lambda m: m["class_counts"].update(n01440764=99))
    report = verify_shift(shift)
    assert len(report.problems) == 1
    assert has(report, "per-class counts in shards differ from manifest class_counts")
    assert has(report, "n01440764 99 vs 3")


def test_missing_shard(shift):
    (shift / SHARDS_DIR / SHARD_NAMES[0]).unlink()
    report = verify_shift(shift)
    assert f"{SHARD_NAMES[0]}: missing" in report.problems
    assert (report.shards, report.samples) == (1, PER_SHARD)


def test_stray_shard_on_disk(shift):
    shutil.copy(shift / SHARDS_DIR / SHARD_NAMES[0], shift / SHARDS_DIR / "stray-000009.tar")
    report = verify_shift(shift)
    assert report.problems == ["stray-000009.tar: shard on disk but not in manifest"]


def test_shard_sha256_differs_from_manifest(shift):
    edit_manifest(shift, lambda m: m["shards"][0].update(sha256="0" * 64))
    report = verify_shift(shift)
    assert report.problems == [f"{SHARD_NAMES[0]}: sha256 differs from manifest"]


# --- per-sample checks (shards rewritten consistently, so only the sample is wrong) -----------


def _one_bad_sample(tmp_path, change) -> tuple[VerifyReport, str]:
    samples = make_samples()
    change(samples[1])
    return verify_shift(write_shift(tmp_path, samples)), f"{SHARD_NAMES[0]}/{samples[1]['key']}"


def test_cls_differs_from_json_label(tmp_path):
    report, where = _one_bad_sample(tmp_path, lambda s: s["files"].update(cls=b"0"))
    assert report.problems == [f"{where}: cls differs from json label"]


def test_cls_not_ascii(tmp_path):
    report, where = _one_bad_sample(tmp_path, lambda s: s["files"].update(cls="١".encode()))
    assert report.problems == [f"{where}: cls is not ASCII digits"]


def test_json_lacks_required_field(tmp_path):
    report, where = _one_bad_sample(tmp_path, lambda s: s["files"]["json"].pop("license"))
    assert report.problems == [f"{where}: json lacks 'license'"]


def test_jpg_sha256_differs_from_json(tmp_path):
    report, where = _one_bad_sample(tmp_path, lambda s: s["files"].update(jpg=_jpeg(99)))
    assert f"{where}: jpg sha256 differs from json" in report.problems


def test_txt_differs_from_caption(tmp_path):
    report, where = _one_bad_sample(tmp_path, lambda s: s["files"].update(txt=b"a dog"))
    assert report.problems == [f"{where}: txt differs from json source.caption"]


def test_index_row_differs_from_sample(tmp_path):
    report, where = _one_bad_sample(tmp_path, lambda s: s["row"].update(shard=SHARD_NAMES[1]))
    assert report.problems == [f"{where}: index.parquet row differs from sample"]


@pytest.mark.parametrize("json_bytes", [b"\xff\xfe{", b"{not json", b"[1, 2]"])
def test_unparseable_json_is_a_problem(tmp_path, json_bytes):
    report, where = _one_bad_sample(tmp_path, lambda s: s["files"].update(json=json_bytes))
    assert any(p.startswith(f"{where}: json") for p in report.problems)
    assert report.samples == 2 * PER_SHARD  # the other samples were still read


def test_sample_problems_are_capped_per_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "MAX_SAMPLE_PROBLEMS_PER_SHARD", 1)
    samples = make_samples()
    for s in samples[:PER_SHARD]:
        s["files"]["cls"] = b"x"
    report = verify_shift(write_shift(tmp_path, samples))
    assert len(report.problems) == 2
    assert (
        report.problems[1] == f"{SHARD_NAMES[0]}: {PER_SHARD - 1} more sample problems not listed"
    )


# --- damage that must not crash verify ------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.33, 0.5, 0.77])
def test_truncated_shard(shift, fraction):
    path = shift / SHARDS_DIR / SHARD_NAMES[0]
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    report = verify_shift(shift)
    assert not report.ok
    assert has(report, f"{SHARD_NAMES[0]}: sha256 differs from manifest")
    assert has(report, f"{SHARD_NAMES[0]}: corrupt tar: truncated")
    assert report.shards == 2 and report.samples < 2 * PER_SHARD


def _flip(path: Path, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] = value
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("value", [0xFF, ord("#")])  # invalid UTF-8, invalid JSON
def test_flipped_byte_in_json_member(shift, value):
    path = shift / SHARDS_DIR / SHARD_NAMES[0]
    member = next(m for m in iter_members(path) if m.ext == "json")
    _flip(path, member.offset, value)
    report = verify_shift(shift)
    assert has(report, f"{SHARD_NAMES[0]}/{member.key}: json does not parse")
    assert has(report, f"{SHARD_NAMES[0]}: sha256 differs from manifest")


def test_flipped_byte_in_tar_header(shift):
    path = shift / SHARDS_DIR / SHARD_NAMES[0]
    second = list(iter_members(path))[4]  # the second member of the second sample
    _flip(path, second.offset - 512 + 10, ord("Z"))
    report = verify_shift(shift)
    assert has(report, f"{SHARD_NAMES[0]}: corrupt tar: bad tar header checksum")
    assert report.samples == 2 * PER_SHARD - PER_SHARD + 1  # up to the damage, then shard 2


@pytest.mark.parametrize("content", [b"", b"not a parquet file", b"PAR1" + b"\0" * 64 + b"PAR1"])
def test_garbage_index(shift, content):
    (shift / INDEX).write_bytes(content)
    report = verify_shift(shift)
    assert has(report, "index.parquet unreadable")
    assert report.samples == 2 * PER_SHARD


def test_index_without_needed_columns(shift):
    pq.write_table(pa.table({"key": ["a"]}), shift / INDEX)
    assert has(verify_shift(shift), "index.parquet lacks columns: shard, label, sha256")


@pytest.mark.parametrize(
    "manifest, expected",
    [
        (b"{not json", "manifest.json unreadable"),
        (b"\xff\xfe", "manifest.json unreadable"),
        (b"[]", "manifest.json: not a JSON object"),
        (b"{}", "manifest.json: 'shards' missing or not a list"),
        (b'{"shards": "x"}', "manifest.json: 'shards' missing or not a list"),
        (b'{"shards": [5, {"name": 7}]}', "manifest.json: shards[0] has no valid 'name'"),
        (b'{"shards": [{"name": "../x.tar"}]}', "manifest.json: shards[0] has no valid 'name'"),
        (b'{"shards": [{"name": "tiny-000000.tar", "sha256": 1, "samples": "3"}]}',
         "manifest.json: tiny-000000.tar has no string 'sha256'"),
        (b'{"shards": [], "total_samples": "6"}', "'total_samples' missing or not an integer"),
        (b'{"shards": [], "class_counts": []}', "'class_counts' missing or not {wnid: integer}"),
    ],
)  # fmt: skip
def test_bad_manifest(shift, manifest, expected):
    (shift / MANIFEST).write_bytes(manifest)
    report = verify_shift(shift)
    assert has(report, expected), report.problems
