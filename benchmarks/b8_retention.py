"""B8 store size: a week of a fleet's events through the daemon's store, with and without
retention.

A fleet of trackers reports its location every half hour; a threshold rule on location
updates ("more than 100 an hour") matches every one of them and, not reaching its threshold,
writes two audit rows ("matched", "below threshold") for each. The events go through the real
pipeline into a real SQLite file in 5-minute batches on a virtual clock (the poller's part:
a batch, its cursor, the seen ids aged out past the dedup horizon), once keeping everything
and once with the store's retention run every virtual hour as the daemon runs it. The size on
disk is read at the end of every day, after a WAL checkpoint.

The retention period is scaled down with the week (2 days instead of 30), so the week shows
what a month does: once a period's worth is stored, the file stops growing. Targets: the last
day's size at most 10% above the size at the end of the first day past the retention period,
and no single retention batch holding the store longer than 100 ms (a poll waits at most
one batch). Reported beside them: bytes per event without retention (what a month costs
without it) and the size per device with it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.harness import Figure, Report
from engine.clock import FixedClock
from engine.pipeline import Pipeline, dedup_horizon
from engine.retention import Retention, RetentionSettings
from engine.rules import load_rules_text
from engine.store import SqliteStore

START = datetime(2026, 3, 2, tzinfo=UTC)
BATCH = timedelta(minutes=5)  # a poll window
RETENTION_EVERY = timedelta(hours=1)
RETENTION_PERIOD = timedelta(days=2)
OVERLAP = timedelta(seconds=120)
FLAT = 1.10  # the last day's size at most this times the first day's past the period
LONGEST_BATCH_MS = 100.0

RULES = """
rules:
  - id: many-location-updates
    description: a device that reports its location more than 100 times an hour
    when: {type: 1}
    threshold: {count: 100, within: 1h, per: sim.iccid}
    actions: [{log: {}}]
  - id: suspend-on-quota-used-up
    when: {type: 19}
    actions: [{suspend_sim: {}}]
"""


@dataclass(slots=True)
class Week:
    """What one run stored: the size at the end of each day, and the events judged."""

    sizes: list[int] = field(default_factory=list)
    events: int = 0
    longest_batch: float = 0.0
    seconds: float = 0.0


def _location_update(event_id: int, device: int, at: datetime) -> dict[str, Any]:
    iccid = f"89883030000{device:08d}"
    return {
        "id": event_id,
        "timestamp": at.isoformat(),
        "alert": False,
        "description": "New location received from VLR.",
        "event_type": {"id": 1, "description": "Update location"},
        "event_source": {"id": 0, "description": "Network"},
        "event_severity": {"id": 0, "description": "Info"},
        "endpoint": {"id": 100000 + device, "name": f"tracker-{device:05d}", "tags": "fleet"},
        "sim": {"id": 500000 + device, "iccid": iccid},
        "detail": {"name": "Telekom", "country": {"name": "Germany"}},
    }


def _batches(devices: int, days: int, report_every: timedelta) -> Iterator[list[dict[str, Any]]]:
    """Each device reports once every `report_every`, the devices spread evenly over it;
    one list per BATCH of time."""
    spacing = report_every / devices
    total = int(timedelta(days=days) / spacing)
    batch: list[dict[str, Any]] = []
    window_end = START + BATCH
    for n in range(total):
        at = START + n * spacing
        if at >= window_end:
            yield batch
            batch, window_end = [], window_end + BATCH
        batch.append(_location_update(412_900_000_000_000 + n, n % devices, at))
    yield batch


def _size_on_disk(path: Path) -> int:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def replay_week(
    path: Path, *, devices: int, days: int, report_every: timedelta, retained: bool
) -> Week:
    week = Week()
    clock = FixedClock(START)  # row times (`at`) on the fleet's virtual clock
    store = SqliteStore(path)
    pipeline = Pipeline(load_rules_text(RULES), store, clock=clock)
    settings = RetentionSettings(period=RETENTION_PERIOD)
    retention = Retention(settings, clock=clock)
    next_retention = START + RETENTION_EVERY
    next_day = START + timedelta(days=1)
    started = time.perf_counter()
    for batch in _batches(devices, days, report_every):
        clock.now = datetime.fromisoformat(batch[-1]["timestamp"]) + timedelta(seconds=30)
        pipeline.process(batch, source="poller", cursor=clock.now)
        store.prune_seen(clock.now - dedup_horizon(OVERLAP))
        week.events += len(batch)
        if retained and clock.now >= next_retention:
            run = asyncio.run(retention.run_once(store))
            week.longest_batch = max(week.longest_batch, run.longest_batch)
            next_retention += RETENTION_EVERY
        if clock.now >= next_day:
            week.sizes.append(_size_on_disk(path))
            next_day += timedelta(days=1)
    week.seconds = time.perf_counter() - started
    if len(week.sizes) < days:  # the last batch may end just short of the last day's end
        week.sizes.append(_size_on_disk(path))
    store.close()
    return week


def run(report: Report, *, devices: int, days: int, report_every: timedelta) -> None:
    with tempfile.TemporaryDirectory(prefix="event-engine-b8-") as folder:
        kept = replay_week(
            Path(folder) / "kept.sqlite3",
            devices=devices,
            days=days,
            report_every=report_every,
            retained=False,
        )
        pruned = replay_week(
            Path(folder) / "pruned.sqlite3",
            devices=devices,
            days=days,
            report_every=report_every,
            retained=True,
        )
    mb = 1024 * 1024
    past_period = int(RETENTION_PERIOD / timedelta(days=1))  # index of the day after it
    settled = pruned.sizes[min(past_period, len(pruned.sizes) - 1)]
    report.note(
        "B8 size at the end of each day, MB: without retention "
        + ", ".join(f"{s / mb:.1f}" for s in kept.sizes)
        + "; with retention "
        + ", ".join(f"{s / mb:.1f}" for s in pruned.sizes)
        + f" ({pruned.events:,} events in {pruned.seconds:.0f} s with retention,"
        f" {kept.seconds:.0f} s without)"
    )
    fleet = f"{devices:,} devices, one location update each every {_span(report_every)}"
    report.add(
        Figure(
            "B8",
            f"store size after {days} days ({fleet}, {kept.events:,} events), "
            f"retention {_span(RETENTION_PERIOD)}",
            pruned.sizes[-1] / mb,
            "MB",
            "without retention",
            kept.sizes[-1] / mb,
            f"≤ {FLAT:.2f}× the size one day past the retention period"
            f" ({settled / mb:.1f} MB): flat",
            pruned.sizes[-1] <= settled * FLAT,
        )
    )
    report.add(
        Figure(
            "B8",
            "bytes per event stored, without retention",
            kept.sizes[-1] / kept.events,
            "bytes",
        )
    )
    report.add(
        Figure(
            "B8",
            "store size per device, with retention (flat: the newest decisions of each SIM)",
            pruned.sizes[-1] / devices / 1024,
            "KB",
        )
    )
    report.add(
        Figure(
            "B8",
            "longest retention batch (a poll waits at most this)",
            pruned.longest_batch * 1000,
            "ms",
            target=f"≤ {LONGEST_BATCH_MS:.0f} ms",
            passed=pruned.longest_batch * 1000 <= LONGEST_BATCH_MS,
        )
    )


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds % 86400 == 0:
        return f"{seconds // 86400}d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    return f"{seconds // 60}m"
