"""The diffusion curator on the demo world's tiny Stable Diffusion pipeline (random weights,
loaded through diffusers' from_pretrained like real ones): seeded bytes, resume after SIGKILL,
black outputs replaced and recorded, the CLIP filter, img2img provenance, bad input."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curators import Candidate, label_set
from curators.base import Rejected
from curators.diffusion import DiffusionCurator, DiffusionParams
from curators.diffusion_models import build_tiny_pipeline, weights_digest
from pipelines.config import load_config
from shards.manifest import sha256_file

from .conftest import CLI, REPO, one_line_error, run_cli

CONFIG = REPO / "configs" / "demo_sd_txt2img.yaml"
SMALL = ["--set", "classes.wnids=[n01443537,n02007558]", "--set", "target_per_class=8",
         "--set", "curator.params.images_per_class=8", "--set", "curator.params.unit_size=4",
         "--set", "shards.samples_per_shard=5",
         "--set", "embed.model=null"]  # no CLIP embedding: these tests are about generation  # fmt: skip
GOLDFISH = label_set()[1]


def shard_hashes(shift):
    return {p.name: sha256_file(p) for p in sorted((shift / "shards").glob("*.tar"))}


def tiny_params(model, **kw) -> DiffusionParams:
    base = dict(model=str(model), steps=4, size=64, images_per_class=8, unit_size=8,
                batch_size=4, blob_format="png")  # fmt: skip
    return DiffusionParams(**{**base, **kw})


@pytest.fixture(scope="module")
def sd_shift(demo_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd")
    run_cli("curate", str(CONFIG), "--out", str(out), "--no-progress", *SMALL, check=True)
    return out / "demo-sd-txt2img"


def test_every_sample_says_how_it_was_made(sd_shift, demo_world):
    import webdataset as wds

    model = demo_world / "model" / "tiny-sd"
    samples = list(wds.WebDataset(sorted(map(str, (sd_shift / "shards").glob("*.tar"))), shardshuffle=False))  # fmt: skip
    assert len(samples) == 16
    replaced = 0
    for s in samples:
        meta = json.loads(s["json"])
        gen = meta["generation"]
        assert int(s["cls"]) == meta["label"]
        assert meta["prompt"] == f"A photo of {meta['class_name']}"  # label and prompt agree
        assert meta["seed"] == 1 + gen["index"] + gen["attempt"] * 8  # first_seed 1, 8 per class
        seeds = [1 + gen["index"] + k * 8 for k in range(gen["attempt"])]
        # The demo pipeline's only blanks are its safety checker's black outputs.
        tries = json.loads(gen["replaced"])  # JSON text: a list empty in most samples
        assert [(r["seed"], r["reason"]) for r in tries] == [
            (x, "black (safety checker)") for x in seeds
        ]
        assert meta["source"]["id"] == f"{meta['wnid']}/{gen['index']:05d}"
        assert (gen["scheduler"], gen["steps"], gen["guidance"], gen["size"]) == ("UniPCMultistepScheduler", 4, 7.5, 64)  # fmt: skip
        assert meta["model"] == {"name": "tiny-sd", "weights": weights_digest(str(model))}
        assert meta["license"] == "creativeml-openrail-m"
        replaced += gen["attempt"]
    manifest = json.loads((sd_shift / "manifest.json").read_text())
    assert manifest["replaced"]["tries"] == replaced
    assert manifest["class_counts"] == {"n01443537": 8, "n02007558": 8}
    # Hugging Face datasets reads the shards unchanged: one type per json key in every sample.
    import datasets

    shards = sorted(map(str, (sd_shift / "shards").glob("*.tar")))
    ds = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train")
    assert len(ds) == 16 and sorted(r["generation"]["replaced"] for r in ds["json"]) == sorted(
        json.loads(s["json"])["generation"]["replaced"] for s in samples
    )
    index = pq.read_table(sd_shift / "index.parquet")
    assert all(json.loads(g)["index"] >= 0 for g in index["generation"].to_pylist())
    assert run_cli("verify", str(sd_shift)).returncode == 0


def test_generation_killed_by_sigkill_resumes_to_the_same_bytes(sd_shift, tmp_path):
    args = [CLI, "curate", str(CONFIG), "--out", str(tmp_path), "--no-progress", "--workers", "1", *SMALL]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    cands = tmp_path / "demo-sd-txt2img" / "_work" / "candidates"
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if cands.exists() and len(list(cands.glob("*.parquet"))) >= 1:
            proc.send_signal(signal.SIGKILL)  # mid-way through generating the other units
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the dead driver's Ray workers
    except ProcessLookupError:
        pass
    assert proc.returncode == -signal.SIGKILL
    assert len(list(cands.glob("*.parquet"))) < 4  # some units were left to generate
    run_cli("curate", str(CONFIG), "--out", str(tmp_path), "--no-progress", *SMALL, check=True)
    assert shard_hashes(tmp_path / "demo-sd-txt2img") == shard_hashes(sd_shift)


def test_the_same_class_and_index_give_the_same_bytes(demo_world):
    model = demo_world / "model" / "tiny-sd"
    params = tiny_params(model)
    unit = DiffusionCurator(params).units([GOLDFISH])[0]
    first = [c.data for c in DiffusionCurator(params).candidates(unit)]
    second = [c.data for c in DiffusionCurator(params).candidates(unit)]
    assert len(first) == 8 and first == second
    # Another prompt, same seeds: other pictures (the prompt reaches the model).
    other = DiffusionCurator(tiny_params(model, prompts=["a drawing of {name}"]))
    assert [c.data for c in other.candidates(unit)] != first


@pytest.fixture(scope="module")
def flagging_model(tmp_path_factory):
    """A tiny pipeline whose safety checker blacks out about half of its outputs."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("flagging") / "sd", seed=3, flagged=0.5)


