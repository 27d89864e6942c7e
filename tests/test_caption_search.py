"""Caption search (LA1000 txt2img): lemma matching edge cases, the curator on parquet parts,
a corrupt part skipped and recorded, and the demo shift end to end through acquire."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curators.labels import label_set
from curators.lemma_match import LemmaMatcher, class_lemmas, plural, words

from .conftest import one_line_error, run_cli


@pytest.fixture(scope="module")
def matcher() -> LemmaMatcher:
    return LemmaMatcher.for_classes(label_set())


@pytest.mark.parametrize(
    "caption, label",
    [
        ("A photo of a Golden Retriever.", 207),  # multi-word, any case, punctuation
        ("golden retrievers playing fetch", 207),  # plural of the last word
        ("GOLDEN-RETRIEVER!!", 207),  # hyphen as a word break
        ("Jack-o'-lantern on the porch", 607),  # hyphens and an apostrophe in the lemma
        ("a jack o lantern", 607),
        ("tiger shark off the reef", 3),  # the longest lemma wins: not also "tiger"
        ("a tiger resting", 292),
        ("computer mice for sale", 673),  # an irregular plural (WordNet's noun.exc)
        ("a crane at dawn", -1),  # "crane" is a lemma of two classes: it names neither
        ("a tiger and a goldfish", -1),  # two classes named: dropped
        ("goldfish, goldfish and more goldfish", 1),  # one class named three times
        ("goldfishbowl", -1),  # whole words only
        ("retriever", -1),  # part of a lemma is no lemma
        ("", -1),
        (None, -1),
        ("Crème brûlée beside a Cocker Spaniel", 219),  # non-ASCII words around a match
    ],
)
def test_caption_names_one_class(matcher, caption, label):
    found = matcher.match([caption])
    assert int(found.label[0]) == label
    if label >= 0:
        assert found.named[0] == 1 and found.lemma[0] >= 0


def test_matching_a_column_agrees_with_matching_one_by_one(matcher):
    rng = np.random.default_rng(0)
    names = [c.name for c in label_set()]
    fillers = ["a", "photo", "of", "my", "the", "best", "new", "in", "park", "red"]
    captions = []
    for _ in range(400):
        parts = list(rng.choice(fillers, 6))
        for _ in range(int(rng.integers(0, 3))):
            parts.insert(int(rng.integers(0, 7)), names[int(rng.integers(len(names)))])
        captions.append(" ".join(parts))
    whole = matcher.match(pa.chunked_array([captions[:150], captions[150:]]))
    alone = [int(matcher.match([c]).label[0]) for c in captions]
    assert whole.label.tolist() == alone
    assert 0 < sum(x >= 0 for x in alone) < len(captions)  # both outcomes occur


def test_shared_lemmas_name_no_class_and_plurals_follow_wordnet():
    lemmas = class_lemmas(label_set())
    assert ("crane",) not in lemmas and ("cranes",) not in lemmas
    assert lemmas[("golden", "retrievers")] == 207
    assert [plural(w) for w in ("fox", "church", "butterfly", "monkey", "fireman", "goose", "glass", "bus", "woods", "sunglasses")] == [
        "foxes", "churches", "butterflies", "monkeys", "firemen", "geese", "glasses", "buses", "woods", "sunglasses"
    ]  # fmt: skip
    assert words("Jack-o'-Lantern") == ["jack", "o", "lantern"]


def _tiny_params(world, metadata, **kw):
    from curators.caption_search import CaptionSearchParams

    return CaptionSearchParams(
        metadata=str(metadata), model="imagenetpp-tiny",
        pretrained=str(world / "model" / "imagenetpp-tiny.pt"), **kw,
    )  # fmt: skip


def test_curator_keeps_one_class_captions_and_reports_a_corrupt_part(demo_world, tmp_path):
    from curators.base import SourceUnreadable
    from curators.caption_search import CaptionSearchCurator

    folder = tmp_path / "meta"
    folder.mkdir()
    rows = {"url": [f"http://x.invalid/{i}.jpg" for i in range(5)], "key": [f"k{i}" for i in range(5)],
            "caption": ["a goldfish", "a lion and a zebra", "untitled", "my LION", "a crane"]}  # fmt: skip
    pq.write_table(pa.table(rows), folder / "a.parquet")
    (folder / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    curator = CaptionSearchCurator(_tiny_params(demo_world, folder, min_text_similarity=-1.0))
    classes = [c for c in label_set() if c.index in (1, 291, 340)]
    units = curator.units(classes)
    assert [u.params["part"].rsplit("/", 1)[-1] for u in units] == ["a.parquet", "b.parquet"]
    got = {c.source_id: c for c in curator.candidates(units[0])}
    assert sorted(got) == ["k0", "k3"]
    assert (got["k0"].label, got["k3"].label) == (1, 291)
    assert got["k3"].locator == {"kind": "url", "url": "http://x.invalid/3.jpg"}
    assert got["k3"].query_kind == "lemma" and got["k3"].query_value == "lion"
    assert -1.0 <= got["k0"].score <= 1.0
    strict = CaptionSearchCurator(_tiny_params(demo_world, folder, min_text_similarity=1.0))
    assert list(strict.candidates(units[0])) == []  # the similarity threshold is applied
    with pytest.raises(SourceUnreadable, match="b.parquet"):
        list(curator.candidates(units[1]))


def test_bad_caption_search_params_are_one_line(tmp_path):
    base = ["--set", "curator.params.metadata=" + str(tmp_path / "none")]
    one_line_error(run_cli("check", "configs/demo_caption_search.yaml", *base), "metadata")
    bad = ["--set", "curator.params.min_image_similarity=2"]
    one_line_error(run_cli("check", "configs/demo_caption_search.yaml", *bad), "min_image_similarity")  # fmt: skip


def test_demo_caption_shift_is_precise_and_survives_a_corrupt_part(demo_world, tmp_path):
    """scan -> acquire (loopback, dead links replaced) -> select -> shards, with a corrupt
    metadata part beside the good one: recorded in the manifest, the shift still whole."""
    from pipelines.demo_world import DEMO_POOL_HOST, serve_pool

    meta = tmp_path / "meta"
    meta.mkdir()
    for part in (demo_world / "url-index" / "metadata").glob("*.parquet"):
        shutil.copy(part, meta / part.name)
    (meta / "zz_broken.parquet").write_bytes(b"not a parquet file at all")
    with serve_pool(demo_world) as address:
        proc = run_cli(
            "curate", "configs/demo_caption_search.yaml", "--out", str(tmp_path / "out"),
            "--executor", "local", "--no-progress",
            "--set", f"run.resolve={{{DEMO_POOL_HOST}: '{address}'}}",
            "--set", f"curator.params.metadata={meta}",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "zz_broken.parquet" in proc.stderr  # warned, once, naming the part
    shift = tmp_path / "out" / "demo-caption-search"
    manifest = json.loads((shift / "manifest.json").read_text())
    assert [s["reason"].split(":")[0] for s in manifest["sources_skipped"]] == ["zz_broken.parquet"]
    assert manifest["acquire"]["failed"] > 0  # dead links met and replaced
    short = {s["wnid"] for s in manifest["shortfalls"]}
    assert short <= {"n07753592"}  # only the demo's deliberately scarce banana
    truth = {r["key"]: r["label"] for r in pq.read_table(demo_world / "ground_truth.parquet").to_pylist()}  # fmt: skip
    index = pq.read_table(shift / "index.parquet").to_pylist()
    assert len(index) >= 540 and {r["query_kind"] for r in index} == {"lemma"}
    precision = sum(truth[r["source_id"]] == r["label"] for r in index) / len(index)
    assert precision >= 0.9, precision
    lemmas = class_lemmas(label_set())
    for r in index:  # every caption holds the lemma recorded, and that lemma is its class's
        lemma, said = r["query_value"].split(), words(r["caption"])
        assert any(said[i : i + len(lemma)] == lemma for i in range(len(said))), r
        assert lemmas[tuple(lemma)] == r["label"]
    assert run_cli("verify", str(shift)).returncode == 0


def test_pool_index_metadata_gives_tar_ranges_that_read_back(demo_world):
    """Over an `imagenetpp index`, candidates point into the pool's tars (no download), and
    the bytes there are the picture the index row describes."""
    from curators.caption_search import CaptionSearchCurator
    from shards.sources import read_source

    params = _tiny_params(demo_world, demo_world / "index", min_text_similarity=-1.0)
    curator = CaptionSearchCurator(params)
    classes = [c for c in label_set() if c.index in (1, 291)]
    (unit, *_) = curator.units(classes)
    cands = list(curator.candidates(unit))
    assert cands and {c.label for c in cands} == {1, 291}
    for c in cands[:20]:
        assert c.locator["kind"] == "tar"
        data = read_source(c.locator, demo_world)
        assert hashlib.sha256(data).hexdigest() == c.sha256
