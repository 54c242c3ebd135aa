"""The routes of the daemon's HTTP server: health, readiness, metrics, and the routes the
running sources ask for (`Source.routes`, e.g. the Data Streamer's ingress)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

import orjson
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from engine import __version__
from engine.errors import EngineError
from engine.http.health import readiness
from engine.metrics import CONTENT_TYPE
from engine.sources.base import ClientGone
from engine.sources.base import Request as SourceRequest
from engine.sources.base import Route as SourceRoute

if TYPE_CHECKING:
    from engine.services import ServiceContext

OWN_PATHS = ("/healthz", "/readyz", "/metrics")
# The console's pages and API (engine.console), which a source's route may not take.
CONSOLE_PREFIXES = ("/ui", "/api")
# The body did not arrive in time: the connection is not worth keeping (RFC 9110, 408).
_CLOSING = frozenset({408})
# What the entry point hands the server for the console: its routes, given the daemon.
Pages = Callable[["ServiceContext"], Sequence[BaseRoute]]


def create_app(
    context: ServiceContext, *, body_timeout: float | None, pages: Pages | None = None
) -> Starlette:
    """`body_timeout`: seconds a source route's request body may take (`http.body_timeout`);
    `pages`: the routes of the web console (engine.console), when it is served."""

    async def healthz(request: Request) -> Response:
        # Answering at all is the proof of life: the event loop is turning.
        return JSONResponse({"status": "alive", "version": __version__})

    async def readyz(request: Request) -> Response:
        state = readiness(context)
        return JSONResponse(state.as_json(), status_code=200 if state.ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(context.metrics.render(), media_type=CONTENT_TYPE)

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    if pages is not None:
        routes.extend(pages(context))
    for route in source_routes(context):
        routes.append(
            Route(route.path, _SourceRoute(route, body_timeout), methods=list(route.methods))
        )
    return Starlette(routes=routes)


def source_routes(context: ServiceContext) -> Sequence[SourceRoute]:
    """The routes the sources ask for; EngineError when two want the same path."""
    taken = set(OWN_PATHS)
    routes: list[SourceRoute] = []
    for source in context.sources:
        for route in source.routes():
            if route.path in taken or route.path.startswith(CONSOLE_PREFIXES):
                raise EngineError(
                    f"http: the {source.name} source asks for {route.path}, which is taken"
                )
            taken.add(route.path)
            routes.append(route)
    return routes


class _SourceRoute:
    """A source's route as a bare ASGI app: a stream may deliver one event a request, and
    Starlette's Request and JSONResponse would cost a good share of what judging it does."""

    def __init__(self, route: SourceRoute, body_timeout: float | None) -> None:
        self._handle = route.handle
        self._body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = SourceRequest(Headers(scope=scope), _body(receive), self._body_timeout)
        answer = await self._handle(request)
        body = orjson.dumps(answer.body)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if answer.status in _CLOSING:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return
