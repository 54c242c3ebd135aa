"""Events and actions a minute, for the overview's chart: the daemon's own counters
(`engine.metrics`), read once a minute and kept for the last hours in memory.

Counters rather than the audit log: they cost nothing to read, and they count what this
instance did (the chart of a cluster member is that member's). A restart starts the chart
afresh, as it does the counters.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import pairwise

from prometheus_client import CollectorRegistry

KEPT_MINUTES = 180
_EVENTS = "event_engine_events_new_total"
_ACTIONS = "event_engine_actions_total"


@dataclass(frozen=True, slots=True)
class Minute:
    at: float  # the end of the minute, seconds since the epoch
    events: float
    actions: float


class Rates:
    def __init__(self, registry: CollectorRegistry, kept: int = KEPT_MINUTES) -> None:
        self._registry = registry
        self._totals: deque[tuple[float, float, float]] = deque(maxlen=kept + 1)

    def sample(self, now: float) -> None:
        """Note the counters' totals at `now` (called once a minute)."""
        events = actions = 0.0
        for metric in self._registry.collect():
            for sample in metric.samples:
                if sample.name == _EVENTS:
                    events += sample.value
                elif sample.name == _ACTIONS:
                    actions += sample.value
        self._totals.append((now, events, actions))

    def minutes(self) -> list[Minute]:
        """What each minute between two samples added, oldest first."""
        totals = list(self._totals)
        return [
            Minute(at=now, events=max(events - e0, 0.0), actions=max(actions - a0, 0.0))
            for (_, e0, a0), (now, events, actions) in pairwise(totals)
        ]


def chart(minutes: list[Minute], width: int = 600, height: int = 80) -> dict[str, object]:
    """Bars for the template's inline SVG: one pair a minute, scaled to the busiest."""
    peak = max([1.0, *(m.events for m in minutes), *(m.actions for m in minutes)])
    step = width / max(len(minutes), 1)
    bars = []
    for position, minute in enumerate(minutes):
        x = position * step
        for offset, value, kind in (
            (0.0, minute.events, "events"),
            (0.5, minute.actions, "actions"),
        ):
            tall = value / peak * height
            bars.append(
                {
                    "x": round(x + offset * step, 1),
                    "y": round(height - tall, 1),
                    "width": round(max(step / 2 - 0.5, 0.5), 1),
                    "height": round(tall, 1),
                    "kind": kind,
                    "value": int(value),
                }
            )
    return {
        "width": width,
        "height": height,
        "peak": int(peak),
        "bars": bars,
        "minutes": len(minutes),
        "events": int(sum(m.events for m in minutes)),
        "actions": int(sum(m.actions for m in minutes)),
    }
