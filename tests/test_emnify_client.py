"""The emnify REST client, spoken to over real loopback HTTP.

The core behaviours run against the simulator (`engine.simulator`); shapes it cannot produce
(odd error bodies, a JWT without `exp`, lying paging headers, a connect error) use
`httpx.MockTransport`. Waits between retries go through an injected `sleep` that records them.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from raw_receiver import Answer, RawReceiver, endless_body, trickle
from structlog.testing import capture_logs

from engine.emnify import (
    ClientSettings,
    EmnifyClient,
    EndpointStatus,
    LoginError,
    SimStatus,
    api_error_from_response,
    event_window,
    parse_retry_after,
)
from engine.emnify.auth import AuthSession, JwtTimes, Secret, read_jwt_times, refresh_time
from engine.errors import ApiError
from engine.simulator import (
    FIRST_ENDPOINT_ID,
    FIRST_SIM_ID,
    FaultRule,
    SimulatorConfig,
    SimulatorServer,
)
from engine.simulator.state import RequestRecord

from helpers import eventually

APP_TOKEN = "demo-application-token"
T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
T1 = datetime(2025, 5, 1, 10, 5, tzinfo=UTC)
# Rates high enough that the limiter never slows a test that is not about it.
FAST: dict[str, Any] = {"event_rate_limit": 1000.0, "action_rate_limit": 1000.0}


async def no_sleep(seconds: float) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# Against the simulator, over loopback HTTP
# ---------------------------------------------------------------------------------------------

FIRST_SIM = FIRST_SIM_ID
FIRST_ENDPOINT = FIRST_ENDPOINT_ID
SMS_PATH = r"^/api/v1/endpoint/\d+/sms$"


@pytest.fixture(scope="module")
def shared_simulator() -> Iterator[SimulatorServer]:
    with SimulatorServer(SimulatorConfig(seed=7, endpoints=5)) as server:
        yield server


@pytest.fixture
def simulator(shared_simulator: SimulatorServer) -> SimulatorServer:
    shared_simulator.state.reset()
    return shared_simulator


def set_faults(server: SimulatorServer, *rules: dict[str, Any]) -> None:
    server.state.set_faults(FaultRule.parse(rule) for rule in rules)


def settled_requests(server: SimulatorServer) -> list[RequestRecord]:
    """The request log once it stops growing: the server logs a request after answering it."""
    seen = server.state.requests()
    for _ in range(50):
        time.sleep(0.02)
        now = server.state.requests()
        if len(now) == len(seen):
            return now
        seen = now
    return seen


def api_requests(server: SimulatorServer, method: str, pattern: str = "") -> list[RequestRecord]:
    return [
        r
        for r in settled_requests(server)
        if r.method == method and re.search(pattern, r.path) and r.path.startswith("/api/")
    ]


def logins(server: SimulatorServer) -> int:
    return len(api_requests(server, "POST", "^/api/v1/authenticate$"))


class Recorder:
    """The client's `sleep`: notes each wait instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def connect(
    server: SimulatorServer,
    token: str = APP_TOKEN,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    sleep: Recorder | None = None,
    **settings: Any,
) -> EmnifyClient:
    options: dict[str, Any] = {"base_url": server.base_url, **FAST, **settings}
    return EmnifyClient(
        token, ClientSettings(**options), transport=transport, sleep=sleep or Recorder()
    )


def window() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(minutes=10), now + timedelta(seconds=1)


async def test_logs_in_lazily_once_and_reads_sims_endpoints_and_event_types(
    simulator: SimulatorServer,
) -> None:
    async with connect(simulator) as client:
        assert logins(simulator) == 0
        sim = await client.get_sim(FIRST_SIM)
        endpoint = await client.get_endpoint(FIRST_ENDPOINT)
        types = await client.event_types()
    assert sim["id"] == FIRST_SIM and endpoint["id"] == FIRST_ENDPOINT
    assert {"id": 1, "description": "Update location"} in types
    assert logins(simulator) == 1


async def test_concurrent_first_calls_share_one_login(simulator: SimulatorServer) -> None:
    async with connect(simulator) as client:
        sims = await asyncio.gather(*(client.get_sim(FIRST_SIM + k) for k in range(5)))
    assert [s["id"] for s in sims] == [FIRST_SIM + k for k in range(5)]
    assert logins(simulator) == 1


async def test_retries_a_read_timeout_on_a_read(simulator: SimulatorServer) -> None:
    set_faults(simulator, {"path": "^/api/v1/sim/", "kind": "slow", "delay": 0.3, "count": 1})
    sleep = Recorder()
    async with connect(simulator, sleep=sleep, read_timeout=0.1) as client:
        assert (await client.get_sim(FIRST_SIM))["id"] == FIRST_SIM
    assert len(sleep.waits) == 1
    # The abandoned slow request is still running on the server; let it end inside this test.
    deadline = time.monotonic() + 2.0
    while len(api_requests(simulator, "GET")) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(api_requests(simulator, "GET")) == 2


async def test_a_refused_token_means_one_fresh_login_and_one_retry(
    simulator: SimulatorServer,
) -> None:
    set_faults(simulator, {"path": "^/api/v1/sim/", "kind": "expire_token", "count": 1})
    async with connect(simulator) as client:
        await client.authenticate()
        assert (await client.get_sim(FIRST_SIM))["id"] == FIRST_SIM
        await client.get_sim(FIRST_SIM)
    assert [r.status for r in api_requests(simulator, "GET", "^/api/v1/sim/")] == [401, 200, 200]
    assert logins(simulator) == 2


async def test_logs_in_again_before_the_token_expires() -> None:
    with SimulatorServer(SimulatorConfig(seed=7, endpoints=2, token_ttl=2)) as server:
        async with connect(server) as client:
            await client.get_sim(FIRST_SIM)
            await asyncio.sleep(1.1)  # past exp − min(margin, lifetime / 2)
            await client.get_sim(FIRST_SIM)
        assert logins(server) == 2
        assert all(r.status == 200 for r in api_requests(server, "GET"))


async def test_walks_every_page_once_and_never_asks_past_the_last(
    simulator: SimulatorServer,
) -> None:
    stored = simulator.state.generate(25, spread_seconds=60)
    start, end = window()
    async with connect(simulator) as client:
        pages = [p async for p in client.iter_event_pages(start, end, per_page=10)]
        past_the_end = await client.list_events_page(start, end, 4, per_page=10)
    ids = [e["id"] for p in pages for e in p.events]
    assert ids == sorted(e["id"] for e in stored)
    assert [(p.page, p.total_pages, p.per_page, p.total_count) for p in pages] == [
        (1, 3, 10, 25),
        (2, 3, 10, 25),
        (3, 3, 10, 25),
    ]
    assert past_the_end.events == pages[-1].events  # the quirk the walk must not loop on
    queries = [r.query for r in api_requests(simulator, "GET", "^/api/v1/event$")]
    assert ["page=4" in q for q in queries] == [False, False, False, True]


async def test_reads_the_clamped_page_size_back(simulator: SimulatorServer) -> None:
    stored = simulator.state.generate(10, spread_seconds=30)
    set_faults(simulator, {"path": "^/api/v1/event$", "kind": "clamp_per_page", "max_per_page": 4})
    start, end = window()
    async with connect(simulator) as client:
        pages = [p async for p in client.iter_event_pages(start, end, per_page=1000)]
    assert [(p.per_page, p.total_pages, len(p.events)) for p in pages] == [
        (4, 3, 4),
        (4, 3, 4),
        (4, 3, 2),
    ]
    assert [e["id"] for p in pages for e in p.events] == [e["id"] for e in stored]


async def test_an_empty_window_is_one_empty_page(simulator: SimulatorServer) -> None:
    start, end = window()
    async with connect(simulator) as client:
        pages = [p async for p in client.iter_event_pages(start, end)]
    assert [(p.events, p.total_pages, p.total_count) for p in pages] == [([], 0, 0)]


class HeldAnswers(httpx.AsyncBaseTransport):
    """A real HTTP transport that notes each event-page request as it leaves the client, and
    holds its answer back until `release` is set."""

    def __init__(self, log: list[str]) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._log = log
        self.release = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/api/v1/event":
            return await self._inner.handle_async_request(request)
        self._log.append("sent")
        response = await self._inner.handle_async_request(request)
        await self.release.wait()
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_on_underway_is_called_once_the_request_is_out_and_before_its_answer(
    simulator: SimulatorServer,
) -> None:
    log: list[str] = []
    transport = HeldAnswers(log)
    async with connect(simulator, transport=transport) as client:
        await client.authenticate()  # else it is called at once: the login comes first
        underway = asyncio.Event()

        def note() -> None:
            log.append("underway")
            underway.set()

        page = asyncio.create_task(client.list_events_page(*window(), on_underway=note))
        await underway.wait()
        assert log == ["sent", "underway"] and not page.done()
        transport.release.set()
        assert (await page).page == 1


async def test_on_underway_is_called_before_a_wait_for_the_rate_limit(
    simulator: SimulatorServer,
) -> None:
    log: list[str] = []
    transport = HeldAnswers(log)
    transport.release.set()
    async with connect(simulator, transport=transport, event_rate_limit=2.0) as client:
        await client.list_events_page(*window())  # takes the limiter's one slot
        await client.list_events_page(*window(), on_underway=lambda: log.append("underway"))
    assert log[:3] == ["sent", "underway", "sent"]


async def test_retries_a_429_after_the_retry_after_delay(simulator: SimulatorServer) -> None:
    set_faults(
        simulator,
        {"path": "^/api/v1/event", "kind": "429", "count": 2, "retry_after": 1.5},
    )
    sleep = Recorder()
    async with connect(simulator, sleep=sleep) as client:
        assert await client.event_types()
    assert sleep.waits == [1.5, 1.5]
    assert [r.status for r in api_requests(simulator, "GET", "^/api/v1/event")] == [429, 429, 200]


async def test_retry_after_longer_than_backoff_max_is_capped(simulator: SimulatorServer) -> None:
    set_faults(simulator, {"path": "^/api/v1/sim/", "kind": "429", "count": 1, "retry_after": 90})
    sleep = Recorder()
    async with connect(simulator, sleep=sleep, backoff_max=20.0) as client:
        await client.get_sim(FIRST_SIM)
    assert sleep.waits == [20.0]


