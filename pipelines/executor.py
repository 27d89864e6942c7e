"""Where units run: in this process, or on Ray (local by default, a cluster given an address).

A stage hands an executor a ``setup`` (builds per-worker state once: a model, an index) and a
``work`` function (state, unit) -> result. Ray runs one actor per worker, so state loads once
per worker, not once per unit. Stages never import Ray.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from curators.base import Resources

from .errors import UserError

_ERROR = "__user_error__"
_ITEMS = "__items__"  # progress a unit reported that the driver had not yet taken
Setup = Callable[[], Any]
Work = Callable[[Any, Any], dict]


FAILED = "failed"
_report: Callable[[int], None] | None = None  # set by the executor running this process's units


def report_progress(items: int) -> None:
    """Called by a unit's work as it goes (images embedded, samples written), so the stage's
    bar moves inside a unit that takes hours; a no-op outside an executor."""
    if _report is not None:
        _report(items)


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

    items = 0  # reported from inside units (report_progress)
    shown = 0.0  # when advance last redrew the bar

    def update(self, result: dict) -> None:
        self.samples += int(result.get("samples", 0))
        if self.bar is not None:
            self._postfix()
            self.bar.update(1)

    def advance(self, items: int) -> None:
        self.items += items
        # Redrawn ten times a second at most: a unit may report every one of its candidates.
        if self.bar is not None and items and time.monotonic() - self.shown >= 0.1:
            self.shown = time.monotonic()
            self._postfix()
            self.bar.refresh()

    def _postfix(self) -> None:
        count, what = (self.items, "items") if self.items else (self.samples, "samples")
        rate = count / max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{count} {what}, {rate:.1f} {what}/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RowProgress:
    """A bar for a long step that runs in the driver (grouping near duplicates): called with
    (rows done, rows) as it goes."""

    def __init__(self, desc: str, total: int, enabled: bool, unit: str = "row") -> None:
        self.bar = None
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{desc:>12}", unit=unit, file=sys.stderr)

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
        global _report
        bar = Progress(desc, len(units), self.progress)
        _report = bar.advance
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
            _report = None
            bar.close()

    def set_guard(self, guard: Callable[[], None] | None) -> None:
        pass  # its worker is the driver, which holds the lock itself

    def describe(self) -> dict:
        return {"executor": "local"}

    def shutdown(self) -> None:
        pass


class _Worker:
    """A Ray actor that outlives a stage: started once per run (per resource shape) and reused
    by every stage, so a run pays the process start and imports once, not once per stage. It
    holds one stage's state at a time (a model, an index), built by ``prepare``. A user's error
    (missing resource, bad value) comes back as a value, so the driver can print its one line
    instead of Ray's traceback."""

    def __init__(self, guard: Callable[[], None] | None = None) -> None:
        global _report
        from shards.atomic import set_commit_guard

        set_commit_guard(guard)
        self.key: str | None = None
        self.state, self.error = None, None
        self.items = 0  # reported by the running unit, not yet taken by the driver
        _report = self._count

    def _count(self, items: int) -> None:
        self.items += items

    def take_progress(self) -> int:
        """Runs beside ``run`` (its own concurrency group): what the unit reported so far."""
        items, self.items = self.items, 0
        return items

    def prepare(self, key: str, setup: Setup) -> None:
        if key == self.key:
            return
        self.state, self.error = None, None  # the last stage's model goes before the next loads
        self.key = key
        try:
            self.state = setup()
        except Exception as e:  # noqa: BLE001  reported by every unit it would have run
            self.error = e

    def run(self, work: Work, unit: Any) -> dict:
        if isinstance(self.error, UserError):
            return {_ERROR: self.error}
        if self.error is not None:
            return failure(unit, self.error)
        try:
            return {**work(self.state, unit), _ITEMS: self.take_progress()}
        except UserError as e:
            return {_ERROR: e}
        except Exception as e:  # noqa: BLE001  fails the same way wherever it runs: recorded
            return failure(unit, e)


class RayExecutor:
    """Runs units as Ray actor calls; results stream back as units finish.

    On a Ray of its own (no cluster address), a stage with a single unit and no GPU need runs
    in this process: one unit cannot use a second worker, and a worker's start-up would cost
    more than the unit on small jobs (measured in `make bench`, curate_ray_vs_local)."""

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
        self.local = LocalExecutor(progress)
        self._pool: list[Any] = []  # live actors, all of self._shape
        self._shape: dict[str, Any] | None = None

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
        resources = resources or Resources()
        if self.address is None and len(units) == 1 and not (resources.gpus and self.gpus):
            yield from self.local.map(desc, units, work, setup)
            return
        ray = self.ray
        n = min(len(units), self.workers)
        options: dict[str, Any] = {"num_cpus": resources.cpus, "max_restarts": 0}
        if resources.gpus and self.gpus:
            n = max(1, min(n, int(self.gpus / resources.gpus)))
            options["num_gpus"] = resources.gpus
        if options != self._shape:  # other resources: free the old workers' reservations
            self._kill_pool()
            self._shape = options
        actor_cls = ray.remote(concurrency_groups={"progress": 1}, **options)(_ray_worker(ray))
        key = hashlib.sha256(ray.cloudpickle.dumps(setup)).hexdigest()

        def start():
            actor = actor_cls.remote(self.guard)
            self._pool.append(actor)
            return actor

        while len(self._pool) < n:
            start()
        actors = self._pool[:n]
        for actor in actors:  # ordered before its first run: state is built once per worker
            actor.prepare.remote(key, setup)
        bar = Progress(desc, len(units), self.progress)
        pending: dict[Any, tuple[Any, Any]] = {}  # ref -> (actor, unit)
        tries: dict[int, int] = {}
        todo = list(reversed(units))  # pop() from the end: units in order

        def submit(actor) -> None:
            if todo:
                unit = todo.pop()
                pending[actor.run.remote(work, unit)] = (actor, unit)

        def replace(actor):
            self._pool.remove(actor)
            fresh = start()
            fresh.prepare.remote(key, setup)
            actors[actors.index(actor)] = fresh
            return fresh

        try:
            for actor in actors:  # two in flight per actor hides the round trip
                submit(actor)
                submit(actor)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                if not done:  # a long unit: show what it reported so far
                    if bar.bar is not None:
                        taken = [a.take_progress.remote() for a in actors]
                        bar.advance(sum(ray.get(taken)))
                    continue
                actor, unit = pending.pop(done[0])
                try:
                    result = _unwrap(ray, done[0], bar)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                    tries[id(unit)] = tries.get(id(unit), 0) + 1
                    if actor in actors:  # its other in-flight unit comes back here too
                        actor = replace(actor)
                    else:
                        actor = actors[0]
                    if tries[id(unit)] < self.attempts:
                        todo.append(unit)  # next in line, on a live worker
                        submit(actor)
                        continue
                    result = failure(unit, e, f"worker died {self.attempts} times")
                bar.update(result)
                yield result
                submit(actor)
        except BaseException:
            self._kill_pool()  # units still in flight must not go on writing
            raise
        finally:
            bar.close()

    def set_guard(self, guard: Callable[[], None] | None) -> None:
        """The commit guard for workers started from now on (see shards.atomic)."""
        self._kill_pool()
        self.guard = guard

    def _kill_pool(self) -> None:
        for actor in self._pool:
            self.ray.kill(actor)
        self._pool, self._shape = [], None

    def describe(self) -> dict:
        return {
            "executor": "ray",
            "address": self.address or "local",
            "cpus": self.cpus,
            "gpus": self.gpus,
        }

    def shutdown(self) -> None:
        self._kill_pool()
        # A Ray of our own: ray.shutdown() gives each of its processes a second to exit after
        # SIGTERM, one after another; nothing of ours runs there now, so kill them outright
        # once the driver has disconnected (what the reaper would do if we died).
        worker = getattr(self.ray, "_private", None) and self.ray._private.worker
        node = getattr(worker, "_global_node", None) if self.address is None else None
        if node is not None:
            worker._global_node = None
        try:
            self.ray.shutdown()
        finally:
            if node is not None:
                node.kill_all_processes(check_alive=False, allow_graceful=False)


def _ray_worker(ray: Any) -> type:
    """_Worker with take_progress in its own concurrency group, so the driver can ask while a
    unit runs; units still run one at a time (the default group has one thread)."""

    class RayWorker(_Worker):
        @ray.method(concurrency_group="progress")
        def take_progress(self) -> int:
            return super().take_progress()

    return RayWorker


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


def _unwrap(ray: Any, ref: Any, bar: Progress) -> dict:
    result = ray.get(ref)
    if _ERROR in result:
        raise result[_ERROR]
    bar.advance(result.pop(_ITEMS, 0))
    return result


Executor = LocalExecutor | RayExecutor  # where units run; stages use either alike


def make_executor(
    kind: str,
    address: str | None,
    workers: int | None,
    progress: bool,
    guard: Callable[[], None] | None = None,
) -> Executor:
    """``guard`` runs in workers before each commit (see shards.atomic): refuses once the
    driver's run is gone. The local executor needs none: its worker is the driver."""
    if kind == "local":
        return LocalExecutor(progress)
    return RayExecutor(address, workers, progress, guard)
