"""Data Streamer ingress: emnify pushes event and usage records to us (emnify-api.md §8).

A RestAPI stream POSTs (or PUTs/PATCHes) a JSON array of records, perhaps a bare object when
its `size` is 1, with the static headers configured on the stream and nothing else: no
signature. So a delivery is accepted only with the configured secret header (compared in
constant time), within a body size limit, and answered 2xx only once its events are
committed: anything else makes the streamer deliver the batch again, and the seen-id dedup
that the poller shares drops whatever arrives twice. A store that cannot take the batch is
answered 503, as the stream expects of a destination that is briefly unavailable.

What one delivery may cost is bounded: its body's bytes, the time it takes to arrive, its
records (and, before parsing, the JSON values that many records could hold: a body of tiny
values would otherwise parse into hundreds of MB), and the deliveries read and judged at
once. A large delivery is judged in slices, each its own commit, with a turn of the event
loop between them, so health probes and the poller are not held up for its whole length;
the answer is 200 only once every slice is committed, and dedup makes a redelivery after a
failed slice safe. Refusals are logged once per burst (`engine.bursts`).

Usage records go to the pipeline with the events: rules with `usage:` sum them
(`engine.usage`); with no such rule, the pipeline passes them over and they are counted as
ignored.

`StreamerIngress` is the ingress itself; `StreamerSource` is the `data_streamer` source that
asks the daemon's HTTP server for its route. Neither knows the web framework: `engine.http`
adapts the route.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from engine import secrets
from engine.bursts import Bursts
from engine.errors import ConfigError, StoreError
from engine.jsontext import loads_records
from engine.sources.base import (
    Answer,
    ClientGone,
    Ingest,
    LookUp,
    Request,
    Route,
    SettingsSection,
    Source,
    SourceContext,
)
from engine.usage import is_usage_record

if TYPE_CHECKING:
    from engine.lookups import LookupTable
    from engine.metrics import Metrics
    from engine.pipeline import BatchResult

_log = structlog.get_logger(__name__)

INGEST_PATH = "/ingest/data-streamer"
# emnify's RestAPI stream may be set to POST (the default), PUT or PATCH.
INGEST_METHODS = ("POST", "PUT", "PATCH")
DEFAULT_AUTH_HEADER = "X-Emnify-Secret"
# emnify's default stream `size` is 3000 records a request, a few KB each at most.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
# The largest `size` emnify lets a stream have (emnify-api.md §8).
DEFAULT_MAX_RECORDS = 10_000
# JSON values a record may hold on average before a body is refused unparsed: above what
# the richest event records (PDP contexts) hold, far below what a body of tiny values does.
_VALUES_PER_RECORD = 150
# Records judged between two turns of the event loop: the first slice has `_FIRST_SLICE`,
# the next ones as many as fit in `_SLICE_SECONDS` at the pace of the one before, so a
# slice of costly events (many matches, many rules) holds the loop no longer than one of
# cheap ones.
_FIRST_SLICE = 500
_SLICE_SECONDS = 0.02
_SLICE_RANGE = (50, 5000)
_AT_ONCE = 4  # deliveries being read or judged at the same time (the others wait)
# Status for a delivery whose client went away before its body arrived (nginx's 499): only
# counted, as nobody is left to read an answer.
CLIENT_GONE = 499
STREAM_LAST_DELIVERY = "stream_last_delivery"  # meta: when a delivery last came (any instance)
DELIVERY_NOTED_EVERY = timedelta(seconds=5)


@dataclass(frozen=True, slots=True)
class StreamerSettings:
    auth_header: str = DEFAULT_AUTH_HEADER
    secret_reference: str | None = None  # `${NAME}`, resolved at start (`secret_of`)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_records: int = DEFAULT_MAX_RECORDS
    # The secret itself, when the caller has it already (the demo, tests); never from a file.
    secret: str | None = field(default=None, repr=False)
    # The data stream watchdog (`engine.health.StreamWatchdog`): opt-in, and how often.
    watch: bool = False
    watch_every: timedelta = timedelta(minutes=1)


_SECRET_HINT = (
    "write `secret: ${STREAMER_SECRET}` and export STREAMER_SECRET "
    "(or STREAMER_SECRET_FILE naming a file)"
)


class StreamerSource(Source[StreamerSettings], name="data_streamer"):
    """emnify's Data Streamer pushing to the ingress route on the daemon's HTTP server."""

    serves_http = True
    delivers_usage = True  # when the stream is of usage records, or of both kinds
    per_organisation = True  # each organisation's stream posts to a path of its own

    @classmethod
    def read_settings(cls, section: SettingsSection, *, enabled: bool) -> StreamerSettings:
        defaults = StreamerSettings()
        settings = StreamerSettings(
            auth_header=section.get("auth_header", _header_name, defaults.auth_header),
            secret_reference=section.secret("secret", hint=_SECRET_HINT),
            max_body_bytes=section.integer("max_body_bytes", defaults.max_body_bytes, minimum=1024),
            max_records=section.integer("max_records", defaults.max_records, minimum=1),
            watch=section.flag("watch", defaults.watch),
            watch_every=section.duration("watch_every", defaults.watch_every),
        )
        if settings.watch_every < timedelta(seconds=1):
            raise ConfigError(
                f"`{section.name}.watch_every` must be at least 1s",
                section.where("watch_every"),
                hint="the default, 1m, reads the stream's status once a minute",
            )
        if enabled and settings.secret_reference is None:
            raise ConfigError(
                f"the {cls.name} source needs `{section.name}.secret`",
                section.where("secret"),
                hint=f"add `{section.name}: {{secret: ${{STREAMER_SECRET}}}}` and set the same "
                "value as a header on the emnify data stream",
            )
        return settings

    @classmethod
    def check(cls, settings: StreamerSettings) -> None:
        secret_of(settings)

    def __init__(self, settings: StreamerSettings, context: SourceContext) -> None:
        super().__init__(settings, context)
        self.ingress = StreamerIngress(
            settings,
            secret_of(settings),
            self._ingest,
            metrics=context.metrics,
            look_up=context.look_up,
        )
        self._noted: datetime | None = None

    def _ingest(
        self,
        records: Sequence[object],
        *,
        source: str,
        cursor: datetime | None = None,
        complete: datetime | None = None,
        lookups: LookupTable | None = None,
    ) -> BatchResult:
        """A delivery's batch, judged; when deliveries come is noted in the store (every
        few seconds at most) for the stream's health, which the leader watches."""
        batch = self.context.ingest(
            records, source=source, cursor=cursor, complete=complete, lookups=lookups
        )
        now = self.context.clock()
        if records and (self._noted is None or now - self._noted >= DELIVERY_NOTED_EVERY):
            with contextlib.suppress(StoreError):  # the batch is in; only its note is lost
                self.context.store.set_meta(STREAM_LAST_DELIVERY, now.isoformat())
                self._noted = now
        return batch

    def routes(self) -> Sequence[Route]:
        """`/ingest/data-streamer`; with `organisations:`, one route per organisation
        (`/ingest/data-streamer/NAME`), so each stream's events are that organisation's."""
        organisation = self.context.organisation
        path = f"{INGEST_PATH}/{organisation}" if organisation else INGEST_PATH
        return (Route(path, INGEST_METHODS, self.ingress.handle),)

    async def start(self) -> None:
        pass  # deliveries come in through the route once the HTTP server runs

    async def stop(self) -> None:
        # The HTTP server has stopped first: log what the last bursts of refusals counted.
        self.ingress.flush_log()


