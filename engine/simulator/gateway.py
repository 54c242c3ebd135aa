"""The API Gateway in front of emnify: every `/api/` call but login needs a valid bearer token.

A missing or malformed token never reaches the API and gets the gateway's own 401 body; an
expired or revoked one gets the API's `TokenExpired` (emnify-api.md §2.4).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from engine.simulator.responses import api_error, gateway_unauthorized
from engine.simulator.state import SimulatorState
from engine.simulator.tokens import TokenCheck

_OPEN_PATHS = frozenset({"/api/v1/authenticate"})


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class TokenGate:
    def __init__(self, app: ASGIApp, state: SimulatorState) -> None:
        self._app = app
        self._state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/api/") or path in _OPEN_PATHS:
            await self._app(scope, receive, send)
            return
        check = self._state.check_token(bearer_token(scope))
        if check is TokenCheck.VALID:
            await self._app(scope, receive, send)
        elif check is TokenCheck.EXPIRED:
            await api_error(401, 1103, "TokenExpired", "Token expired")(scope, receive, send)
        elif check is TokenCheck.UNKNOWN:
            await api_error(401, 1102, "InvalidToken", "Invalid token")(scope, receive, send)
        else:
            await gateway_unauthorized()(scope, receive, send)
