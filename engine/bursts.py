"""One log line per burst of like events, not one per event.

A client with a wrong secret, a flood of connections or a scanner repeats the same refusal
thousands of times a minute; a line for each would bury everything else in the log and cost
more than the refusal itself. `Bursts` logs the first event of a burst at once, with its
details, counts the ones that follow for `window` seconds, and then logs how many there were,
by reason, in one line. The next event after that starts a new burst.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import structlog

_log = structlog.get_logger(__name__)

DEFAULT_WINDOW = 10.0


class Bursts:
    def __init__(
        self,
        summary: str,
        *,
        window: float = DEFAULT_WINDOW,
        level: str = "warning",
        logger: Any = None,
    ) -> None:
        """`summary` is the message of the line that counts a burst's followers."""
        self.summary = summary
        self.window = window
        self._level = level
        self._logger = logger if logger is not None else _log
        self._counts: Counter[str] | None = None  # None: no burst open
        self._timer: asyncio.TimerHandle | None = None

    def note(self, message: str, reason: str, **fields: Any) -> None:
        """One event: logged as `message` when it opens a burst, else only counted."""
        if self._counts is not None:
            self._counts[reason] += 1
            return
        self._emit(message, reason=reason, **fields)
        self._counts = Counter()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # outside a loop the summary waits for `flush`
        self._timer = loop.call_later(self.window, self.flush)

    def flush(self) -> None:
        """End the burst now: log its followers, if there were any."""
        counts, self._counts = self._counts, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if counts:
            self._emit(
                self.summary,
                count=sum(counts.values()),
                seconds=self.window,
                reasons=dict(counts.most_common()),
            )

    def _emit(self, message: str, **fields: Any) -> None:
        getattr(self._logger, self._level)(message, **fields)
