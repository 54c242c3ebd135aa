"""Data Streamer ingress: emnify pushes event records to us (emnify-api.md §8).

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

This module knows nothing of the web framework; `engine.http` adapts it to a route.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from engine.bursts import Bursts
from engine.errors import StoreError
from engine.jsontext import loads_records

if TYPE_CHECKING:
    from engine.metrics import Metrics
    from engine.pipeline import BatchResult, Pipeline

_log = structlog.get_logger(__name__)

SOURCE = "data_streamer"
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


@dataclass(frozen=True, slots=True)
class StreamerSettings:
    auth_header: str = DEFAULT_AUTH_HEADER
    secret_reference: str | None = None  # `${NAME}`; resolved by `Config.streamer_secret()`
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_records: int = DEFAULT_MAX_RECORDS


@dataclass(frozen=True, slots=True)
class IngressAnswer:
    status: int
    body: dict[str, Any] = field(default_factory=dict)


class ClientGone(Exception):
    """Raised by a body iterator when the client closed the connection mid-body."""


class _TooLarge(Exception):
    pass


@dataclass(slots=True)
class _Totals:
    received: int = 0
    new: int = 0
    duplicates: int = 0
    quarantined: int = 0
    matched: int = 0

    def add(self, batch: BatchResult) -> None:
        self.new += batch.new_events
        self.duplicates += batch.duplicates
        self.quarantined += batch.quarantined
        self.matched += batch.matches


class StreamerIngress:
    """Checks, reads and hands one delivery to the pipeline; `receive` gives the answer."""

    def __init__(
        self,
        settings: StreamerSettings,
        secret: str,
        pipeline: Pipeline,
        *,
        on_batch: Callable[[BatchResult], None] | None = None,
        metrics: Metrics | None = None,
        body_timeout: float | None = None,
    ) -> None:
        """`body_timeout`: seconds a delivery's body may take to arrive (None: no limit)."""
        if not secret:
            raise ValueError("the Data Streamer secret is empty")
        self.settings = settings
        self.pipeline = pipeline
        self._secret_digest = _digest(secret)
        self._on_batch = on_batch
        self._metrics = metrics
        self._body_timeout = body_timeout
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

    async def receive(
        self, headers: Mapping[str, str], body: AsyncIterator[bytes]
    ) -> IngressAnswer:
        """`headers` as a case-insensitive mapping (lower-case keys work too)."""
        answer = await self._receive(headers, body)
        if self._metrics is not None:
            self._metrics.ingress_requests.labels(str(answer.status)).inc()
        return answer

    async def _receive(
        self, headers: Mapping[str, str], body: AsyncIterator[bytes]
    ) -> IngressAnswer:
        if not self.authorized(headers):
            error = f"missing or wrong {self.settings.auth_header}"
            return self._refused(401, "missing or wrong secret header", error)
        # The body is due `body_timeout` after the headers, waiting for a slot included.
        timeout = self._body_timeout
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            return self._not_recorded("too many deliveries at once", None)
        try:
            return await self._read_and_judge(headers, body, deadline)
        finally:
            self._slots.release()

    async def _read_and_judge(
        self, headers: Mapping[str, str], body: AsyncIterator[bytes], deadline: float | None
    ) -> IngressAnswer:
        limit = self.settings.max_body_bytes
        try:
            async with asyncio.timeout_at(deadline):
                raw = await _read_limited(headers.get("content-length"), body, limit)
        except _TooLarge:
            return self._refused(413, "body too large", f"body larger than {limit} bytes")
        except TimeoutError:
            return self._refused(
                408, "body too slow", f"the body did not arrive within {self._body_timeout:g}s"
            )
        except ClientGone:
            self._refusals.note(
                "Data Streamer delivery abandoned: the client closed the connection mid-body",
                "client went away",
            )
            return IngressAnswer(CLIENT_GONE)
        async with self._judging:
            try:
                records = _records(raw, self.settings.max_records)
            except _TooLarge as error:
                return self._refused(413, "too many records", str(error))
            except ValueError as error:
                return self._refused(400, "malformed body", str(error))
            del raw
            return await self._judge(records)

    async def _judge(self, records: list[object]) -> IngressAnswer:
        totals = _Totals(received=len(records))
        usage = 0
        start, size = 0, _FIRST_SLICE
        try:
            while True:
                began = time.perf_counter()
                piece = records[start : start + size]
                events = [r for r in piece if not is_usage_record(r)]
                usage += len(piece) - len(events)
                batch = self.pipeline.process(events, source=SOURCE)
                if self._on_batch is not None:
                    self._on_batch(batch)
                totals.add(batch)
                start += size
                if start >= len(records):
                    break
                size = _next_slice(size, time.perf_counter() - began)
                await asyncio.sleep(0)  # let probes, the poller and other clients in
        except (StoreError, sqlite3.Error, OSError) as error:
            return self._not_recorded("the state store cannot take it", error)
        finally:
            if usage and self._metrics is not None:
                self._metrics.usage_records_ignored.inc(usage)
        if totals.new or totals.quarantined:
            _log.info(
                "Data Streamer delivery",
                received=totals.received,
                new=totals.new,
                duplicates=totals.duplicates,
                quarantined=totals.quarantined,
                usage_ignored=usage,
                matched=totals.matched,
            )
        return IngressAnswer(
            200,
            {
                "received": totals.received,
                "new": totals.new,
                "duplicates": totals.duplicates,
                "quarantined": totals.quarantined,
                "usage_ignored": usage,
            },
        )

    def _refused(self, status: int, reason: str, error: str) -> IngressAnswer:
        self._refusals.note(
            f"Data Streamer delivery refused ({status})", f"{status} {reason}", detail=error
        )
        return IngressAnswer(status, {"error": error})

    def _not_recorded(self, reason: str, error: Exception | None) -> IngressAnswer:
        # Not recorded, so not acknowledged: the streamer sends the batch again.
        details = {"error": str(error)} if error is not None else {}
        self._unrecorded.note(
            "Data Streamer delivery not recorded; asking for a retry (503)", reason, **details
        )
        what = "the state store is not writable" if error is not None else "too busy"
        return IngressAnswer(503, {"error": f"{what}; retry later"})

    def flush_log(self) -> None:
        """Log what the open bursts of refusals have counted (at shutdown)."""
        self._refusals.flush()
        self._unrecorded.flush()


def is_usage_record(record: object) -> bool:
    """A usage record (data or SMS traffic), as opposed to an event record: usage records
    carry `traffic_type` and `volume` and no `event_type` (emnify-api.md §8)."""
    return (
        isinstance(record, dict)
        and "event_type" not in record
        and ("traffic_type" in record or "volume" in record)
    )


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
