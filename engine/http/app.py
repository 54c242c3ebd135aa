"""The routes of the daemon's HTTP server, over one running `Daemon`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import orjson
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from engine import __version__
from engine.http.health import readiness
from engine.metrics import CONTENT_TYPE
from engine.sources.streamer import ClientGone

if TYPE_CHECKING:
    from engine.daemon import Daemon
    from engine.sources.streamer import StreamerIngress

INGEST_PATH = "/ingest/data-streamer"
# emnify's RestAPI stream may be set to POST (the default), PUT or PATCH.
INGEST_METHODS = ["POST", "PUT", "PATCH"]
# The body did not arrive in time: the connection is not worth keeping (RFC 9110, 408).
_CLOSING = frozenset({408})


def create_app(daemon: Daemon, ingress: StreamerIngress | None) -> Starlette:
    """`ingress` None (the Data Streamer is not among the sources): no ingest route, 404."""

    async def healthz(request: Request) -> Response:
        # Answering at all is the proof of life: the event loop is turning.
        return JSONResponse({"status": "alive", "version": __version__})

    async def readyz(request: Request) -> Response:
        state = readiness(daemon)
        return JSONResponse(state.as_json(), status_code=200 if state.ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(daemon.metrics.render(), media_type=CONTENT_TYPE)

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    if ingress is not None:
        routes.append(Route(INGEST_PATH, _Ingest(ingress), methods=INGEST_METHODS))
    return Starlette(routes=routes)


class _Ingest:
    """The ingest route as a bare ASGI app: a stream may deliver one event a request, and
    Starlette's Request and JSONResponse would cost a good share of what judging it does."""

    def __init__(self, ingress: StreamerIngress) -> None:
        self._ingress = ingress

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = await self._ingress.receive(Headers(scope=scope), _body(receive))
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
