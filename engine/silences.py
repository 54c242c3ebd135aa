"""The silences in force for the daemon's pipeline: the store's (`event-engine silence
add`, from any instance or the command line, so re-read) and the config's mute windows.

The store is read at most every `refresh` seconds (and at once when the silences read last
time change at a moment before then: one starts or ends), so a silence added while the
engine runs takes effect within seconds, without a restart, and a busy poller does not
read the table for every batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import structlog

from engine.model import Silence
from engine.ports import Silences
from engine.silencing import MuteCheck, Quiet

_log = structlog.get_logger(__name__)

# Silences that ended this long ago still silence a late event from while they held.
LOOK_BACK = timedelta(days=2)
REFRESH = timedelta(seconds=5)


class StoredSilences:
    """A `QuietSource` over a store's silences and the mute windows."""

    def __init__(
        self,
        store: Silences,
        windows: Sequence[MuteCheck] = (),
        *,
        refresh: timedelta = REFRESH,
    ):
        self.store = store
        self.windows = tuple(windows)
        self.refresh = refresh
        self._read_at: datetime | None = None
        self._silences: tuple[Silence, ...] = ()

    def __call__(self, now: datetime) -> Quiet:
        if self._read_at is None or not (self._read_at <= now < self._read_at + self.refresh):
            self._silences = tuple(self.store.silences(now - LOOK_BACK))
            self._read_at = now
        return Quiet(self._silences, now, self.windows)

    def forget(self) -> None:
        """Read the store again at the next batch (a silence was just added here)."""
        self._read_at = None