async def test_retries_a_503_html_page_then_succeeds(simulator: SimulatorServer) -> None:
    set_faults(simulator, {"path": "^/api/v1/endpoint/", "kind": "503", "count": 1})
    sleep = Recorder()
    with capture_logs() as logs:
        async with connect(simulator, sleep=sleep, backoff_initial=2.0) as client:
            assert (await client.get_endpoint(FIRST_ENDPOINT))["id"] == FIRST_ENDPOINT
    assert len(sleep.waits) == 1 and 0.0 <= sleep.waits[0] <= 2.0
    (retry,) = [entry for entry in logs if entry["event"] == "emnify request failed; retrying"]
    assert retry["status"] == 503 and retry["attempt"] == 1
    assert retry["error"].startswith("HTTP 503 with a non-JSON body (text/html, ")
    assert retry["path"] == f"/api/v1/endpoint/{FIRST_ENDPOINT}"


async def test_gives_up_after_max_retries_with_the_last_status(
    simulator: SimulatorServer,
) -> None:
    set_faults(simulator, {"path": "^/api/v1/sim/", "kind": "502"})
    sleep = Recorder()
    async with connect(simulator, sleep=sleep, max_retries=2) as client:
        with pytest.raises(ApiError) as info:
            await client.get_sim(FIRST_SIM)
    error = info.value
    assert (error.status, error.method, error.path) == (502, "GET", f"/api/v1/sim/{FIRST_SIM}")
    assert str(error).startswith(f"GET /api/v1/sim/{FIRST_SIM} HTTP 502: HTTP 502 with a non-JSON")
    assert len(api_requests(simulator, "GET", "^/api/v1/sim/")) == 3
    assert len(sleep.waits) == 2


@pytest.mark.parametrize(
    ("fault_body", "code", "token", "message"),
    [
        ("json", None, None, "Too Many Requests"),
        ("error", 1105, "TooManyRequests", "Too Many Requests"),
        ("empty", None, None, "HTTP 429 with an empty body"),
    ],
)
async def test_reads_each_throttling_body_shape(
    simulator: SimulatorServer, fault_body: str, code: int | None, token: str | None, message: str
) -> None:
    set_faults(simulator, {"path": "^/api/v1/sim/", "kind": "429", "body": fault_body})
    async with connect(simulator, max_retries=0) as client:
        with pytest.raises(ApiError) as info:
            await client.get_sim(FIRST_SIM)
    assert (info.value.status, info.value.error_code, info.value.error_token) == (429, code, token)
    assert info.value.message == message


async def test_reads_not_found_and_nested_validation_errors(simulator: SimulatorServer) -> None:
    async with connect(simulator) as client:
        with pytest.raises(ApiError) as missing:
            await client.get_sim(1)
        with pytest.raises(ApiError) as invalid:
            await client.set_sim_status(FIRST_SIM, 99)
    assert (missing.value.status, missing.value.error_token) == (404, "NotFound")
    assert invalid.value.status == 422
    assert invalid.value.error_code is not None and invalid.value.errors


async def test_suspends_a_sim_and_disables_its_endpoint(simulator: SimulatorServer) -> None:
    async with connect(simulator) as client:
        await client.set_endpoint_status(FIRST_ENDPOINT, EndpointStatus.DISABLED)
        await client.set_sim_status(FIRST_SIM, SimStatus.SUSPENDED)
    assert simulator.state.sim(FIRST_SIM)["status"]["id"] == SimStatus.SUSPENDED
    assert simulator.state.endpoint(FIRST_ENDPOINT)["status"]["id"] == EndpointStatus.DISABLED


async def test_status_changes_are_left_to_the_caller_after_an_ambiguous_failure(
    simulator: SimulatorServer,
) -> None:
    # The PATCH may have been applied: the status action reads back before any resend.
    set_faults(
        simulator,
        {"path": "^/api/v1/sim/", "method": "PATCH", "kind": "apply_then_fail", "count": 1},
    )
    async with connect(simulator) as client:
        with pytest.raises(ApiError) as info:
            await client.set_sim_status(FIRST_SIM, SimStatus.SUSPENDED)
    assert info.value.status == 504 and info.value.retryable
    assert [r.status for r in api_requests(simulator, "PATCH")] == [504]
    assert simulator.state.sim(FIRST_SIM)["status"]["id"] == SimStatus.SUSPENDED


async def test_send_sms_returns_the_id_from_location(simulator: SimulatorServer) -> None:
    async with connect(simulator) as client:
        sms_id = await client.send_sms(FIRST_ENDPOINT, {"payload": "REBOOT"})
        listed = await client.list_sms(FIRST_ENDPOINT)
    assert sms_id is not None and [s["id"] for s in listed] == [sms_id]
    assert listed[0]["payload"] == "REBOOT"


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        ({"kind": "apply_then_fail"}, 504),
        ({"kind": "apply_then_fail", "then": "drop"}, None),
        ({"kind": "503"}, 503),
        ({"kind": "drop"}, None),
    ],
)
async def test_send_sms_is_not_sent_again_after_an_ambiguous_failure(
    simulator: SimulatorServer, fault: dict[str, Any], status: int | None
) -> None:
    set_faults(simulator, {"path": SMS_PATH, "method": "POST", "count": 1, **fault})
    sleep = Recorder()
    async with connect(simulator, sleep=sleep) as client:
        with pytest.raises(ApiError) as info:
            await client.send_sms(FIRST_ENDPOINT, {"payload": "REBOOT"})
    assert info.value.status == status
    assert len(api_requests(simulator, "POST", SMS_PATH)) == 1
    assert sleep.waits == []
    applied = 1 if fault["kind"] == "apply_then_fail" else 0
    assert len(simulator.state.sms(FIRST_ENDPOINT)) == applied


async def test_send_sms_is_retried_after_a_429(simulator: SimulatorServer) -> None:
    set_faults(
        simulator, {"path": SMS_PATH, "method": "POST", "kind": "429", "count": 1, "retry_after": 2}
    )
    sleep = Recorder()
    async with connect(simulator, sleep=sleep) as client:
        assert await client.send_sms(FIRST_ENDPOINT, {"payload": "REBOOT"}) is not None
    assert sleep.waits == [2.0]
    assert len(simulator.state.sms(FIRST_ENDPOINT)) == 1


class SendTimes(httpx.AsyncBaseTransport):
    """A real HTTP transport that notes when each request leaves the client."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.sent: list[tuple[float, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((time.monotonic(), request.url.path))
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def busiest_window(times: list[float], width: float) -> int:
    return max(sum(1 for t in times if start <= t < start + width) for start in times)


async def test_event_calls_and_their_retries_never_exceed_the_rate_limit(
    simulator: SimulatorServer,
) -> None:
    set_faults(simulator, {"path": "^/api/v1/event/type$", "kind": "503", "count": 3})
    transport = SendTimes()
    async with connect(simulator, transport=transport, event_rate_limit=5.0) as client:
        await client.authenticate()
        await asyncio.gather(*(client.event_types() for _ in range(9)))
    records = api_requests(simulator, "GET", "^/api/v1/event/type$")
    assert [r.status for r in records].count(503) == 3 and len(records) == 12
    sent = [at for at, path in transport.sent if path == "/api/v1/event/type"]
    assert busiest_window(sent, 1.0 - 1e-3) <= 5  # as sent: strictly 5 a second
    arrived = [r.monotonic_time for r in records]
    assert arrived[-1] - arrived[0] >= 11 / 5 - 0.1
    # As the simulator saw them, allowing 100 ms for arrival jitter on a busy machine.
    assert busiest_window(arrived, 0.9) <= 5


async def test_a_wrong_application_token_is_reported_without_the_token(
    simulator: SimulatorServer,
) -> None:
    wrong = "wrong-application-token-4f1c"
    async with connect(simulator, wrong) as client:
        with pytest.raises(ApiError) as info:
            await client.get_sim(FIRST_SIM)
    assert info.value.status == 401
    assert "application token rejected: check EMNIFY_APPLICATION_TOKEN" in str(info.value)
    assert wrong not in f"{info.value} {info.value!r} {info.value.args}"
    assert api_requests(simulator, "GET") == []


async def test_a_failing_login_is_retried_by_itself_not_once_more_per_call(
    simulator: SimulatorServer,
) -> None:
    set_faults(simulator, {"path": "^/api/v1/authenticate$", "kind": "503"})
    sleep = Recorder()
    async with connect(simulator, sleep=sleep, max_retries=2) as client:
        with pytest.raises(LoginError) as info:
            await client.get_sim(FIRST_SIM)
    assert info.value.status == 503
    assert str(info.value).startswith("POST /api/v1/authenticate HTTP 503: login failed: HTTP 503")
    assert logins(simulator) == 3 and len(sleep.waits) == 2
    assert api_requests(simulator, "GET") == []


class BearerRecorder(httpx.AsyncBaseTransport):
    """A real HTTP transport that also notes every bearer token the client sent."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.tokens: set[str] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme == "Bearer":
            self.tokens.add(token)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_no_secret_reaches_a_log_line_an_error_or_a_repr(
    simulator: SimulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    set_faults(
        simulator,
        {"path": "^/api/v1/sim/", "kind": "expire_token", "count": 1},
        {"path": "^/api/v1/endpoint/", "kind": "503", "count": 1},
        {"path": "^/api/v1/event/type", "kind": "504"},
        {"path": "^/api/v1/authenticate", "kind": "502", "count": 1},
    )
    transport = BearerRecorder()
    errors: list[ApiError] = []
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        async with connect(simulator, transport=transport, max_retries=1) as client:
            await client.get_sim(FIRST_SIM)
            await client.get_endpoint(FIRST_ENDPOINT)
            with pytest.raises(ApiError) as failed:
                await client.event_types()
            errors.append(failed.value)
            text_of_client = repr(client)
        async with connect(simulator, "not-the-token", max_retries=0) as client:
            with pytest.raises(ApiError) as refused:
                await client.authenticate()
            errors.append(refused.value)
    assert len(transport.tokens) == 2  # the first JWT, and the one after the 401
    secrets = {APP_TOKEN, "not-the-token", *transport.tokens}
    seen = "\n".join(
        [
            repr(logs),
            caplog.text,
            text_of_client,
            *(f"{e} {e!r} {e.args} {e.__cause__!r}" for e in errors),
        ]
    )
    assert len(logs) >= 4
    assert not [secret for secret in secrets if secret in seen]


# ---------------------------------------------------------------------------------------------
# Answers no API should give, from a raw socket on loopback: trickled or endless
# ---------------------------------------------------------------------------------------------


def api_answering(answer: Answer) -> RawReceiver:
    """A loopback 'API' that logs anyone in and gives every other call `answer`."""
    login = json.dumps({"auth_token": make_jwt({"exp": time.time() + 3600})}).encode()

    async def reply(receiver: RawReceiver, head: bytes, writer: asyncio.StreamWriter) -> None:
        if head.startswith(b"POST /api/v1/authenticate "):
            await receiver.send(
                writer,
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(login), login),
            )
        else:
            await answer(receiver, head, writer)

    return RawReceiver(reply)


