"""The one clock. What "now" is comes from a `Clock`, passed in by whoever builds a part:
the daemon and the commands pass `system_clock`; tests pass a `FixedClock` and move it.
No other module asks the system for the time of day (the store included: it records the
"now" its caller gives it). Durations measured on the spot use `time.monotonic`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


class FixedClock:
    """A clock that stands still until moved: `clock.now = ...` or `clock.advance(...)`."""

    def __init__(self, now: datetime) -> None:
        if now.tzinfo is None:
            raise ValueError("a clock tells time in UTC: give an aware datetime")
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> datetime:
        self.now += by
        return self.now
