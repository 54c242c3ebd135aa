"""The routes of the daemon's HTTP server, over one running `Daemon`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine import __version__
from engine.http.health import readiness
from engine.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from engine.daemon import Daemon
    from engine.sources.streamer import StreamerIngress

INGEST_PATH = "/ingest/data-streamer"
# emnify's RestAPI stream may be set to POST (the default), PUT or PATCH.
INGEST_METHODS = ["POST", "PUT", "PATCH"]


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
        receiver = ingress

        async def ingest(request: Request) -> Response:
            answer = await receiver.receive(request.headers, request.stream())
            return JSONResponse(answer.body, status_code=answer.status)

        routes.append(Route(INGEST_PATH, ingest, methods=INGEST_METHODS))
    return Starlette(routes=routes)