async def test_an_api_answer_trickling_in_is_cut_at_connect_plus_read_timeout() -> None:
    # A byte every 0.3 s: each read is quick, the whole answer would take a minute.
    body = b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n" + b" " * 198 + b"{}"
    async with api_answering(trickle(body, 0.3)) as api:
        settings = ClientSettings(
            base_url=api.base_url, connect_timeout=1.0, read_timeout=1.0, max_retries=0, **FAST
        )
        async with EmnifyClient(APP_TOKEN, settings) as client:
            started = time.monotonic()
            with pytest.raises(ApiError) as failed:
                await client.get_sim(FIRST_SIM)
            took = time.monotonic() - started
    assert failed.value.status is None
    assert "the answer took longer than 2 s" in str(failed.value)
    assert took < 10


@pytest.mark.parametrize(("status", "message"), [(200, "larger than 1048576 bytes"), (500, "500")])
async def test_an_api_answer_is_read_no_further_than_its_bound(status: int, message: str) -> None:
    size = 200 * 1024 * 1024
    async with api_answering(endless_body(status, size, b"Content-Type: text/html\r\n")) as api:
        settings = ClientSettings(
            base_url=api.base_url, max_retries=0, max_response_bytes=1024 * 1024, **FAST
        )
        async with EmnifyClient(APP_TOKEN, settings) as client:
            with pytest.raises(ApiError, match=message):
                await client.get_sim(FIRST_SIM)
        await eventually(lambda: api.open_now == 0)
    assert api.bytes_sent < 16 * 1024 * 1024  # not 200 MB: the client hung up


async def test_a_compressed_api_answer_is_bounded_as_it_inflates() -> None:
    bomb = gzip.compress(b"[" + b" " * (64 * 1024 * 1024) + b"]")

    async def answer(receiver: RawReceiver, head: bytes, writer: asyncio.StreamWriter) -> None:
        await receiver.send(
            writer,
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(bomb), bomb),
        )

    async with api_answering(answer) as api:
        settings = ClientSettings(
            base_url=api.base_url, max_retries=0, max_response_bytes=1024 * 1024, **FAST
        )
        async with EmnifyClient(APP_TOKEN, settings) as client:
            with pytest.raises(ApiError, match="larger than 1048576 bytes"):
                await client.event_types()


async def test_a_gzipped_api_answer_within_the_bound_reads_as_usual() -> None:
    page = gzip.compress(json.dumps([{"id": 1, "description": "Quota used up"}]).encode())

    async def answer(receiver: RawReceiver, head: bytes, writer: asyncio.StreamWriter) -> None:
        await receiver.send(
            writer,
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(page), page),
        )

    async with api_answering(answer) as api:
        settings = ClientSettings(base_url=api.base_url, **FAST)
        async with EmnifyClient(APP_TOKEN, settings) as client:
            assert await client.event_types() == [{"id": 1, "description": "Quota used up"}]


# ---------------------------------------------------------------------------------------------
# Shapes the simulator cannot produce: httpx.MockTransport
# ---------------------------------------------------------------------------------------------


