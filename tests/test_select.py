"""Balancing: claims across classes, exact and near duplicates, targets, seeded shard plans."""

import json

import numpy as np

from curators import Candidate, label_set
from pipelines.candidates import write_candidates
from pipelines.select import greedy_dedupe, plan_shards, select_all

MODEL = {"name": "m", "weights": "w"}


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def cand(source_id, score, emb, sha=None):
    return Candidate(label=-1, source_id=source_id, score=score, query_kind="image",
                     query_value="q", source_dataset="pool", sha256=sha or f"sha-{source_id}",
                     embedding=unit(emb))  # fmt: skip


def class_files(tmp_path, per_class, per_unit=1):
    """Candidate unit files holding ``per_unit`` classes each, as a scanning curator writes."""
    labels = sorted(per_class)
    paths = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for u in range(0, len(labels), per_unit):
        cands = []
        for index in labels[u : u + per_unit]:
            for c in per_class[index]:
                c.label = index
                cands.append(c)
        path = tmp_path / f"unit-{u:04d}.parquet"
        write_candidates(path, cands, MODEL)
        paths.append(path)
    return [label_set()[i] for i in labels], paths


def test_item_claimed_by_two_classes_goes_where_it_scores_best(tmp_path):
    files = class_files(tmp_path, {
        0: [cand("a", 0.9, [1, 0, 0]), cand("shared", 0.5, [0, 1, 0])],
        1: [cand("b", 0.8, [0, 0, 1]), cand("shared", 0.7, [0, 1, 0])],
    })  # fmt: skip
    table, stats = select_all(*files, target=5, threshold=0.99)
    rows = table.to_pylist()
    assert {(r["label"], r["source_id"]) for r in rows} == {(0, "a"), (1, "b"), (1, "shared")}
    assert stats[0]["claimed_elsewhere_or_duplicate"] == 1 and stats[0]["selected"] == 1


def test_near_duplicate_group_is_claimed_once_across_classes(tmp_path):
    a, b = cand("x", 0.6, [1, 0]), cand("y", 0.9, [1, 0.02])  # other bytes, same picture
    a.duplicate_group = b.duplicate_group = "pool:7"
    files = class_files(tmp_path, {0: [a, cand("z", 0.5, [0, 1])], 1: [b]})
    table, stats = select_all(*files, target=5, threshold=1.0)
    assert {(r["label"], r["source_id"]) for r in table.to_pylist()} == {(0, "z"), (1, "y")}


def test_exact_duplicates_by_sha256_count_once(tmp_path):
    files = class_files(tmp_path, {
        0: [cand("x", 0.9, [1, 0], sha="same"), cand("y", 0.8, [0, 1], sha="same"), cand("z", 0.7, [1, 1])],
    })  # fmt: skip
    table, _ = select_all(*files, target=5, threshold=1.0)
    assert table["source_id"].to_pylist() == ["x", "z"]


def test_near_duplicates_dropped_and_target_filled_from_below(tmp_path):
    files = class_files(tmp_path, {
        0: [cand("a", 0.9, [1, 0, 0]), cand("a2", 0.85, [1, 0.01, 0]), cand("b", 0.8, [0, 1, 0]),
            cand("c", 0.7, [0, 0, 1]), cand("d", 0.6, [1, 1, 1])],
    })  # fmt: skip
    table, stats = select_all(*files, target=3, threshold=0.99)
    assert table["source_id"].to_pylist() == ["a", "b", "c"]
    assert table["rank"].to_pylist() == [0, 1, 2]
    assert {json.loads(m)["name"] for m in table["model"].to_pylist()} == {"m"}
    assert stats[0]["near_duplicates"] == 1 and stats[0]["selected"] == 3


def test_shortfall_is_reported(tmp_path):
    files = class_files(tmp_path, {0: [cand("a", 0.9, [1, 0])], 1: []})
    table, stats = select_all(*files, target=4, threshold=0.95)
    assert [s["selected"] for s in stats] == [1, 0]
    assert stats[1]["candidates"] == 0


def test_greedy_dedupe_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 8)).astype(np.float32)
    emb = np.concatenate([base, base[:200] + 0.01 * rng.normal(size=(200, 8)).astype(np.float32)])
    emb = emb[rng.permutation(len(emb))]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    kept = []
    for i, e in enumerate(emb):
        if all(e @ emb[j] < 0.99 for j in kept):
            kept.append(i)
    for target in (50, 250, 10_000):
        assert list(greedy_dedupe(emb, target, 0.99)) == kept[:target]


