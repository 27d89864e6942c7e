"""The executors themselves: progress inside long units, workers reused across stages."""

from __future__ import annotations

import re

import pytest

from pipelines.executor import LocalExecutor, RayExecutor


def _long_unit(reports: int, pause: float):
    def work(_state, unit):  # a closure: Ray pickles it by value, no import path needed
        import os
        import time

        from pipelines.executor import report_progress

        for _ in range(reports):
            report_progress(10)
            time.sleep(pause)
        return {"samples": 1, "pid": os.getpid()}

    return work


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_the_bar_moves_inside_a_long_unit(kind, capsys):
    executor = LocalExecutor(progress=True) if kind == "local" else RayExecutor(workers=1)
    try:
        results = list(executor.map("long", [1, 2], _long_unit(10, 0.3)))
    finally:
        executor.shutdown()
    assert [r["samples"] for r in results] == [1, 1]
    err = capsys.readouterr().err
    during = [int(n) for n in re.findall(r"0/2 \[[^\]]*\]?[^\r\n]*?(\d+) items", err)]
    assert any(0 < n < 100 for n in during), err  # items shown before the first unit ended
    assert "200 items" in err  # nothing lost: what was not polled comes back with the result


def test_ray_workers_are_reused_across_stages_with_the_same_resources():
    executor = RayExecutor(workers=2, progress=False)
    try:
        first = {r["pid"] for r in executor.map("a", [1, 2, 3, 4], _long_unit(1, 0.0))}
        second = {r["pid"] for r in executor.map("b", [1, 2, 3, 4], _long_unit(1, 0.0))}
    finally:
        executor.shutdown()
    assert first and second <= first  # no new worker process started for the second stage
