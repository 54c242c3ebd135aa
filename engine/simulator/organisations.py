"""Several emnify organisations behind one simulator address, told apart by their tokens.

Each organisation is a whole simulator of its own (`SimulatorState` and app: its fleet, its
events, its request log, its faults), made from its own `SimulatorConfig`: its application
token, its organisation id and name, and an `id_offset` so that no two fleets share an
endpoint, SIM or ICCID. Event ids start at the same number in every organisation, as two
real organisations' ids may meet: an engine must keep each one's seen ids apart.

A login goes to the organisation whose application token it carries; every other call to
the one whose login issued its bearer token, as emnify's API answers with the data of the
token's organisation. A call with no token, or one nobody issued, goes to the first
organisation (which refuses it as the single simulator does); `/organisations/NAME/...`
reaches one organisation's routes directly (its `/admin` API, say).

`engine.simulator.OrganisationsSimulator` runs them on loopback for tests;
`event-engine simulate --organisations acme,globex` serves them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace

import orjson
from starlette.applications import Starlette
from starlette.types import Message, Receive, Scope, Send

from engine.simulator.app import create_app
from engine.simulator.config import ORGANISATION_ID, SimulatorConfig
from engine.simulator.gateway import bearer_token
from engine.simulator.request_log import ORGANISATION_SCOPE_KEY
from engine.simulator.state import SimulatorState
from engine.simulator.tokens import TokenCheck

_LOGIN = "/api/v1/authenticate"
_PREFIX = "/organisations/"
# Ids of the n-th organisation's fleet start this far after the first one's.
ID_SPACING = 1_000_000
_MAX_LOGIN_BODY = 64 * 1024


@dataclass(slots=True)
class SimulatedOrganisation:
    """One organisation of the simulator: its name, its state and its app."""

    name: str
    state: SimulatorState
    app: Starlette

    @property
    def application_token(self) -> str:
        return self.state.config.application_token


def organisation_configs(
    names: Sequence[str], base: SimulatorConfig | None = None
) -> dict[str, SimulatorConfig]:
    """A config per organisation from one base: its own token (`NAME-application-token`),
    organisation id and name, seed and ids; the rest (rates, faults) as in `base`."""
    base = base or SimulatorConfig()
    return {
        name: replace(
            base,
            application_token=f"{name}-application-token",
            organisation_id=ORGANISATION_ID + index,
            organisation_name=f"{name.capitalize()} GmbH",
            id_offset=index * ID_SPACING,
            seed=base.seed + index,
        )
        for index, name in enumerate(names)
    }


class OrganisationsApp(Starlette):
    """The organisations' apps behind one address (see the module docstring)."""

    def __init__(self, configs: Mapping[str, SimulatorConfig]) -> None:
        if not configs:
            raise ValueError("at least one organisation is needed")
        tokens = [config.application_token for config in configs.values()]
        if len(set(tokens)) != len(tokens):
            raise ValueError("each organisation needs its own application token")
        self.organisations: dict[str, SimulatedOrganisation] = {}
        for name, config in configs.items():
            state = SimulatorState(config)
            self.organisations[name] = SimulatedOrganisation(name, state, create_app(state))
        super().__init__(lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for organisation in self.organisations.values():
                inner = organisation.app
                await stack.enter_async_context(inner.router.lifespan_context(inner))
            yield

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if path.startswith(_PREFIX):
            name, _, rest = path.removeprefix(_PREFIX).partition("/")
            organisation = self.organisations.get(name)
            if organisation is not None:
                scope = {**scope, "path": "/" + rest, "raw_path": ("/" + rest).encode()}
                await organisation.app(scope, receive, send)
                return
        if path == _LOGIN and scope.get("method") == "POST":
            body = await _read_body(receive)
            found = self._by_application_token(body)
            await self._call(found, scope, _replay(body), send)
            return
        await self._call(self._by_bearer(scope), scope, receive, send)

    async def _call(
        self, found: SimulatedOrganisation | None, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """To the organisation whose token the call carries (the first one when none),
        its request log noting whose token it was."""
        if found is None:
            await self._first().app(scope, receive, send)
            return
        await found.app({**scope, ORGANISATION_SCOPE_KEY: found.name}, receive, send)

    def _first(self) -> SimulatedOrganisation:
        return next(iter(self.organisations.values()))

    def _by_application_token(self, body: bytes) -> SimulatedOrganisation | None:
        try:
            token = orjson.loads(body).get("application_token")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        for organisation in self.organisations.values():
            if token == organisation.application_token:
                return organisation
        return None

    def _by_bearer(self, scope: Scope) -> SimulatedOrganisation | None:
        token = bearer_token(scope)
        if token:
            for organisation in self.organisations.values():
                if organisation.state.check_token(token) is not TokenCheck.UNKNOWN:
                    return organisation
        return None


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= _MAX_LOGIN_BODY:
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive
