"""The curation pipeline: config -> curator units -> the stages (pipelines/stages.py) -> finalize.

Every stage skips its committed units, so re-running the same command resumes.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

from curators import ImageNetClass, create_curator, select_classes
from shards.manifest import MANIFEST

from .candidates import plan_units
from .config import ShiftConfig, parse_config
from .errors import ConfigError, UserError
from .executor import Executor, make_executor
from .finalize import finalize
from .stages import STAGES, Run, embed_model, failed_path, run_stage, shift_clip, stage_progress
from .workdir import RunLock, WorkDir, lock_holder


def resolve_classes(config: ShiftConfig) -> list[ImageNetClass]:
    try:
        return select_classes(config.classes.first, config.classes.wnids)
    except KeyError as e:
        raise ConfigError(f"config key 'classes.wnids': unknown wnid {e.args[0]!r}") from None


def curate(
    config: ShiftConfig, out: str | Path | None = None, executor: Executor | None = None
) -> dict:
    """Run (or resume) a shift; returns its manifest. Raises UnitsFailed when units of a stage
    failed (the others are committed; a re-run retries the failed ones). ``executor``: one
    that outlives this shift (the demo runs five on one Ray); by default one of its own."""
    shift_dir = Path(out or config.run.out) / config.shift
    classes = resolve_classes(config)
    curator = create_curator(config.curator.name, config.curator.params)
    units = plan_units(config, classes, curator)
    if config.select.exclude and shift_clip(config, curator) is None:
        raise ConfigError("config key 'select.exclude': needs the shift's CLIP model (set embed.model)")  # fmt: skip
    with RunLock(shift_dir) as lock:
        work = WorkDir(shift_dir)
        work.clear_temporaries()
        config_hash = config.content_hash()
        work.bind_config(config_hash, config.to_dict())
        started = datetime.now(UTC).isoformat(timespec="seconds")
        work.log_run(
            {"started": started, "host": socket.gethostname(), "pid": os.getpid(),
             "executor": config.run.executor}
        )  # fmt: skip
        own = executor is None
        if executor is None:
            executor = make_executor(
                config.run.executor, config.run.ray_address, config.run.workers,
                config.run.progress, guard=lock.guard(),
            )  # fmt: skip
        else:
            executor.set_guard(lock.guard())  # workers that commit check this shift's lock
        run = Run(config, classes, work, units, node_cpus=executor.node_cpus)
        run.curator = curator  # one instance in the driver
        stages: dict[str, dict] = {}
        try:
            for stage in STAGES:
                start = time.monotonic()
                stages[stage.name] = {
                    **run_stage(executor, stage, run),
                    "seconds": round(time.monotonic() - start, 3),
                }
            facts = {
                "started": started,
                "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                "stages": stages,
                **executor.describe(),
            }
            manifest = finalize(shift_dir, work, config, classes, facts, embed_model(run))
        finally:
            if own:
                executor.shutdown()
            else:
                executor.set_guard(None)
        if config.report.after_curate and manifest["total_samples"]:
            write_shift_report(shift_dir, config)
        return manifest


def write_shift_report(shift_dir: Path, config: ShiftConfig) -> None:
    """report/ for a shift just made (under its run lock): the config's report options."""
    from .report import write_report

    write_report(
        shift_dir, config.report, config.embed.device, config.embed.batch_size,
        log=lambda line: print(line, flush=True) if config.run.progress else None,
    )  # fmt: skip


def config_from_record(record: dict) -> ShiftConfig:
    """The config a run was started with, from its _work/run.json (resources not checked)."""
    data = copy.deepcopy(record)
    data["curator"].pop("demo_params", None)
    return parse_config(data, check_resources=False)


def status_report(shift_dir: Path) -> list[str]:
    """Committed units per stage: what a re-run of the same command would still do."""
    work = WorkDir(shift_dir)
    if not work.run_file.exists():
        raise UserError(f"no run has started in {shift_dir}")
    held = json.loads(work.run_file.read_text())
    config = config_from_record(held["config"])
    classes = resolve_classes(config)
    run = Run(config, classes, work, plan_units(config, classes))
    lines = [f"shift: {config.shift} (config {held['config_hash']})"]
    complete = True
    for name, done, total, failed in stage_progress(run):
        line = f"{name}: {done}/{'?' if total is None else total} units"
        if failed:
            line += f", {failed} failed (see {failed_path(work, name)})"
        complete &= total is not None and done == total
        lines.append(line)
    finished = complete and (shift_dir / MANIFEST).exists()
    lines.append(f"finalize: {'done' if finished else 'not yet'}")
    holder = lock_holder(shift_dir)
    if holder:
        lines.append(f"run: active, {holder}")
    else:
        lines.append(
            "run: none active" + ("" if finished else "; re-run the same command to resume")
        )
    return lines
