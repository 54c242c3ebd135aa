"""The daemon: wires store, client, pipeline, sources, dispatcher and scheduler, and runs them
until told to stop. `run` and `demo` both come through here.

The sources are whatever the config lists under `sources:` (`engine.sources`): the daemon
builds, starts and stops each the same way, and every batch one hands over through `ingest`
is counted under its name and wakes the dispatcher. Sources and services see the daemon
through narrow Protocols (`engine.sources.base.SourceContext`,
`engine.services.ServiceContext`), so nothing but the CLI (and its demo) imports this module.

It starts only on a store that passes SQLite's integrity check (a damaged file is an error
that names it and says what to do), and keeps going when the store fails under it: the
dispatcher is run again after a failure rather than left dead, and errors nobody awaited
reach the log as one line per burst, not as a traceback each."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from engine import __version__
from engine import sources as source_registry
from engine.bursts import Bursts
from engine.clock import Clock, system_clock
from engine.config import Config
from engine.dispatch import Dispatcher
from engine.emitter import EngineEvents
from engine.emnify import EmnifyClient
from engine.engine_events import is_engine_event_id
from engine.errors import EngineError, StoreError
from engine.health import (
    HealthWatch,
    Heartbeat,
    StreamWatchdog,
    StreamWatchSettings,
)
from engine.leadership import Leadership, default_instance_id
from engine.lookup_fetch import LookupFetcher
from engine.lookups import LookupTable
from engine.metrics import Metrics
from engine.model import Intent
from engine.organisation_run import OrganisationContext, OrganisationRun
from engine.pipeline import BatchResult, Pipeline
from engine.ports import Store
from engine.retention import Retention
from engine.rules import RuleSet
from engine.services import Service
from engine.silences import StoredSilences
from engine.sources.base import Source
from engine.sources.streamer import StreamerSettings, StreamerSource
from engine.store import StoreSettings, open_store

_log = structlog.get_logger(__name__)

SHUTDOWN_GRACE = 8.0  # seconds in-flight work gets after SIGTERM; the unit allows 10
# Seconds the start-up integrity check may read the store for (it reads every page).
INTEGRITY_CHECK_BUDGET = 15.0
DISPATCH_RETRY = 5.0  # seconds between the dispatcher's attempts while the store fails


@dataclass(slots=True)
class Summary:
    """What a run did, for the closing lines of `demo` and `run`."""

    new_events: int = 0
    matches_by_rule: Counter[str] = field(default_factory=Counter)
    actions: Counter[tuple[str, str]] = field(default_factory=Counter)
    received_by_source: Counter[str] = field(default_factory=Counter)
    new_events_by_source: Counter[str] = field(default_factory=Counter)

    def add_batch(self, batch: BatchResult, source: str) -> None:
        self.new_events += batch.new_events
        self.received_by_source[source] += batch.received
        self.new_events_by_source[source] += batch.new_events
        self.matches_by_rule.update(batch.matched_rules)


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
        organisation_tokens: Mapping[str, str] | None = None,
    ):
        """`client`: the one start-up fetched the event-type catalog with, so the daemon
        goes on with its login instead of logging in a second time (closed with the daemon).
        `clock`: what every part of the daemon takes "now" from. `organisation_tokens`:
        with `organisations:` configured, each one's application token by name (the
        `client` given, if any, must be the first organisation's)."""
        # Before anything is opened: a listed source that cannot run (its secret unset).
        source_registry.check(config.sources, config.source_settings)
        self.clock = clock
        # The store's retention runs beside every daemon: its size stays bounded.
        self.services = [
            *services,
            Retention(config.retention, clock=clock),
            *_health_services(config),
        ]
        self.config = config
        # One id for the lease, the outbox's claims and the store's connections.
        instance_id = config.cluster.instance_id or default_instance_id()
        self.store = _checked_store(replace(config.store, instance_id=instance_id))
        self.metrics = Metrics(clock=clock)
        # What the engine says about itself, judged like any event (`engine.engine_events`).
        self.engine_events = EngineEvents(
            self.ingest,
            instance=instance_id,
            clock=clock,
            on_emitted=self.metrics.observe_engine_event,
        )
        self.organisations = _organisation_runs(
            config, organisation_tokens or {}, client, self.metrics
        )
        if self.organisations:
            # The first organisation's client stands for the engine where one is needed
            # (the catalog, the console); no action runs with it for another organisation.
            self.client = self.organisations[0].client
        else:
            self.client = client or EmnifyClient(application_token, config.api)
            self.client.observe_responses(self.metrics.observe_api)
        self.lookups = LookupFetcher(
            self.client, config.lookups, on_lookup=self.metrics.observe_lookup
        )
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0))
        self.pipeline = Pipeline(
            rules,
            self.store,
            dry_run=config.dry_run,
            max_actions=config.guard_max_actions,
            clock=clock,
            echoes=config.echoes,
            loop_breaker=config.loop_breaker,
            quiet=StoredSilences(self.store, config.mute_windows),
        )
        self.summary = Summary()
        self.leadership = Leadership(
            self.store,
            replace(config.cluster, instance_id=instance_id),
            clock=clock,
            rules_hash=lambda: self.pipeline.rules.fingerprint,
            on_gained=self._lead,
            on_lost=self._follow,
            on_change=self.metrics.observe_leadership,
        )
        self.dispatcher = Dispatcher(
            self.store,
            self.client,
            self.http,
            policy=config.retry,
            concurrency=config.concurrency,
            webhook_concurrency=config.webhook_concurrency,
            webhook_per_host=config.webhook_per_host,
            clock=clock,
            owner=self.leadership.instance_id,
            on_outcome=self._action_finished,
            on_dead_letter=self._dead_lettered,
            on_failed=self._action_failed,
            on_attempt=self.metrics.observe_attempt,
            # A store that takes calls from threads (PostgreSQL) gets the attempts' calls
            # off the event loop; SQLite's calls stay on it.
            store_threads=getattr(self.store, "thread_calls", 0),
            organisations={run.name: run.client for run in self.organisations}
            if self.organisations
            else None,
            on_organisation_outcome=self.metrics.observe_organisation_action,
        )
        self.metrics.watch_store(
            self.store,
            member_timeout=3 * config.cluster.lease_ttl.total_seconds(),
            organisations=[run.name for run in self.organisations],
        )
        # Services may add their own jobs (digests, catalog refresh) before `run` starts it.
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.sources: list[Source[Any]] = source_registry.build(
            config.sources, config.source_settings, self
        )
        if self.organisations:
            self.sources = self._per_organisation(self.sources)
        # What runs only while this instance leads (started and stopped as it gains and
        # loses the lease), and what is running of it now.
        self._leading_parts: list[Source[Any] | Service] = []
        self._leader_only_running = False
        if rules.has_absence and not any(s.tells_complete_time for s in self.sources):
            _log.warning(
                "absence rules never fire without a source that tells how far event time is"
                " complete: the Data Streamer promises no delivery time or order, so a quiet"
                " stream cannot be told from a silent device; add `poller` to `sources`",
                rules=[rule.id for rule in rules.absence_rules],
            )
        if rules.usage_rules and not any(s.delivers_usage for s in self.sources):
            _log.warning(
                "usage rules never fire without a source of usage records: add `data_streamer`"
                " to `sources` and stream usage records to it (data_stream_type 1)",
                rules=[rule.id for rule in rules.usage_rules],
            )
        self._dispatch_failures = Bursts("the dispatcher still fails", window=60.0, level="error")
        self._loop_errors = Bursts("more unexpected errors in the event loop", level="error")

    # -- what sources and services see (SourceContext, ServiceContext) -------------------------

    @property
    def dry_run(self) -> bool:
        return self.config.dry_run

    @property
    def organisation(self) -> str:
        """The daemon's own batches (pushes, engine events) are of no named organisation."""
        return ""

    def _per_organisation(self, sources: list[Source[Any]]) -> list[Source[Any]]:
        """The listed sources, each `per_organisation` one (the poller, the Data Streamer
        ingress) replaced by one per organisation over that organisation's context (its
        client, cursor, seen ids, ingress path: `engine.organisation_run`)."""
        wanted = self.pipeline.wanted_lookups
        contexts = [OrganisationContext(self, run, wanted) for run in self.organisations]
        found: list[Source[Any]] = []
        for source in sources:
            kind = type(source)
            if kind.per_organisation:
                found.extend(kind(source.settings, context) for context in contexts)
            else:
                found.append(source)
        return found

    @property
    def organisation_clients(self) -> Mapping[str, EmnifyClient]:
        return {run.name: run.client for run in self.organisations}

    @property
    def api_url(self) -> str:
        return self.config.api.base_url

    def source(self, name: str) -> Source[Any]:
        """The running source listed as `name` (EngineError when it is not listed)."""
        for source in self.sources:
            if source.name == name:
                return source
        listed = ", ".join(self.config.sources)
        raise EngineError(f"no {name} source in this daemon (sources: {listed})")

    def ingest(
        self,
        records: Sequence[object],
        *,
        source: str,
        cursor: datetime | None = None,
        complete: datetime | None = None,
        lookups: LookupTable | None = None,
        organisation: str = "",
    ) -> BatchResult:
        """A source's batch: judged and committed (a leader-only source's under the leader
        lease), then counted and the dispatcher woken. Complete time moves only under
        that lease: absence rules are judged once per cluster, by the leader.
        `organisation`: whose events these are (`organisations:`; "" the single one)."""
        fence = self.leadership.fence() if self._leader_only(source) else None
        batch = self.pipeline.process(
            records,
            source=source,
            cursor=cursor,
            fence=fence,
            complete=complete if fence is not None else None,
            lookups=lookups,
            organisation=organisation,
        )
        self.summary.add_batch(batch, source)
        self.metrics.observe_batch(batch, source)
        if organisation:
            self.metrics.observe_organisation_batch(batch, organisation)
        log_would_have_acted(batch)
        if batch.intents_created:
            self.dispatcher.wake()
        if batch.engine_events:  # the batch is committed: what the core drafted is said now
            self.engine_events.emit_drafts(batch.engine_events)
        return batch

    async def look_up(self, records: Sequence[object]) -> LookupTable | None:
        """The facts the rules' `lookup` lists need for `records` (`engine.lookup_fetch`:
        cached, within a budget per second and a bounded wait); None when no rule asks."""
        wanted = self.pipeline.wanted_lookups(records)
        if not wanted:
            return None
        return await self.lookups.fetch(wanted)

    def emit_engine_event(
        self,
        kind: str,
        *,
        detail: Mapping[str, Any] | None = None,
        sim: Mapping[str, Any] | None = None,
        endpoint: Mapping[str, Any] | None = None,
    ) -> None:
        """Say an engine event (`engine.engine_events`): judged like any other event."""
        self.engine_events.emit(kind, detail=detail, sim=sim, endpoint=endpoint)

    def wake_dispatcher(self) -> None:
        self.dispatcher.wake()

    @property
    def leading(self) -> bool:
        """Whether this instance holds the leader lease (one alone always does)."""
        return self.leadership.leading

    def _leader_only(self, source: str) -> bool:
        return any(s.leader_only for s in self.sources if s.name == source)

    async def _lead(self) -> None:
        """This instance gained the lease: start what runs on the leader only."""
        for part in self._leading_parts:
            if isinstance(part, Source):
                await part.start()
            else:
                await part.start(self)
        self._leader_only_running = True

    async def _follow(self) -> None:
        """This instance lost the lease: stop what runs on the leader only (a poll under
        way finishes; its commit is refused, as the lease has moved on)."""
        if not self._leader_only_running:
            return
        self._leader_only_running = False
        for part in reversed(self._leading_parts):
            try:
                await part.stop()
            except Exception as error:  # one part's trouble must not keep others running
                _log.error("a leader-only part failed to stop", exc_info=error)

    def _dead_lettered(self, intent: Intent, error: str | None) -> None:
        """An action gave up: say so as an engine event, unless the action was planned for
        an engine event itself (a dead receiver of engine events would feed itself)."""
        if is_engine_event_id(intent.event_id):
            return
        target = intent.target
        self.engine_events.emit(
            "action_dead_lettered",
            detail={
                "rule": intent.rule_id,
                "action": intent.kind,
                "intent_id": intent.id,
                "event_id": intent.event_id,
                "reason": error or "retries exhausted",
            },
            sim={"id": target["sim_id"], "iccid": target.get("iccid")}
            if target.get("sim_id")
            else None,
            endpoint={"id": target["endpoint_id"]} if target.get("endpoint_id") else None,
        )

    def _startup_block(self) -> dict[str, Any]:
        """The one start-up line: what runs, on which rules, store and address."""
        rules = self.pipeline.rules.rules
        enabled = sum(1 for rule in rules if rule.enabled)
        shadow = sum(1 for rule in rules if rule.enabled and rule.mode == "shadow")
        http = [getattr(s, "startup_line", None) for s in self.services]
        return {
            "version": __version__,
            "instance": self.leadership.instance_id,
            "sources": ", ".join(source.startup_line() for source in self.sources),
            "rules": f"{len(rules)} loaded from {self.config.rules} ({enabled} enabled"
            + (f", {shadow} in shadow mode)" if shadow else ")"),
            "store": self.config.store.where,
            "http": next((line() for line in http if line is not None), "off"),
            "api": self.config.api.base_url,
            **(
                {"organisations": ", ".join(run.name for run in self.organisations)}
                if self.organisations
                else {}
            ),
            **({"dry_run": True} if self.config.dry_run else {}),
            **({"mute_windows": len(self.config.mute_windows)} if self.config.mute_windows else {}),
        }

    def _action_failed(self, intent: Intent, error: str | None) -> None:
        """An action failed for good when it ran (a permanent error): said as an engine
        event, unless it was planned for an engine event itself (it would feed itself)."""
        if is_engine_event_id(intent.event_id):
            return
        target = intent.target
        self.engine_events.emit(
            "action_failed",
            detail={
                "rule": intent.rule_id,
                "action": intent.kind,
                "intent_id": intent.id,
                "event_id": intent.event_id,
                "reason": error or "failed",
                "stage": "run",
            },
            sim={"id": target["sim_id"], "iccid": target.get("iccid")}
            if target.get("sim_id")
            else None,
            endpoint={"id": target["endpoint_id"]} if target.get("endpoint_id") else None,
        )

    def _action_finished(self, kind: str, outcome: str) -> None:
        self.summary.actions.update([(kind, outcome.split(" ")[0])])
        self.metrics.observe_action(kind, outcome)

    async def run(self, stop: asyncio.Event) -> Summary:
        """Run the sources and dispatch until `stop` is set, then shut down within
        SHUTDOWN_GRACE. What runs on the leader only starts once this instance holds the
        leader lease (at once when it runs alone) and stops when it loses it."""
        scheduler = self.scheduler
        scheduler.start()
        loop = asyncio.get_running_loop()
        loop_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_error)
        dispatching = asyncio.create_task(self._dispatch(stop), name="dispatcher")
        everywhere_sources = [s for s in self.sources if not s.leader_only]
        everywhere = [s for s in self.services if not getattr(s, "leader_only", False)]
        self._leading_parts = [
            *[s for s in self.sources if s.leader_only],
            *[s for s in self.services if getattr(s, "leader_only", False)],
        ]
        started_sources: list[Source[Any]] = []
        started: list[Service] = []
        leadership_started = False
        try:
            for source in everywhere_sources:
                await source.start()
                started_sources.append(source)
            for service in everywhere:
                await service.start(self)
                started.append(service)
            _log.info("engine started", **self._startup_block())
            await self.leadership.start()
            leadership_started = True
            await stop.wait()
        finally:
            _log.info("shutting down: polling stopped, finishing in-flight actions")
            if leadership_started:
                leading = [s for s in self._leading_parts if isinstance(s, Source)]
                # Leader-only sources drain with the others; the lease is given up after.
                self._leading_parts = [s for s in self._leading_parts if not isinstance(s, Source)]
                if self._leader_only_running:
                    started_sources.extend(leading)
                await self._follow()
            for service in reversed(started):
                await service.stop()
            scheduler.pause()
            # The scheduler's shutdown cancels running jobs: let the sources' batches finish first.
            await self._drain(started_sources, dispatching)
            if leadership_started:
                await self.leadership.stop()
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

    async def _drain(self, sources: Sequence[Source[Any]], dispatching: asyncio.Task[None]) -> None:
        """Stop the sources (each lets its in-flight batch finish) while the dispatcher
        finishes its in-flight actions: all of it within SHUTDOWN_GRACE, then cancelled."""
        stopping = [
            asyncio.create_task(source.stop(), name=f"stop source {source.name}")
            for source in reversed(sources)
        ]
        pending = [*stopping, *([dispatching] if not dispatching.done() else [])]
        if not pending:
            return
        _, still = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still, timeout=1.0)
            _log.warning("in-flight work interrupted; it stays pending for the next start")
        for task, source in zip(stopping, reversed(sources), strict=True):
            if task.done() and not task.cancelled() and task.exception() is not None:
                _log.error("a source failed to stop", source=source.name, exc_info=task.exception())

    async def aclose(self) -> None:
        for run in self.organisations[1:]:  # the first one's client is `self.client`
            await run.client.aclose()
        await self.client.aclose()
        await self.http.aclose()
        self.store.close()


