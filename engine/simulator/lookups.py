"""The read-only calls a rule's `lookup` makes, as the simulator answers them.

- `GET /api/v1/endpoint/{id}/quota/data` and `.../quota/sms`: served with the quota actions
  (`EmnifyApi.quota_routes`, one store of quotas); `LookupFacts.set(quota_data=...)` puts a
  quota there as a test gives it;
- `GET /api/v1/endpoint/{id}/stats`: usage with `current_month`, `last_month` and
  `last_hour`, each `{"data": {"volume", "volume_tx", "volume_rx"}, "sms": {...}}` (MB and
  messages; the shape is this simulator's reading of the API reference, §6.5);
- `GET /api/v1/endpoint/{id}/connectivity`: `{"status": {"description": "OFFLINE"},
  "services": []}` as recorded (§6.5) until a test says otherwise.

Tests set the facts per endpoint with `LookupFacts.set` (`SimulatorServer.lookups`); an
unknown endpoint answers `404` as `GET /api/v1/endpoint/{id}` does.
"""

from __future__ import annotations

import threading
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.simulator.lifecycle import NotFoundError
from engine.simulator.responses import api_error, json_response
from engine.simulator.state import SimulatorState

_NO_USAGE = {"data": {"volume": 0.0, "volume_tx": 0.0, "volume_rx": 0.0}, "sms": {"volume": 0}}
_OFFLINE = {"status": {"description": "OFFLINE"}, "services": []}


class LookupFacts:
    """Quota, usage and connectivity per endpoint id, changed from the test's thread."""

    def __init__(self, state: SimulatorState) -> None:
        self._lock = threading.Lock()
        self._facts: dict[tuple[int, str], Any] = {}
        self._state = state

    def set(self, endpoint_id: int, **facts: Any) -> None:
        """Set `quota_data`, `quota_sms`, `stats` or `connectivity` for one endpoint
        (`None` removes a quota)."""
        with self._lock:
            for name, value in facts.items():
                if name in ("quota_data", "quota_sms"):
                    with self._state.lock:
                        self._state.quotas.put(endpoint_id, name.removeprefix("quota_"), value)
                else:
                    self._facts[(endpoint_id, name)] = value

    def clear(self) -> None:
        """Forget every fact set: each endpoint answers the defaults again."""
        with self._lock:
            self._facts.clear()

    def get(self, endpoint_id: int, name: str, default: Any) -> Any:
        with self._lock:
            return self._facts.get((endpoint_id, name), default)


def lookup_routes(state: SimulatorState, facts: LookupFacts) -> list[Route]:
    """The routes above over `state` (which endpoints exist) and `facts`."""

    def known(request: Request) -> int | Response:
        endpoint_id: int = request.path_params["endpoint_id"]
        try:
            state.endpoint(endpoint_id)
        except NotFoundError as exc:
            return api_error(404, 1401, "InvalidReference", str(exc))
        return endpoint_id

    async def stats(request: Request) -> Response:
        endpoint_id = known(request)
        if isinstance(endpoint_id, Response):
            return endpoint_id
        none = {"current_month": _NO_USAGE, "last_month": _NO_USAGE, "last_hour": _NO_USAGE}
        return json_response(facts.get(endpoint_id, "stats", none))

    async def connectivity(request: Request) -> Response:
        endpoint_id = known(request)
        if isinstance(endpoint_id, Response):
            return endpoint_id
        return json_response(facts.get(endpoint_id, "connectivity", _OFFLINE))

    base = "/api/v1/endpoint/{endpoint_id:int}"
    return [
        Route(f"{base}/stats", stats, methods=["GET"]),
        Route(f"{base}/connectivity", connectivity, methods=["GET"]),
    ]
