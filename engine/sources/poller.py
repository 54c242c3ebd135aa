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

`Poller` is the polling itself (driven bare by its tests and benchmark B2); `PollerSource`
is the `poller` source the daemon runs: a scheduler job every `interval`, its metrics, the
last poll's outcome for `event-engine status`, and its line in `/readyz`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import orjson
import structlog
from apscheduler.jobstores.base import JobLookupError

from engine.clock import Clock, system_clock
from engine.emnify import EventPage, LoginError
from engine.errors import ApiError, ConfigError, EventFormatError, StoreError
from engine.events import parse_timestamp
from engine.lookups import LookupTable
from engine.pipeline import dedup_horizon
from engine.sources.base import (
    Check,
    Ingest,
    LookUp,
    SettingsSection,
    Source,
    SourceContext,
    SourceStore,
)
from engine.state import format_duration

if TYPE_CHECKING:
    from apscheduler.job import Job

    from engine.emnify import EmnifyClient

_log = structlog.get_logger(__name__)

RETENTION = timedelta(days=30)
POLL_FLOOR = "poll_floor"  # meta key: the first start minus initial_lookback
# emnify blocks an application token for 5 minutes after 3 failed logins in a row; polling
# on through that would only extend the block.
LOGIN_REFUSED_PAUSE = timedelta(minutes=5)
# `/readyz` calls the poller stale when its last good poll is older than this many intervals.
POLL_STALE_AFTER_INTERVALS = 3


