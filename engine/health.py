"""The engine watching itself: its health said as engine events, a heartbeat to a dead-man's
switch while it is healthy, and a watchdog on emnify's data stream.

`HealthWatch` looks at a few conditions every `health.check_every` and says each one as an
engine event (`engine.engine_events`) on the transition, once it has held for its time, and
once more when it is over (`..._recovered`):

- `poll_failing`: the last poll of the Event API failed, for `poll_failing_after`;
- `poll_lag_exceeded`: the poller's cursor is more than `poll_lag` behind the clock;
- `stream_silent`: the Data Streamer source is listed, yet for `stream_silent_after` no
  delivery came while the poller kept finding events nobody had delivered;
- `api_unreachable`: the emnify API's last answer was none at all or a gateway error
  (502/503/504), for `api_unreachable_after`;
- `auth_failed`: emnify refused the application token at the last login.

The first three are about the cluster's one poller: the leader watches them (a `HealthWatch`
with `leader_only`). The last two are about each instance's own connection to the API, so
every instance watches them and its events name it (`detail.instance`). Which conditions
were said is kept in the store, so a restart (or a new leader) says the recovery of one
that is over, and does not say again one that still holds.

`Heartbeat` requests `heartbeat.url` every `heartbeat.every` while, and only while, this
instance is ready as `/readyz` defines it; an external dead-man's switch then raises the
alarm when the pings stop, whatever stopped them (the host, the process, the store).

`StreamWatchdog` (opt-in, `data_streamer.watch: true`) reads `GET /api/v2/data_stream`
every `data_streamer.watch_every`; a stream in Error (status 3) is said as
`data_stream_error` and restarted (`POST /api/v2/data_stream/{id}/restart`); the poller
backfills what the stream missed meanwhile, as it polls all along. Its return to Running is
said as `data_stream_error_recovered`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import orjson
import structlog

from engine import secrets
from engine.errors import ApiError, EngineError, StoreError
from engine.http.health import readiness
from engine.services import run_every, stop_running
from engine.sources.poller import PollerSource
from engine.sources.streamer import STREAM_LAST_DELIVERY
from engine.state import format_duration

if TYPE_CHECKING:
    from engine.emnify import EmnifyClient
    from engine.services import ServiceContext

_log = structlog.get_logger(__name__)

STREAM_SOURCE = "data_streamer"
_LOGIN = "/api/v1/authenticate"
_STREAM_ERROR = 3
RESTART_SPACING_LIMIT = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """`health:` in the config: how often to look, and how long each condition must hold."""

    check_every: timedelta = timedelta(seconds=10)
    poll_failing_after: timedelta = timedelta(minutes=5)
    api_unreachable_after: timedelta = timedelta(minutes=1)
    poll_lag: timedelta = timedelta(minutes=15)
    stream_silent_after: timedelta = timedelta(minutes=15)


@dataclass(frozen=True, slots=True)
class HeartbeatSettings:
    """`heartbeat: {url, every, timeout}`; no `url`, no heartbeat. The URL may be a
    `${NAME}` reference (a dead-man's switch URL is a secret: whoever has it can ping)."""

    url: str | None = None
    every: timedelta = timedelta(minutes=1)
    timeout: timedelta = timedelta(seconds=10)


@dataclass(frozen=True, slots=True)
class StreamWatchSettings:
    """`data_streamer.watch` and `data_streamer.watch_every`."""

    watch: bool = False
    every: timedelta = timedelta(minutes=1)


class _Unknown:
    """A condition that cannot be judged right now (nothing polled yet): no transition."""


UNKNOWN = _Unknown()
Verdict = str | None | _Unknown  # the reason it holds, None when it does not, or UNKNOWN


@dataclass(slots=True)
class _Condition:
    kind: str
    after: timedelta
    check: Callable[[datetime], Verdict]
    since: datetime | None = None  # when it began to hold (this time)
    said: bool = False  # its engine event was said and its recovery not yet


class HealthWatch:
    """A daemon service (see the module docstring): `check_now` is one look."""

    def __init__(self, settings: HealthSettings, *, leader_only: bool) -> None:
        self.settings = settings
        self.leader_only = leader_only
        self._context: ServiceContext | None = None
        self.conditions: list[_Condition] = []
        self._meta_key = ""
        self._job_id = "health-cluster" if leader_only else "health-instance"

    async def start(self, context: ServiceContext) -> None:
        self._context = context
        self.conditions = self._conditions(context)
        scope = "cluster" if self.leader_only else f"instance:{context.engine_events.instance}"
        self._meta_key = f"health:{scope}"
        said = self._said_before(context)
        for condition in self.conditions:
            condition.said = condition.kind in said
        run_every(
            context.scheduler,
            self._job_id,
            self.check_now,
            self.settings.check_every,
            context.clock() + self.settings.check_every,
        )

    async def stop(self) -> None:
        if self._context is not None:
            stop_running(self._context.scheduler, self._job_id)
        self._context = None

    def check_now(self) -> None:
        """Look at every condition once; say what changed."""
        context = self._context
        if context is None:
            return
        context.engine_events.retry_pending()
        now = context.clock()
        changed = False
        for condition in self.conditions:
            verdict = condition.check(now)
            if isinstance(verdict, _Unknown):
                continue
            if verdict is None:
                condition.since = None
                if condition.said:
                    condition.said = False
                    changed = True
                    context.emit_engine_event(f"{condition.kind}_recovered")
                continue
            if condition.since is None:
                condition.since = now
            if not condition.said and now - condition.since >= condition.after:
                condition.said = True
                changed = True
                context.emit_engine_event(
                    condition.kind,
                    detail={"reason": verdict, "since": condition.since.isoformat()},
                )
        if changed:
            self._remember(context)

    def _conditions(self, context: ServiceContext) -> list[_Condition]:
        settings = self.settings
        if not self.leader_only:
            return [
                _Condition("api_unreachable", settings.api_unreachable_after, self._api),
                _Condition("auth_failed", timedelta(0), self._auth),
            ]
        poller = _poller_of(context)
        if poller is None:
            return []
        conditions = [
            _Condition("poll_failing", settings.poll_failing_after, self._polls),
            _Condition("poll_lag_exceeded", timedelta(0), self._lag),
        ]
        if any(source.name == STREAM_SOURCE for source in context.sources):
            conditions.append(
                _Condition("stream_silent", settings.stream_silent_after, self._stream)
            )
        return conditions

    # -- the conditions ----------------------------------------------------------------------

    def _polls(self, now: datetime) -> Verdict:
        """The last poll's error (with `organisations:`, each failing one's, named)."""
        polled = [p for p in _pollers_of(self._ctx) if p.polls]
        if not polled:
            return UNKNOWN
        failing = [_whose(p) + p.poller.last_error for p in polled if p.poller.last_error]
        return "; ".join(failing) or None

    def _lag(self, now: datetime) -> Verdict:
        """How far the cursor is behind (with `organisations:`, each one's, named)."""
        pollers = _pollers_of(self._ctx)
        stores = [(_whose(p), p.context.store) for p in pollers] or [("", self._ctx.store)]
        behind: list[str] = []
        known = False
        for whose, store in stores:
            try:
                cursor = store.get_cursor()
            except StoreError:
                return UNKNOWN
            if cursor is None:
                continue
            known = True
            lag = now - cursor
            if lag > self.settings.poll_lag:
                behind.append(
                    f"{whose}the poller's cursor is {format_duration(lag)} behind"
                    f" (limit {format_duration(self.settings.poll_lag)})"
                )
        if not known:
            return UNKNOWN
        return "; ".join(behind) or None

    def _stream(self, now: datetime) -> Verdict:
        poller = _poller_of(self._ctx)
        if poller is None or poller.poller.last_fresh_at is None:
            return None  # the poller has found nothing the stream had not delivered
        try:  # the stream of the poller's organisation (`organisations:`), or the one
            text = poller.context.store.get_meta(STREAM_LAST_DELIVERY)
        except StoreError:
            return UNKNOWN
        delivered = datetime.fromisoformat(text) if text else None
        fresh = poller.poller.last_fresh_at
        if delivered is not None and delivered >= fresh:
            return None
        last = f"last delivery {delivered.isoformat()}" if delivered else "no delivery yet"
        return f"the poller finds events the Data Streamer did not deliver ({last})"

    def _api(self, now: datetime) -> Verdict:
        last = self._ctx.metrics.last_api
        if last is None:
            return UNKNOWN
        return None if last.trouble is None else f"{self._ctx.api_url} {last.trouble}"

    def _auth(self, now: datetime) -> Verdict:
        by_organisation = self._ctx.metrics.organisation_login_refused
        if by_organisation:
            refused_ones = [f"{name} (HTTP {r})" for name, r in by_organisation.items() if r]
            if not refused_ones:
                return None
            return (
                "the application token of organisation "
                + ", ".join(refused_ones)
                + (" was refused; the others go on")
            )
        refused = self._ctx.metrics.login_refused
        if refused is None:
            return UNKNOWN
        return f"the application token was refused (HTTP {refused})" if refused else None

    @property
    def _ctx(self) -> ServiceContext:
        assert self._context is not None, "started"
        return self._context

    # -- what was said, across restarts --------------------------------------------------------

    def _said_before(self, context: ServiceContext) -> set[str]:
        try:
            text = context.store.get_meta(self._meta_key)
        except StoreError:
            return set()
        try:
            kinds = orjson.loads(text) if text else []
        except orjson.JSONDecodeError:
            return set()
        return {k for k in kinds if isinstance(k, str)}

    def _remember(self, context: ServiceContext) -> None:
        said = sorted(c.kind for c in self.conditions if c.said)
        with contextlib.suppress(StoreError):  # said again, at worst, after a restart
            context.store.set_meta(self._meta_key, orjson.dumps(said).decode())


def _pollers_of(context: ServiceContext) -> list[PollerSource]:
    """The pollers: one, or one per organisation (`organisations:`)."""
    return [source for source in context.sources if isinstance(source, PollerSource)]


def _whose(source: PollerSource) -> str:
    organisation = source.context.organisation
    return f"organisation {organisation}: " if organisation else ""


def _poller_of(context: ServiceContext) -> PollerSource | None:
    for source in context.sources:
        if isinstance(source, PollerSource):
            return source
    return None


class Heartbeat:
    """A daemon service (see the module docstring): `beat` is one round."""

    leader_only = False  # every instance says it is alive

    def __init__(self, settings: HeartbeatSettings) -> None:
        if settings.url is None:
            raise EngineError("a heartbeat needs heartbeat.url")
        self.settings = settings
        self._context: ServiceContext | None = None
        self._http: httpx.AsyncClient | None = None
        self._url = ""
        self.sent = 0
        self.held = 0
        self._holding: str | None = None

    async def start(self, context: ServiceContext) -> None:
        assert self.settings.url is not None
        self._url = secrets.register(secrets.expand(self.settings.url))
        self._context = context
        timeout = self.settings.timeout.total_seconds()
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout), follow_redirects=True)
        run_every(context.scheduler, "heartbeat", self.beat, self.settings.every, context.clock())
        _log.info(
            "heartbeat",
            to=_shown(self._url),
            every=format_duration(self.settings.every),
        )

    async def stop(self) -> None:
        if self._context is not None:
            stop_running(self._context.scheduler, "heartbeat")
        if self._http is not None:
            await self._http.aclose()
        self._context = self._http = None

    async def beat(self) -> bool:
        """Ping the dead-man's switch if this instance is ready; True when it was pinged."""
        context, http = self._context, self._http
        if context is None or http is None:
            return False
        state = readiness(context)
        if not state.ready:
            failing = "; ".join(f"{c.name}: {c.detail}" for c in state.checks if not c.ok)
            if failing != self._holding:
                _log.warning("heartbeat held: the engine is not ready", failing=failing)
            self._holding = failing
            self.held += 1
            return False
        if self._holding is not None:
            _log.info("heartbeat resumed: the engine is ready again")
            self._holding = None
        try:
            response = await http.get(self._url)
        except httpx.HTTPError as error:
            _log.warning(
                "heartbeat not delivered",
                to=_shown(self._url),
                error=secrets.redact(f"{type(error).__name__}: {error}"),
            )
            return False
        if response.status_code >= 400:
            _log.warning("heartbeat refused", to=_shown(self._url), status=response.status_code)
            return False
        self.sent += 1
        return True


