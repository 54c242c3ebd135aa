"""The simulator as an ASGI app: emnify's API, the admin API, background generation, streaming.

Layers, outermost first: request log, fault
injection, bearer-token gate, routes. So the log sees injected faults, and faults hit before
authentication, as a throttling gateway or a failing load balancer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from engine.simulator.admin import AdminApi
from engine.simulator.api import EmnifyApi
from engine.simulator.faults import FaultInjector, remember_connection
from engine.simulator.gateway import TokenGate
from engine.simulator.lookups import LookupFacts, lookup_routes
from engine.simulator.request_log import RequestLogger
from engine.simulator.responses import api_error
from engine.simulator.state import SimulatorState
from engine.simulator.streamer import StreamerPusher

_TICK = 0.05  # seconds between generator wake-ups; high rates produce a batch per tick


async def run_generator(state: SimulatorState) -> None:
    """Store events at `state.event_rate` per second until cancelled. The rate may change."""
    owed = 0.0
    last = time.monotonic()
    while True:
        await asyncio.sleep(_TICK)
        now = time.monotonic()
        rate = state.event_rate
        owed = owed + (now - last) * rate if rate > 0 else 0.0
        last = now
        due = int(owed)
        if due:
            owed -= due
            state.generate_live(due)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return api_error(404, 1201, "NotFound", f"No resource at {request.url.path}")
    if exc.status_code == 405:
        return api_error(405, 1000, "MethodNotAllowed", f"{request.method} not allowed here")
    return api_error(exc.status_code, 1000, "BadRequest", str(exc.detail))


class _SimulatorApp(Starlette):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Starlette's own error middleware wraps `send`; take the server's before it does.
        remember_connection(scope, send)
        await super().__call__(scope, receive, send)


def create_app(state: SimulatorState) -> Starlette:
    """The simulator app over `state`; `app.state.streamer` is its Data Streamer, if configured."""
    config = state.config
    streamer = (
        StreamerPusher(
            state,
            config.stream_url,
            config.stream_headers,
            config.stream_batch_size,
            config.stream_interval,
            retry_initial_s=config.stream_retry_initial,
            retry_max_s=config.stream_retry_max,
        )
        if config.stream_url
        else None
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        generator = asyncio.create_task(run_generator(state), name="simulator-generator")
        if streamer is not None:
            streamer.start()
        try:
            yield
        finally:
            generator.cancel()
            await asyncio.gather(generator, return_exceptions=True)
            if streamer is not None:
                await streamer.stop()

    lookup_facts = LookupFacts(state)
    app = _SimulatorApp(
        routes=[
            *EmnifyApi(state).routes(),
            *AdminApi(state).routes(),
            *lookup_routes(state, lookup_facts),
        ],
        middleware=[
            Middleware(RequestLogger, state=state),
            Middleware(FaultInjector, state=state),
            Middleware(TokenGate, state=state),
        ],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.simulator = state
    app.state.streamer = streamer
    app.state.lookups = lookup_facts
    return app
