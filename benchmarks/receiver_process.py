"""A webhook receiver in a process of its own, for B7: answers every request 200 with an
empty body at once, and counts the requests and their distinct `Idempotency-Key`s.

It is a bare ASGI callable on uvicorn with httptools (the engine's own HTTP server stack),
so that what B7 measures is the engine's dispatchers, not the receiver: B7 reports the
receiver's CPU per request beside its figures.

`python -m benchmarks.receiver_process --port N` serves on 127.0.0.1:N until its standard
input closes, then prints `{"requests": R, "keys": K}` on one line and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn

_OK = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}
_EMPTY = {"type": "http.response.body", "body": b""}


@dataclass
class Counts:
    requests: int = 0
    keys: set[bytes] = field(default_factory=set)


def receiver(counts: Counts) -> Callable[..., Awaitable[None]]:
    async def app(
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        counts.requests += 1
        for name, value in scope["headers"]:
            if name == b"idempotency-key":
                counts.keys.add(value)
        await send(_OK)
        await send(_EMPTY)

    return app


async def _serve(port: int) -> Counts:
    counts = Counts()
    config = uvicorn.Config(
        receiver(counts),
        host="127.0.0.1",
        port=port,
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    server.should_exit = True
    await serving
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    counts = asyncio.run(_serve(args.port))
    print(orjson.dumps({"requests": counts.requests, "keys": len(counts.keys)}).decode())
    return 0


@dataclass
class RunningReceiver:
    url: str
    pid: int
    counts: dict[str, int] = field(default_factory=dict)  # filled when it stops


@contextmanager
def receiver_process(port: int) -> Iterator[RunningReceiver]:
    """Start the child on `port`; yields it; on exit stops it and fills `counts`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.receiver_process", "--port", str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    running = RunningReceiver(f"http://127.0.0.1:{port}", process.pid)
    try:
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError("the receiver process did not start")
        yield running
    finally:
        process.stdin.close()
        try:
            last = process.stdout.read().strip().splitlines()
            process.wait(timeout=10)
            if last:
                running.counts = orjson.loads(last[-1])
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    sys.exit(main())
