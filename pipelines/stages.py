"""The stages of a curation run, as data: one list that `curate`, `status` and resume all walk.

A stage names its units (all of them, committed or not), how to tell a committed one, the
per-worker setup, the unit's work and the resources a worker needs. The runner executes the
units not yet committed; a unit that fails is recorded in _work/failed/<stage>.json and the
stage's other units still run, but the next stage does not start.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

from curators import ImageNetClass, create_curator
from curators.base import Curator, Resources, Unit
from curators.clip_models import ClipEncoder
from shards.atomic import atomic_write_bytes
from shards.manifest import SHARDS_DIR

from .acquire import Chunk, fetch_chunk, make_fetcher, plan_rounds, status_path, url_candidates
from .candidates import candidates_path, footer_count, unit_work
from .config import ShiftConfig
from .embed import embed_work, embedded_path, needs_localizing
from .errors import PartialFailure
from .executor import FAILED
from .materialize import SampleContext, shard_work
from .select import PLAN_UNIT, write_plan
from .workdir import WorkDir


@dataclass
class Run:
    """Everything a stage needs to know about the run it belongs to."""

    config: ShiftConfig
    classes: list[ImageNetClass]
    work: WorkDir
    units: list[Unit]  # the curator's cut of the candidates stage
    node_cpus: int = 1  # CPUs of the largest node the executor runs on

    @cached_property
    def curator(self) -> Curator:
        """The driver's instance (units, resources); workers build their own in setup."""
        return create_curator(self.config.curator.name, self.config.curator.params)

    @property
    def shift_dir(self) -> Path:
        return self.work.shift_dir

    def sample_context(self) -> SampleContext:
        c = self.config
        return SampleContext(
            shift=c.shift, curator=c.curator.name, config_hash=c.content_hash(),
            class_names={k.index: (k.wnid, k.name) for k in self.classes},
            max_side=c.image.max_side, jpeg_quality=c.image.jpeg_quality,
            work_root=self.work.root,
        )  # fmt: skip


@dataclass(frozen=True)
class Stage:
    name: str
    units: Callable[[Run], list | None]  # None: not known until an earlier stage has run
    done: Callable[[Run, Any], bool]
    work: Callable[[Run], Callable[[Any, Any], dict]]
    setup: Callable[[Run], Callable[[], Any] | None] = lambda run: None
    resources: Callable[[Run], Resources] = lambda run: Resources()


def _curator_setup(run: Run):
    return partial(create_curator, run.config.curator.name, run.config.curator.params)


def _curator_resources(run: Run) -> Resources:
    return run.curator.resources


def _candidate_files(run: Run) -> list[Path] | None:
    paths = [candidates_path(run.work.candidates, u) for u in run.units]
    return paths if all(p.exists() for p in paths) else None  # None: candidates not all in


def _acquire_units(run: Run) -> list[Chunk] | None:
    """The chunks of every round planned so far (a round is planned once the one before it
    is committed): the runner asks again until no new chunk appears."""
    paths = _candidate_files(run)
    if paths is None:
        return None
    with_urls = [p for p in paths if footer_count(p, b"url_candidates")]
    if not with_urls:
        return []
    ranked = url_candidates(with_urls)
    target = run.config.target_per_class
    return [c for r in plan_rounds(ranked, target, run.work.acquired) for c in r]


def _embed_units(run: Run) -> list[Unit] | None:
    paths = _candidate_files(run)
    acquire = _acquire_units(run)
    if paths is None or acquire is None or not all(status_path(run.work.acquired, c.id).exists() for c in acquire):  # fmt: skip
        return None
    model = embed_model(run)
    return [u for u, p in zip(run.units, paths, strict=True) if needs_localizing(p, model and model[0])]  # fmt: skip


def embed_model(run: Run) -> tuple[str, str | None] | None:
    return shift_clip(run.config, run.curator)


def shift_clip(config: ShiftConfig, curator) -> tuple[str, str | None] | None:
    """The shift's CLIP model: config ``embed``, else the curator's own (a kNN curator's)."""
    e = config.embed
    if e.model:
        if e.pretrained and e.pretrained.startswith("demo:"):  # hashed as named, loaded from here
            from .demo_world import resolve_demo_path

            return e.model, resolve_demo_path(e.pretrained)
        return e.model, e.pretrained
    own = getattr(curator, "embedding_model", None)
    return own() if callable(own) else None


def _embed_setup(run: Run):
    model = embed_model(run)
    if model is None:
        return None
    e = run.config.embed
    return partial(ClipEncoder, model[0], model[1], e.device, e.batch_size)


def _plans(run: Run) -> list[Path] | None:
    return sorted(run.work.plan.glob("*.tar.parquet")) if run.work.plan.exists() else None


STAGES: list[Stage] = [
    Stage(
        "candidates",
        units=lambda run: run.units,
        done=lambda run, u: candidates_path(run.work.candidates, u).exists(),
        work=lambda run: partial(unit_work, run.work.candidates, run.work.root),
        setup=_curator_setup,
        resources=_curator_resources,
    ),
    Stage(
        "acquire",
        units=_acquire_units,
        done=lambda run, c: status_path(run.work.acquired, c.id).exists(),
        work=lambda run: partial(fetch_chunk, run.work.acquired, run.work.root),
        setup=lambda run: partial(
            make_fetcher,
            run.config.acquire.policy(run.config.run.resolve),
            run.config.acquire.threads,
        ),
    ),
    Stage(
        "embed",
        units=_embed_units,
        done=lambda run, u: embedded_path(run.work.embedded, u).exists(),
        work=lambda run: partial(embed_work, run.work, run.work.acquired),
        setup=_embed_setup,
        resources=lambda run: Resources(cpus=1.0, gpus=1.0 if embed_model(run) else 0.0),
    ),
    Stage(
        "select",
        units=lambda run: [PLAN_UNIT],
        done=lambda run, _: run.work.plan.exists(),
        # One unit that uses every core of a node: as many threads as it reserved.
        work=lambda run: partial(
            write_plan,
            run.config,
            run.classes,
            run.units,
            run.work,
            run.node_cpus,
            embed_model(run),
        ),  # fmt: skip
        resources=lambda run: Resources(cpus=float(run.node_cpus)),
    ),
    Stage(
        "materialize",
        units=_plans,
        done=lambda run, plan: (run.work.shard_rows / plan.name).exists(),
        work=lambda run: partial(
            shard_work, run.sample_context(), run.shift_dir / SHARDS_DIR, run.work.shard_rows
        ),
    ),
]


class UnitsFailed(PartialFailure):
    """Some units of a stage did not finish; the run stops before the next stage."""

    def __init__(self, stage: str, failures: list[dict], path: Path) -> None:
        self.stage, self.failures, self.path = stage, failures, path
        first = failures[0]
        super().__init__(
            f"{len(failures)} unit(s) of stage {stage} failed (first: {first['unit']}: "
            f"{first['error']}); see {path}; re-run the same command to retry them"
        )


def failed_path(work: WorkDir, stage: str) -> Path:
    return work.root / "failed" / f"{stage}.json"


def run_stage(executor, stage: Stage, run: Run) -> dict:
    """Run a stage's uncommitted units; raise UnitsFailed (after all have run) if any failed."""
    results: list[dict] = []
    ran = 0
    while True:  # one pass, or one per round for a stage whose units come in rounds
        units = stage.units(run) or []
        todo = [u for u in units if not stage.done(run, u)]
        if not todo:
            break
        done = list(
            executor.map(
                stage.name, todo, stage.work(run), setup=stage.setup(run) or _none,
                resources=stage.resources(run),
            )
        )  # fmt: skip
        results += done
        ran += len(todo)
        if any(r.get(FAILED) for r in done):
            break
    failures = [r for r in results if r.get(FAILED)]
    path = failed_path(run.work, stage.name)
    if failures:
        atomic_write_bytes(path, json.dumps(failures, indent=2).encode())
        raise UnitsFailed(stage.name, failures, path)
    path.unlink(missing_ok=True)
    return {
        "units": len(units),
        "run": ran,
        "samples": sum(int(r.get("samples", 0)) for r in results),
    }


def _none() -> None:
    return None


def stage_progress(run: Run) -> list[tuple[str, int, int | None, int]]:
    """(stage, committed units, all units or None when not yet known, failed) per stage."""
    out = []
    for stage in STAGES:
        units = stage.units(run)
        done = sum(stage.done(run, u) for u in units) if units is not None else 0
        path = failed_path(run.work, stage.name)
        failed = len(json.loads(path.read_text())) if path.exists() else 0
        out.append((stage.name, done, None if units is None else len(units), failed))
    return out
