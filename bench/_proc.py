"""Run a command as a child process and time it; optionally sample the memory of it and of
every process it starts (an embedded Ray's GCS, raylet, agents and workers are descendants).

Memory is PSS (proportional set size: a page shared by n processes counts 1/n in each, so
memory-mapped files and fork-shared pages are not counted once per process), read from
/proc/<pid>/smaps_rollup through psutil every ``interval`` seconds and summed over the tree;
RSS where PSS cannot be read (then the sum over-counts shared pages).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import psutil


class TreeMemory:
    """Samples the summed PSS of a process and all its descendants in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.seen: dict[int, psutil.Process] = {pid: self.root}
        self.peak_mb = 0.0
        self.peak_driver_mb = 0.0
        self.peak_processes = 0
        self.peak_by_name: dict[str, float] = {}
        self.metric = "pss"
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _memory(self, p: psutil.Process) -> float:
        if self.metric == "pss":
            try:
                return p.memory_full_info().pss
            except (psutil.AccessDenied, AttributeError, NotImplementedError):
                self.metric = "rss"  # PSS unavailable here: fall back for every process
        return p.memory_info().rss

    def sample(self) -> None:
        try:
            for child in self.root.children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass  # the driver is gone; processes it left behind are still sampled
        total, driver, alive, by_name = 0.0, 0.0, 0, {}
        for pid, p in list(self.seen.items()):
            try:
                if not p.is_running():  # also false for a reused pid
                    del self.seen[pid]
                    continue
                mem = self._memory(p) / 2**20
                name = p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += mem
            alive += 1
            by_name[name] = by_name.get(name, 0.0) + mem
            if p is self.root:
                driver = mem
        self.samples += 1
        self.peak_driver_mb = max(self.peak_driver_mb, driver)
        if total > self.peak_mb:
            self.peak_mb, self.peak_processes, self.peak_by_name = total, alive, by_name

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> TreeMemory:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def leftovers(self, wait_s: float = 5.0) -> int:
        """Processes of the tree still running ``wait_s`` after the driver exited."""
        deadline = time.monotonic() + wait_s
        while True:
            alive = [p for p in self.seen.values() if p.pid != self.root.pid and _running(p)]
            if not alive or time.monotonic() > deadline:
                return len(alive)
            time.sleep(0.1)

    def report(self) -> dict:
        top = sorted(self.peak_by_name.items(), key=lambda kv: -kv[1])[:6]
        return {
            "peak_mb": round(self.peak_mb, 1),
            "peak_driver_mb": round(self.peak_driver_mb, 1),
            "processes_at_peak": self.peak_processes,
            "peak_mb_by_process_name": {k: round(v, 1) for k, v in top},
            "memory_metric": self.metric,
            "memory_samples": self.samples,
        }


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class CommandFailed(RuntimeError):
    pass


def run_cmd(
    cmd: list[str],
    log: Path,
    env: dict | None = None,
    cwd: Path | None = None,
    memory: bool = False,
    interval: float = 0.2,
) -> dict:
    """Run ``cmd`` to completion (output to ``log``); wall seconds, and with ``memory`` the
    peak summed PSS of its process tree. Raises CommandFailed (with the log's tail) on a
    non-zero exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd
        )
        sampler = TreeMemory(proc.pid, interval).start() if memory else None
        rc = proc.wait()
        wall = time.perf_counter() - start
    result: dict = {"wall_s": round(wall, 3)}
    if sampler is not None:
        sampler.stop()
        result.update(sampler.report())
        result["processes_left_after_5s"] = sampler.leftovers()
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise CommandFailed(f"{' '.join(map(str, cmd))} exited {rc}; log {log}:\n{tail}")
    return result
