"""What every benchmark shares: figures with their reference and target, the machine they
ran on, timing, child processes measured for peak RSS, and the event files they replay."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.sandbox.postgres import PostgresServer, find

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EVENT_ENGINE = BIN / "event-engine"
WORKDIR = Path(os.environ.get("BENCH_WORKDIR", Path(tempfile.gettempdir()) / "event-engine-bench"))


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure. `ratio` is value / reference (both in the same unit); `passed`
    is None for figures reported without a target."""

    bench: str
    name: str
    value: float
    unit: str
    reference: str | None = None
    reference_value: float | None = None
    target: str | None = None
    passed: bool | None = None
    note: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.reference_value is None or not self.reference_value:
            return None
        return self.value / self.reference_value

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "info"}[self.passed]

    def line(self) -> str:
        text = f"[{self.verdict:4}] {self.bench} {self.name}: {fmt(self.value)} {self.unit}"
        if self.reference is not None and self.reference_value is not None:
            text += f" | {self.reference}: {fmt(self.reference_value)} {self.unit}"
            text += f" | ratio {fmt_ratio(self.ratio)}"
        if self.target:
            text += f" | target {self.target}"
        return text


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}×" if ratio < 10 else f"{ratio:.1f}×"  # 19.7×, not a failing "20×"


@dataclass(slots=True)
class Report:
    """All figures of one run, printed as they come in."""

    quick: bool
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        print(figure.line(), flush=True)
        return figure

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    @property
    def failed(self) -> list[Figure]:
        return [f for f in self.figures if f.passed is False]


def at_least(value: float, reference: float, share: float) -> bool:
    return reference > 0 and value / reference >= share


# -- the machine ---------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or "unknown"
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) // 1024:,} MB"
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model,
        "cores": str(os.cpu_count() or "unknown"),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


# -- timing and child processes ------------------------------------------------------------


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


@dataclass(frozen=True, slots=True)
class ChildRun:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stderr: str


# Runs the command and reports its peak RSS. The measuring goes through this small launcher
# because Linux counts, in a child's peak RSS, the memory of the process it was forked from
# (the high-water mark of the old image carries over exec): a child forked straight from
# this process would report this process's size.
_LAUNCHER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
sys.stderr.write(f"\\nbench-peak-rss-kb={peak}\\n")
sys.exit(code)
"""
_PEAK_PREFIX = "bench-peak-rss-kb="


def run_child(argv: Sequence[str | Path], *, stdout_to: Path | None = None) -> ChildRun:
    """Run a command to its end; its wall time and peak RSS. stdout goes to `stdout_to`
    or nowhere."""
    out = stdout_to.open("wb") if stdout_to else subprocess.DEVNULL
    try:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, *(str(a) for a in argv)],
            stdout=out,
            stderr=subprocess.PIPE,
            cwd=REPO,
            check=False,
        )
        seconds = time.perf_counter() - started
    finally:
        if stdout_to:
            out.close()  # type: ignore[union-attr]
    stderr, _, peak = done.stderr.decode("utf-8", "replace").rpartition(_PEAK_PREFIX)
    # ru_maxrss is in kilobytes on Linux.
    peak_mb = int(peak.strip()) / 1024 if peak.strip().isdigit() else float("nan")
    return ChildRun(seconds, peak_mb, done.returncode, stderr.rstrip())


def check(run: ChildRun, what: str) -> ChildRun:
    if run.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
    return run


# -- workloads -----------------------------------------------------------------------------


def event_file(count: int, *, endpoints: int = 1000, seed: int = 1) -> Path:
    """A JSON-lines file of `count` generated events, written by `event-engine simulate
    --write-events` once and kept in WORKDIR for later runs."""
    WORKDIR.mkdir(parents=True, exist_ok=True)
    path = WORKDIR / f"events-{count}-e{endpoints}-s{seed}.jsonl"
    if path.exists():
        return path
    partial = path.with_suffix(".partial")
    argv = [
        EVENT_ENGINE,
        "simulate",
        "--write-events",
        partial,
        "--count",
        count,
        "--endpoints",
        endpoints,
        "--seed",
        seed,
    ]
    print(f"writing {count:,} events to {path} ...", flush=True)
    check(run_child([str(a) for a in argv]), "event-engine simulate --write-events")
    partial.rename(path)
    return path


@contextmanager
def postgres() -> Iterator[PostgresServer]:
    """PostgreSQL for the benchmarks that need it, as the tests find it
    (`engine.sandbox.postgres.find`: `$EVENT_ENGINE_TEST_POSTGRES`, else a throw-away server
    made with the machine's initdb, else one on 127.0.0.1:5432), stopped or dropped after."""
    with tempfile.TemporaryDirectory() as folder:
        found = find(Path(folder))
        if isinstance(found, str):
            raise RuntimeError(f"no PostgreSQL to measure on: {found}")
        try:
            yield found
        finally:
            found.stop()


def rules_file(count: int) -> Path:
    from benchmarks.rulesets import RULES_DIR

    return RULES_DIR / f"fleet-{count}.yaml"