@dataclass(frozen=True, slots=True)
class PollerSettings:
    interval: timedelta = timedelta(seconds=10)
    overlap: timedelta = timedelta(seconds=120)
    initial_lookback: timedelta = timedelta(0)
    max_window: timedelta = timedelta(hours=1)
    per_page: int | None = None  # None: the client's (`api.per_page`)
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
        ingest: Ingest,
        settings: PollerSettings,
        *,
        store: SourceStore,
        clock: Clock = system_clock,
        look_up: LookUp | None = None,
    ):
        """`ingest`: where each window's events go, committed with the window's end as the
        cursor (`SourceContext.ingest`, or a bare `Pipeline.process`). `store`: where the
        cursor is read from and the first start's point is kept. `look_up`: fetches the
        facts rules look up for a window's events before it is judged (its budget bounds
        how long a window of a catch-up waits for them)."""
        self.client = client
        self.ingest = ingest
        self.look_up = look_up
        self.store = store
        self.settings = settings
        self.clock = clock
        self.last_success: float | None = None  # monotonic time of the last good poll
        self.last_error: str | None = None
        # When a poll last found events no other source had delivered (the Data Streamer's
        # health: `engine.health`).
        self.last_fresh_at: datetime | None = None
        self._paused_until: datetime | None = None
        # The organisation polled (`organisations:`; "" the single one), for its log lines.
        self.organisation = ""
        self._floor: datetime | None = None
        self._floor_read = False
        # The newest event time the API has shown: proof that it lets us see up to there.
        self._newest_seen: datetime | None = None

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
                    **self._whose(),
                )
            else:
                _log.error(
                    "login failed; will try again at the next interval",
                    error=str(error),
                    **self._whose(),
                )
        except (ApiError, StoreError) as error:
            self.last_error = str(error)
            _log.error(
                "poll failed; will try again at the next interval",
                error=str(error),
                **self._whose(),
            )
        except Exception as error:  # a bug: the daemon keeps polling, and says so once
            reason = f"internal error: {type(error).__name__}: {error}"
            repeated = reason == self.last_error
            self.last_error = reason
            _log.error(
                "poll failed; will try again at the next interval",
                error=reason,
                exc_info=not repeated,
                **self._whose(),
            )
        else:
            self.last_success = time.monotonic()
            self.last_error = None
        return result

    def _whose(self) -> dict[str, str]:
        """The organisation polled, for log lines (none for the single one)."""
        return {"organisation": self.organisation} if self.organisation else {}

    @property
    def paused_until(self) -> datetime | None:
        """Until when polling pauses because the application token was refused."""
        if self._paused_until is not None and self.clock() < self._paused_until:
            return self._paused_until
        return None

    async def _poll(self, result: PollResult) -> None:
        now = self.clock().replace(microsecond=0)
        store = self.store
        cursor = store.get_cursor()
        if cursor is None:
            cursor = now - self.settings.initial_lookback
            # Persist both at once: with no lookback there is no window to commit yet, and
            # the next poll must still start from here, not from its own "now". The floor
            # first: a crash in between only starts the engine afresh.
            store.set_meta(POLL_FLOOR, cursor.isoformat())
            # An empty batch: the cursor is committed as every window's is (under the
            # leader lease, which a paused leader no longer holds).
            self.ingest([], source=PollerSource.name, cursor=cursor)
            self._floor, self._floor_read = cursor, True
            _log.info("first start: polling from", start=cursor.isoformat(), **self._whose())
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
                lookups = None
                if self.look_up is not None:
                    lookups = await self.look_up([e for page in pages for e in page.events])
                self._process(pages, end, result, lookups)
                result.cursor = cursor = end
                if progress is not None:
                    progress.window_done(index + 1, result)
        finally:
            if ahead is not None:
                await _abandon(ahead)
        self.store.prune_seen(cursor - dedup_horizon(self.settings.overlap))  # its own ids
        if result.fetched or result.windows:
            # A poll that found nothing new (the overlap re-read what was seen) says so at
            # debug: at info it would be a line every interval, day and night.
            log = _log.info if result.new_events else _log.debug
            log(
                "poll done",
                windows=result.windows,
                pages=result.pages,
                fetched=result.fetched,
                new=result.new_events,
                matched=result.matches,
                intents=result.intents,
                **self._whose(),
            )

    def _poll_floor(self) -> datetime | None:
        """The first start's point (None for a store from before it was kept)."""
        if not self._floor_read:
            value = self.store.get_meta(POLL_FLOOR)
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

    def _process(
        self,
        pages: list[EventPage],
        end: datetime,
        result: PollResult,
        lookups: LookupTable | None = None,
    ) -> None:
        records = [event for page in pages for event in page.events]
        result.pages += len(pages)
        result.fetched += len(records)
        batch = self.ingest(
            records,
            source=PollerSource.name,
            cursor=end,
            complete=self._complete(records, end),
            lookups=lookups,
        )
        if batch.new_events:
            self.last_fresh_at = self.clock()
        result.windows += 1
        result.new_events += batch.new_events
        result.matches += batch.matches
        result.intents += batch.intents_created

    def _complete(self, records: list[object], end: datetime) -> datetime | None:
        """Event time known to be complete once this window is committed: the window's end
        minus the overlap (events may land in the API that much late), but no later than
        the newest event the API has shown. An empty answer may mean "nothing happened" or
        "we may not see" (emnify answers some list calls with 200 `[]` when access is
        missing): it proves nothing, so it does not move complete time; absence rules then
        take nothing for silence. None before the API has shown any event."""
        for record in records:
            at = _timestamp_of(record)
            if at is not None and (self._newest_seen is None or at > self._newest_seen):
                self._newest_seen = at
        if self._newest_seen is None:
            return None
        return min(end - self.settings.overlap, self._newest_seen)


def _timestamp_of(record: object) -> datetime | None:
    """A raw record's timestamp, or None when it has none readable (the pipeline
    quarantines such a record)."""
    if not isinstance(record, dict):
        return None
    try:
        return parse_timestamp(record.get("timestamp"))
    except EventFormatError:
        return None


