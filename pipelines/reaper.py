"""Watches a driver process; when it dies, kills every process it had started (its embedded Ray:
GCS, raylet, agents, workers), so a killed run leaves nothing behind that could still write.

Started by the Ray executor for a Ray it started itself (never for a cluster it joined):
``python -m pipelines.reaper DRIVER_PID``, in its own session so a signal to the driver's
process group does not take the reaper with it.
"""

from __future__ import annotations

import os
import sys
import time

import psutil


def watch(driver_pid: int, interval: float = 0.25) -> None:
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    me = os.getpid()
    seen: dict[int, psutil.Process] = {}
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            for p in driver.children(recursive=True):
                if p.pid != me:
                    seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    victims = dict(seen)
    for p in seen.values():  # what they started since the last look (workers of a raylet)
        try:
            victims.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for p in victims.values():
        try:
            if p.is_running():  # also checks the pid was not reused since
                p.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))