def test_a_unit_gives_each_sample_as_soon_as_it_is_settled(demo_world):
    """Samples come out in index order while the unit is still making the rest, so the
    candidates bar moves within a unit that takes minutes on a GPU."""
    curator = DiffusionCurator(tiny_params(demo_world / "model" / "tiny-sd", batch_size=2))
    batches = []
    make = curator._make
    curator._make = lambda *args: batches.append(len(args[1])) or make(*args)  # counts, then makes
    items = curator.candidates(curator.units([GOLDFISH])[0])
    first = next(items)
    made_by_then = len(batches)
    rest = list(items)
    assert made_by_then < len(batches) >= 4  # 8 samples in batches of 2, the first out early
    indices = [c.generation["index"] for c in (first, *rest) if isinstance(c, Candidate)]
    assert indices == sorted(indices) and len(indices) + sum(isinstance(r, Rejected) for r in rest) == 8  # fmt: skip


def test_black_outputs_are_replaced_with_the_next_seed_and_recorded(flagging_model):
    params = tiny_params(flagging_model, max_attempts=6)
    curator = DiffusionCurator(params)
    items = list(curator.candidates(curator.units([GOLDFISH])[0]))
    cands = [c for c in items if isinstance(c, Candidate)]
    assert all(isinstance(r, Rejected) and "tries failed (blank x6)" in r.reason for r in items[len(cands) :])  # fmt: skip
    replaced = [r for c in cands for r in c.generation["replaced"]]
    assert replaced, "a checker flagging half the outputs flagged none"
    assert {r["check"] for r in replaced} == {"blank"}
    assert {r["reason"] for r in replaced} == {"black (safety checker)"}
    for c in cands:
        assert np.asarray(Image.open(io.BytesIO(c.data))).std() > params.blank_max_std
        index, attempt = c.generation["index"], c.generation["attempt"]
        assert c.seed == 1 + index + attempt * 8 and len(c.generation["replaced"]) == attempt


def test_a_class_that_cannot_be_filled_is_a_reported_shortfall(demo_world, tmp_path):
    # Every output counts as blank: nothing can be kept, and the manifest says so per class.
    sets = ["--set", "classes.wnids=[n01443537]", "--set", "curator.params.blank_max_std=1000",
            "--set", "curator.params.max_attempts=2", "--set", "curator.params.images_per_class=4",
            "--set", "target_per_class=4"]  # fmt: skip
    proc = run_cli("curate", str(CONFIG), "--out", str(tmp_path), "--no-progress", "--executor", "local", *sets)  # fmt: skip
    manifest = json.loads((tmp_path / "demo-sd-txt2img" / "manifest.json").read_text())
    assert manifest["total_samples"] == 0
    assert [(s["wnid"], s["shortfall"]) for s in manifest["shortfalls"]] == [("n01443537", 4)]
    assert "4 tried and rejected by the curator" in manifest["shortfalls"][0]["reason"]
    assert "all 2 tries failed (blank x2)" in manifest["shortfalls"][0]["reason"]
    assert manifest["rejected"] == {"count": 4, "by_reason": {"quality control": 4}}
    assert "n01443537" in proc.stdout + proc.stderr


def test_clip_filter_keeps_only_images_close_to_their_prompt(demo_world):
    model = demo_world / "model" / "tiny-sd"
    clip = dict(clip_model="imagenetpp-tiny", clip_pretrained=str(demo_world / "model" / "imagenetpp-tiny.pt"))  # fmt: skip
    unit = DiffusionCurator(tiny_params(model)).units([GOLDFISH])[0]
    everything = DiffusionCurator(tiny_params(model, min_clip_similarity=-1.0, **clip))
    sims = sorted(c.generation["clip_similarity"] for c in everything.candidates(unit))
    floor = float(np.median(sims))
    curator = DiffusionCurator(tiny_params(model, min_clip_similarity=floor, max_attempts=3, **clip))  # fmt: skip
    items = list(curator.candidates(unit))
    kept = [c for c in items if isinstance(c, Candidate)]
    assert len(kept) + sum(isinstance(r, Rejected) for r in items) == 8  # every index accounted for
    assert all(c.generation["clip_similarity"] >= floor for c in kept)
    assert all(c.score == c.generation["clip_similarity"] and c.embedding is not None for c in kept)
    rejected = [r for c in kept for r in c.generation["replaced"]]
    assert any(r["check"] == "clip" for r in rejected)
    assert curator.embedding_model() == (clip["clip_model"], clip["clip_pretrained"])


def test_img2img_provenance_names_an_existing_exemplar(demo_world, tmp_path):
    config = load_config(REPO / "configs" / "demo_sd_img2img.yaml")
    params = config.curator.params
    params.images_per_class, params.unit_size = 6, 6
    curator = DiffusionCurator(params)
    cands = list(curator.candidates(curator.units([GOLDFISH])[0]))
    assert len(cands) == 6
    exemplars = demo_world / "exemplars"
    for c in cands:
        key = c.generation["exemplar"]
        assert (exemplars / key).is_file() and key.startswith(GOLDFISH.wnid + "/")
        assert (c.query_kind, c.query_value, c.generation["strength"]) == ("image", key, 0.75)
    # Sample i starts from exemplar i mod n, by file name.
    files = sorted(p.name for p in (exemplars / GOLDFISH.wnid).iterdir())
    assert [c.generation["exemplar"] for c in cands] == [f"{GOLDFISH.wnid}/{files[i]}" for i in range(6)]  # fmt: skip
    # An unreadable exemplar is recorded and its samples start from the next one: none lost.
    shutil.copytree(exemplars / GOLDFISH.wnid, tmp_path / GOLDFISH.wnid)
    (tmp_path / GOLDFISH.wnid / files[1]).write_bytes(b"not a jpeg")
    curator = DiffusionCurator(dataclasses.replace(params, exemplars=str(tmp_path)))
    items = list(curator.candidates(curator.units([GOLDFISH])[0]))
    made = [c for c in items if not isinstance(c, Rejected)]
    assert [c.generation["exemplar"] for c in made] == [f"{GOLDFISH.wnid}/{files[i]}" for i in (0, 2, 2, 3, 4, 5)]  # fmt: skip
    assert [(r.source_id, r.reason) for r in items if isinstance(r, Rejected)] == [
        (f"exemplar {GOLDFISH.wnid}/{files[1]}", "unreadable exemplar: UnidentifiedImageError")
    ]


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("curator.params.scheduler=warp-drive", ["curator.params.scheduler", "warp-drive"]),
        ("curator.params.model=/nonexistent/sd", ["curator.params.model", "/nonexistent/sd"]),
        ("curator.params.prompts=[a photo of {nme}]", ["curator.params.prompts", "nme"]),
        ("curator.params.size=60", ["curator.params.size"]),
    ],
)
def test_bad_diffusion_config_exits_2_with_one_line(demo_world, override, names):
    proc = run_cli("check", str(CONFIG), "--set", override)
    one_line_error(proc, *names)


def test_a_folder_that_is_no_pipeline_exits_2_with_one_line(demo_world, tmp_path):
    proc = run_cli("check", str(CONFIG), "--set", f"curator.params.model={tmp_path}")
    one_line_error(proc, "model_index.json")
