"""Data Streamer ingress: emnify pushes event records to us (emnify-api.md §8).

A RestAPI stream POSTs (or PUTs/PATCHes) a JSON array of records, perhaps a bare object when
its `size` is 1, with the static headers configured on the stream and nothing else: no
signature. So a delivery is accepted only with the configured secret header (compared in
constant time), within a body size limit, and answered 2xx only once its events are
committed: anything else makes the streamer deliver the batch again, and the seen-id dedup
that the poller shares drops whatever arrives twice.

This module knows nothing of the web framework; `engine.http` adapts it to a route.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from engine.jsontext import loads_records
from engine.store import StoreError

if TYPE_CHECKING:
    from engine.metrics import Metrics
    from engine.pipeline import BatchResult, Pipeline

_log = structlog.get_logger(__name__)

SOURCE = "data_streamer"
DEFAULT_AUTH_HEADER = "X-Emnify-Secret"
# emnify's default stream `size` is 3000 records a request, a few KB each at most.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StreamerSettings:
    auth_header: str = DEFAULT_AUTH_HEADER
    secret_reference: str | None = None  # `${NAME}`; resolved by `Config.streamer_secret()`
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


@dataclass(frozen=True, slots=True)
class IngressAnswer:
    status: int
    body: dict[str, Any] = field(default_factory=dict)


class _TooLarge(Exception):
    pass


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
    ) -> None:
        if not secret:
            raise ValueError("the Data Streamer secret is empty")
        self.settings = settings
        self.pipeline = pipeline
        self._secret_digest = _digest(secret)
        self._on_batch = on_batch
        self._metrics = metrics

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
            _log.warning("Data Streamer delivery refused: missing or wrong secret header")
            return IngressAnswer(401, {"error": f"missing or wrong {self.settings.auth_header}"})
        limit = self.settings.max_body_bytes
        try:
            raw = await _read_limited(headers.get("content-length"), body, limit)
        except _TooLarge:
            _log.warning("Data Streamer delivery refused: body too large", limit=limit)
            return IngressAnswer(413, {"error": f"body larger than {limit} bytes"})
        try:
            records = _records(raw)
        except ValueError as error:
            _log.warning("Data Streamer delivery refused: malformed body", reason=str(error))
            return IngressAnswer(400, {"error": str(error)})
        events = [r for r in records if not is_usage_record(r)]
        usage = len(records) - len(events)
        if usage and self._metrics is not None:
            self._metrics.usage_records_ignored.inc(usage)
        try:
            batch = self.pipeline.process(events, source=SOURCE)
        except StoreError as error:
            # Not recorded, so not acknowledged: the streamer sends the batch again.
            _log.error("Data Streamer delivery not recorded; asking for a retry", error=str(error))
            return IngressAnswer(503, {"error": "the state store is not writable; retry later"})
        if self._on_batch is not None:
            self._on_batch(batch)
        if batch.new_events or batch.quarantined:
            _log.info(
                "Data Streamer delivery",
                received=len(records),
                new=batch.new_events,
                duplicates=batch.duplicates,
                quarantined=batch.quarantined,
                usage_ignored=usage,
                matched=batch.matches,
            )
        return IngressAnswer(
            200,
            {
                "received": len(records),
                "new": batch.new_events,
                "duplicates": batch.duplicates,
                "quarantined": batch.quarantined,
                "usage_ignored": usage,
            },
        )


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


def _records(raw: bytes) -> list[object]:
    if not raw.strip():
        raise ValueError("empty body: expected a JSON array of event records or one record")
    try:
        data = loads_records(raw)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"body is not valid JSON: {error}") from None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        return [data]
    raise ValueError(
        f"expected a JSON array of event records or one record, got {type(data).__name__}"
    )
