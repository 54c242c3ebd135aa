"""The emnify simulator speaks the real API's wire format, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import orjson
import pytest

from engine.events import format_timestamp, normalize
from engine.simulator import (
    FIRST_ENDPOINT_ID,
    FIRST_EVENT_ID,
    FIRST_SIM_ID,
    EventGenerator,
    FaultRule,
    SimulatorConfig,
    SimulatorServer,
    SimulatorState,
    build_fleet,
    generate_events,
    serve,
)

APP_TOKEN = "demo-application-token"
SIM = FIRST_SIM_ID
ENDPOINT = FIRST_ENDPOINT_ID


@pytest.fixture(scope="module")
def shared() -> Iterator[SimulatorServer]:
    with SimulatorServer(SimulatorConfig(seed=3, endpoints=6, late_fraction=0.0)) as server:
        yield server


@pytest.fixture
def sim(shared: SimulatorServer) -> SimulatorServer:
    shared.state.reset()
    return shared


@pytest.fixture
def client(sim: SimulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, timeout=5.0) as http:
        token = login(http)
        http.headers["Authorization"] = f"Bearer {token}"
        yield http


def login(http: httpx.Client) -> str:
    response = http.post("/api/v1/authenticate", json={"application_token": APP_TOKEN})
    assert response.status_code == 200
    token: str = response.json()["auth_token"]
    return token


def jwt_part(token: str, index: int) -> dict[str, Any]:
    segment = token.split(".")[index]
    decoded: dict[str, Any] = orjson.loads(
        base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    )
    return decoded


def inject(sim: SimulatorServer, *records: dict[str, Any]) -> list[dict[str, Any]]:
    response = httpx.post(f"{sim.base_url}/admin/events", json=list(records))
    assert response.status_code == 200, response.text
    stored: list[dict[str, Any]] = response.json()
    return stored


def faults(sim: SimulatorServer, *rules: dict[str, Any]) -> None:
    response = httpx.put(f"{sim.base_url}/admin/faults", json=list(rules))
    assert response.status_code == 200, response.text


def at(seconds_ago: float) -> str:
    return format_timestamp(datetime.now(UTC) - timedelta(seconds=seconds_ago))


def bound(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- authentication ---------------------------------------------------------------------------


def test_login_returns_an_hs384_jwt_whose_payload_carries_exp_and_org(sim: SimulatorServer) -> None:
    with httpx.Client(base_url=sim.base_url) as http:
        token = login(http)
    assert jwt_part(token, 0) == {"alg": "HS384"}
    payload = jwt_part(token, 1)
    assert payload["exp"] - payload["iat"] == 14400
    assert payload["esc.org"] == 731245


def test_login_with_a_wrong_application_token_is_401_with_an_empty_body(
    sim: SimulatorServer,
) -> None:
    response = httpx.post(f"{sim.base_url}/api/v1/authenticate", json={"application_token": "x"})
    assert response.status_code == 401
    assert response.content == b""
    failed = [e for e in sim.state.events() if e["event_type"]["id"] == 7]
    assert len(failed) == 1  # "Application authentication failed"


@pytest.mark.parametrize("authorization", [None, "Bearer None", "Bearer garbage"])
def test_a_missing_or_malformed_bearer_gets_the_gateway_401(
    sim: SimulatorServer, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.get(f"{sim.base_url}/api/v1/event", headers=headers)
    assert response.status_code == 401
    assert response.json() == {"message": "token contains an invalid number of segments"}
    assert response.headers["x-amzn-ErrorType"] == "AccessDeniedException"


def test_an_expired_token_gets_401_token_expired() -> None:
    with (
        SimulatorServer(SimulatorConfig(token_ttl=0)) as sim,
        httpx.Client(base_url=sim.base_url) as http,
    ):
        token = login(http)
        response = http.get("/api/v1/event", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.json() == {
        "error_code": 1103,
        "error_token": "TokenExpired",
        "message": "Token expired",
    }


def test_revoking_tokens_through_admin_expires_them(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    assert client.get("/api/v1/event").status_code == 200
    httpx.delete(f"{sim.base_url}/admin/tokens")
    assert client.get("/api/v1/event").json()["error_token"] == "TokenExpired"


# -- Event API ----------------------------------------------------------------------------------


def test_event_list_is_a_bare_array_with_lower_case_paging_headers(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    sim.state.generate(3, spread_seconds=5)
    response = client.get("/api/v1/event")
    names = {name for name, _ in response.headers.raw}
    assert {b"x-count-per-page", b"x-current-page", b"x-total-count", b"x-total-pages"} <= names
    assert isinstance(response.json(), list)
    assert response.headers["x-count-per-page"] == "100"
    assert response.headers["x-total-count"] == "3"
    assert response.headers["x-total-pages"] == "1"
    assert response.headers["x-sort"] == "id"
    assert response.headers["link"] == ""


def test_events_come_sorted_by_id_by_default_and_normalize_cleanly(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    sim.state.generate(40, spread_seconds=30)
    events = client.get("/api/v1/event").json()
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(ids) == 40
    assert all(i > FIRST_EVENT_ID for i in ids)
    for raw in events:
        normalize(raw)


def test_a_page_past_the_end_returns_the_last_page_again(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    stored = sim.state.generate(25, spread_seconds=30)
    response = client.get("/api/v1/event", params={"per_page": 10, "page": 7})
    assert [e["id"] for e in response.json()] == [e["id"] for e in stored[20:]]
    assert response.headers["x-total-pages"] == "3"
    assert response.headers["x-current-page"] == "3"
    assert 'rel="first"' in response.headers["link"]


def test_too_large_per_page_is_clamped_silently_and_below_one_means_default() -> None:
    config = SimulatorConfig(max_per_page=8, default_per_page=5)
    with SimulatorServer(config) as sim, httpx.Client(base_url=sim.base_url) as http:
        http.headers["Authorization"] = f"Bearer {login(http)}"
        sim.state.generate(12, spread_seconds=10)
        clamped = http.get("/api/v1/event", params={"per_page": 5000})
        defaulted = http.get("/api/v1/event", params={"per_page": 0})
    assert clamped.status_code == 200
    assert len(clamped.json()) == 8 and clamped.headers["x-count-per-page"] == "8"
    assert len(defaulted.json()) == 5 and defaulted.headers["x-total-pages"] == "3"


def test_from_until_select_by_timestamp_inclusive_at_whole_seconds(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    stamps = [base, base + timedelta(seconds=59, milliseconds=500), base + timedelta(seconds=61)]
    inject(sim, *({"event_type": {"id": 1}, "timestamp": format_timestamp(t)} for t in stamps))
    q = f"from:{bound(base)},until:{bound(base + timedelta(seconds=59))}"
    events = client.get("/api/v1/event", params={"q": q}).json()
    assert [e["timestamp"] for e in events] == [format_timestamp(t) for t in stamps[:2]]


def test_from_without_until_is_422_invalid_query_criteria(client: httpx.Client) -> None:
    response = client.get("/api/v1/event", params={"q": "from:2025-05-01T10:00:00Z"})
    assert response.status_code == 422
    assert response.json()["error_code"] == 1301
    assert response.json()["error_token"] == "InvalidQueryCriteria"


def test_an_unknown_sort_is_400_invalid_sort_criteria(client: httpx.Client) -> None:
    response = client.get("/api/v1/event", params={"sort": "-id"})
    assert response.status_code == 400
    assert response.json()["error_code"] == 1302


def test_type_severity_and_alert_filters_combine(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    inject(
        sim,
        {"event_type": {"id": 19}, "sim_id": SIM},
        {"event_type": {"id": 11}, "sim_id": SIM},
        {"event_type": {"id": 1}, "sim_id": SIM},
    )
    events = client.get("/api/v1/event", params={"q": "type:11|19,alert:true,severity:1"}).json()
    assert sorted(e["event_type"]["id"] for e in events) == [11, 19]
    seven = "|".join(str(n) for n in range(7))
    assert client.get("/api/v1/event", params={"q": f"type:{seven}"}).status_code == 422


def test_events_stamped_in_the_future_stay_invisible_until_then(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    inject(sim, {"event_type": {"id": 1}, "timestamp": at(-3600)})
    assert client.get("/api/v1/event").json() == []
    assert len(sim.state.events()) == 1


def test_an_empty_result_is_an_empty_array_with_zero_total_pages(client: httpx.Client) -> None:
    response = client.get("/api/v1/event", params={"page": 4})
    assert response.json() == []
    assert response.headers["x-total-pages"] == "0"
    assert response.headers["x-current-page"] == "1"


def test_event_types_come_from_the_shipped_table(client: httpx.Client) -> None:
    types = {t["id"]: t["description"] for t in client.get("/api/v1/event/type").json()}
    assert types[9] == "SIM suspension" and types[19] == "Quota used up"


def test_per_device_event_lists_give_an_empty_array_for_unknown_ids(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    inject(sim, {"event_type": {"id": 19}, "sim_id": SIM})
    assert len(client.get(f"/api/v1/sim/{SIM}/event").json()) == 1
    assert len(client.get(f"/api/v1/endpoint/{ENDPOINT}/event").json()) == 1
    missing = client.get("/api/v1/endpoint/1/event")
    assert missing.status_code == 200 and missing.json() == []


# -- SIMs, endpoints, SMS -----------------------------------------------------------------------


def test_suspending_a_sim_is_204_changes_it_and_emits_a_sim_suspension_event(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    response = client.patch(f"/api/v1/sim/{SIM}", json={"status": {"id": 2}})
    assert response.status_code == 204 and response.content == b""
    assert client.get(f"/api/v1/sim/{SIM}").json()["status"] == {
        "id": 2,
        "description": "Suspended",
    }
    (event,) = client.get("/api/v1/event", params={"q": "type:9"}).json()
    assert event["description"] == "Status of SIM changed from 'Activated' to 'Suspended'"
    assert event["event_source"] == {"id": 2, "description": "API"}
    assert event["alert"] is False and "user" not in event
    assert event["sim"]["id"] == SIM and event["endpoint"]["id"] == ENDPOINT
    assert event["imsi"]["imsi"]


def test_patching_a_sim_to_its_current_status_is_204_without_an_event(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    assert client.patch(f"/api/v1/sim/{SIM}", json={"status": {"id": 1}}).status_code == 204
    assert sim.state.events() == []


def test_a_disallowed_sim_transition_is_422_input_validation_failed(
    client: httpx.Client,
) -> None:
    response = client.patch(f"/api/v1/sim/{SIM}", json={"status": {"id": 0}})
    assert response.status_code == 422
    body = response.json()
    assert body["error_code"] == 1400 and body["error_token"] == "InputValidationFailed"
    assert body["errors"]


def test_an_unknown_sim_is_404_not_found(client: httpx.Client) -> None:
    response = client.get("/api/v1/sim/1")
    assert response.status_code == 404
    assert response.json()["error_token"] == "NotFound"


def test_disabling_an_endpoint_is_204_and_emits_endpoint_disabled(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    assert (
        client.patch(f"/api/v1/endpoint/{ENDPOINT}", json={"status": {"id": 1}}).status_code == 204
    )
    assert client.get(f"/api/v1/endpoint/{ENDPOINT}").json()["status"]["description"] == "Disabled"
    (event,) = client.get("/api/v1/event").json()
    assert event["event_type"] == {"id": 43, "description": "Endpoint disabled"}


def test_an_sms_is_created_with_201_a_location_and_then_listed(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    response = client.post(f"/api/v1/endpoint/{ENDPOINT}/sms", json={"payload": "REBOOT"})
    assert response.status_code == 201 and response.content == b""
    location = response.headers["location"]
    assert location.startswith(f"{sim.base_url}/api/v1/endpoint/{ENDPOINT}/sms/")
    sms = client.get(location).json()
    assert sms["payload"] == "REBOOT" and sms["status"] == {"id": 4, "description": "Delivered"}
    assert [s["id"] for s in client.get(f"/api/v1/endpoint/{ENDPOINT}/sms").json()] == [sms["id"]]


def test_an_sms_without_payload_is_422(client: httpx.Client) -> None:
    response = client.post(f"/api/v1/endpoint/{ENDPOINT}/sms", json={"source_address": "Ops"})
    assert response.status_code == 422


def test_an_unknown_path_is_a_json_404(client: httpx.Client) -> None:
    response = client.get("/api/v1/nothing/here")
    assert response.status_code == 404 and response.json()["error_code"] == 1201


# -- admin --------------------------------------------------------------------------------------


def test_injecting_with_a_sim_id_shortcut_fills_the_device_and_the_type(
    sim: SimulatorServer,
) -> None:
    (event,) = inject(sim, {"event_type": {"id": 19}, "sim_id": SIM})
    assert event["event_type"] == {"id": 19, "description": "Quota used up"}
    assert event["event_source"]["description"] == "Policy Control" and event["alert"] is True
    assert event["endpoint"]["id"] == ENDPOINT and event["sim"]["id"] == SIM
    assert event["organisation"] == {"id": 731245, "name": "Acme Fleet GmbH"}
    assert event["id"] > FIRST_EVENT_ID and "sim_id" not in event


def test_injecting_an_existing_id_stores_a_redelivered_copy(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    first = {"id": 500000000000001, "timestamp": at(5), "event_type": 1, "endpoint_id": ENDPOINT}
    inject(sim, first)
    inject(sim, first)
    ids = [e["id"] for e in client.get("/api/v1/event").json()]
    assert ids == [500000000000001, 500000000000001]
    (later,) = inject(sim, {"event_type": 1})
    assert later["id"] > 500000000000001


def test_an_incomplete_injected_event_is_rejected_with_the_field_named(
    sim: SimulatorServer,
) -> None:
    response = httpx.post(f"{sim.base_url}/admin/events", json={"sim_id": 1})
    assert response.status_code == 422 and "sim_id" in response.json()["message"]


def test_admin_setup_changes_status_without_rules_or_events(sim: SimulatorServer) -> None:
    response = httpx.put(f"{sim.base_url}/admin/sims/{SIM}", json={"status": {"id": 0}})
    assert response.json()["status"]["description"] == "Issued"
    assert sim.state.events() == []


# -- faults -------------------------------------------------------------------------------------


def test_a_429_fault_carries_retry_after(sim: SimulatorServer, client: httpx.Client) -> None:
    faults(sim, {"path": "^/api/v1/event$", "kind": "429", "retry_after": 2, "count": 1})
    response = client.get("/api/v1/event")
    assert response.status_code == 429 and response.headers["retry-after"] == "2"
    assert client.get("/api/v1/event").status_code == 200


def test_a_503_fault_can_answer_with_a_non_json_cloudfront_page(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    faults(sim, {"path": "/api/v1/event", "kind": "503", "body": "html"})
    response = client.get("/api/v1/event")
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("text/html")
    with pytest.raises(ValueError):
        response.json()


@pytest.mark.parametrize("body", ["json", "error", "empty"])
def test_5xx_faults_have_the_asked_for_body_shape(
    sim: SimulatorServer, client: httpx.Client, body: str
) -> None:
    faults(sim, {"path": "/api/", "kind": "502", "body": body})
    response = client.get("/api/v1/event")
    assert response.status_code == 502
    shape = {"json": {"message"}, "error": {"error_code", "error_token", "message"}}
    if body == "empty":
        assert response.content == b""
    else:
        assert set(response.json()) == shape[body]


@pytest.mark.parametrize("when", ["before", "mid"])
def test_a_drop_fault_surfaces_as_an_httpx_transport_error(
    sim: SimulatorServer, client: httpx.Client, when: str
) -> None:
    faults(sim, {"path": "^/api/v1/event$", "kind": "drop", "when": when, "count": 1})
    with pytest.raises(httpx.TransportError):
        client.get("/api/v1/event")
    assert client.get("/api/v1/event").status_code == 200


def test_apply_then_fail_changes_the_sim_but_the_client_sees_a_504(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    faults(sim, {"path": "^/api/v1/sim/", "method": "PATCH", "kind": "apply_then_fail"})
    response = client.patch(f"/api/v1/sim/{SIM}", json={"status": {"id": 2}})
    assert response.status_code == 504
    assert sim.state.sim(SIM)["status"]["id"] == 2
    assert client.get(f"/api/v1/sim/{SIM}").status_code == 200  # GET is not faulted


def test_apply_then_fail_can_drop_the_connection_after_sending_the_sms(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    faults(sim, {"path": "/api/v1/endpoint/", "kind": "apply_then_fail", "then": "drop"})
    with pytest.raises(httpx.TransportError):
        client.post(f"/api/v1/endpoint/{ENDPOINT}/sms", json={"payload": "PING"})
    assert len(sim.state.sms(ENDPOINT)) == 1


def test_an_expire_token_fault_makes_the_call_401_token_expired(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    faults(sim, {"path": "^/api/v1/sim/", "kind": "expire_token", "count": 1})
    assert client.get(f"/api/v1/sim/{SIM}").json()["error_code"] == 1103
    client.headers["Authorization"] = f"Bearer {login(client)}"
    assert client.get(f"/api/v1/sim/{SIM}").status_code == 200


def test_a_slow_fault_outlasts_the_client_timeout(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    faults(sim, {"path": "^/api/v1/event$", "kind": "slow", "delay": 0.6, "count": 1})
    with pytest.raises(httpx.ReadTimeout):
        client.get("/api/v1/event", timeout=0.15)
    # Let the slow answer finish, so it does not land in the next test's request log.
    for _ in range(100):
        if any(r.fault == "slow" for r in sim.state.requests()):
            break
        time.sleep(0.02)


def test_duplicate_across_pages_repeats_the_previous_pages_last_event(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    stored = sim.state.generate(6, spread_seconds=10)
    faults(sim, {"path": "^/api/v1/event$", "kind": "duplicate_across_pages", "count": 1})
    page1 = client.get("/api/v1/event", params={"per_page": 3, "page": 1}).json()
    page2 = client.get("/api/v1/event", params={"per_page": 3, "page": 2}).json()
    assert page2[0] == page1[-1]
    assert {e["id"] for e in page1 + page2} == {e["id"] for e in stored}


def test_a_clamp_fault_lowers_the_page_size_maximum(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    sim.state.generate(5, spread_seconds=5)
    faults(sim, {"path": "/api/v1/event", "kind": "clamp_per_page", "max_per_page": 2})
    response = client.get("/api/v1/event", params={"per_page": 100})
    assert len(response.json()) == 2 and response.headers["x-total-pages"] == "3"


def test_probabilistic_faults_fire_reproducibly_for_a_seed() -> None:
    def fired(seed: int) -> list[bool]:
        state = SimulatorState(SimulatorConfig(seed=seed))
        state.set_faults([FaultRule.parse({"kind": "503", "probability": 0.3})])
        kinds = frozenset({"503"})
        return [state.draw_fault("GET", "/api/v1/event", kinds) is not None for _ in range(50)]

    assert fired(1) == fired(1)
    assert 5 <= sum(fired(1)) <= 25


def test_admin_calls_are_never_faulted_and_not_logged(
    sim: SimulatorServer, client: httpx.Client
) -> None:
    faults(sim, {"path": "", "kind": "500"})
    assert httpx.get(f"{sim.base_url}/admin/sims").status_code == 200
    assert client.get("/api/v1/event").status_code == 500
    log = httpx.get(f"{sim.base_url}/admin/requests").json()
    assert [(r["path"], r["status"], r["fault"]) for r in log][-1:] == [
        ("/api/v1/event", 500, "500")
    ]
    assert not any(r["path"].startswith("/admin") for r in log)


def test_a_bad_fault_rule_is_refused_with_the_field_named(sim: SimulatorServer) -> None:
    response = httpx.put(f"{sim.base_url}/admin/faults", json={"kind": "418"})
    assert response.status_code == 422 and "kind" in response.json()["message"]


# -- generator ----------------------------------------------------------------------------------


def test_the_generator_is_deterministic_by_seed() -> None:
    first = list(generate_events(200, seed=5))
    assert first == list(generate_events(200, seed=5))
    assert first != list(generate_events(200, seed=6))
    ids = [e["id"] for e in first]
    assert ids == sorted(set(ids))


def test_the_generator_mixes_network_traffic_with_policy_control_alerts() -> None:
    events = list(generate_events(3000, seed=1, step_seconds=0.5))
    kinds = {
        (e["event_type"]["id"], e["event_source"]["id"], e["event_severity"]["id"]) for e in events
    }
    assert {(1, 0, 0), (2, 0, 0), (3, 0, 0), (5, 0, 0), (18, 1, 1), (19, 1, 1), (11, 1, 1)} <= kinds
    assert (3, 1, 1) in kinds  # a PDP create rejected by Policy Control
    assert any(e["event_severity"]["id"] == 2 and e["alert"] for e in events)
    sessions = {e["detail"]["session_id"] for e in events if e["event_type"]["id"] == 5}
    created = {e["detail"]["session_id"] for e in events if "session_id" in e.get("detail", {})}
    assert sessions and sessions <= created
    for raw in events[:500]:
        normalize(raw)


def test_suspended_sims_fall_silent_in_generated_traffic() -> None:
    fleet = build_fleet(2, seed=0)
    fleet.sims[SIM].status = 2
    generator = EventGenerator(fleet, seed=0)
    moment = datetime(2025, 5, 1, tzinfo=UTC)
    events = [generator.next_event(moment, n) for n in range(300)]
    assert all(e is None or e["sim"] is None or e["sim"]["id"] != SIM for e in events)


def test_background_generation_follows_the_rate_and_stores_some_events_late() -> None:
    config = SimulatorConfig(event_rate=200.0, late_fraction=0.5, late_by=60.0)
    with SimulatorServer(config) as sim:
        time.sleep(0.4)
        httpx.put(f"{sim.base_url}/admin/generator", json={"paused": True})
        events = sim.state.events()
    assert len(events) >= 20
    now = datetime.now(UTC)
    late = [e for e in events if normalize(e).timestamp < now - timedelta(seconds=2)]
    assert late and len(late) < len(events)


# -- server and streamer ------------------------------------------------------------------------


async def test_the_server_works_as_an_async_context_manager() -> None:
    async with (
        SimulatorServer(SimulatorConfig(endpoints=2)) as sim,
        httpx.AsyncClient(base_url=sim.base_url) as http,
    ):
        response = await http.post("/api/v1/authenticate", json={"application_token": APP_TOKEN})
        assert response.status_code == 200
    assert sim.port == 0


async def test_serve_announces_its_url_and_runs_until_cancelled() -> None:
    lines: list[str] = []
    task = asyncio.create_task(serve(SimulatorConfig(endpoints=1), port=0, on_ready=lines.append))
    for _ in range(200):
        if lines:
            break
        await asyncio.sleep(0.01)
    match = re.search(r"http://[\d.:]+", lines[0])
    assert match is not None and APP_TOKEN in lines[0]
    async with httpx.AsyncClient(base_url=match.group(0)) as http:
        assert (await http.get("/admin/sims")).status_code == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class _Receiver:
    """A tiny webhook target that fails its first `fail_first` calls with 500."""

    def __init__(self, fail_first: int) -> None:
        self.bodies: list[Any] = []
        self.headers: list[dict[str, str]] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = orjson.loads(self.rfile.read(int(self.headers["content-length"])))
                status = 500 if len(receiver.statuses) < fail_first else 200
                receiver.bodies.append(body)
                receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                receiver.statuses.append(status)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/emnify/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_the_streamer_pushes_batches_and_retries_a_failed_one() -> None:
    receiver = _Receiver(fail_first=1)
    config = SimulatorConfig(
        stream_url=receiver.url,
        stream_headers={"X-Emnify-Secret": "s3cret"},
        stream_batch_size=4,
        stream_interval=0.05,
        stream_retry_initial=0.05,
    )
    try:
        async with SimulatorServer(config) as sim:
            stored = sim.state.generate(6)
            for _ in range(250):
                if receiver.statuses.count(200) >= 2:
                    break
                await asyncio.sleep(0.02)
            assert sim.streamer is not None and sim.streamer.stats.failed_attempts == 1
    finally:
        receiver.close()
    assert receiver.statuses == [500, 200, 200]
    assert receiver.bodies[0] == receiver.bodies[1]  # the failed batch is sent again
    delivered = [e["id"] for body in receiver.bodies[1:] for e in body]
    assert delivered == [e["id"] for e in stored]
    assert [len(b) for b in receiver.bodies] == [4, 4, 2]
    assert receiver.headers[0]["x-emnify-secret"] == "s3cret"


async def test_a_response_with_an_empty_body_is_logged_before_its_headers_go_out():
    # Such an answer is complete for the client once its headers arrive: an entry logged
    # with the (empty) body message could still be missing when the client looks.
    from starlette.responses import Response

    from engine.simulator.request_log import RequestLogger
    from engine.simulator.state import SimulatorState

    state = SimulatorState()
    logged_when_sent: list[tuple[str, int]] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        logged_when_sent.append((message["type"], len(state.requests())))

    app = RequestLogger(Response(status_code=401), state)
    scope = {"type": "http", "method": "POST", "path": "/api/v1/authenticate", "headers": []}
    await app(scope, receive, send)
    assert logged_when_sent == [("http.response.start", 1), ("http.response.body", 1)]
    (entry,) = state.requests()
    assert entry.status == 401
