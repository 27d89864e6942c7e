"""The loopback server of the acquire_overhead benchmark, in its own process so it does not
share the benchmark's interpreter lock: tests/http_server.py's FaultServer serving ``N``
small JPEGs as /img/p<i> (and /slow/p<i>, answered after SLOW seconds).

    python bench/_http_serve.py N SIDE SLOW   # prints the port, serves until stdin closes

The listen backlog is raised from socketserver's 5 to 128: with 16 fetches in flight, a
backlog of 5 drops connection attempts, and each dropped SYN costs the client a 1 s
retransmit; that would measure the kernel's retry timer, not the fetch code.
"""

import sys
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pools import photo_jpeg  # noqa: E402

from tests.http_server import FaultServer  # noqa: E402


def main() -> None:
    count, side, slow = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    images = {f"p{i}": photo_jpeg(np.random.default_rng([7, i]), side, side) for i in range(count)}
    ThreadingHTTPServer.request_queue_size = 128
    with FaultServer(images, slow_seconds=slow) as server:
        print(server.port, flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin


if __name__ == "__main__":
    main()
