"""The emnify REST API calls the engine uses (emnify-api.md §11), with their wire quirks."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.simulator.catalog import event_type_names
from engine.simulator.data_streams import STATUSES as STREAM_STATUSES
from engine.simulator.data_streams import UnknownStream
from engine.simulator.event_query import QueryError, parse_query
from engine.simulator.generator import OPERATORS
from engine.simulator.lifecycle import InvalidChangeError, NotFoundError
from engine.simulator.paging import PagingError, cut_page, page_request, paging_headers
from engine.simulator.profiles import profile_list
from engine.simulator.quotas import KINDS as QUOTA_KINDS
from engine.simulator.quotas import InvalidQuota
from engine.simulator.request_log import note_fault
from engine.simulator.responses import (
    api_error,
    empty,
    json_response,
    not_found,
    validation_failed,
)
from engine.simulator.state import SimulatorState

_EXTENSION = "/api/v1/endpoint/{endpoint_id:int}/traffic_limit_extension"
_PAGING_FAULTS = frozenset({"clamp_per_page"})
_DUPLICATE_FAULTS = frozenset({"duplicate_across_pages"})


class _BadBody(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        bad = api_error(400, 1000, "BadRequest", "Request body is not valid JSON")
        raise _BadBody(bad) from None


def _status_id(body: Any, what: str) -> int | None:
    """The `status.id` of a PATCH body, None if absent; raises `_BadBody` if malformed."""
    if not isinstance(body, dict):
        raise _BadBody(
            validation_failed(
                f"Update {what} validation error",
                [_required("body", "a JSON object is required")],
            )
        )
    if "status" not in body:
        return None
    status = body["status"]
    ident = status.get("id") if isinstance(status, dict) else None
    if not isinstance(ident, int) or isinstance(ident, bool):
        raise _BadBody(
            validation_failed(
                f"Update {what} validation error",
                [
                    {
                        "error_code": 1403,
                        "error_token": "InvalidFormat",
                        "message": "status must be an object with an integer id",
                    }
                ],
            )
        )
    return ident


def _required(field: str, message: str) -> dict[str, Any]:
    return {"error_code": 1402, "error_token": "Required", "message": f"{field}: {message}"}


def _endpoint_not_found(exc: NotFoundError) -> Response:
    # Recorded traffic shows InvalidReference, not NotFound, for a missing endpoint.
    return api_error(404, 1401, "InvalidReference", str(exc))


def _profile_ids(body: dict[str, Any]) -> dict[str, int]:
    """The `service_profile` / `tariff_profile` ids of an endpoint PATCH body."""
    found: dict[str, int] = {}
    for kind in ("service_profile", "tariff_profile"):
        if kind not in body:
            continue
        ident = body[kind].get("id") if isinstance(body[kind], dict) else None
        if not isinstance(ident, int) or isinstance(ident, bool):
            raise _BadBody(
                validation_failed(
                    "Update endpoint validation error",
                    [_required(kind, "must be an object with an integer id")],
                )
            )
        found[kind] = ident
    return found


class EmnifyApi:
    """Route handlers over one `SimulatorState`."""

    def __init__(self, state: SimulatorState) -> None:
        self._state = state

    def routes(self) -> list[Route]:
        return [
            Route("/api/v1/authenticate", self.authenticate, methods=["POST"]),
            Route("/api/v1/event", self.events, methods=["GET"]),
            Route("/api/v1/event/type", self.event_types, methods=["GET"]),
            Route("/api/v1/sim/{sim_id:int}", self.get_sim, methods=["GET"]),
            Route("/api/v1/sim/{sim_id:int}", self.patch_sim, methods=["PATCH"]),
            Route("/api/v1/sim/{sim_id:int}/event", self.sim_events, methods=["GET"]),
            Route("/api/v1/endpoint", self.list_endpoints, methods=["GET"]),
            Route("/api/v1/endpoint/{endpoint_id:int}", self.get_endpoint, methods=["GET"]),
            Route("/api/v1/endpoint/{endpoint_id:int}", self.patch_endpoint, methods=["PATCH"]),
            Route(
                "/api/v1/endpoint/{endpoint_id:int}/event", self.endpoint_events, methods=["GET"]
            ),
            Route("/api/v1/endpoint/{endpoint_id:int}/sms", self.send_sms, methods=["POST"]),
            Route("/api/v1/endpoint/{endpoint_id:int}/sms", self.list_sms, methods=["GET"]),
            Route(
                "/api/v1/endpoint/{endpoint_id:int}/sms/{sms_id:int}",
                self.get_sms,
                methods=["GET"],
            ),
            Route("/api/v2/data_stream", self.data_streams, methods=["GET"]),
            Route("/api/v2/data_stream/status", self.data_stream_statuses, methods=["GET"]),
            Route("/api/v2/data_stream/{stream_id:int}", self.data_stream, methods=["GET"]),
            Route(
                "/api/v2/data_stream/{stream_id:int}/restart",
                self.restart_data_stream,
                methods=["POST"],
            ),
            *self.quota_routes(),
            *self.profile_routes(),
        ]

    async def data_streams(self, request: Request) -> Response:
        return json_response(self._state.data_streams.list())

    async def data_stream_statuses(self, request: Request) -> Response:
        return json_response([{"id": i, "description": d} for i, d in STREAM_STATUSES.items()])

    async def data_stream(self, request: Request) -> Response:
        try:
            return json_response(self._state.data_streams.get(request.path_params["stream_id"]))
        except UnknownStream as exc:
            return not_found(str(exc))

    async def restart_data_stream(self, request: Request) -> Response:
        try:
            self._state.data_streams.restart(request.path_params["stream_id"])
        except UnknownStream as exc:
            return not_found(str(exc))
        return empty(204)

    async def authenticate(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
        except _BadBody:
            return empty(401)
        token = body.get("application_token") if isinstance(body, dict) else None
        auth_token = self._state.authenticate(token)
        if auth_token is None:
            return empty(401)  # the real login failure has no body at all
        return json_response({"auth_token": auth_token})

    async def event_types(self, request: Request) -> Response:
        names = {**event_type_names(), **self._state.config.extra_event_types}
        types = [{"id": i, "description": name} for i, name in sorted(names.items())]
        return json_response(types)

    async def events(self, request: Request) -> Response:
        return self._event_page(request)

    async def sim_events(self, request: Request) -> Response:
        # Unknown ids give 200 [] here, never 404 (emnify-api.md §3.1).
        return self._event_page(request, sim_id=request.path_params["sim_id"])

    async def endpoint_events(self, request: Request) -> Response:
        return self._event_page(request, endpoint_id=request.path_params["endpoint_id"])

    def _event_page(
        self, request: Request, *, endpoint_id: int | None = None, sim_id: int | None = None
    ) -> Response:
        params = request.query_params
        config = self._state.config
        try:
            query = parse_query(params.get("sort"), params.get("q"))
        except QueryError as exc:
            return api_error(exc.status, exc.error_code, exc.error_token, str(exc))
        method, path = request.method, request.url.path
        max_per_page = config.max_per_page
        clamp = self._state.draw_fault(method, path, _PAGING_FAULTS)
        if clamp is not None and clamp.max_per_page is not None:
            note_fault(request.scope, clamp.kind)
            max_per_page = min(max_per_page, clamp.max_per_page)
        try:
            wanted = page_request(
                params, default_per_page=config.default_per_page, max_per_page=max_per_page
            )
        except PagingError as exc:
            return api_error(400, 1000, "BadRequest", str(exc))
        records = self._state.query_events(query, endpoint_id=endpoint_id, sim_id=sim_id)
        page = cut_page(records, wanted)
        items = list(page.items)
        if page.page > 1 and self._state.draw_fault(method, path, _DUPLICATE_FAULTS):
            # As if an event had been inserted ahead of the cursor between two page requests.
            note_fault(request.scope, "duplicate_across_pages")
            items.insert(0, records[page.start - 1])
        headers = paging_headers(page, path, dict(params), sort=query.sort)
        return json_response(items, headers=headers)

    async def get_sim(self, request: Request) -> Response:
        try:
            return json_response(self._state.sim(request.path_params["sim_id"]))
        except NotFoundError as exc:
            return not_found(str(exc))

    async def patch_sim(self, request: Request) -> Response:
        sim_id: int = request.path_params["sim_id"]
        try:
            status_id = _status_id(await _json_body(request), "SIM")
            if status_id is not None:
                self._state.change_sim_status(sim_id, status_id)
            else:
                self._state.sim(sim_id)
        except _BadBody as exc:
            return exc.response
        except NotFoundError as exc:
            return not_found(str(exc))
        except InvalidChangeError as exc:
            return validation_failed(str(exc), exc.errors)
        return empty(204)

    async def list_endpoints(self, request: Request) -> Response:
        """The endpoint list, with the one filter the engine sends: `q=name:PART` (a part
        of the name, case-insensitive, as the API matches text fields)."""
        wanted = request.query_params.get("q", "")
        part = wanted.removeprefix("name:").lower() if wanted.startswith("name:") else ""
        found = [e for e in self._state.endpoints() if part in (e["name"] or "").lower()]
        return json_response(found)

    async def get_endpoint(self, request: Request) -> Response:
        try:
            return json_response(self._state.endpoint(request.path_params["endpoint_id"]))
        except NotFoundError as exc:
            return _endpoint_not_found(exc)

    async def patch_endpoint(self, request: Request) -> Response:
        endpoint_id: int = request.path_params["endpoint_id"]
        try:
            body = await _json_body(request)
            status_id = _status_id(body, "endpoint")
            name = body.get("name")
            tags = body.get("tags")
            if (name is not None and not isinstance(name, str)) or (
                tags is not None and not isinstance(tags, str)
            ):
                return validation_failed(
                    "Update endpoint validation error",
                    [_required("name/tags", "must be strings")],
                )
            profiles = _profile_ids(body)
            imei_lock = body.get("imei_lock")
            if imei_lock is not None and not isinstance(imei_lock, bool):
                return validation_failed(
                    "Update endpoint validation error",
                    [_required("imei_lock", "must be true or false")],
                )
            self._state.change_endpoint(
                endpoint_id,
                status_id=status_id,
                name=name,
                tags=tags,
                set_tags="tags" in body,
                service_profile_id=profiles.get("service_profile"),
                tariff_profile_id=profiles.get("tariff_profile"),
                imei_lock=imei_lock,
            )
        except _BadBody as exc:
            return exc.response
        except NotFoundError as exc:
            return _endpoint_not_found(exc)
        except InvalidChangeError as exc:
            return validation_failed(str(exc), exc.errors)
        return empty(204)

    async def send_sms(self, request: Request) -> Response:
        endpoint_id: int = request.path_params["endpoint_id"]
        try:
            body = await _json_body(request)
        except _BadBody as exc:
            return exc.response
        payload = body.get("payload") if isinstance(body, dict) else None
        if not isinstance(payload, str) or not payload:
            return validation_failed(
                "Input validation failed", [_required("payload", "is required")]
            )
        assert isinstance(body, dict)
        try:
            sms = self._state.send_sms(endpoint_id, body)
        except NotFoundError as exc:
            return _endpoint_not_found(exc)
        location = (
            f"{str(request.base_url).rstrip('/')}/api/v1/endpoint/{endpoint_id}/sms/{sms['id']}"
        )
        return empty(201, {"location": location})

    async def list_sms(self, request: Request) -> Response:
        try:
            messages = self._state.sms(request.path_params["endpoint_id"])
        except NotFoundError as exc:
            return _endpoint_not_found(exc)
        config = self._state.config
        try:
            wanted = page_request(
                request.query_params,
                default_per_page=config.default_per_page,
                max_per_page=config.max_per_page,
            )
        except PagingError as exc:
            return api_error(400, 1000, "BadRequest", str(exc))
        page = cut_page(messages, wanted)
        headers = paging_headers(page, request.url.path, dict(request.query_params))
        return json_response(list(page.items), headers=headers)

    async def get_sms(self, request: Request) -> Response:
        endpoint_id: int = request.path_params["endpoint_id"]
        sms_id: int = request.path_params["sms_id"]
        try:
            messages = self._state.sms(endpoint_id)
        except NotFoundError as exc:
            return _endpoint_not_found(exc)
        for sms in messages:
            if sms["id"] == sms_id:
                return json_response(sms)
        return not_found(f"SMS with id {sms_id} not found")

    # -- quotas (emnify-api.md §6.4) -----------------------------------------------------

    def quota_routes(self) -> list[Route]:
        path = "/api/v1/endpoint/{endpoint_id:int}/quota/{kind:str}"
        return [
            Route(path, self.get_quota, methods=["GET"]),
            Route(path, self.post_quota, methods=["POST"]),
            Route(path, self.delete_quota, methods=["DELETE"]),
            Route(_EXTENSION, self.get_extension, methods=["GET"]),
            Route(_EXTENSION, self.post_extension, methods=["POST"]),
            Route(_EXTENSION, self.delete_extension, methods=["DELETE"]),
        ]

    async def get_quota(self, request: Request) -> Response:
        endpoint_id, kind = request.path_params["endpoint_id"], request.path_params["kind"]
        if kind not in QUOTA_KINDS:
            return not_found(f"Unknown quota type {kind!r}")
        try:
            quota = self._state.quota(endpoint_id, kind)
        except NotFoundError as exc:
            return _endpoint_not_found(exc)
        if quota is None:
            return not_found(f"No {kind} quota for endpoint {endpoint_id}")
        return json_response(quota)

    async def post_quota(self, request: Request) -> Response:
        endpoint_id, kind = request.path_params["endpoint_id"], request.path_params["kind"]
        if kind not in QUOTA_KINDS:
            return not_found(f"Unknown quota type {kind!r}")
        try:
            body = await _json_body(request)
            if not isinstance(body, dict):
                return validation_failed(
                    "Quota validation error", [_required("body", "a JSON object is required")]
                )
            self._state.set_quota(endpoint_id, kind, body)
        except _BadBody as exc:
            return exc.response
        except NotFoundError as exc:
            return _endpoint_not_found(exc)
        except InvalidQuota as exc:
            return validation_failed(
                "Quota validation error",
                [{"error_code": 1403, "error_token": "InvalidFormat", "message": str(exc)}],
            )
        return empty(201)

    async def delete_quota(self, request: Request) -> Response:
        endpoint_id, kind = request.path_params["endpoint_id"], request.path_params["kind"]
        if kind not in QUOTA_KINDS:
            return not_found(f"Unknown quota type {kind!r}")
        try:
            deleted = self._state.delete_quota(endpoint_id, kind)
        except NotFoundError as exc:
            return _endpoint_not_found(exc)
        if not deleted:
            return not_found(f"No {kind} quota for endpoint {endpoint_id}")
        return empty(204)

    # Traffic-limit extension (emnify-api.md §6.5, §13 [OAS]): a temporary raise of a
    # blocked device's limit; POST `{"volume": MB}` sets it (201), DELETE reverts (204).
    # The GET's shape is not recorded: here `{"volume"}`, 404 when there is none.

    async def get_extension(self, request: Request) -> Response:
        endpoint_id = request.path_params["endpoint_id"]
        try:
            extension = self._state.traffic_limit_extension(endpoint_id)
        except NotFoundError as exc:
            return _endpoint_not_found(exc)
        if extension is None:
            return not_found(f"No traffic limit extension for endpoint {endpoint_id}")
        return json_response(extension)

    async def post_extension(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
        except _BadBody as exc:
            return exc.response
        volume = body.get("volume") if isinstance(body, dict) else None
        if isinstance(volume, bool) or not isinstance(volume, int | float) or volume <= 0:
            return validation_failed(
                "Input validation failed", [_required("volume", "a number of MB above 0")]
            )
        try:
            self._state.extend_traffic_limit(request.path_params["endpoint_id"], volume)
        except NotFoundError as exc:
            return _endpoint_not_found(exc)
        return empty(201)

    async def delete_extension(self, request: Request) -> Response:
        endpoint_id = request.path_params["endpoint_id"]
        try:
            removed = self._state.remove_traffic_limit_extension(endpoint_id)
        except NotFoundError as exc:
            return _endpoint_not_found(exc)
        if not removed:
            return not_found(f"No traffic limit extension for endpoint {endpoint_id}")
        return empty(204)

    # -- profiles, connectivity, operator blacklist (emnify-api.md §6.5, §13) ------------

    def profile_routes(self) -> list[Route]:
        endpoint = "/api/v1/endpoint/{endpoint_id:int}"
        blacklist = endpoint + "/operator_blacklist"
        return [
            Route("/api/v1/service_profile", self.service_profiles, methods=["GET"]),
            Route("/api/v1/tariff_profile", self.tariff_profiles, methods=["GET"]),
            Route(endpoint + "/connectivity", self.reset_connectivity, methods=["PATCH"]),
            Route(blacklist, self.operator_blacklist, methods=["GET"]),
            Route(blacklist + "/{operator_id:int}", self.blacklist_operator, methods=["PUT"]),
            Route(blacklist + "/{operator_id:int}", self.unblacklist_operator, methods=["DELETE"]),
        ]

    async def service_profiles(self, request: Request) -> Response:
        return json_response(profile_list("service_profile"))

    async def tariff_profiles(self, request: Request) -> Response:
        return json_response(profile_list("tariff_profile"))

    async def reset_connectivity(self, request: Request) -> Response:
        """`{"location": null}` cancels the location, `{"pdp_context": null}` deletes the
        PDP context, both do both; 204, the effect itself comes later (event 68)."""
        try:
            body = await _json_body(request)
        except _BadBody as exc:
            return exc.response
        parts = body if isinstance(body, dict) else {}
        location, pdp_context = "location" in parts, "pdp_context" in parts
        if not (location or pdp_context):
            return validation_failed(
                "Input validation failed", [_required("location/pdp_context", "one is required")]
            )
        try:
            self._state.reset_connectivity(
                request.path_params["endpoint_id"], location=location, pdp_context=pdp_context
            )
        except NotFoundError as exc:
            return _endpoint_not_found(exc)
        return empty(204)

    async def operator_blacklist(self, request: Request) -> Response:
        try:
            ids = self._state.operator_blacklist(request.path_params["endpoint_id"])
        except NotFoundError as exc:
            return _endpoint_not_found(exc)
        # As recorded: a bare array of whole operator objects [CASS test_list_device_blacklist].
        known = {op.id: op for op in OPERATORS}
        return json_response([known[i].detail() if i in known else {"id": i} for i in ids])

    async def blacklist_operator(self, request: Request) -> Response:
        endpoint_id, operator_id = (
            request.path_params["endpoint_id"],
            request.path_params["operator_id"],
        )
        try:
            added = self._state.blacklist_operator(endpoint_id, operator_id)
        except NotFoundError as exc:
            return _endpoint_not_found(exc)
        if not added:  # as recorded: 409 Duplicated (emnify-api.md §6.5 [CASS])
            return api_error(409, 1405, "Duplicated", "Operator is already blacklisted")
        return empty(204)

    async def unblacklist_operator(self, request: Request) -> Response:
        endpoint_id, operator_id = (
            request.path_params["endpoint_id"],
            request.path_params["operator_id"],
        )
        try:
            removed = self._state.unblacklist_operator(endpoint_id, operator_id)
        except NotFoundError as exc:
            return _endpoint_not_found(exc)
        if not removed:
            return not_found(f"Operator {operator_id} is not blacklisted")
        return empty(204)
