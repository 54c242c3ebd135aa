"""The daemon's HTTP server over loopback: /healthz, /readyz, /metrics, and its life cycle."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from engine.config import Config
from engine.daemon import Daemon
from engine.errors import EngineError
from engine.http.service import HttpService
from engine.http.settings import HttpSettings
from engine.simulator import FaultRule, SimulatorConfig, SimulatorServer

from helpers import (
    TOKEN,
    engine_config,
    eventually,
    ingest_url,
    metric_value,
    poller_of,
    rules_from,
    running_daemon,
    with_poller,
)

RULES = """
rules:
  - id: suspend-on-quota
    when: {source: policy_control, type: "Quota used up"}
    actions: [{suspend_sim: {}}]
"""


def _config(tmp_path: Path, simulator: SimulatorServer, **changes: object) -> Config:
    config = with_poller(engine_config(tmp_path, simulator), interval=timedelta(milliseconds=300))
    return replace(config, **changes)


def _service() -> HttpService:
    service = HttpService(HttpSettings(port=0))
    service.bind()
    return service


async def test_healthz_answers_alive_and_the_ingest_route_exists_only_for_the_data_streamer(
    tmp_path, simulator
):
    service = _service()
    daemon = Daemon(
        _config(tmp_path, simulator), rules_from(tmp_path, RULES), TOKEN, services=[service]
    )
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        health = await client.get(service.base_url + "/healthz")
        ingest = await client.post(ingest_url(service), content=b"[]")
    assert health.status_code == 200
    assert health.json()["status"] == "alive"
    assert ingest.status_code == 404  # sources: [poller] only


async def test_metrics_count_events_matches_actions_api_requests_and_latencies(tmp_path, simulator):
    sim = simulator.state.sims()[0]
    simulator.state.store_events([{"event_type": {"id": 19}, "sim_id": sim["id"]}])
    service = _service()
    daemon = Daemon(
        _config(tmp_path, simulator), rules_from(tmp_path, RULES), TOKEN, services=[service]
    )
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        await eventually(lambda: simulator.state.sim(sim["id"])["status"]["id"] == 2)
        await eventually(lambda: daemon.summary.actions[("suspend_sim", "done")] == 1)
        answer = await client.get(service.base_url + "/metrics")
    text = answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    assert metric_value(text, "event_engine_events_new_total", source="poller") == 1
    assert metric_value(text, "event_engine_events_received_total", source="poller") >= 1
    assert metric_value(text, "event_engine_rule_matches_total", rule="suspend-on-quota") == 1
    assert metric_value(text, "event_engine_actions_total", kind="suspend_sim", outcome="done") == 1
    assert (
        metric_value(
            text, "event_engine_action_duration_seconds_count", kind="suspend_sim", result="ok"
        )
        == 1
    )
    assert metric_value(text, "event_engine_polls_total", result="ok") >= 1
    assert metric_value(text, "event_engine_poll_duration_seconds_count") >= 1
    assert (
        metric_value(
            text,
            "event_engine_api_requests_total",
            method="GET",
            path="/api/v1/event",
            status="200",
        )
        >= 1
    )
    assert metric_value(text, "event_engine_api_request_duration_seconds_count", method="GET") >= 1
    lag = metric_value(text, "event_engine_poll_lag_seconds")
    assert lag is not None and 0 <= lag < 30
    assert metric_value(text, "event_engine_outbox_intents", status="pending") == 0
    assert metric_value(text, "event_engine_outbox_intents", status="dead") == 0
    assert metric_value(text, "event_engine_outbox_intents", status="done") == 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_readyz_turns_unready_when_the_api_goes_away_and_ready_when_it_returns(tmp_path):
    port = _free_port()
    simulated = SimulatorConfig(seed=3, endpoints=6, late_fraction=0.0)
    first = SimulatorServer(simulated, port=port).start()
    service = _service()
    daemon = Daemon(
        _config(tmp_path, first), rules_from(tmp_path, RULES), TOKEN, services=[service]
    )
    second = None
    try:
        async with running_daemon(daemon), httpx.AsyncClient() as client:

            async def readyz() -> httpx.Response:
                return await client.get(service.base_url + "/readyz")

            async def ready_is(expected: bool) -> bool:
                return (await readyz()).status_code == (200 if expected else 503)

            await eventually(lambda: ready_is(True))
            body = (await readyz()).json()
            assert body["ready"] is True
            assert set(body["checks"]) == {"store", "lease", "poll", "api"}

            await asyncio.to_thread(first.stop)
            await eventually(lambda: ready_is(False))
            body = (await readyz()).json()
            assert body["checks"]["api"]["ok"] is False
            assert "did not respond" in body["checks"]["api"]["detail"]
            assert body["checks"]["store"]["ok"] is True

            second = SimulatorServer(simulated, port=port)
            await asyncio.to_thread(second.start)
            await eventually(lambda: ready_is(True))
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_readyz_is_unready_before_the_first_poll_and_names_what_is_missing(
    tmp_path, simulator
):
    service = _service()
    config = _config(tmp_path, simulator)
    # One poll a minute: only the one at start runs, and it meets a failing Event API.
    config = with_poller(config, interval=timedelta(minutes=1))
    simulator.state.set_faults([FaultRule.parse({"kind": "503", "path": "^/api/v1/event"})])
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN, services=[service])
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        await eventually(lambda: poller_of(daemon).last_error is not None)
        answer = await client.get(service.base_url + "/readyz")
    assert answer.status_code == 503
    checks = answer.json()["checks"]
    assert checks["poll"]["ok"] is False
    assert "no successful poll yet" in checks["poll"]["detail"]
    assert checks["api"] == {"ok": False, "detail": checks["api"]["detail"]}
    assert "503" in checks["api"]["detail"]


async def test_a_port_in_use_is_a_clear_error_not_a_traceback(tmp_path, simulator):
    taken = _service()
    clash = HttpService(HttpSettings(port=taken.port))
    with pytest.raises(EngineError, match=rf"cannot listen on 127.0.0.1:{taken.port}"):
        clash.bind()
    await taken.stop()
