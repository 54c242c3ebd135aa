"""A simulator with a backlog of events, in a process of its own, for B2.

The engine and the bare httpx loop then each have a core to themselves, as they would
against the real API, instead of sharing one interpreter lock with the server.

`python -m benchmarks.simulator_process --backlog N --days D` stores N generated events
spread evenly over the last D days, prints the base URL on one line, and serves until its
standard input closes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from engine.simulator import SimulatorConfig, SimulatorServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backlog", type=int, required=True)
    parser.add_argument("--days", type=float, required=True)
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    config = SimulatorConfig(seed=args.seed, endpoints=args.endpoints, late_fraction=0.0)
    with SimulatorServer(config) as server:
        server.state.generate(args.backlog, spread_seconds=args.days * 86400)
        print(server.base_url, flush=True)
        sys.stdin.read()  # until the parent closes it
    return 0


@contextmanager
def simulator_process(backlog: int, days: float) -> Iterator[str]:
    """Start the child; yields its base URL; stops it on exit."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.simulator_process",
            "--backlog",
            str(backlog),
            "--days",
            str(days),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        base_url = process.stdout.readline().strip()
        if not base_url.startswith("http"):
            raise RuntimeError("the simulator process did not start")
        yield base_url
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    sys.exit(main())
