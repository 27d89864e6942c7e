"""The loopback server of the acquire_overhead benchmark, in its own process so it does not
share the benchmark's interpreter lock: tests/http_server.py's FaultServer serving ``N``
small JPEGs as /img/p<i> (and /slow/p<i>, answered after SLOW seconds).

    python bench/_http_serve.py N SIDE SLOW [HEIGHT [DISTINCT]]
    # prints the port, serves until stdin closes; SIDE x HEIGHT pixels (default square);
    # DISTINCT pictures (default N), p<i> showing picture i % DISTINCT

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
    height = int(sys.argv[4]) if len(sys.argv) > 4 else side
    distinct = int(sys.argv[5]) if len(sys.argv) > 5 else count
    pictures = [photo_jpeg(np.random.default_rng([7, i]), side, height) for i in range(distinct)]
    images = {f"p{i}": pictures[i % distinct] for i in range(count)}
    ThreadingHTTPServer.request_queue_size = 128
    with FaultServer(images, slow_seconds=slow) as server:
        print(server.port, flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin


if __name__ == "__main__":
    main()
