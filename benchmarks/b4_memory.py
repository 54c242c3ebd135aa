"""B4 memory: peak RSS of `event-engine replay` over a large file, and whether it grows
with the input.

The real CLI runs as a child process, its output to nowhere; the kernel reports the child's
peak RSS (`wait4`). Targets: at most 150 MB for the large file, and no growth with the input:
the large file's peak at most 1.25× the peak for a file a tenth its size.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import (
    EVENT_ENGINE,
    Figure,
    Report,
    check,
    event_file,
    rules_file,
    run_child,
)

PEAK_LIMIT_MB = 150.0
GROWTH_LIMIT = 1.25


def peak_rss_mb(events: int, rules: int = 50) -> float:
    path = event_file(events)
    argv: list[str | Path] = [
        EVENT_ENGINE,
        "replay",
        "--rules",
        rules_file(rules),
        "--events",
        path,
    ]
    return check(run_child(argv), "event-engine replay").peak_rss_mb


def run(report: Report, *, events: int) -> None:
    small_events = events // 10
    small = peak_rss_mb(small_events)
    large = peak_rss_mb(events)
    report.add(
        Figure(
            "B4",
            f"peak RSS, replay of {events:,} events",
            large,
            "MB",
            target=f"≤ {PEAK_LIMIT_MB:.0f} MB",
            passed=large <= PEAK_LIMIT_MB,
        )
    )
    report.add(
        Figure(
            "B4",
            f"peak RSS growth, {events:,} vs {small_events:,} events",
            large,
            "MB",
            f"peak RSS for {small_events:,} events",
            small,
            f"≤ {GROWTH_LIMIT}× (no growth with the input)",
            large <= small * GROWTH_LIMIT,
        )
    )
