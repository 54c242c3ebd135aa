"""Records every API request with its outcome, for tests that count calls or check timing.

`/admin` calls are not recorded: they are the test's own bookkeeping, not client traffic.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.simulator.state import RequestRecord, SimulatorState

FAULT_SCOPE_KEY = "simulator.fault"
# Set by `engine.simulator.organisations`: whose token a request carried.
ORGANISATION_SCOPE_KEY = "simulator.organisation"
_LOG_KEY = "simulator.log_request"


def log_before_closing(scope: Scope) -> None:
    """Record the request now, before a fault closes its connection: a client that saw the
    connection drop finds the entry (as one that got its answer does)."""
    log = scope.get(_LOG_KEY)
    if callable(log):
        log()


def note_fault(scope: Scope, kind: str) -> None:
    """Mark a request as faulted, so its log entry says which fault hit it."""
    previous = scope.get(FAULT_SCOPE_KEY)
    scope[FAULT_SCOPE_KEY] = f"{previous},{kind}" if previous else kind


class RequestLogger:
    def __init__(self, app: ASGIApp, state: SimulatorState) -> None:
        self._app = app
        self._state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or path.startswith("/admin"):
            await self._app(scope, receive, send)
            return
        wall, started = time.time(), time.monotonic()
        status: int | None = None
        logged = False

        def log() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            self._state.log_request(
                RequestRecord(
                    method=scope["method"],
                    path=path,
                    query=scope.get("query_string", b"").decode("latin-1"),
                    status=status,
                    fault=scope.get(FAULT_SCOPE_KEY),
                    wall_time=wall,
                    monotonic_time=started,
                    duration=time.monotonic() - started,
                    organisation=scope.get(ORGANISATION_SCOPE_KEY),
                )
            )

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                # An empty body is complete with its headers: the client has its answer
                # before the body message is even sent. So is any 204 or 304, which has no
                # body (and may come without a content-length).
                headers = message.get("headers", ())
                if status in (204, 304) or any(
                    k.lower() == b"content-length" and v == b"0" for k, v in headers
                ):
                    log()
            elif (
                message["type"] == "http.response.body"
                and not message.get("more_body")
                and not logged
            ):
                # Log before the last byte leaves: a client that got its answer finds the entry.
                log()
            await send(message)

        scope[_LOG_KEY] = log
        try:
            await self._app(scope, receive, send_noting_status)
        finally:
            if not logged:
                log()
