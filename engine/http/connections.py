"""Bounds on the HTTP server's connections: how many, and how long a request may take to arrive.

uvicorn leaves three doors open that an attacker (or a broken client) walks through:
- a connection that never completes its request headers, or drips them a byte at a time
  (slowloris), stays open for ever: its keep-alive timer starts only after a first answer;
- httptools puts no bound on the size of a request's headers;
- its `limit_concurrency` counts idle connections like busy ones, answers every request past
  the limit with 503 (health probes included) and logs a line for each.

So every connection here passes a `ConnectionGate`:
- a request line and headers must arrive within `header_timeout` of the connection opening
  (or of its previous answer) and within `max_header_bytes`; else 408 or 431, and closed;
- at most `max_connections` are open. Past that, a new connection takes the place of the one
  idle the longest (a keep-alive between requests, or one still sending its headers), so a
  flood of idle connections cannot lock probes and deliveries out; only when every
  connection has a request in progress is the new one refused with 503;
- what is turned away is logged once per burst (`engine.bursts`) and counted.
How long a request's body may take is the route's business (the ingress has `body_timeout`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from engine.bursts import Bursts


def _canned(status: str, text: str) -> bytes:
    body = text.encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


_BUSY = _canned("503 Service Unavailable", "too many connections; try again later\n")
_TOO_SLOW = _canned("408 Request Timeout", "the request's headers took too long\n")
_TOO_LARGE = _canned("431 Request Header Fields Too Large", "the request's headers are too large\n")


class ConnectionGate:
    """The server's connections: who is open, who is idle (oldest first), who must go."""

    def __init__(
        self,
        max_connections: int,
        header_timeout: float,
        max_header_bytes: int,
        *,
        on_turned_away: Callable[[str], None] | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self._open: set[GuardedProtocol] = set()
        self._idle: dict[GuardedProtocol, None] = {}  # insertion order: idle the longest first
        self._on_turned_away = on_turned_away
        self.bursts = Bursts("more HTTP connections turned away")

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def admit(self, connection: GuardedProtocol) -> bool:
        if len(self._open) >= self.max_connections:
            oldest = next(iter(self._idle), None)
            if oldest is None:
                self.turned_away(
                    "HTTP connection refused: every connection has a request in progress",
                    "refused at the limit",
                )
                return False
            self.turned_away(
                "HTTP connection limit reached: the connection idle the longest makes room",
                "idle one closed at the limit",
            )
            self.left(oldest)
            oldest.give_way()
        self._open.add(connection)
        return True

    def left(self, connection: GuardedProtocol) -> None:
        self._open.discard(connection)
        self._idle.pop(connection, None)

    def idle(self, connection: GuardedProtocol) -> None:
        if connection in self._open:
            self._idle.pop(connection, None)
            self._idle[connection] = None

    def busy(self, connection: GuardedProtocol) -> None:
        self._idle.pop(connection, None)

    def turned_away(self, message: str, reason: str) -> None:
        self.bursts.note(message, reason, limit=self.max_connections)
        if self._on_turned_away is not None:
            self._on_turned_away(reason)


class ServerConfig(uvicorn.Config):
    """uvicorn's settings, with the gate its connections pass."""

    def __init__(self, app: Any, *, gate: ConnectionGate, **settings: Any) -> None:
        super().__init__(app, http=GuardedProtocol, **settings)
        self.gate = gate


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (httptools parses a request in a third of h11's time,
    which shows at Data Streamer rates of one event a request), through a `ConnectionGate`
    (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        assert isinstance(config, ServerConfig)
        self._gate = config.gate
        self._admitted = False
        # Waiting: since the connection opened or its last answer, no request's headers are
        # complete (the header timer runs). In headers: a request has begun, not its body.
        self._waiting = False
        self._in_headers = False
        self._header_bytes = 0  # received while in a request's headers
        self._header_size = 0  # of the request line and headers parsed so far
        self._header_timer: asyncio.TimerHandle | None = None
        self._refused = False  # answered already: whatever else arrives is dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if not self._gate.admit(self):
            transport.write(_BUSY)
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._gate.left(self)
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if (
            self._in_headers
            and self._header_bytes > self._gate.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._headers_too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = self._header_size = 0

    def on_url(self, url: bytes) -> None:
        if self._within_header_limit(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._within_header_limit(len(name) + len(value) + 4):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._waiting = self._in_headers = False
        self._stop_header_timer()
        if self._refused:
            return
        if self._header_size > self._gate.max_header_bytes:
            self._headers_too_large()
            return
        self._gate.busy(self)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined request already read has taken over: its headers are in.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_headers()

    def give_way(self) -> None:
        """Close at once: the gate needs the room for a new connection."""
        self._stop_header_timer()
        if not self.transport.is_closing():
            self.transport.close()

    def _await_headers(self) -> None:
        self._waiting = True
        self._gate.idle(self)
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self._gate.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self._waiting or self.transport.is_closing():
            return
        if not self._in_headers:
            # Idle (or still sending the body of a request answered early): closing it is
            # routine, not news.
            self.transport.close()
            return
        self._gate.turned_away(
            "HTTP request dropped: its headers did not arrive in time (408)", "headers too slow"
        )
        self._answer_and_close(_TOO_SLOW)

    def _within_header_limit(self, size: int) -> bool:
        """Count a piece of the request line or headers; past the limit, drop it (the
        request is refused once its headers are complete, or once it sent too much)."""
        self._header_size += size
        return self._header_size <= self._gate.max_header_bytes

    def _headers_too_large(self) -> None:
        self._gate.turned_away(
            "HTTP request refused: its headers are too large (431)", "headers too large"
        )
        self._answer_and_close(_TOO_LARGE)

    def _answer_and_close(self, answer: bytes) -> None:
        self._refused = True
        self._waiting = self._in_headers = False
        self._stop_header_timer()
        self.transport.write(answer)
        self.transport.close()

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