def secret_of(settings: StreamerSettings) -> str:
    """The shared secret deliveries must carry, resolved now: `ConfigError` when it is not
    configured or its variable is not set."""
    secret = settings.secret
    if secret is None and settings.secret_reference is not None:
        try:
            secret = secrets.expand(settings.secret_reference)
        except secrets.MissingSecretError as error:
            raise ConfigError(
                f"no Data Streamer secret: {error}",
                hint="export the variable named in data_streamer.secret, e.g. a long random "
                "string also set as a header on the emnify data stream",
            ) from None
    if not secret:
        raise ConfigError(
            "the Data Streamer ingress needs a secret",
            hint="set data_streamer.secret: ${STREAMER_SECRET} and export it",
        )
    return secret


def _header_name(value: Any, path: str) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not text or any(c in text for c in " :\t\r\n"):
        raise ConfigError(f"`{path}` must be an HTTP header name like X-Emnify-Secret")
    return text


class _TooLarge(Exception):
    pass


@dataclass(slots=True)
class _Totals:
    received: int = 0
    new: int = 0
    duplicates: int = 0
    quarantined: int = 0
    matched: int = 0
    usage_used: int = 0
    usage_ignored: int = 0

    def add(self, batch: BatchResult) -> None:
        self.new += batch.new_events
        self.duplicates += batch.duplicates
        self.quarantined += batch.quarantined
        self.matched += batch.matches
        self.usage_used += batch.usage_used
        self.usage_ignored += batch.usage_ignored


