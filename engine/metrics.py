"""Prometheus metrics of one engine, served at `GET /metrics`.

Each `Metrics` has its own registry, so two daemons in one process (tests, the demo) never
share counters. Counters are fed by the daemon's hooks (batches, API responses, action
outcomes); the gauges that describe state (poll lag, the outbox) are read from the store when
Prometheus scrapes, so they are right even for work a previous run left behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.clock import Clock, system_clock
from engine.errors import GATEWAY_ERRORS, StoreError

if TYPE_CHECKING:
    from engine.pipeline import BatchResult
    from engine.ports import Members, Meta, StoreHealth

    class _Observed(Meta, StoreHealth, Members, Protocol):
        """What `/metrics` reads of the store at each scrape."""


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Statuses always exported (as 0 when empty), so alerts on them never see a missing series.
_OUTBOX_STATUSES = ("pending", "running", "dead")

# Polls and actions take from milliseconds (a quiet poll) to minutes (retries inside a call).
_SLOW_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


_LOGIN = "/api/v1/authenticate"


@dataclass(frozen=True, slots=True)
class ApiExchange:
    """The most recent emnify API exchange: `status` None means no response came back."""

    status: int | None
    at: float  # monotonic

    @property
    def trouble(self) -> str | None:
        """Why this exchange says the API is not there ("did not respond", "answered HTTP
        503": a gateway's answer), or None when the API itself answered."""
        if self.status is None:
            return "did not respond"
        if self.status in GATEWAY_ERRORS:
            return f"answered HTTP {self.status}"
        return None


class Metrics:
    def __init__(self, *, clock: Clock = system_clock) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        self.last_api: ApiExchange | None = None
        # The last login's verdict on the application token: the status it was refused with
        # (401/403), False when accepted, None before any login (`engine.health`).
        self.login_refused: int | bool | None = None
        # The same per organisation (`organisations:`): one refused token pauses only it.
        self.organisation_login_refused: dict[str, int | bool] = {}
        r = self.registry
        self.events_received = Counter(
            "event_engine_events_received",
            "Event records received, by source (before dedup)",
            ["source"],
            registry=r,
        )
        self.events_new = Counter(
            "event_engine_events_new",
            "Events evaluated for the first time, by the source that delivered them first",
            ["source"],
            registry=r,
        )
        self.events_duplicate = Counter(
            "event_engine_events_duplicate",
            "Event records dropped as already seen, by source",
            ["source"],
            registry=r,
        )
        self.events_quarantined = Counter(
            "event_engine_events_quarantined",
            "Records that could not be read as events and were quarantined, by source",
            ["source"],
            registry=r,
        )
        self.rule_matches = Counter(
            "event_engine_rule_matches", "Events matched, by rule", ["rule"], registry=r
        )
        self.rule_failures = Counter(
            "event_engine_rule_failures",
            "Events a rule failed on, by rule and stage: match, cancel_if, judge (the rule"
            " as a whole) or plan (one of its actions); the other rules and events go on",
            ["rule", "stage"],
            registry=r,
        )
        self.actions = Counter(
            "event_engine_actions",
            "Actions finished, by kind and outcome (done, already, failed, dead, ...)",
            ["kind", "outcome"],
            registry=r,
        )
        self.actions_failed = Counter(
            "event_engine_actions_failed",
            "Actions that failed for good, by kind and stage: plan (the event lacks what"
            " the action needs, e.g. a SIM) or run (a permanent error when it ran)",
            ["kind", "stage"],
            registry=r,
        )
        self.action_seconds = Histogram(
            "event_engine_action_duration_seconds",
            "Time one action attempt took, by kind and result (ok or error)",
            ["kind", "result"],
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.polls = Counter(
            "event_engine_polls", "Polls of the Event API, by result", ["result"], registry=r
        )
        # With `organisations:` only: the same, per organisation (a config without it keeps
        # exactly the families above).
        self.organisation_polls = Counter(
            "event_engine_organisation_polls",
            "Polls of the Event API, by organisation and result",
            ["organisation", "result"],
            registry=r,
        )
        self.organisation_paused = Gauge(
            "event_engine_organisation_paused",
            "1 while an organisation's polling is paused because its token was refused",
            ["organisation"],
            registry=r,
        )
        self.organisation_events = Counter(
            "event_engine_organisation_events_new",
            "Events evaluated for the first time, by organisation",
            ["organisation"],
            registry=r,
        )
        self.organisation_matches = Counter(
            "event_engine_organisation_rule_matches",
            "Events matched, by organisation and rule",
            ["organisation", "rule"],
            registry=r,
        )
        self.organisation_actions = Counter(
            "event_engine_organisation_actions",
            "Actions finished, by organisation, kind and outcome",
            ["organisation", "kind", "outcome"],
            registry=r,
        )
        self.poll_seconds = Histogram(
            "event_engine_poll_duration_seconds",
            "Time one poll took (every window and page of it)",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.api_requests = Counter(
            "event_engine_api_requests",
            "emnify API requests, by method, path template and status (none: no response)",
            ["method", "path", "status"],
            registry=r,
        )
        self.api_seconds = Histogram(
            "event_engine_api_request_duration_seconds",
            "emnify API request latency, by method and path template",
            ["method", "path"],
            registry=r,
        )
        self.ingress_requests = Counter(
            "event_engine_streamer_requests",
            "Data Streamer deliveries received, by the HTTP status answered",
            ["status"],
            registry=r,
        )
        self.usage_records_ignored = Counter(
            "event_engine_streamer_usage_records_ignored",
            "Usage records the Data Streamer delivered while no rule uses them",
            registry=r,
        )
        self.usage_records_used = Counter(
            "event_engine_streamer_usage_records_used",
            "Usage records the Data Streamer delivered that `usage` rules judged",
            registry=r,
        )
        self.is_leader = Gauge(
            "event_engine_cluster_is_leader",
            "1 while this instance holds the leader lease (polls, runs once-per-cluster jobs)",
            registry=r,
        )
        self.lease_changes = Counter(
            "event_engine_lease_changes",
            "Times this instance gained or lost the leader lease",
            ["change"],
            registry=r,
        )
        self.engine_events = Counter(
            "event_engine_engine_events",
            "Engine events said (the engine's own health, guards, dead letters), by kind",
            ["kind"],
            registry=r,
        )
        self.lookups = Counter(
            "event_engine_lookups",
            "Facts rules looked up (`lookup:`), by fact and outcome: cache_hit, fetched, or"
            " unavailable to the rule as budget_exhausted, timeout or api_error",
            ["fact", "outcome"],
            registry=r,
        )
        self.lookup_seconds = Histogram(
            "event_engine_lookup_fetch_duration_seconds",
            "Time one lookup's API call took (answered or not), by fact",
            ["fact"],
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.http_turned_away = Counter(
            "event_engine_http_turned_away",
            "HTTP connections and requests the server's bounds turned away, by reason",
            ["reason"],
            registry=r,
        )

    # -- hooks -------------------------------------------------------------------------------

    def observe_batch(self, batch: BatchResult, source: str) -> None:
        self.events_received.labels(source).inc(batch.received)
        self.events_new.labels(source).inc(batch.new_events)
        self.events_duplicate.labels(source).inc(batch.duplicates)
        self.events_quarantined.labels(source).inc(batch.quarantined)
        for rule_id, count in batch.matched_rules.items():
            self.rule_matches.labels(rule_id).inc(count)
        for failure in batch.failures:
            self.rule_failures.labels(failure.rule_id, failure.stage).inc()
            if failure.action is not None:
                self.actions_failed.labels(failure.action, "plan").inc()

    def observe_organisation_batch(self, batch: BatchResult, organisation: str) -> None:
        self.organisation_events.labels(organisation).inc(batch.new_events)
        for rule_id, count in batch.matched_rules.items():
            self.organisation_matches.labels(organisation, rule_id).inc(count)

    def observe_organisation_poll(self, organisation: str, ok: bool, *, paused: bool) -> None:
        self.organisation_polls.labels(organisation, "ok" if ok else "failed").inc()
        self.organisation_paused.labels(organisation).set(1.0 if paused else 0.0)

    def observe_organisation_action(self, organisation: str, kind: str, outcome: str) -> None:
        self.organisation_actions.labels(organisation, kind, outcome.split(" ")[0]).inc()

    def organisation_api(self, organisation: str) -> Callable[[str, str, int | None, float], None]:
        """What an organisation's client reports its exchanges to: counted as any, its
        login's verdict kept as that organisation's (`organisation_login_refused`)."""

        def observe(method: str, path: str, status: int | None, seconds: float) -> None:
            self.api_requests.labels(method, path, str(status) if status else "none").inc()
            self.api_seconds.labels(method, path).observe(seconds)
            self.last_api = ApiExchange(status, time.monotonic())
            if path == _LOGIN and status is not None:
                if status in (401, 403):
                    self.organisation_login_refused[organisation] = status
                elif status < 400:
                    self.organisation_login_refused[organisation] = False

        return observe

    def observe_api(self, method: str, path: str, status: int | None, seconds: float) -> None:
        """`EmnifyClient(on_response=...)`: one HTTP exchange, retries included."""
        self.api_requests.labels(method, path, str(status) if status else "none").inc()
        self.api_seconds.labels(method, path).observe(seconds)
        self.last_api = ApiExchange(status, time.monotonic())
        if path == _LOGIN and status is not None:
            if status in (401, 403):
                self.login_refused = status
            elif status < 400:
                self.login_refused = False

    def observe_engine_event(self, kind: str) -> None:
        self.engine_events.labels(kind).inc()

    def observe_action(self, kind: str, outcome: str) -> None:
        """`Dispatcher(on_outcome=...)`: outcomes may carry detail after a space."""
        ended = outcome.split(" ")[0]
        self.actions.labels(kind, ended).inc()
        if ended == "failed":
            self.actions_failed.labels(kind, "run").inc()

    def observe_attempt(self, kind: str, ok: bool, seconds: float) -> None:
        """`Dispatcher(on_attempt=...)`: every attempt, including the ones retried later."""
        self.action_seconds.labels(kind, "ok" if ok else "error").observe(seconds)

    def observe_lookup(self, fact: str, outcome: str, seconds: float | None) -> None:
        """`LookupFetcher(on_lookup=...)`: one fact asked for; `seconds` when a call was made."""
        self.lookups.labels(fact, outcome).inc()
        if seconds is not None:
            self.lookup_seconds.labels(fact).observe(seconds)

    def observe_leadership(self, leading: bool) -> None:
        """`Leadership(on_change=...)`: this instance gained (True) or lost the lease."""
        self.is_leader.set(1.0 if leading else 0.0)
        self.lease_changes.labels("gained" if leading else "lost").inc()

    def observe_poll(self, ok: bool, seconds: float) -> None:
        self.polls.labels("ok" if ok else "failed").inc()
        self.poll_seconds.observe(seconds)

    def watch_store(
        self, store: _Observed, *, member_timeout: float = 30.0, organisations: Sequence[str] = ()
    ) -> None:
        """Export the store's gauges, read at each scrape; members whose last heartbeat is
        older than `member_timeout` seconds no longer count. `organisations`: the config's,
        whose cursors' lags are exported too."""
        self.registry.register(
            _StoreCollector(store, self._clock, member_timeout, tuple(organisations))
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCollector(Collector):
    def __init__(
        self,
        store: _Observed,
        clock: Clock,
        member_timeout: float,
        organisations: tuple[str, ...] = (),
    ) -> None:
        self._store = store
        self._clock = clock
        self._member_timeout = member_timeout
        self._organisations = organisations

    def describe(self) -> list[Metric]:
        return []  # read lazily: registering must not touch the store

    def _organisation_lags(self) -> GaugeMetricFamily:
        lags = GaugeMetricFamily(
            "event_engine_organisation_poll_lag_seconds",
            "How far an organisation's poll cursor is behind now (absent before its first poll)",
            labels=["organisation"],
        )
        for organisation in self._organisations:
            try:
                cursor = self._store.get_cursor(organisation)
            except StoreError:
                continue  # absent while the store cannot be read, as the other gauges
            if cursor is not None:
                lags.add_metric([organisation], max((self._clock() - cursor).total_seconds(), 0))
        return lags

    def collect(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(
            "event_engine_store_ok",
            "1 when the state store is sound and takes writes (the store check of /readyz)",
        )
        healthy.add_metric([], 1.0 if self._store.condition(self._clock()).ok else 0.0)
        yield healthy
        try:
            cursor = self._store.get_cursor()
            counts = self._store.counts()
            members = self._store.members()
        except StoreError:
            return  # the gauges read from the store are absent while it cannot be read
        alive = GaugeMetricFamily(
            "event_engine_cluster_members",
            "Instances sharing the store whose heartbeat is recent",
        )
        now = self._clock()
        alive.add_metric(
            [],
            sum(
                1 for m in members if (now - m.heartbeat_at).total_seconds() <= self._member_timeout
            ),
        )
        yield alive
        lag = GaugeMetricFamily(
            "event_engine_poll_lag_seconds",
            "How far the poll cursor is behind now (absent before the first poll)",
        )
        if cursor is not None:
            lag.add_metric([], max((self._clock() - cursor).total_seconds(), 0.0))
        yield lag
        if self._organisations:
            yield self._organisation_lags()
        outbox = GaugeMetricFamily(
            "event_engine_outbox_intents",
            "Action intents in the outbox, by status",
            labels=["status"],
        )
        by_status = {s: 0 for s in _OUTBOX_STATUSES}
        for key, value in counts.items():
            if key.startswith("intents_"):
                by_status[key.removeprefix("intents_")] = value
        for status, value in sorted(by_status.items()):
            outbox.add_metric([status], value)
        yield outbox
        not_planned = GaugeMetricFamily(
            "event_engine_actions_not_planned",
            "Actions that could not be planned for their event (it lacks what the action"
            " needs), as the audit log keeps them: `status` counts them as failed",
        )
        not_planned.add_metric([], counts.get("actions_not_planned", 0))
        yield not_planned
