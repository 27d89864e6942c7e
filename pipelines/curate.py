"""The curation pipeline: config -> candidates -> select -> materialize -> finalize.

Every stage skips its committed units, so re-running the same command resumes.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

from curators import ImageNetClass, select_classes
from shards.manifest import SHARDS_DIR

from .candidates import run_candidates
from .config import ShiftConfig
from .errors import ConfigError
from .executor import make_executor
from .finalize import finalize
from .materialize import SampleContext, run_materialize
from .select import run_select
from .workdir import RunLock, WorkDir


def resolve_classes(config: ShiftConfig) -> list[ImageNetClass]:
    try:
        return select_classes(config.classes.first, config.classes.wnids)
    except KeyError as e:
        raise ConfigError(f"config key 'classes.wnids': unknown wnid {e.args[0]!r}") from None


def curate(config: ShiftConfig, out: str | Path | None = None) -> dict:
    """Run (or resume) a shift; returns its manifest."""
    shift_dir = Path(out or config.run.out) / config.shift
    classes = resolve_classes(config)
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
        executor = make_executor(
            config.run.executor, config.run.ray_address, config.run.workers,
            config.run.progress, guard=lock.guard(),
        )  # fmt: skip
        stages: dict[str, dict] = {}

        def timed(name: str, run, *args) -> None:
            start = time.monotonic()
            stages[name] = {**run(*args), "seconds": round(time.monotonic() - start, 3)}

        try:
            timed("candidates", run_candidates, executor, config, classes, work.candidates)
            timed("select", run_select, executor, config, classes, work)
            ctx = SampleContext(
                shift=config.shift,
                curator=config.curator.name,
                config_hash=config_hash,
                class_names={c.index: (c.wnid, c.name) for c in classes},
                max_side=config.image.max_side,
                jpeg_quality=config.image.jpeg_quality,
            )
            timed("materialize", run_materialize, executor, ctx, work, shift_dir / SHARDS_DIR)
            facts = {
                "started": started,
                "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                "stages": stages,
                **executor.describe(),
            }
            return finalize(shift_dir, work, config, classes, facts)
        finally:
            executor.shutdown()