def _shown(url: str) -> str:
    """Where a heartbeat goes, without its path (which often holds the switch's key)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}"


class StreamWatchdog:
    """A daemon service (see the module docstring): `watch_once` is one round."""

    leader_only = True  # one instance reads and restarts the organisations' streams

    def __init__(self, settings: StreamWatchSettings) -> None:
        self.settings = settings
        self._context: ServiceContext | None = None
        self.restarts = 0
        # Per organisation ("" for the single one): stream id → the reason said.
        self._in_error: dict[str, dict[int, str]] = {}
        # A stream that is misconfigured fails again after each restart: restart it again
        # after a round, then two, four, … up to RESTART_SPACING_LIMIT apart.
        self._next_restart: dict[tuple[str, int], tuple[datetime, int]] = {}

    async def start(self, context: ServiceContext) -> None:
        self._context = context
        self._in_error = {
            name: self._said_before(context, name) for name in _stream_clients(context)
        }
        if _poller_of(context) is None:
            _log.warning(
                "the data stream watchdog restarts a stream in Error, but with no poller"
                " listed under `sources` nothing backfills what it missed meanwhile"
            )
        run_every(
            context.scheduler,
            "data-stream-watchdog",
            self.watch_once,
            self.settings.every,
            context.clock(),
        )

    async def stop(self) -> None:
        if self._context is not None:
            stop_running(self._context.scheduler, "data-stream-watchdog")
        self._context = None

    async def watch_once(self) -> None:
        """Read each organisation's streams' status (with its own token); say and restart
        those in Error, say those back."""
        context = self._context
        if context is None:
            return
        for organisation, client in _stream_clients(context).items():
            await self._watch(context, organisation, client)

    async def _watch(
        self, context: ServiceContext, organisation: str, client: EmnifyClient
    ) -> None:
        whose = {"organisation": organisation} if organisation else {}
        try:
            streams = await client.data_streams()
        except ApiError as error:
            _log.warning("cannot read the data streams' status", error=str(error), **whose)
            return
        in_error = self._in_error.setdefault(organisation, {})
        changed = False
        for stream in streams:
            stream_id = stream.get("id")
            if not isinstance(stream_id, int):
                continue
            status = _status_id(stream)
            named = {"stream_id": stream_id, "name": str(stream.get("name") or ""), **whose}
            if status == _STREAM_ERROR:
                if stream_id not in in_error:
                    reason = _last_error(stream)
                    in_error[stream_id] = reason
                    changed = True
                    context.emit_engine_event(
                        "data_stream_error", detail={**named, "reason": reason}
                    )
                await self._restart(context, organisation, client, stream_id)
            elif stream_id in in_error and status is not None:
                del in_error[stream_id]
                self._next_restart.pop((organisation, stream_id), None)
                changed = True
                context.emit_engine_event("data_stream_error_recovered", detail=named)
        if changed:
            with contextlib.suppress(StoreError):
                context.store.set_meta(
                    _streams_key(organisation), orjson.dumps(list(in_error)).decode()
                )

    async def _restart(
        self,
        context: ServiceContext,
        organisation: str,
        client: EmnifyClient,
        stream_id: int,
    ) -> None:
        now = context.clock()
        due, tries = self._next_restart.get((organisation, stream_id), (now, 0))
        if now < due:
            return
        spacing = min(self.settings.every * 2**tries, RESTART_SPACING_LIMIT)
        self._next_restart[(organisation, stream_id)] = (now + spacing, tries + 1)
        try:
            await client.restart_data_stream(stream_id)
        except ApiError as error:
            _log.error(
                "the data stream in Error could not be restarted; tried again next round",
                stream_id=stream_id,
                error=str(error),
                **({"organisation": organisation} if organisation else {}),
            )
            return
        self.restarts += 1
        _log.warning(
            "data stream in Error restarted",
            stream_id=stream_id,
            restarts_in_a_row=tries + 1,
            next_restart_after=format_duration(spacing),
        )

    def _said_before(self, context: ServiceContext, organisation: str) -> dict[int, str]:
        try:
            text = context.store.get_meta(_streams_key(organisation))
            ids = orjson.loads(text) if text else []
        except (StoreError, orjson.JSONDecodeError):
            return {}
        return {i: "" for i in ids if isinstance(i, int)}


def _stream_clients(context: ServiceContext) -> Mapping[str, EmnifyClient]:
    """Whose streams the watchdog reads, with whose token: each configured organisation's
    (`organisations:`), else the single organisation's ("")."""
    return context.organisation_clients or {"": context.client}


def _streams_key(organisation: str) -> str:
    """The meta key of the streams said to be in Error (the single organisation's as before)."""
    return f"health:data_streams:{organisation}" if organisation else "health:data_streams"


def _status_id(stream: dict[str, Any]) -> int | None:
    status = stream.get("status")
    ident = status.get("id") if isinstance(status, dict) else status
    return ident if isinstance(ident, int) and not isinstance(ident, bool) else None


def _last_error(stream: dict[str, Any]) -> str:
    errors = stream.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[-1], dict):
        message = errors[-1].get("message")
        if isinstance(message, str) and message:
            return message
    return "the data stream is in Error"
