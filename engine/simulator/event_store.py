"""The simulator's event log: every stored event, indexed by store order and by time.

A stored id may repeat: the admin API lets tests store a second copy of an event to simulate a
re-delivery. Both copies are then served, the way an at-least-once pipeline would show them.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.events import parse_timestamp


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event record and where it sits: `seq` is its position in store order."""

    id: int
    at_ms: int
    seq: int
    record: dict[str, Any]


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class EventIdSequence:
    """Hands out strictly increasing 64-bit ids with irregular gaps, like the real ones."""

    def __init__(self, first: int, seed: int) -> None:
        self._rng = random.Random(f"ids:{seed}")
        self._last = first - 1

    def next(self) -> int:
        self._last += self._rng.randint(1, 4096)
        return self._last

    def observe(self, event_id: int) -> None:
        """An id chosen by a caller: later ids must still be larger."""
        self._last = max(self._last, event_id)


class EventStore:
    """Not thread-safe on its own; `SimulatorState` holds the lock."""

    def __init__(self) -> None:
        self._entries: list[StoredEvent] = []
        self._by_time: list[tuple[int, int, int]] = []
        # Store positions keep counting across `clear()`, so a streamer's cursor stays valid.
        self._base = 0
        self.version = 0  # changes whenever the content does

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, record: dict[str, Any]) -> StoredEvent:
        at_ms = epoch_ms(parse_timestamp(record["timestamp"]))
        entry = StoredEvent(int(record["id"]), at_ms, self._base + len(self._entries), record)
        self._entries.append(entry)
        bisect.insort(self._by_time, (at_ms, entry.id, entry.seq))
        self.version += 1
        return entry

    def between(self, start_ms: int | None, end_ms: int) -> list[StoredEvent]:
        """Events with `start_ms <= at_ms <= end_ms`, in (timestamp, id) order."""
        low = 0 if start_ms is None else bisect.bisect_left(self._by_time, (start_ms, -1, -1))
        high = bisect.bisect_right(self._by_time, (end_ms, 2**63, 2**63))
        return [self._entries[seq - self._base] for _, _, seq in self._by_time[low:high]]

    def first_after(self, moment_ms: int) -> int | None:
        """The earliest timestamp after `moment_ms`: when the visible set grows next."""
        index = bisect.bisect_right(self._by_time, (moment_ms, 2**63, 2**63))
        return self._by_time[index][0] if index < len(self._by_time) else None

    @property
    def next_seq(self) -> int:
        return self._base + len(self._entries)

    def since(self, seq: int, limit: int) -> list[StoredEvent]:
        """Up to `limit` events from store position `seq` on, oldest first."""
        start = max(seq - self._base, 0)
        return self._entries[start : start + limit]

    def all_by_id(self) -> list[StoredEvent]:
        return sorted(self._entries, key=lambda e: (e.id, e.seq))

    def clear(self) -> None:
        self._base += len(self._entries)
        self.version += 1
        self._entries.clear()
        self._by_time.clear()