def test_plan_is_seeded_and_cut_into_fixed_shards(tmp_path):
    files = class_files(tmp_path, {i: [cand(f"{i}-{j}", 1 - j / 100, [i, j, 1]) for j in range(7)] for i in range(3)})  # fmt: skip
    table, _ = select_all(*files, target=7, threshold=1.0)
    wnids = {c.index: c.wnid for c in label_set()[:3]}
    a = plan_shards(table, wnids, 5, seed=1)
    b = plan_shards(table, wnids, 5, seed=1)
    c = plan_shards(table, wnids, 5, seed=2)
    assert [t.num_rows for t in a] == [5, 5, 5, 5, 1]
    assert [t["key"].to_pylist() for t in a] == [t["key"].to_pylist() for t in b]
    assert [t["key"].to_pylist() for t in a] != [t["key"].to_pylist() for t in c]
    keys = [k for t in a for k in t["key"].to_pylist()]
    assert sorted(keys) == sorted(f"{wnids[i]}_{r:05d}" for i in range(3) for r in range(7))


def test_units_holding_many_classes_select_like_one_file_per_class(tmp_path):
    def candidates():
        rng = np.random.default_rng(3)
        return {
            i: [cand(f"{i}-{j}", float(rng.random()), rng.normal(size=4)) for j in range(9)]
            + [cand("shared", 0.5 + i / 10, [1, 2, 3, 4])]
            for i in range(5)
        }

    one = select_all(*class_files(tmp_path / "one", candidates(), per_unit=1), 6, 0.99)
    many = select_all(*class_files(tmp_path / "many", candidates(), per_unit=3), 6, 0.99)
    assert one[0].to_pylist() == many[0].to_pylist() and one[1] == many[1]
    assert one[0].num_rows == 5 * 6
    assert [r["label"] for r in one[0].to_pylist() if r["source_id"] == "shared"] == [4]


def test_an_image_a_full_class_does_not_need_goes_to_its_next_best_class(tmp_path):
    # "x" scores best for class 0, which fills up with better items; class 1 has room.
    files = class_files(tmp_path, {
        0: [cand("a", 0.9, [1, 0, 0]), cand("b", 0.8, [0, 1, 0]), cand("x", 0.7, [0, 0, 1])],
        1: [cand("c", 0.9, [1, 1, 0]), cand("x", 0.6, [0, 0, 1])],
    })  # fmt: skip
    table, stats = select_all(*files, target=2, threshold=1.0)
    assert {(r["label"], r["source_id"]) for r in table.to_pylist()} == {
        (0, "a"), (0, "b"), (1, "c"), (1, "x"),
    }  # fmt: skip
    assert [s["selected"] for s in stats] == [2, 2]


def test_more_candidates_never_yield_fewer_samples(tmp_path):
    """Curators asked for more neighbours (k 3000 instead of 150) must not lose samples: here
    class 0's own 40 items fill it, and 60 items it also likes (more than class 1 does) are
    class 1's only candidates. Asked for more, class 0 claims them too, and must let go."""
    rng = np.random.default_rng(11)
    emb = {i: rng.normal(size=8) for i in range(100)}
    ranked0 = [(i, 0.99 - i / 10000) for i in range(60, 100)] + [(i, 0.9 - i / 1000) for i in range(60)]  # fmt: skip

    def run(k, folder):
        per_class = {
            0: [cand(f"p{i}", s, emb[i]) for i, s in ranked0[:k]],
            1: [cand(f"p{i}", 0.5 - i / 1000, emb[i]) for i in range(60)],
        }
        table, _ = select_all(*class_files(tmp_path / folder, per_class), 40, 0.999)
        return table.num_rows

    counts = [run(k, f"k{k}") for k in (40, 60, 100)]
    assert counts == [80, 80, 80], counts


def test_plan_of_classes_some_of_them_empty(tmp_path):
    # The first class has no candidates: its empty table must not confuse the shard plan.
    files = class_files(tmp_path, {0: [], 1: [cand("a", 0.9, [1, 0]), cand("b", 0.8, [0, 1])]})
    table, stats = select_all(*files, target=2, threshold=0.95)
    shards = plan_shards(table, {c.index: c.wnid for c in label_set()[:2]}, 5, seed=0)
    assert [t.num_rows for t in shards] == [2] and [s["selected"] for s in stats] == [0, 2]