class PollerSource(Source[PollerSettings], name="poller"):
    """The poller as the daemon runs it (see the module docstring)."""

    leader_only = True  # one poller per cluster, under the leader lease
    tells_complete_time = True  # its cursor minus the overlap: every event up to it is read
    per_organisation = True  # each organisation's events, with its token and cursor

    @classmethod
    def read_settings(cls, section: SettingsSection, *, enabled: bool) -> PollerSettings:
        defaults = PollerSettings()
        settings = PollerSettings(
            interval=section.duration("interval", defaults.interval),
            overlap=section.duration("overlap", defaults.overlap),
            initial_lookback=section.duration("initial_lookback", defaults.initial_lookback),
            max_window=section.duration("max_window", defaults.max_window),
        )
        if settings.interval < timedelta(seconds=1):
            raise ConfigError(
                f"`{section.name}.interval` must be at least 1s", section.where("interval")
            )
        return settings

    def __init__(self, settings: PollerSettings, context: SourceContext) -> None:
        super().__init__(settings, context)
        self.poller = Poller(
            context.client,
            context.ingest,
            settings,
            store=context.store,
            clock=context.clock,
            look_up=context.look_up,
        )
        self.poller.organisation = context.organisation
        self.polls = 0
        self._job: Job | None = None
        self._polling: asyncio.Task[object] | None = None
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        self._job = self.context.scheduler.add_job(
            self.poll,
            "interval",
            seconds=self.settings.interval.total_seconds(),
            next_run_time=self.context.clock(),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            id=f"poll:{self.context.organisation}" if self.context.organisation else "poll",
            replace_existing=True,
        )
        _log.debug(  # the start-up block says so already
            "polling the Event API",
            interval=format_duration(self.settings.interval),
            overlap=format_duration(self.settings.overlap),
        )

    def startup_line(self) -> str:
        every = format_duration(self.settings.interval)
        overlap = format_duration(self.settings.overlap)
        organisation = self.context.organisation
        whose = f" of organisation {organisation}" if organisation else ""
        return f"{self.name}{whose} (every {every}, overlap {overlap})"

    async def poll(self) -> PollResult | None:
        """The scheduler's job: one poll, timed and counted, its outcome kept in the store
        for `event-engine status`. None when it fired as the daemon began to stop."""
        if self._stopping:
            return None
        self._polling = asyncio.current_task()
        started = time.monotonic()
        result = await self.poller.poll_once()
        ok = self.poller.last_error is None
        self.context.metrics.observe_poll(ok, time.monotonic() - started)
        if self.context.organisation:
            self.context.metrics.observe_organisation_poll(
                self.context.organisation, ok, paused=self.poller.paused_until is not None
            )
        self.polls += 1
        self._remember(ok, result.fetched)
        return result

    def _remember(self, ok: bool, fetched: int) -> None:
        now = self.context.clock().isoformat()
        error = self.poller.last_error
        record: dict[str, object] = {"at": now, "ok": ok, "fetched": fetched, "error": error}
        paused = self.poller.paused_until
        if paused is not None:
            record["paused_until"] = paused.isoformat()
        with contextlib.suppress(StoreError):  # the poll itself has logged a broken store
            self.context.store.set_meta("last_poll", orjson.dumps(record).decode())
            if ok:
                self.context.store.set_meta("last_poll_ok", now)

    async def stop(self) -> None:
        """No more polls; the one under way finishes (its window is committed or not at
        all), unless the daemon's grace runs out first and cancels this."""
        self._stopping = True
        job, self._job = self._job, None
        if job is not None:
            with contextlib.suppress(JobLookupError):
                job.remove()
        await asyncio.sleep(0.05)  # a poll that fired this instant sees `_stopping`
        polling = self._polling
        if polling is None or polling.done():
            return
        try:
            await asyncio.wait((polling,))
        except asyncio.CancelledError:
            polling.cancel()  # its window is polled again at the next start
            raise

    def readiness(self) -> Check:
        """Ready while the last successful poll is at most a few intervals old. With
        `organisations:`, one check per organisation (`poll:acme`), naming it when its
        token was refused and its polling paused."""
        poller = self.poller
        organisation = self.context.organisation
        name = f"poll:{organisation}" if organisation else "poll"
        paused = poller.paused_until
        if organisation and paused is not None:
            return Check(
                name,
                False,
                f"organisation {organisation} paused until {paused.isoformat()}: its application"
                f" token was refused ({poller.last_error})",
            )
        limit = POLL_STALE_AFTER_INTERVALS * self.settings.interval.total_seconds()
        if poller.last_success is None:
            reason = f"last poll failed: {poller.last_error}" if poller.last_error else "not yet"
            return Check(name, False, f"no successful poll yet ({reason})")
        age = time.monotonic() - poller.last_success
        if age > limit:
            why = f"; last error: {poller.last_error}" if poller.last_error else ""
            return Check(
                name, False, f"last successful poll {age:.0f}s ago (limit {limit:.0f}s){why}"
            )
        return Check(name, True, f"last successful poll {age:.1f}s ago")


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
