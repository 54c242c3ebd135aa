"""B5 many rules: loading 1,000 rules, and matching with 1,000 rules against 50.

Loading (validate + compile, `load_rules`) is timed in a fresh child process, so no cache
of an earlier load helps it; the child reports the time of the load alone, without the
interpreter's start-up. Matching runs the B1 pipeline on the same events with each rule set,
side by side in this process. Targets: the load within 1 s; the rate with 1,000 rules at
least 50% of the rate with 50.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks.b1_matching import ROUNDS, best_rates, pipeline
from benchmarks.harness import Figure, Report, check, event_file, rules_file, run_child
from engine.rules import load_rules

LOAD_LIMIT_S = 1.0
RATE_SHARE = 0.5


def load_seconds(path: Path) -> float:
    """Seconds `load_rules(path)` takes in a fresh interpreter (imports done beforehand)."""
    child = run_child([sys.executable, "-m", "benchmarks.b5_many_rules", "--load", path])
    return float(check(child, "loading rules").stderr.strip().splitlines()[-1])


def run(report: Report, *, events: int) -> None:
    seconds = min(load_seconds(rules_file(1000)) for _ in range(2))
    report.add(
        Figure(
            "B5",
            "validate and compile 1,000 rules",
            seconds,
            "s",
            target=f"≤ {LOAD_LIMIT_S:.0f} s",
            passed=seconds <= LOAD_LIMIT_S,
        )
    )
    path = event_file(events)
    few = load_rules(rules_file(50))
    many = load_rules(rules_file(1000))
    # As many rounds as B1, in the quick run too (docs/performance.md, notes on fairness).
    few_rate, many_rate = best_rates(
        ROUNDS, lambda: pipeline(path, few)[0], lambda: pipeline(path, many)[0]
    )
    report.add(
        Figure(
            "B5",
            f"pipeline with 1,000 rules vs 50 ({events:,} events)",
            many_rate,
            "events/s",
            "with 50 rules",
            few_rate,
            f"≥ {RATE_SHARE:.0%} of the rate with 50 rules",
            many_rate >= few_rate * RATE_SHARE,
        )
    )


def _load_in_child(path: str) -> None:
    # Import everything loading needs first: the figure is the load, not Python's start-up.
    import engine.actions
    import engine.rules.loader  # noqa: F401

    started = time.perf_counter()
    rules = load_rules(path)
    seconds = time.perf_counter() - started
    assert len(rules) > 0
    print(f"{seconds:.6f}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--load":
        _load_in_child(sys.argv[2])
    else:
        sys.exit("usage: python -m benchmarks.b5_many_rules --load RULES")
