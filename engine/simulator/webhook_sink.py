"""A webhook receiver on loopback for the demo and the tests: records every call it gets,
and counts distinct `Idempotency-Key`s so duplicates show."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.simulator.server import LoopbackServer


@dataclass(frozen=True, slots=True)
class ReceivedCall:
    channel: str
    method: str
    headers: dict[str, str]
    body: Any
    at: float


class WebhookSink:
    """Accepts any method on `/hooks/{channel}` and answers `status` (default 200)."""

    def __init__(self) -> None:
        self.base_url = ""
        self._lock = threading.Lock()
        self._calls: list[ReceivedCall] = []
        self.status = 200
        self.app = Starlette(
            routes=[
                Route(
                    "/hooks/{channel}",
                    self._receive,
                    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                )
            ]
        )

    async def _receive(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        call = ReceivedCall(
            channel=request.path_params["channel"],
            method=request.method,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            at=time.time(),
        )
        with self._lock:
            self._calls.append(call)
            status = self.status
        return Response(status_code=status)

    def calls(self, channel: str | None = None) -> list[ReceivedCall]:
        with self._lock:
            return [c for c in self._calls if channel is None or c.channel == channel]

    def idempotency_keys(self) -> Counter[str]:
        """How often each `Idempotency-Key` arrived (a count above 1 is a duplicate)."""
        return Counter(c.headers.get("idempotency-key", "") for c in self.calls())


class WebhookSinkServer(LoopbackServer):
    """A `WebhookSink` on loopback; `sink.base_url` is set once it listens."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sink = WebhookSink()
        super().__init__(self.sink.app, host=host, port=port)

    def start(self) -> WebhookSinkServer:
        super().start()
        self.sink.base_url = self.base_url
        return self
