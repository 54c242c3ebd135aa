"""The daemon: wires store, client, pipeline, poller, dispatcher and scheduler, and runs them
until told to stop. `run` and `demo` both come through here.

It starts only on a store that passes SQLite's integrity check (a damaged file is an error
that names it and says what to do), and keeps going when the store fails under it: the
dispatcher is run again after a failure rather than left dead, and errors nobody awaited
reach the log as one line per burst, not as a traceback each."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from engine.bursts import Bursts
from engine.clock import Clock, system_clock
from engine.config import Config
from engine.dispatch import Dispatcher
from engine.emnify import EmnifyClient
from engine.errors import StoreError
from engine.metrics import Metrics
from engine.pipeline import BatchResult, Pipeline
from engine.retention import Retention
from engine.rules import RuleSet
from engine.sources.poller import Poller
from engine.state import format_duration
from engine.store import SqliteStore

_log = structlog.get_logger(__name__)

SHUTDOWN_GRACE = 8.0  # seconds in-flight work gets after SIGTERM; the unit allows 10
# Seconds the start-up integrity check may read the store for (it reads every page).
INTEGRITY_CHECK_BUDGET = 15.0
DISPATCH_RETRY = 5.0  # seconds between the dispatcher's attempts while the store fails


@dataclass(slots=True)
class Summary:
    """What a run did, for the closing lines of `demo` and `run`."""

    polls: int = 0
    events_polled: int = 0
    new_events: int = 0
    matches_by_rule: Counter[str] = field(default_factory=Counter)
    actions: Counter[tuple[str, str]] = field(default_factory=Counter)
    new_events_by_source: Counter[str] = field(default_factory=Counter)

    def add_batch(self, batch: BatchResult, source: str = "poller") -> None:
        self.new_events += batch.new_events
        self.new_events_by_source[source] += batch.new_events
        self.matches_by_rule.update(batch.matched_rules)


class Service(Protocol):
    """Something that runs beside the poller for the daemon's lifetime (an HTTP server, a
    rule-file watcher, ...). `start` returns once it is running; `stop` within the grace."""

    async def start(self, daemon: Daemon) -> None: ...

    async def stop(self) -> None: ...


class Daemon:
    def __init__(
        self,
        config: Config,
        rules: RuleSet,
        application_token: str,
        *,
        services: Sequence[Service] = (),
        client: EmnifyClient | None = None,
        clock: Clock = system_clock,
    ):
        """`client`: the one start-up fetched the event-type catalog with, so the daemon
        goes on with its login instead of logging in a second time (closed with the daemon).
        `clock`: what every part of the daemon takes "now" from."""
        self.clock = clock
        # The store's retention runs beside every daemon: its size stays bounded.
        self.services = [*services, Retention(config.retention, clock=clock)]
        self.config = config
        self.store = _checked_store(config.store_path)
        self.metrics = Metrics(clock=clock)
        self.client = client or EmnifyClient(application_token, config.api)
        self.client.observe_responses(self.metrics.observe_api)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0))
        self.pipeline = Pipeline(
            rules,
            self.store,
            dry_run=config.dry_run,
            max_actions=config.guard_max_actions,
            clock=clock,
        )
        self.summary = Summary()
        self.dispatcher = Dispatcher(
            self.store,
            self.client,
            self.http,
            policy=config.retry,
            concurrency=config.concurrency,
            webhook_concurrency=config.webhook_concurrency,
            webhook_per_host=config.webhook_per_host,
            clock=clock,
            on_outcome=self._action_finished,
            on_attempt=self.metrics.observe_attempt,
        )
        self.metrics.watch_store(self.store)
        self.poller = Poller(
            self.client,
            self.pipeline,
            config.poller,
            meta=self.store,
            clock=clock,
            on_batch=self._after_batch,
        )
        self._poll_task: asyncio.Task[Any] | None = None
        # Services may add their own jobs (digests, catalog refresh) before `run` starts it.
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self._stopping = False
        self._dispatch_failures = Bursts("the dispatcher still fails", window=60.0, level="error")
        self._loop_errors = Bursts("more unexpected errors in the event loop", level="error")

    def _after_batch(self, batch: BatchResult) -> None:
        self.record_batch(batch, source="poller")

    def record_batch(self, batch: BatchResult, *, source: str) -> None:
        """A source committed a batch: count it and let the dispatcher see its intents."""
        self.summary.add_batch(batch, source)
        self.metrics.observe_batch(batch, source)
        log_would_have_acted(batch)
        if batch.intents_created:
            self.dispatcher.wake()

    def _action_finished(self, kind: str, outcome: str) -> None:
        self.summary.actions.update([(kind, outcome.split(" ")[0])])
        self.metrics.observe_action(kind, outcome)

    async def _poll_job(self) -> None:
        if self._stopping:  # fired just as the shutdown began
            return
        self._poll_task = asyncio.current_task()
        started = time.monotonic()
        result = await self.poller.poll_once()
        ok = self.poller.last_error is None
        self.metrics.observe_poll(ok, time.monotonic() - started)
        self.summary.polls += 1
        self.summary.events_polled += result.fetched
        self._remember_poll(ok, result.fetched)

    def _remember_poll(self, ok: bool, fetched: int) -> None:
        """Keep the last poll's outcome in the store, for `event-engine status`."""
        now = self.clock().isoformat()
        record = {"at": now, "ok": ok, "fetched": fetched, "error": self.poller.last_error}
        with contextlib.suppress(StoreError):  # the poll itself has logged a broken store
            self.store.set_meta("last_poll", orjson.dumps(record).decode())
            if ok:
                self.store.set_meta("last_poll_ok", now)

    async def run(self, stop: asyncio.Event) -> Summary:
        """Poll and dispatch until `stop` is set, then shut down within SHUTDOWN_GRACE."""
        scheduler = self.scheduler
        if "poller" in self.config.sources:
            scheduler.add_job(
                self._poll_job,
                "interval",
                seconds=self.config.poller.interval.total_seconds(),
                next_run_time=self.clock(),
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
                id="poll",
            )
        _log.info(
            "engine started",
            rules=len(self.pipeline.rules.rules),
            api=self.config.api.base_url,
            store=str(self.config.store_path),
            interval=format_duration(self.config.poller.interval),
            sources=",".join(self.config.sources),
            dry_run=self.config.dry_run,
        )
        scheduler.start()
        loop = asyncio.get_running_loop()
        loop_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_error)
        dispatching = asyncio.create_task(self._dispatch(stop), name="dispatcher")
        started: list[Service] = []
        try:
            for service in self.services:
                await service.start(self)
                started.append(service)
            await stop.wait()
        finally:
            for service in reversed(started):
                await service.stop()
            _log.info("shutting down: polling stopped, finishing in-flight actions")
            self._stopping = True
            scheduler.pause()
            await asyncio.sleep(0.05)  # let a job that fired this instant see `_stopping`
            # The scheduler's shutdown cancels running jobs: let the current poll finish first.
            await self._drain(dispatching)
            scheduler.shutdown(wait=False)
            await self.aclose()
            self._dispatch_failures.flush()
            self._loop_errors.flush()
            loop.set_exception_handler(loop_handler)
        return self.summary

    async def _dispatch(self, stop: asyncio.Event) -> None:
        """Run the dispatcher until `stop`. When the store (or a bug) fails it, say so once a
        burst and run it again after a pause: the outbox keeps what it has not done."""
        while not stop.is_set():
            try:
                await self.dispatcher.run_forever(stop)
            except StoreError as error:
                self._dispatch_failures.note(
                    "the dispatcher cannot read the outbox; it tries again every "
                    f"{DISPATCH_RETRY:g}s",
                    "store",
                    error=str(error),
                )
            except Exception as error:
                self._dispatch_failures.note(
                    f"the dispatcher failed; it starts again in {DISPATCH_RETRY:g}s",
                    type(error).__name__,
                    exc_info=error,
                )
            else:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), DISPATCH_RETRY)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's last resort (an exception nobody awaited, accept() out of file
        descriptors): one line per burst, with the traceback of the first."""
        error = context.get("exception")
        self._loop_errors.note(
            str(context.get("message", "unexpected error in the event loop")),
            type(error).__name__ if error is not None else "error",
            exc_info=error,
        )

    async def _drain(self, dispatching: asyncio.Task[None]) -> None:
        pending = [t for t in (self._poll_task, dispatching) if t is not None and not t.done()]
        if not pending:
            return
        _, still = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still, timeout=1.0)
            _log.warning("in-flight work interrupted; it stays pending for the next start")

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.http.aclose()
        self.store.close()


def _checked_store(path: Path) -> SqliteStore:
    """The store at `path`, after SQLite's integrity check: StoreError when it is damaged."""
    store = SqliteStore(path)
    try:
        whole = store.check_integrity(INTEGRITY_CHECK_BUDGET)
    except StoreError:
        store.close()
        raise
    if not whole:
        _log.warning(
            "the store's integrity check ran out of time; the rest of the file is unchecked",
            store=str(path),
            seconds=INTEGRITY_CHECK_BUDGET,
            hint=f"check it all while the engine is stopped: sqlite3 {path} 'PRAGMA quick_check'",
        )
    return store


