"""The Event API poller.

The API has no "events after id X" cursor, only a `from`/`until` time window, and events
can land in its store a little late. So each poll asks for `[cursor − overlap, now]`, walks
the pages of that fixed window, drops ids already seen, and hands the rest on in
(timestamp, id) order. A long outage is caught up in windows of at most `max_window`, each
committed with its own cursor, so progress survives a crash half-way through a backlog.

While one window of a backlog is judged and committed, the next window's first page is
already on its way: the API works on it meanwhile. Windows are still committed one after the
other, in order; a fetched window that was not committed is simply asked for again.

The very first start reads back `initial_lookback` and no further: the overlap would
otherwise reach before it, and act on events from before the engine ever ran. The first
start's point is kept in the store (meta `poll_floor`), and no window starts before it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog

from engine.clock import Clock, system_clock
from engine.emnify import EventPage, LoginError
from engine.errors import ApiError, StoreError
from engine.pipeline import BatchResult, Pipeline, dedup_horizon

if TYPE_CHECKING:
    from engine.emnify import EmnifyClient
    from engine.ports import Meta

_log = structlog.get_logger(__name__)

RETENTION = timedelta(days=30)
POLL_FLOOR = "poll_floor"  # meta key: the first start minus initial_lookback
# emnify blocks an application token for 5 minutes after 3 failed logins in a row; polling
# on through that would only extend the block.
LOGIN_REFUSED_PAUSE = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class PollerSettings:
    interval: timedelta = timedelta(seconds=10)
    overlap: timedelta = timedelta(seconds=120)
    initial_lookback: timedelta = timedelta(0)
    max_window: timedelta = timedelta(hours=1)
    per_page: int | None = None
    # A backlog of many windows logs how far it has got this often (wall-clock time).
    progress_every: timedelta = timedelta(seconds=10)


@dataclass(slots=True)
class PollResult:
    windows: int = 0
    pages: int = 0
    fetched: int = 0
    new_events: int = 0
    matches: int = 0
    intents: int = 0
    cursor: datetime | None = None


class Poller:
    def __init__(
        self,
        client: EmnifyClient,
        pipeline: Pipeline,
        settings: PollerSettings,
        *,
        meta: Meta,
        clock: Clock = system_clock,
        on_batch: Callable[[BatchResult], None] | None = None,
    ):
        """`meta`: where the cursor is read from (the pipeline commits it with each
        window) and the first start's point is kept."""
        self.client = client
        self.pipeline = pipeline
        self.meta = meta
        self.settings = settings
        self.clock = clock
        self.on_batch = on_batch
        self.last_success: float | None = None  # monotonic time of the last good poll
        self.last_error: str | None = None
        self._paused_until: datetime | None = None
        self._floor: datetime | None = None
        self._floor_read = False

    async def poll_once(self) -> PollResult:
        """One poll: every window from the cursor up to now. Errors are logged, not raised,
        so the scheduler keeps polling; the cursor only moves past committed windows."""
        result = PollResult()
        if self._paused_until is not None and self.clock() < self._paused_until:
            return result
        self._paused_until = None
        try:
            await self._poll(result)
        except LoginError as error:
            self.last_error = str(error)
            if error.status in (401, 403):
                self._paused_until = self.clock() + LOGIN_REFUSED_PAUSE
                _log.error(
                    "the application token was refused; polling pauses for 5 minutes",
                    error=str(error),
                    resume_at=self._paused_until.isoformat(),
                )
            else:
                _log.error("login failed; will try again at the next interval", error=str(error))
        except (ApiError, StoreError) as error:
            self.last_error = str(error)
            _log.error("poll failed; will try again at the next interval", error=str(error))
        except Exception as error:  # a bug: the daemon keeps polling, and says so once
            reason = f"internal error: {type(error).__name__}: {error}"
            repeated = reason == self.last_error
            self.last_error = reason
            _log.error(
                "poll failed; will try again at the next interval",
                error=reason,
                exc_info=not repeated,
            )
        else:
            self.last_success = time.monotonic()
            self.last_error = None
        return result

    async def _poll(self, result: PollResult) -> None:
        now = self.clock().replace(microsecond=0)
        store = self.meta
        cursor = store.get_cursor()
        if cursor is None:
            cursor = now - self.settings.initial_lookback
            # Persist both at once: with no lookback there is no window to commit yet, and
            # the next poll must still start from here, not from its own "now". The floor
            # first: a crash in between only starts the engine afresh.
            store.set_meta(POLL_FLOOR, cursor.isoformat())
            store.set_meta("cursor", cursor.isoformat())
            self._floor, self._floor_read = cursor, True
            _log.info("first start: polling from", start=cursor.isoformat())
        oldest = now - RETENTION
        floor = self._poll_floor()
        if cursor < oldest:
            _log.error(
                "the cursor is older than the Event API's 30-day retention: events were lost",
                cursor=cursor.isoformat(),
                lost_from=cursor.isoformat(),
                lost_until=oldest.isoformat(),
            )
            cursor = oldest
        windows = self._windows(cursor, now, max(oldest, floor) if floor else oldest)
        progress = _CatchUp(windows, self.settings.progress_every) if len(windows) > 1 else None
        ahead: asyncio.Task[list[EventPage]] | None = None
        try:
            for index, (start, end) in enumerate(windows):
                pages = await self._fetch(start, end) if ahead is None else await ahead
                ahead = None
                if index + 1 < len(windows):
                    ahead = await self._fetch_ahead(*windows[index + 1])
                self._process(pages, end, result)
                result.cursor = cursor = end
                if progress is not None:
                    progress.window_done(index + 1, result)
        finally:
            if ahead is not None:
                await _abandon(ahead)
        self.pipeline.store.prune_seen(cursor - dedup_horizon(self.settings.overlap))
        if result.fetched or result.windows:
            _log.info(
                "poll done",
                windows=result.windows,
                pages=result.pages,
                fetched=result.fetched,
                new=result.new_events,
                matched=result.matches,
                intents=result.intents,
            )

    def _poll_floor(self) -> datetime | None:
        """The first start's point (None for a store from before it was kept)."""
        if not self._floor_read:
            value = self.meta.get_meta(POLL_FLOOR)
            self._floor = datetime.fromisoformat(value) if value else None
            self._floor_read = True
        return self._floor

    def _windows(
        self, cursor: datetime, now: datetime, oldest: datetime
    ) -> list[tuple[datetime, datetime]]:
        """(start, end) of each window from the cursor to now: ends `max_window` apart, each
        start reaching `overlap` back for late events, but not past `oldest` (the retention,
        or the first start's floor)."""
        windows = []
        while cursor < now:
            end = min(now, cursor + self.settings.max_window)
            windows.append((max(cursor - self.settings.overlap, oldest), end))
            cursor = end
        return windows

    async def _fetch(
        self, start: datetime, end: datetime, on_underway: Callable[[], None] | None = None
    ) -> list[EventPage]:
        return [
            page
            async for page in self.client.iter_event_pages(
                start, end, sort="id", per_page=self.settings.per_page, on_underway=on_underway
            )
        ]

    async def _fetch_ahead(self, start: datetime, end: datetime) -> asyncio.Task[list[EventPage]]:
        """Start fetching a window; return once its first request is under way (or the fetch
        is over), so that judging the window before it does not hold the request back."""
        underway = asyncio.get_running_loop().create_future()

        def mark() -> None:
            if not underway.done():
                underway.set_result(None)

        task = asyncio.create_task(self._fetch(start, end, mark))
        try:
            await asyncio.wait((underway, task), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await _abandon(task)
            raise
        finally:
            underway.cancel()
        return task

    def _process(self, pages: list[EventPage], end: datetime, result: PollResult) -> None:
        records = [event for page in pages for event in page.events]
        result.pages += len(pages)
        result.fetched += len(records)
        batch = self.pipeline.process(records, source="poller", cursor=end)
        result.windows += 1
        result.new_events += batch.new_events
        result.matches += batch.matches
        result.intents += batch.intents_created
        if self.on_batch:
            self.on_batch(batch)


class _CatchUp:
    """Progress through a backlog of many windows, logged now and then: a catch-up after a
    long outage may take minutes, and should not look like a hung daemon meanwhile."""

    def __init__(self, windows: list[tuple[datetime, datetime]], every: timedelta):
        self.total = len(windows)
        self.every = every.total_seconds()
        self.started = self.reported = time.monotonic()
        _log.info(
            "catching up a backlog",
            windows=self.total,
            start=windows[0][0].isoformat(),
            until=windows[-1][1].isoformat(),
        )

    def window_done(self, done: int, result: PollResult) -> None:
        now = time.monotonic()
        if done == self.total or now - self.reported < self.every:
            return  # the last window is reported by "poll done"
        self.reported = now
        elapsed = max(now - self.started, 1e-6)
        _log.info(
            "catch-up progress",
            windows=f"{done}/{self.total}",
            cursor=result.cursor.isoformat() if result.cursor else None,
            new=result.new_events,
            events_per_second=round(result.new_events / elapsed),
            eta_seconds=round(elapsed / done * (self.total - done)),
        )


async def _abandon(task: asyncio.Task[list[EventPage]]) -> None:
    """Stop a fetch whose window will not be judged in this poll, and wait for it to end."""
    task.cancel()
    await asyncio.wait((task,))
    if not task.cancelled():
        task.exception()  # retrieved: the poll has already failed for its own reason
