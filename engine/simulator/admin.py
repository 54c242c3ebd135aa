"""The admin API under `/admin`: no auth, never faulted. Tests and the demo drive the
simulator through it; the same operations exist as `SimulatorState` methods.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.simulator.data_streams import ERROR as STREAM_ERROR
from engine.simulator.data_streams import STATUSES as STREAM_STATUSES
from engine.simulator.data_streams import UnknownStream
from engine.simulator.fault_rules import FaultRule, FaultRuleError
from engine.simulator.lifecycle import InvalidChangeError, NotFoundError
from engine.simulator.records import RecordError
from engine.simulator.responses import api_error, json_response, not_found
from engine.simulator.state import SimulatorState


def _bad_request(message: str) -> Response:
    return api_error(400, 1000, "BadRequest", message)


async def _body(request: Request) -> Any:
    raw = await request.body()
    return orjson.loads(raw) if raw else None


class AdminApi:
    def __init__(self, state: SimulatorState) -> None:
        self._state = state

    def routes(self) -> list[Route]:
        return [
            Route("/admin/events", self.list_events, methods=["GET"]),
            Route("/admin/events", self.store_events, methods=["POST"]),
            Route("/admin/events", self.clear_events, methods=["DELETE"]),
            Route("/admin/generate", self.generate, methods=["POST"]),
            Route("/admin/generator", self.get_generator, methods=["GET"]),
            Route("/admin/generator", self.put_generator, methods=["PUT"]),
            Route("/admin/sims", self.list_sims, methods=["GET"]),
            Route("/admin/sims/{sim_id:int}", self.get_sim, methods=["GET"]),
            Route("/admin/sims/{sim_id:int}", self.set_sim, methods=["PUT"]),
            Route("/admin/endpoints", self.list_endpoints, methods=["GET"]),
            Route("/admin/endpoints/{endpoint_id:int}", self.get_endpoint, methods=["GET"]),
            Route("/admin/endpoints/{endpoint_id:int}", self.set_endpoint, methods=["PUT"]),
            Route("/admin/sms", self.list_sms, methods=["GET"]),
            Route("/admin/requests", self.list_requests, methods=["GET"]),
            Route("/admin/requests", self.clear_requests, methods=["DELETE"]),
            Route("/admin/faults", self.get_faults, methods=["GET"]),
            Route("/admin/faults", self.put_faults, methods=["PUT"]),
            Route("/admin/faults", self.clear_faults, methods=["DELETE"]),
            Route("/admin/tokens", self.revoke_tokens, methods=["DELETE"]),
            Route("/admin/reset", self.reset, methods=["POST"]),
            Route("/admin/data_stream/{stream_id:int}", self.set_data_stream, methods=["PUT"]),
            Route("/admin/logins", self.set_logins, methods=["PUT"]),
        ]

    async def set_data_stream(self, request: Request) -> Response:
        """`{"status": 3, "reason": "..."}`: put a data stream in a status (3: Error)."""
        body = await _body(request)
        status = body.get("status") if isinstance(body, dict) else None
        if not isinstance(status, int) or status not in STREAM_STATUSES:
            return _bad_request(f"status must be one of {sorted(STREAM_STATUSES)}")
        stream_id = request.path_params["stream_id"]
        try:
            if status == STREAM_ERROR:
                reason = str(body.get("reason") or "destination unreachable")
                self._state.data_streams.fail(stream_id, reason, self._state.now())
            else:
                self._state.data_streams.set_status(stream_id, status)
        except UnknownStream as exc:
            return _bad_request(str(exc))
        return json_response(self._state.data_streams.get(stream_id))

    async def set_logins(self, request: Request) -> Response:
        """`{"refused": true}`: every login is refused with 401 until set back."""
        body = await _body(request)
        refused = body.get("refused") if isinstance(body, dict) else None
        if not isinstance(refused, bool):
            return _bad_request('expected {"refused": true|false}')
        self._state.logins_refused = refused
        return json_response({"refused": refused})

    async def list_events(self, request: Request) -> Response:
        return json_response(self._state.events())

    async def store_events(self, request: Request) -> Response:
        try:
            body = await _body(request)
        except orjson.JSONDecodeError:
            return _bad_request("body is not valid JSON")
        records = body if isinstance(body, list) else [body]
        if not all(isinstance(r, dict) for r in records):
            return _bad_request("send an event object or an array of them")
        try:
            return json_response(self._state.store_events(records))
        except RecordError as exc:
            return api_error(422, 1400, "InputValidationFailed", str(exc))

    async def clear_events(self, request: Request) -> Response:
        self._state.clear_events()
        return json_response({"cleared": True})

    async def generate(self, request: Request) -> Response:
        """`{"count": 100, "spread_seconds": 600}`: store generated events at once."""
        try:
            body = await _body(request) or {}
            count = int(body.get("count", 1))
            spread = float(body.get("spread_seconds", 0.0))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return _bad_request('expected {"count": N, "spread_seconds": S}')
        return json_response(self._state.generate(count, spread_seconds=spread))

    async def get_generator(self, request: Request) -> Response:
        return json_response({"rate": self._state.event_rate})

    async def put_generator(self, request: Request) -> Response:
        """`{"rate": 5.0}` events a second in the background; `{"paused": true}` or 0 stops."""
        try:
            body = await _body(request) or {}
            rate = 0.0 if body.get("paused") else float(body.get("rate", 0.0))
            self._state.set_event_rate(rate)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            return _bad_request(f'expected {{"rate": 5.0}} or {{"paused": true}}: {exc}')
        return json_response({"rate": rate})

    async def list_sims(self, request: Request) -> Response:
        return json_response(self._state.sims())

    async def get_sim(self, request: Request) -> Response:
        try:
            return json_response(self._state.sim(request.path_params["sim_id"]))
        except NotFoundError as exc:
            return not_found(str(exc))

    async def set_sim(self, request: Request) -> Response:
        """`{"status": {"id": 0}}`: set up a SIM status directly, with no rules and no event."""
        sim_id: int = request.path_params["sim_id"]
        try:
            body = await _body(request)
            self._state.change_sim_status(sim_id, int(body["status"]["id"]), emit=False)
            return json_response(self._state.sim(sim_id))
        except NotFoundError as exc:
            return not_found(str(exc))
        except InvalidChangeError as exc:
            return api_error(422, 1400, "InputValidationFailed", str(exc), exc.errors)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return _bad_request('expected {"status": {"id": N}}')

    async def list_endpoints(self, request: Request) -> Response:
        return json_response(self._state.endpoints())

    async def get_endpoint(self, request: Request) -> Response:
        try:
            return json_response(self._state.endpoint(request.path_params["endpoint_id"]))
        except NotFoundError as exc:
            return not_found(str(exc))

    async def set_endpoint(self, request: Request) -> Response:
        """`{"status": {"id": 1}, "name": ..., "tags": ...}`: set up an endpoint, no event."""
        endpoint_id: int = request.path_params["endpoint_id"]
        try:
            body = await _body(request)
            status = body.get("status")
            self._state.change_endpoint(
                endpoint_id,
                status_id=int(status["id"]) if status is not None else None,
                name=body.get("name"),
                tags=body.get("tags"),
                set_tags="tags" in body,
                emit=False,
            )
            return json_response(self._state.endpoint(endpoint_id))
        except NotFoundError as exc:
            return not_found(str(exc))
        except InvalidChangeError as exc:
            return api_error(422, 1400, "InputValidationFailed", str(exc), exc.errors)
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            return _bad_request('expected {"status": {"id": N}, "name": ..., "tags": ...}')

    async def list_sms(self, request: Request) -> Response:
        return json_response(self._state.sms())

    async def list_requests(self, request: Request) -> Response:
        return json_response([r.to_json() for r in self._state.requests()])

    async def clear_requests(self, request: Request) -> Response:
        self._state.clear_requests()
        return json_response({"cleared": True})

    async def get_faults(self, request: Request) -> Response:
        return json_response(self._state.faults())

    async def put_faults(self, request: Request) -> Response:
        """A rule object, an array of them, or `{"rules": [...]}`; replaces the active rules."""
        try:
            body = await _body(request)
        except orjson.JSONDecodeError:
            return _bad_request("body is not valid JSON")
        if isinstance(body, dict) and "rules" in body:
            body = body["rules"]
        items = body if isinstance(body, list) else [body]
        try:
            rules = [FaultRule.parse(item) for item in items]
        except FaultRuleError as exc:
            return api_error(422, 1400, "InputValidationFailed", f"fault rule: {exc}")
        self._state.set_faults(rules)
        return json_response(self._state.faults())

    async def clear_faults(self, request: Request) -> Response:
        self._state.clear_faults()
        return json_response([])

    async def revoke_tokens(self, request: Request) -> Response:
        """Expire every issued auth token: the next API call gets 401 TokenExpired."""
        return json_response({"revoked": self._state.revoke_tokens()})

    async def reset(self, request: Request) -> Response:
        self._state.reset()
        return json_response({"reset": True})