def log_would_have_acted(batch: BatchResult) -> None:
    """One line per action a shadow rule (or dry run, or a tripped guard) planned and will
    not run: what a live rule's "action done" is to its operator, once the batch is
    committed."""
    if not any(planned.shadow for planned in batch.planned):
        return
    reasons = {(d.event_id, d.rule_id): d.reason for d in batch.decisions if d.outcome == "shadow"}
    for planned in batch.planned:
        if planned.shadow:
            event = planned.event
            _log.info(
                "would have acted",
                rule=planned.rule.id,
                outcome="shadow",
                action=planned.action.kind,
                event_id=event.id,
                iccid=event.iccid,
                reason=reasons.get((event.id, planned.rule.id)),
                **({"due": planned.due.isoformat()} if planned.due else {}),
            )


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT ask for a graceful stop; a second SIGINT is not needed."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not possible outside the main thread or on Windows; Ctrl-C still works there.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


def hold_reloads_while_starting() -> None:
    """SIGHUP (`systemctl reload`) is the rule reloader's once it runs; until then it must
    not end the process, as its default action would: a reload right after a start, while
    the API was slow to answer the catalog's fetch, once did."""
    hangup = getattr(signal, "SIGHUP", None)  # not on Windows
    if hangup is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(hangup, _reload_while_starting)


def _reload_while_starting() -> None:
    _log.info("reload requested while starting: the rules just loaded are the ones in force")


async def stop_after(stop: asyncio.Event, duration: timedelta | None) -> None:
    if duration:
        try:
            await asyncio.wait_for(stop.wait(), duration.total_seconds())
        except TimeoutError:
            stop.set()