def _organisation_runs(
    config: Config,
    tokens: Mapping[str, str],
    first_client: EmnifyClient | None,
    metrics: Metrics,
) -> list[OrganisationRun]:
    """Each configured organisation's client (its own login and rate budget) and lookups."""
    runs: list[OrganisationRun] = []
    for index, organisation in enumerate(config.organisations):
        if index == 0 and first_client is not None:
            client = first_client
        else:
            token = tokens.get(organisation.name)
            if token is None:
                raise EngineError(
                    f"no application token given for organisation {organisation.name}"
                )
            client = EmnifyClient(token, organisation.api)
        client.observe_responses(metrics.organisation_api(organisation.name))
        lookups = LookupFetcher(client, config.lookups, on_lookup=metrics.observe_lookup)
        runs.append(OrganisationRun(organisation.name, client, lookups))
    return runs


def _health_services(config: Config) -> list[Service]:
    """The engine watching itself (`engine.health`): the cluster's conditions on the leader,
    each instance's own on it, the heartbeat and the data stream watchdog when configured."""
    services: list[Service] = [
        HealthWatch(config.health, leader_only=True),
        HealthWatch(config.health, leader_only=False),
    ]
    if config.heartbeat.url is not None:
        services.append(Heartbeat(config.heartbeat))
    stream = config.source_settings.get(StreamerSource.name)
    if isinstance(stream, StreamerSettings) and stream.watch:
        services.append(StreamWatchdog(StreamWatchSettings(True, stream.watch_every)))
    return services


def _checked_store(settings: StoreSettings) -> Store:
    """The configured store, after its integrity check: StoreError when it is damaged."""
    store = open_store(settings)
    path = settings.where
    try:
        whole = store.check_integrity(INTEGRITY_CHECK_BUDGET)
    except StoreError:
        store.close()
        raise
    if not whole:
        _log.warning(
            "the store's integrity check ran out of time; the rest of the file is unchecked",
            store=path,
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
                outcome="shadow" if planned.silenced is None else "silenced",
                action=planned.action.kind,
                event_id=event.id,
                iccid=event.iccid,
                reason=planned.silenced or reasons.get((event.id, planned.rule.id)),
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
