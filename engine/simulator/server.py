"""Running the simulator: in a background thread for tests, or in the current loop for the CLI."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Self

import uvicorn
from starlette.applications import Starlette

from engine.simulator.app import create_app
from engine.simulator.config import SimulatorConfig
from engine.simulator.lookups import LookupFacts
from engine.simulator.organisations import (
    OrganisationsApp,
    organisation_configs,
)
from engine.simulator.state import SimulatorState
from engine.simulator.streamer import StreamerPusher

logger = logging.getLogger("engine.simulator")

_STARTUP_TIMEOUT = 10.0


def _listen(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle off only on connections whose
    # socket says TCP, and with Nagle on, every response after the first on a keep-alive
    # connection waits ~40 ms for the client's delayed ACK.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _uvicorn(app: Starlette) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        # Leave logging set-up to the host program; only quieten uvicorn's own loggers.
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="on",
        # h11 is pinned: `drop` faults close its transport, and its behaviour is what was tested.
        http="h11",
        ws="none",
        # In-flight `slow` faults must not hold up shutdown.
        timeout_graceful_shutdown=1,
    )
    return uvicorn.Server(config)


def banner(base_url: str, config: SimulatorConfig, organisations: Sequence[str] = ()) -> str:
    """The one line to show when the simulator is up."""
    if organisations:
        tokens = ", ".join(f"{name}: {name}-application-token" for name in organisations)
        return (
            f"emnify simulator at {base_url}, {len(organisations)} organisations (application"
            f" tokens {tokens}; {config.endpoints} endpoints each, seed {config.seed})"
        )
    return (
        f"emnify simulator at {base_url} (application token {config.application_token!r}, "
        f"{config.endpoints} endpoints, seed {config.seed})"
    )


class LoopbackServer:
    """A Starlette app on loopback in a background thread; a (sync or async) context manager.

    `port=0` picks a free port; after start, `base_url` and `port` are set.
    """

    def __init__(self, app: Starlette, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self._requested_port = port
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("the server is not running")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        sock = _listen(self.host, self._requested_port)
        server = _uvicorn(self.app)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=type(self).__name__, daemon=True
        )
        thread.start()
        self._socket, self._server, self._thread = sock, server, thread
        waited = 0.0
        while not server.started:
            if not thread.is_alive() or waited > _STARTUP_TIMEOUT:
                self.stop()
                raise RuntimeError("the server failed to start; see the log above")
            thread.join(0.005)
            waited += 0.005
        self.port = sock.getsockname()[1]
        return self

    def stop(self) -> None:
        server, thread, sock = self._server, self._thread, self._socket
        self._server = self._thread = self._socket = None
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(5.0)
            if thread.is_alive():
                server.force_exit = True
                thread.join(5.0)
        if sock is not None:
            sock.close()
        self.port = 0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


class SimulatorServer(LoopbackServer):
    """The simulator on loopback in a background thread.

    The state can be inspected and changed directly from the test's thread.
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.config = config or SimulatorConfig()
        self.state = SimulatorState(self.config)
        super().__init__(create_app(self.state), host=host, port=port)

    @property
    def streamer(self) -> StreamerPusher | None:
        """The Data Streamer pusher, when `config.stream_url` is set."""
        pusher: StreamerPusher | None = self.app.state.streamer
        return pusher

    @property
    def lookups(self) -> LookupFacts:
        """Quota, usage and connectivity per endpoint, as the lookup calls answer them."""
        facts: LookupFacts = self.app.state.lookups
        return facts

    @property
    def application_token(self) -> str:
        return self.config.application_token


class OrganisationsSimulator(LoopbackServer):
    """Several organisations' simulators on loopback behind one address, in a background
    thread (`SimulatorServer`'s counterpart); `organisations[name].state` is each one's."""

    def __init__(
        self,
        configs: Mapping[str, SimulatorConfig],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        app = OrganisationsApp(configs)
        self.organisations = app.organisations
        super().__init__(app, host=host, port=port)

    def state(self, name: str) -> SimulatorState:
        return self.organisations[name].state

    def application_token(self, name: str) -> str:
        return self.organisations[name].application_token


async def serve(
    config: SimulatorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8089,
    *,
    on_ready: Callable[[str], None] | None = None,
    organisations: Sequence[str] = (),
) -> None:
    """Run a simulator in the current event loop until cancelled (or Ctrl-C).

    `on_ready` gets the banner line once it listens; the banner is also logged at INFO.
    `organisations`: serve several, by these names (`engine.simulator.organisations`).
    """
    config = config or SimulatorConfig()
    sock = _listen(host, port)
    if organisations:
        configs = organisation_configs(organisations, config)
        server = _uvicorn(OrganisationsApp(configs))
    else:
        server = _uvicorn(create_app(SimulatorState(config)))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            bound = sock.getsockname()[1]
            line = banner(f"http://{host}:{bound}", config, organisations)
            logger.info(line)
            if on_ready is not None:
                on_ready(line)
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        await task
        raise
    finally:
        sock.close()
