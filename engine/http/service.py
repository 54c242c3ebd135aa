"""`HttpService`: the daemon's HTTP server as a `Service`, on uvicorn in the daemon's own loop.

It serves health, readiness and metrics, and mounts whatever routes the running sources ask
for (the Data Streamer's ingress). Running in the same loop as the sources matters:
`Pipeline.process` is synchronous, so a pushed delivery and a poll batch can never be judged
at the same time, and an event that arrives by both doors is evaluated once, by whichever
commits first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import structlog
import uvicorn

from engine.errors import EngineError
from engine.http.app import OWN_PATHS, Pages, create_app, source_routes
from engine.http.connections import ConnectionGate, ServerConfig
from engine.http.settings import HttpSettings

if TYPE_CHECKING:
    from engine.services import ServiceContext

_log = structlog.get_logger(__name__)

_STARTUP_TIMEOUT = 10.0
_STOP_TIMEOUT = 3.0
# Connections the kernel queues for us, and that asyncio may accept in one go before the gate
# sees them: each holds a file descriptor meanwhile.
_BACKLOG = 128
# File descriptors kept for everything but HTTP clients: the store, the emnify and webhook
# connection pools, the rule-file watcher, the logs.
_RESERVED_FILES = 128


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon owns SIGTERM/SIGINT and stops
    this server as one of its services."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpService:
    def __init__(self, settings: HttpSettings, pages: Pages | None = None) -> None:
        """`pages`: the web console's routes (`ui.enabled`), made once the daemon runs."""
        self.settings = settings
        self._pages = pages
        self._socket: socket.socket | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._gate: ConnectionGate | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the HTTP server is not bound")
        port: int = self._socket.getsockname()[1]
        return port

    @property
    def base_url(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def startup_line(self) -> str:
        """What `run`'s start-up block says of the server."""
        console = " /ui" if self._pages is not None else ""
        return f"{self.base_url} (/healthz /readyz /metrics{console})"

    def bind(self) -> int:
        """Open the listening socket now (so its port is known before the daemon starts,
        e.g. to point a Data Streamer at it); `start` binds if this was not called."""
        if self._socket is None:
            host, port = self.settings.host, self.settings.port
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                self._socket = socket.create_server((host, port), family=family)
                # Accepted connections inherit it. asyncio sets it only on sockets made
                # with IPPROTO_TCP, which create_server's are not; without it each answer
                # after the first on a keep-alive connection waits ~40 ms for a delayed ACK.
                self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as error:
                reason = os.strerror(error.errno) if error.errno else str(error)
                raise EngineError(
                    f"http: cannot listen on {host}:{port}: {reason}",
                ) from None
        return self.port

    async def start(self, context: ServiceContext) -> None:
        self.bind()
        assert self._socket is not None
        app = create_app(context, body_timeout=self.settings.body_timeout, pages=self._pages)
        turned_away = context.metrics.http_turned_away
        gate = ConnectionGate(
            _connection_limit(self.settings.max_connections),
            self.settings.header_timeout,
            self.settings.max_header_bytes,
            on_turned_away=lambda reason: turned_away.labels(reason).inc(),
        )
        config = ServerConfig(
            app,
            gate=gate,
            log_config=None,  # structlog is configured by the CLI
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            backlog=_BACKLOG,
            timeout_graceful_shutdown=int(_STOP_TIMEOUT),
        )
        self._gate = gate
        server = _EmbeddedServer(config)
        task = asyncio.create_task(server.serve(sockets=[self._socket]), name="http-server")
        self._server, self._task = server, task
        waited = 0.0
        while not server.started:
            if task.done() or waited > _STARTUP_TIMEOUT:
                await self.stop()
                raise EngineError("http: the server did not start; see the log above")
            await asyncio.sleep(0.01)
            waited += 0.01
        _log.debug(  # the start-up block names the address
            "http server listening",
            url=self.base_url,
            endpoints=" ".join([*OWN_PATHS, *(r.path for r in source_routes(context))]),
        )

    async def stop(self) -> None:
        server, task, sock = self._server, self._task, self._socket
        self._server = self._task = self._socket = None
        if server is not None and task is not None:
            server.should_exit = True
            done, _ = await asyncio.wait([task], timeout=_STOP_TIMEOUT + 1.0)
            if not done:
                _log.warning("http server did not stop in time; closing its connections")
                server.force_exit = True
                done, _ = await asyncio.wait([task], timeout=1.0)
            if not done:
                task.cancel()
            elif not task.cancelled() and task.exception() is not None:
                _log.error("http server failed", error=repr(task.exception()))
        if sock is not None:
            sock.close()
        # What the last bursts of refusals counted, before the log closes.
        if self._gate is not None:
            self._gate.bursts.flush()


def _connection_limit(wanted: int) -> int:
    """`wanted`, or fewer if the process may not open enough files for that many clients
    beside its own: past that limit accept() fails, and asyncio logs a traceback a second.
    The soft limit is raised to the hard one first, as a server should."""
    try:
        import resource
    except ImportError:  # not on Windows
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and hard != resource.RLIM_INFINITY and hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY or soft - _RESERVED_FILES - _BACKLOG >= wanted:
        return wanted
    limit = max(soft - _RESERVED_FILES - _BACKLOG, 1)
    _log.warning(
        "http.max_connections lowered to fit the open-files limit (raise LimitNOFILE)",
        wanted=wanted,
        max_connections=limit,
        open_files_limit=soft,
    )
    return limit