class StreamerIngress:
    """Checks, reads and hands one delivery to the pipeline; `handle` gives the answer."""

    def __init__(
        self,
        settings: StreamerSettings,
        secret: str,
        ingest: Ingest,
        *,
        metrics: Metrics | None = None,
        look_up: LookUp | None = None,
    ) -> None:
        """`look_up`: fetches the facts rules look up for a slice of a delivery before it
        is judged (within the lookups' budget and bounded wait)."""
        if not secret:
            raise ValueError("the Data Streamer secret is empty")
        self.settings = settings
        self._ingest = ingest
        self._look_up = look_up
        self._secret_digest = _digest(secret)
        self._metrics = metrics
        self._slots = asyncio.Semaphore(_AT_ONCE)
        self._judging = asyncio.Lock()  # one delivery's records in memory at a time
        self._refusals = Bursts("more Data Streamer deliveries refused")
        self._unrecorded = Bursts(
            "more Data Streamer deliveries not recorded (answered 503)", level="error"
        )

    def authorized(self, headers: Mapping[str, str]) -> bool:
        given = headers.get(self.settings.auth_header.lower())
        if given is None:
            given = headers.get(self.settings.auth_header)
        # Digests first: compare_digest is constant-time only for equal lengths.
        return given is not None and hmac.compare_digest(_digest(given), self._secret_digest)

    async def handle(self, request: Request) -> Answer:
        """One delivery (`request.headers` case-insensitive; lower-case keys work too)."""
        answer = await self._receive(request)
        if self._metrics is not None:
            self._metrics.ingress_requests.labels(str(answer.status)).inc()
        return answer

    async def _receive(self, request: Request) -> Answer:
        headers, body = request.headers, request.body
        if not self.authorized(headers):
            error = f"missing or wrong {self.settings.auth_header}"
            return self._refused(401, "missing or wrong secret header", error)
        # The body is due `body_timeout` after the headers, waiting for a slot included.
        timeout = request.body_timeout
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            return self._not_recorded("too many deliveries at once", None)
        try:
            return await self._read_and_judge(headers, body, deadline, timeout)
        finally:
            self._slots.release()

    async def _read_and_judge(
        self,
        headers: Mapping[str, str],
        body: AsyncIterator[bytes],
        deadline: float | None,
        timeout: float | None,
    ) -> Answer:
        limit = self.settings.max_body_bytes
        try:
            async with asyncio.timeout_at(deadline):
                raw = await _read_limited(headers.get("content-length"), body, limit)
        except _TooLarge:
            return self._refused(413, "body too large", f"body larger than {limit} bytes")
        except TimeoutError:
            return self._refused(
                408, "body too slow", f"the body did not arrive within {timeout:g}s"
            )
        except ClientGone:
            self._refusals.note(
                "Data Streamer delivery abandoned: the client closed the connection mid-body",
                "client went away",
            )
            return Answer(CLIENT_GONE)
        async with self._judging:
            try:
                records = _records(raw, self.settings.max_records)
            except _TooLarge as error:
                return self._refused(413, "too many records", str(error))
            except ValueError as error:
                return self._refused(400, "malformed body", str(error))
            del raw
            return await self._judge(records)

    async def _judge(self, records: list[object]) -> Answer:
        totals = _Totals(received=len(records))
        start, size = 0, _FIRST_SLICE
        try:
            while True:
                began = time.perf_counter()
                piece = records[start : start + size]
                lookups = None
                if self._look_up is not None:
                    events = [r for r in piece if not is_usage_record(r)]
                    lookups = await self._look_up(events) if events else None
                batch = self._ingest(piece, source=StreamerSource.name, lookups=lookups)
                totals.add(batch)
                start += size
                if start >= len(records):
                    break
                size = _next_slice(size, time.perf_counter() - began)
                await asyncio.sleep(0)  # let probes, the poller and other clients in
        except (StoreError, sqlite3.Error, OSError) as error:
            return self._not_recorded("the state store cannot take it", error)
        finally:
            self._count_usage(totals)
        if totals.new or totals.quarantined:
            _log.info(
                "Data Streamer delivery",
                received=totals.received,
                new=totals.new,
                duplicates=totals.duplicates,
                quarantined=totals.quarantined,
                usage_used=totals.usage_used,
                usage_ignored=totals.usage_ignored,
                matched=totals.matched,
            )
        return Answer(
            200,
            {
                "received": totals.received,
                "new": totals.new,
                "duplicates": totals.duplicates,
                "quarantined": totals.quarantined,
                "usage_used": totals.usage_used,
                "usage_ignored": totals.usage_ignored,
            },
        )

    def _count_usage(self, totals: _Totals) -> None:
        if self._metrics is not None:
            if totals.usage_used:
                self._metrics.usage_records_used.inc(totals.usage_used)
            if totals.usage_ignored:
                self._metrics.usage_records_ignored.inc(totals.usage_ignored)

    def _refused(self, status: int, reason: str, error: str) -> Answer:
        self._refusals.note(
            f"Data Streamer delivery refused ({status})", f"{status} {reason}", detail=error
        )
        return Answer(status, {"error": error})

    def _not_recorded(self, reason: str, error: Exception | None) -> Answer:
        # Not recorded, so not acknowledged: the streamer sends the batch again.
        details = {"error": str(error)} if error is not None else {}
        self._unrecorded.note(
            "Data Streamer delivery not recorded; asking for a retry (503)", reason, **details
        )
        what = "the state store is not writable" if error is not None else "too busy"
        return Answer(503, {"error": f"{what}; retry later"})

    def flush_log(self) -> None:
        """Log what the open bursts of refusals have counted (at shutdown)."""
        self._refusals.flush()
        self._unrecorded.flush()


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