def make_jwt(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS384'})}.{part(claims)}.c2lnbmF0dXJl"


Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class FakeEmnify:
    """A scripted emnify for MockTransport: logs in, then answers each call from `routes`."""

    def __init__(self, token: str | None = None) -> None:
        now = time.time()
        self.token = token or make_jwt({"iat": int(now), "exp": int(now) + 3600})
        self.requests: list[httpx.Request] = []
        self.logins = 0
        self.routes: dict[tuple[str, str], Callable[[httpx.Request], httpx.Response]] = {}

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/api/v1/authenticate":
            self.logins += 1
            return httpx.Response(200, json={"auth_token": self.token})
        route = self.routes.get((request.method, request.url.path))
        if route is None:
            return httpx.Response(404, json={"error_code": 1201, "error_token": "NotFound"})
        return route(request)

    def calls(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]


def mock_client(fake: FakeEmnify, **settings: Any) -> tuple[EmnifyClient, list[float]]:
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    options: dict[str, Any] = {"base_url": "https://emnify.test", **FAST, **settings}
    client = EmnifyClient(
        APP_TOKEN,
        ClientSettings(**options),
        transport=httpx.MockTransport(fake),
        sleep=record,
    )
    return client, waits


def event(event_id: int) -> dict[str, Any]:
    return {"id": event_id, "timestamp": "2025-05-01T10:00:00.000Z", "event_type": {"id": 1}}


async def test_stops_when_a_page_repeats_the_previous_page_although_headers_promise_more() -> None:
    fake = FakeEmnify()
    pages = {1: [event(1), event(2)], 2: [event(3), event(4)]}

    def events(request: httpx.Request) -> httpx.Response:
        asked = int(request.url.params["page"])
        shown = pages[min(asked, 2)]  # past the end: the last page again
        return httpx.Response(200, json=shown, headers={"x-total-pages": "9"})

    fake.routes["GET", "/api/v1/event"] = events
    client, _ = mock_client(fake)
    async with client:
        seen = [e["id"] async for page in client.iter_event_pages(T0, T1) for e in page.events]
    assert seen == [1, 2, 3, 4]
    assert len(fake.calls("GET", "/api/v1/event")) == 3


async def test_assumes_one_page_when_paging_headers_are_absent() -> None:
    fake = FakeEmnify()
    fake.routes["GET", "/api/v1/event"] = lambda r: httpx.Response(200, json=[event(1)])
    client, _ = mock_client(fake)
    async with client:
        pages = [page async for page in client.iter_event_pages(T0, T1, per_page=50)]
    assert [(p.page, p.total_pages, p.per_page, p.total_count) for p in pages] == [(1, 1, 50, None)]


async def test_sends_the_window_in_whole_utc_seconds() -> None:
    fake = FakeEmnify()
    fake.routes["GET", "/api/v1/event"] = lambda r: httpx.Response(200, json=[])
    client, _ = mock_client(fake)
    berlin = timezone(timedelta(hours=2))
    start = datetime(2025, 5, 1, 12, 0, 0, 900_000, tzinfo=berlin)
    end = datetime(2025, 5, 1, 12, 5, 0, 1, tzinfo=berlin)
    async with client:
        await client.list_events_page(start, end, 3, per_page=200)
    (request,) = fake.calls("GET", "/api/v1/event")
    assert dict(request.url.params) == {
        "q": "from:2025-05-01T10:00:00Z,until:2025-05-01T10:05:01Z",
        "sort": "id",
        "page": "3",
        "per_page": "200",
    }
    assert "q=from%3A2025-05-01T10%3A00%3A00Z%2Cuntil%3A" in str(request.url)


def test_refuses_a_naive_or_reversed_window() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        event_window(datetime(2025, 5, 1), T1)
    with pytest.raises(ValueError, match="starts after it ends"):
        event_window(T1, T0)


async def test_json_that_is_not_a_list_where_a_list_is_expected_is_an_api_error() -> None:
    fake = FakeEmnify()
    fake.routes["GET", "/api/v1/event/type"] = lambda r: httpx.Response(200, json={"id": 1})
    fake.routes["GET", "/api/v1/endpoint/7/sms"] = lambda r: httpx.Response(200, json=[1, 2])
    fake.routes["GET", "/api/v1/sim/7"] = lambda r: httpx.Response(200, content=b"<html>")
    client, _ = mock_client(fake)
    async with client:
        with pytest.raises(ApiError, match="expected a JSON array, got an object") as info:
            await client.event_types()
        assert (info.value.status, info.value.path) == (200, "/api/v1/event/type")
        with pytest.raises(ApiError, match="item 0 is a number"):
            await client.list_sms(7)
        with pytest.raises(ApiError, match="non-JSON body"):
            await client.get_sim(7)


async def test_token_without_exp_is_kept_until_a_401() -> None:
    fake = FakeEmnify(token=make_jwt({"sub": "no-exp"}))
    refuse = [True]

    def sim(request: httpx.Request) -> httpx.Response:
        if refuse and request.headers["authorization"] == f"Bearer {fake.token}":
            refuse.clear()
            return httpx.Response(401, json={"message": "token expired"})
        return httpx.Response(200, json={"id": 1})

    fake.routes["GET", "/api/v1/sim/1"] = sim
    client, _ = mock_client(fake)
    async with client:
        for _ in range(3):
            assert await client.get_sim(1) == {"id": 1}
    assert fake.logins == 2


async def test_a_second_401_after_a_fresh_login_raises() -> None:
    fake = FakeEmnify()
    fake.routes["GET", "/api/v1/sim/1"] = lambda r: httpx.Response(
        401, json={"message": "token contains an invalid number of segments"}
    )
    client, _ = mock_client(fake)
    async with client:
        with pytest.raises(ApiError) as info:
            await client.get_sim(1)
    assert info.value.status == 401
    assert "refused again right after a fresh login" in str(info.value)
    assert fake.logins == 2
    assert len(fake.calls("GET", "/api/v1/sim/1")) == 2


async def test_send_sms_is_retried_when_the_connection_was_never_made() -> None:
    fake = FakeEmnify()
    failures = [httpx.ConnectError("connection refused")]

    async def flaky(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/sms") and failures:
            raise failures.pop()
        return await fake(request)

    fake.routes["POST", "/api/v1/endpoint/5/sms"] = lambda r: httpx.Response(
        201, headers={"Location": "https://cdn.emnify.net/api/v1/endpoint/5/sms/77"}
    )
    client = EmnifyClient(
        APP_TOKEN,
        ClientSettings(base_url="https://emnify.test", **FAST),
        transport=httpx.MockTransport(flaky),
        sleep=no_sleep,
    )
    async with client:
        assert await client.send_sms(5, {"payload": "hi"}) == 77
    assert len(fake.calls("POST", "/api/v1/endpoint/5/sms")) == 1


async def test_send_sms_is_not_retried_after_a_read_timeout() -> None:
    sent: list[httpx.Request] = []
    fake = FakeEmnify()

    async def slow(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/sms"):
            sent.append(request)
            raise httpx.ReadTimeout("timed out")
        return await fake(request)

    client = EmnifyClient(
        APP_TOKEN,
        ClientSettings(base_url="https://emnify.test", **FAST),
        transport=httpx.MockTransport(slow),
        sleep=no_sleep,
    )
    async with client:
        with pytest.raises(ApiError) as info:
            await client.send_sms(5, {"payload": "hi"})
    assert info.value.status is None
    assert "ReadTimeout" in info.value.message
    assert len(sent) == 1


async def test_send_sms_without_location_returns_none() -> None:
    fake = FakeEmnify()
    fake.routes["POST", "/api/v1/endpoint/5/sms"] = lambda r: httpx.Response(201)
    client, _ = mock_client(fake)
    async with client:
        assert await client.send_sms(5, {"payload": "hi"}) is None


async def test_a_plain_500_is_not_retried() -> None:
    fake = FakeEmnify()
    fake.routes["GET", "/api/v1/endpoint/3"] = lambda r: httpx.Response(
        500, json={"status_code": 500, "message": "Internal error"}
    )
    client, waits = mock_client(fake)
    async with client:
        with pytest.raises(ApiError, match="Internal error") as info:
            await client.get_endpoint(3)
    assert info.value.status == 500
    assert waits == []


async def test_stops_retrying_when_the_next_wait_would_pass_the_deadline() -> None:
    fake = FakeEmnify()
    fake.routes["GET", "/api/v1/sim/1"] = lambda r: httpx.Response(
        429,
        json={"error_code": 1105, "error_token": "TooManyRequests"},
        headers={"Retry-After": "30"},
    )
    client, waits = mock_client(fake, retry_deadline=10.0)
    async with client:
        with pytest.raises(ApiError) as info:
            await client.get_sim(1)
    assert (info.value.status, info.value.retry_after) == (429, 30.0)
    assert waits == []
    assert len(fake.calls("GET", "/api/v1/sim/1")) == 1


async def test_backoff_without_retry_after_is_jittered_and_capped() -> None:
    fake = FakeEmnify()
    fake.routes["GET", "/api/v1/sim/1"] = lambda r: httpx.Response(504, content=b"")
    client, waits = mock_client(fake, max_retries=6, backoff_initial=1.0, backoff_max=8.0)
    async with client:
        with pytest.raises(ApiError, match="HTTP 504 with an empty body"):
            await client.get_sim(1)
    assert len(waits) == 6
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert all(0.0 <= wait <= ceiling for wait, ceiling in zip(waits, ceilings, strict=True))


async def test_reports_every_attempt_to_on_response_with_the_path_template() -> None:
    fake = FakeEmnify()
    answers = [httpx.Response(503, content=b"busy"), httpx.Response(200, json={"id": 42})]
    fake.routes["GET", "/api/v1/sim/42"] = lambda r: answers.pop(0)
    seen: list[tuple[str, str, int | None]] = []
    client = EmnifyClient(
        APP_TOKEN,
        ClientSettings(base_url="https://emnify.test", **FAST),
        transport=httpx.MockTransport(fake),
        on_response=lambda method, path, status, seconds: seen.append((method, path, status)),
        sleep=no_sleep,
    )
    async with client:
        assert (await client.get_sim(42))["id"] == 42
    assert seen == [
        ("POST", "/api/v1/authenticate", 200),
        ("GET", "/api/v1/sim/{sim_id}", 503),
        ("GET", "/api/v1/sim/{sim_id}", 200),
    ]
    assert fake.requests[-1].headers["user-agent"].startswith("emnify-event-engine/")


# ---------------------------------------------------------------------------------------------
# Error bodies, parsed without a server
# ---------------------------------------------------------------------------------------------


def failed(status: int, content: bytes = b"", **headers: str) -> httpx.Response:
    request = httpx.Request("PATCH", "https://cdn.emnify.net/api/v1/endpoint/9?x=1")
    return httpx.Response(status, content=content, headers=headers, request=request)


def test_error_body_empty() -> None:
    error = api_error_from_response(failed(422))
    assert (error.status, error.method, error.path) == (422, "PATCH", "/api/v1/endpoint/9")
    assert error.message == "HTTP 422 with an empty body"
    assert str(error) == "PATCH /api/v1/endpoint/9 HTTP 422: HTTP 422 with an empty body"


def test_error_body_html_page_is_described_not_dumped() -> None:
    page = b"<html><head><title>503 Service Unavailable</title></head>" + b"<p>x</p>" * 2000
    error = api_error_from_response(
        failed(503, page, **{"content-type": "text/html; charset=utf-8"})
    )
    assert error.message.startswith(
        f"HTTP 503 with a non-JSON body (text/html, {len(page)} bytes): <html><head><title>503"
    )
    assert len(error.message) < 250


def test_error_body_gateway_message() -> None:
    body = b'{"message":"token contains an invalid number of segments"}'
    error = api_error_from_response(failed(401, body))
    assert error.message == "token contains an invalid number of segments"
    assert (error.error_code, error.error_token) == (None, None)


def test_error_body_emnify_shape_with_nested_errors() -> None:
    body = {
        "error_code": 1400,
        "error_token": "InputValidationFailed",
        "message": "Update endpoint validation error",
        "errors": [
            {
                "error_code": 1401,
                "error_token": "InvalidReference",
                "message": "Service profile with Id '-1' not found.",
            }
        ],
    }
    error = api_error_from_response(failed(422, json.dumps(body).encode()))
    assert (error.error_code, error.error_token) == (1400, "InputValidationFailed")
    assert error.message == (
        "Update endpoint validation error: Service profile with Id '-1' not found."
    )
    assert error.errors == body["errors"]
    assert "[1400 InputValidationFailed]" in str(error)


def test_error_body_status_code_shape() -> None:
    error = api_error_from_response(failed(400, b'{"status_code": 400, "message": "Bad filter"}'))
    assert (error.status, error.message) == (400, "Bad filter")


def test_error_body_reason_shape() -> None:
    error = api_error_from_response(failed(409, b'{"reason": "Conflict", "message": "Busy"}'))
    assert error.message == "Busy (Conflict)"


def test_error_body_token_only_and_unexpected_json() -> None:
    assert (
        api_error_from_response(
            failed(400, b'{"error_code":1406,"error_token":"NotAllowed"}')
        ).message
        == "NotAllowed"
    )
    assert api_error_from_response(failed(502, b'"oops"')).message == (
        "HTTP 502 with an unexpected JSON body (str)"
    )


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    now = 1_746_093_600.0  # 2025-05-01T10:00:00Z
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Thu, 01 May 2025 10:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Thu, 01 May 2025 09:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert api_error_from_response(failed(429, b"", **{"Retry-After": "3"})).retry_after == 3.0


# ---------------------------------------------------------------------------------------------
# The auth token schedule, with a fake clock
# ---------------------------------------------------------------------------------------------


def test_relogin_margin_is_capped_to_half_the_lifetime() -> None:
    assert refresh_time(JwtTimes(expires_at=10_000, issued_at=0), 0, 300) == 9_700
    assert refresh_time(JwtTimes(expires_at=200, issued_at=0), 0, 300) == 100
    assert refresh_time(JwtTimes(expires_at=None, issued_at=None), 0, 300) is None
    assert read_jwt_times(make_jwt({"exp": 99, "iat": 9})) == JwtTimes(99.0, 9.0)
    assert read_jwt_times("not-a-jwt") == JwtTimes(None, None)
    assert read_jwt_times("a.!!!.c") == JwtTimes(None, None)


async def test_concurrent_callers_share_one_login_and_its_failure() -> None:
    now = [1000.0]
    logins: list[float] = []
    fail = [False]

    async def login() -> Secret:
        logins.append(now[0])
        await asyncio.sleep(0.01)
        if fail[0]:
            raise ApiError(401, "application token rejected")
        return Secret(make_jwt({"iat": int(now[0]), "exp": int(now[0]) + 600}))

    session = AuthSession(login, relogin_margin=300, clock=lambda: now[0])
    tokens = await asyncio.gather(*(session.token() for _ in range(10)))
    assert len(logins) == 1 and len({id(t) for t in tokens}) == 1
    first = tokens[0]
    fail[0] = True
    with pytest.raises(ApiError):
        await session.renew(first)  # a 401 with a revoked application token
    results = await asyncio.gather(*(session.token() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, ApiError) for r in results)
    assert len(logins) == 3  # the renew, then one shared attempt for the five callers


async def test_keeps_a_valid_token_when_an_early_relogin_fails() -> None:
    now = [1000.0]
    logins: list[float] = []
    fail = [False]

    async def login() -> Secret:
        logins.append(now[0])
        if fail[0]:
            raise ApiError(503, "login failed")
        return Secret(make_jwt({"iat": int(now[0]), "exp": int(now[0]) + 600}))

    session = AuthSession(login, relogin_margin=300, clock=lambda: now[0])
    first = await session.token()
    now[0] += 299
    assert await session.token() is first and len(logins) == 1
    now[0] += 2  # inside the margin: time for an early re-login, which fails
    fail[0] = True
    kept = await asyncio.gather(*(session.token() for _ in range(5)))
    assert all(token is first for token in kept) and len(logins) == 2
    now[0] += 59
    assert await session.token() is first and len(logins) == 2  # not on every call
    now[0] += 2
    assert await session.token() is first and len(logins) == 3
    now[0] = 1600  # exp
    with pytest.raises(ApiError, match="login failed"):
        await session.token()
