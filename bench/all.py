"""Run every benchmark in turn (``make bench``); each prints its own JSON document."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = [
    "bench.runner_overhead",
    "bench.load",
    "bench.pull_throughput",
    "bench.show_metadata",
    "bench.embed",
    "bench.distributed",
    "bench.shape",
    "bench.trial",
]


def main() -> None:
    for module in BENCHMARKS:
        subprocess.run([sys.executable, "-m", module], check=True)


if __name__ == "__main__":
    main()