async def _read_limited(
    content_length: str | None, body: AsyncIterator[bytes], limit: int
) -> bytes:
    # A declared length over the limit is refused before a byte is read; a chunked or lying
    # body is cut off as soon as it passes the limit.
    declared = content_length.strip() if content_length is not None else ""
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in body:
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _next_slice(size: int, seconds: float) -> int:
    """How many records fit in `_SLICE_SECONDS` at the pace `size` records took `seconds`."""
    low, high = _SLICE_RANGE
    return max(low, min(high, int(size * _SLICE_SECONDS / max(seconds, 1e-6))))


def _records(raw: bytes, max_records: int) -> list[object]:
    """The records of a body: _TooLarge past `max_records`, ValueError if malformed."""
    if not raw.strip():
        raise ValueError("empty body: expected a JSON array of event records or one record")
    # Every JSON value but the first follows a '[', a ',' or a ':' (or more of them, inside
    # strings): an upper bound on what parsing would build, counted at memchr speed.
    values = raw.count(b",") + raw.count(b":") + raw.count(b"[") + 1
    if values > max_records * _VALUES_PER_RECORD:
        raise _TooLarge(
            f"the body holds more JSON values than {max_records} records would "
            "(data_streamer.max_records)"
        )
    try:
        data = loads_records(raw)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"body is not valid JSON: {error}") from None
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise ValueError(
            f"expected a JSON array of event records or one record, got {type(data).__name__}"
        )
    if len(data) > max_records:
        raise _TooLarge(
            f"{len(data)} records, more than the {max_records} a delivery may hold "
            "(data_streamer.max_records)"
        )
    return data
