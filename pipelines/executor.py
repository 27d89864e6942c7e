"""Where units run: in this process, or on Ray (local by default, a cluster given an address).

A stage hands an executor a ``setup`` (builds per-worker state once: a model, an index) and a
``work`` function (state, unit) -> result. Ray runs one actor per worker, so state loads once
per worker, not once per unit. Stages never import Ray.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from curators.base import Resources

from .errors import UserError

_ERROR = "__user_error__"
Setup = Callable[[], Any]
Work = Callable[[Any, Any], dict]


FAILED = "failed"


def _no_setup() -> None:
    return None


def failure(unit: Any, error: BaseException, why: str | None = None) -> dict:
    """The record of a unit that did not finish: the stage reports it, the run goes on."""
    text = why or f"{type(error).__name__}: {' '.join(str(error).split())}"[:500]
    return {FAILED: True, "unit": str(getattr(unit, "id", unit)), "error": text}


class Progress:
    """One bar per stage: units done / total and samples per second."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self.samples = 0
        self.start = time.monotonic()
        self.bar = None
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{desc:>12}", unit="unit", file=sys.stderr)

    def update(self, result: dict) -> None:
        self.samples += int(result.get("samples", 0))
        if self.bar is not None:
            rate = self.samples / max(time.monotonic() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.samples} samples, {rate:.1f} samples/s")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RowProgress:
    """A bar for a long step that runs in the driver (grouping near duplicates): called with
    (rows done, rows) as it goes."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{desc:>12}", unit="row", file=sys.stderr)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def __enter__(self) -> RowProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


class LocalExecutor:
    """Runs units one after another in this process: for debugging, tests and benchmarks."""

    name = "local"

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress
        self.node_cpus = os.cpu_count() or 1

    def map(
        self, desc: str, units: list, work: Work, setup: Setup = _no_setup, **_: Any
    ) -> Iterator[dict]:
        bar = Progress(desc, len(units), self.progress)
        try:
            state = setup() if units else None
            for unit in units:
                try:
                    result = work(state, unit)
                except UserError:
                    raise
                except Exception as e:  # noqa: BLE001  a unit that fails is recorded, not fatal
                    result = failure(unit, e)
                bar.update(result)
                yield result
        finally:
            bar.close()

    def describe(self) -> dict:
        return {"executor": "local"}

    def shutdown(self) -> None:
        pass


class _Worker:
    """A Ray actor holding one stage's state. A user's error (missing resource, bad value)
    comes back as a value, so the driver can print its one line instead of Ray's traceback."""

    def __init__(self, setup: Setup, guard: Callable[[], None] | None = None) -> None:
        from shards.atomic import set_commit_guard

        set_commit_guard(guard)
        self.state, self.error = None, None
        try:
            self.state = setup()
        except UserError as e:
            self.error = e

    def run(self, work: Work, unit: Any) -> dict:
        if self.error is not None:
            return {_ERROR: self.error}
        try:
            return work(self.state, unit)
        except UserError as e:
            return {_ERROR: e}
        except Exception as e:  # noqa: BLE001  fails the same way wherever it runs: recorded
            return failure(unit, e)


class RayExecutor:
    """Runs units as Ray actor calls; results stream back as units finish."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        progress: bool = True,
        guard: Callable[[], None] | None = None,
        attempts: int = 3,
    ) -> None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # stay on loopback
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        import ray

        self.ray = ray
        address = address or os.environ.get("RAY_ADDRESS") or None
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": "ERROR",
            "log_to_driver": True,
        }
        if address is None:
            kwargs["num_cpus"] = workers or os.cpu_count()
        else:
            check_ray_address(address)  # ray.init retries an unreachable address for minutes
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(
                f"cannot reach Ray cluster at {address}: {str(e).splitlines()[0]}"
            ) from None
        if address is None:  # a Ray of our own: it dies with this process, whatever kills it
            _start_reaper()
        self.address = address
        self.guard = guard
        self.attempts = attempts
        resources = ray.cluster_resources()
        self.cpus = int(resources.get("CPU", 1))
        self.node_cpus = max(
            [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [1]
        )
        self.gpus = int(resources.get("GPU", 0))
        self.workers = workers or max(1, self.cpus)
        self.progress = progress

    def map(
        self,
        desc: str,
        units: list,
        work: Work,
        setup: Setup = _no_setup,
        resources: Resources | None = None,
    ) -> Iterator[dict]:
        """Results as units finish. A unit whose worker dies (process killed, node lost) goes
        to a fresh worker, up to ``attempts`` times; one whose work raises is yielded as a
        failure record and the stage goes on."""
        if not units:
            return
        ray = self.ray
        resources = resources or Resources()
        n = min(len(units), self.workers)
        options: dict[str, Any] = {"num_cpus": resources.cpus, "max_restarts": 0}
        if resources.gpus and self.gpus:
            n = max(1, min(n, int(self.gpus / resources.gpus)))
            options["num_gpus"] = resources.gpus
        actor_cls = ray.remote(**options)(_Worker)

        def start():
            return actor_cls.remote(setup, self.guard)

        actors = [start() for _ in range(n)]
        bar = Progress(desc, len(units), self.progress)
        pending: dict[Any, tuple[Any, Any]] = {}  # ref -> (actor, unit)
        tries: dict[int, int] = {}
        todo = list(reversed(units))  # pop() from the end: units in order

        def submit(actor) -> None:
            if todo:
                unit = todo.pop()
                pending[actor.run.remote(work, unit)] = (actor, unit)

        try:
            for actor in actors:  # two in flight per actor hides the round trip
                submit(actor)
                submit(actor)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                actor, unit = pending.pop(done[0])
                try:
                    result = _unwrap(ray, done[0])
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                    tries[id(unit)] = tries.get(id(unit), 0) + 1
                    if actor in actors:  # its other in-flight unit comes back here too
                        actors[actors.index(actor)] = actor = start()
                    else:
                        actor = next(a for a in actors)
                    if tries[id(unit)] < self.attempts:
                        todo.append(unit)  # next in line, on a live worker
                        submit(actor)
                        continue
                    result = failure(unit, e, f"worker died {self.attempts} times")
                bar.update(result)
                yield result
                submit(actor)
        finally:
            bar.close()
            for actor in actors:
                ray.kill(actor)

    def describe(self) -> dict:
        return {
            "executor": "ray",
            "address": self.address or "local",
            "cpus": self.cpus,
            "gpus": self.gpus,
        }

    def shutdown(self) -> None:
        self.ray.shutdown()


def _start_reaper() -> None:
    import subprocess

    subprocess.Popen(
        [sys.executable, "-m", "pipelines.reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """Refuse an unreachable cluster address ($RAY_ADDRESS when none is given) at once."""
    import socket

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        return
    host_port = address.removeprefix("ray://")
    if address == "auto" or ":" not in host_port:
        return
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise UserError(f"cannot reach Ray cluster at {address}: {e}") from None


def _unwrap(ray: Any, ref: Any) -> dict:
    result = ray.get(ref)
    if _ERROR in result:
        raise result[_ERROR]
    return result


def make_executor(
    kind: str,
    address: str | None,
    workers: int | None,
    progress: bool,
    guard: Callable[[], None] | None = None,
) -> LocalExecutor | RayExecutor:
    """``guard`` runs in workers before each commit (see shards.atomic): refuses once the
    driver's run is gone. The local executor needs none: its worker is the driver."""
    if kind == "local":
        return LocalExecutor(progress)
    return RayExecutor(address, workers, progress, guard)
