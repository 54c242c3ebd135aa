"""Fault injection: the daemon over loopback, with the poller and the Data Streamer ingress
both feeding it, is sent one poison of each kind between good events. Each time it must stay
ready, judge every other event, lose nothing (the poison's id is seen, the cursor passes it),
and tell the operator in one clear line, however often the poison comes back.

The last test here sends one of every class at once. Each class has its own daemon-level
tests beside its fix: poison events and records here and in test_fault_isolation; rule and
config files of unbounded cost, the watcher and SIGHUP in test_bounded_loading; slow, huge
and steering receivers in test_webhook_bounds; a store that fails, fills up, is damaged or
replaced in test_store_truth; slow, idle and flooding HTTP clients in test_http_bounds."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import orjson
from raw_receiver import RawReceiver, answer_never
from structlog.testing import capture_logs

from engine.daemon import Daemon
from engine.http.service import HttpService
from engine.http.settings import HttpSettings
from engine.reload import RuleReloader
from engine.rules import load_rules
from engine.simulator import SimulatorServer
from engine.sources.streamer import StreamerSettings
from engine.store import SqliteStore

from helpers import (
    BILLION_LAUGHS,
    TOKEN,
    engine_config,
    eventually,
    ingest_url,
    metric_value,
    rules_from,
    running_daemon,
)

SECRET = "streamer-secret-for-poison-tests"
RULES = """
rules:
  - id: usage-percent          # divides by zero for an event whose total is 0
    when: {type: 19}
    actions:
      - log: {message: "{{ 100 * event.detail.used / event.detail.total }}% used"}
  - id: suspend-on-quota       # the rule that must go on whatever the others do
    when: {type: 19}
    actions:
      - suspend_sim: {}
  - id: remind-tomorrow        # its follow-up falls past the year 9999 for a far event
    when: {type: 19}
    actions:
      - after: 24h
        do: {log: {message: "reminder"}}
  - id: once-per-detail        # keys its window on the whole detail: a deep one breaks it
    when: {type: 19}
    threshold: {count: 1, within: 10m, per: detail}
    actions:
      - log: {message: "detail seen"}
"""
# A detail sent as JSON text (an emnify dialect) that the engine parses into 600 levels:
# readable, but too deep for its JSON writer.
DEEP_DETAIL = '{"a":' * 600 + "1" + "}" * 600
# Deeper than any JSON reader here goes: the record cannot even be read.
UNREADABLE = b'{"id": 77, "detail": ' + b"[" * 5000 + b"]" * 5000 + b"}"


def _daemon(tmp_path: Path, simulator: SimulatorServer) -> tuple[Daemon, HttpService]:
    simulator.state.set_event_rate(0)  # only the events each test sends
    simulator.state.clear_events()
    config = replace(
        engine_config(tmp_path, simulator), sources=("poller", "data_streamer")
    ).with_source_settings(data_streamer=StreamerSettings(secret=SECRET, max_body_bytes=4_000_000))
    service = HttpService(HttpSettings(port=0))
    service.bind()
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN, services=[service])
    return daemon, service


def _quota(simulator: SimulatorServer, index: int, **fields: Any) -> dict[str, Any]:
    sim = simulator.state.sims()[index % len(simulator.state.sims())]
    partial = {"event_type": {"id": 19}, "sim_id": sim["id"], **fields}
    (record,) = simulator.state.store_events([partial])
    return record


def _rows(store: SqliteStore, event_id: int) -> dict[str, list[tuple[str | None, str]]]:
    """Audit rows of an event by rule: (action, outcome)."""
    rows: dict[str, list[tuple[str | None, str]]] = {}
    for row in store.audit_rows(event_id=event_id):
        rows.setdefault(row["rule_id"], []).append((row["action"], row["outcome"]))
    return rows


def _failure_detail(store: SqliteStore, event_id: int, rule_id: str) -> str:
    (row,) = [
        r
        for r in store.audit_rows(event_id=event_id)
        if r["rule_id"] == rule_id and r["outcome"] == "failed"
    ]
    return str(row["detail"])


def _suspended(store: SqliteStore, event_id: int) -> bool:
    return any(i.kind == "suspend_sim" for i in store.intents_for_events([event_id]))


async def _ingest(client: httpx.AsyncClient, service: HttpService, body: bytes) -> httpx.Response:
    return await client.post(ingest_url(service), content=body, headers={"X-Emnify-Secret": SECRET})


async def test_poison_events_from_the_poller_fail_only_their_rule_and_the_cursor_moves_on(
    tmp_path, simulator
):
    daemon, service = _daemon(tmp_path, simulator)
    good = _quota(simulator, 0, detail={"used": 5, "total": 10})
    zero = _quota(simulator, 1, detail={"used": 5, "total": 0})
    deep = _quota(simulator, 2, detail=DEEP_DETAIL)
    zero_again = _quota(simulator, 3, detail={"used": 7, "total": 0})
    last = _quota(simulator, 4, detail={"used": 1, "total": 10})
    ids = [e["id"] for e in (good, zero, deep, zero_again, last)]
    with capture_logs() as logs:
        async with running_daemon(daemon), httpx.AsyncClient() as client:
            await eventually(lambda: daemon.store.unseen(ids) == set())
            await eventually(lambda: daemon.source("poller").polls >= 2)
            ready = await client.get(service.base_url + "/readyz")
            metrics = (await client.get(service.base_url + "/metrics")).text
    store = SqliteStore(daemon.config.store_path)
    assert ready.status_code == 200
    cursor = store.get_cursor()
    assert cursor is not None
    # The good events: every rule acted.
    for event in (good, last):
        assert _suspended(store, event["id"])
        assert ("log", "planned") in _rows(store, event["id"])["usage-percent"]
    # Division by zero: that rule failed for those events; the others acted on them.
    for event in (zero, zero_again):
        assert "division by zero" in _failure_detail(store, event["id"], "usage-percent")
        assert _suspended(store, event["id"])
        assert ("log", "scheduled") in _rows(store, event["id"])["remind-tomorrow"]
    # Too deep to handle: quarantined, seen, and nothing of it half-recorded.
    assert store.intents_for_events([deep["id"]]) == []
    assert any("nested too deeply" in q["reason"] for q in store.quarantined())
    failures = [e for e in logs if e["event"].startswith("rule failed on an event")]
    failures += [e for e in logs if e["event"].startswith("action not planned")]
    assert len([e for e in failures if e["rule"] == "usage-percent"]) == 1
    stage_total = sum(
        metric_value(metrics, "event_engine_rule_failures_total", rule="usage-percent", stage=s)
        or 0
        for s in ("judge", "plan")
    )
    assert stage_total == 2


async def test_poison_records_in_one_delivery_are_isolated_and_the_delivery_gets_200(
    tmp_path, simulator
):
    daemon, service = _daemon(tmp_path, simulator)
    good = _quota(simulator, 0, detail={"used": 5, "total": 10})
    zero = _quota(simulator, 1, detail={"used": 5, "total": 0})
    far = {**_quota(simulator, 2, detail={"used": 1, "total": 2})}
    far["timestamp"] = "9999-12-31T23:30:00.000Z"
    deep = _quota(simulator, 3, detail=DEEP_DETAIL)
    last = _quota(simulator, 4, detail={"used": 1, "total": 10})
    simulator.state.clear_events()  # only the Data Streamer delivers these
    wide_id = json.dumps({**good, "id": 0}).replace('"id": 0', '"id": 18446744073709551616')
    below = json.dumps({**good, "id": 0}).replace('"id": 0', '"id": -9223372036854775809')
    body = (
        b"["
        + b",".join(
            [
                orjson.dumps(good),
                orjson.dumps(zero),
                orjson.dumps(far),
                orjson.dumps(deep),
                wide_id.encode(),
                below.encode(),
                UNREADABLE,
                orjson.dumps(last),
            ]
        )
        + b"]"
    )
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        answer = await _ingest(client, service, body)
        again = await _ingest(client, service, body)  # a redelivery: all of it seen
        # Ready asks for a good poll too (the poller starts beside the deliveries).
        await eventually(lambda: daemon.source("poller").polls >= 1)
        ready = await client.get(service.base_url + "/readyz")
    assert answer.status_code == 200, answer.text
    assert answer.json()["received"] == 8
    assert answer.json()["new"] == 4
    assert answer.json()["quarantined"] == 4
    assert again.status_code == 200 and again.json()["new"] == 0
    assert ready.status_code == 200
    store = SqliteStore(daemon.config.store_path)
    for event in (good, zero, far, last):
        assert _suspended(store, event["id"])
    assert "division by zero" in _failure_detail(store, zero["id"], "usage-percent")
    assert "year 9999" in _failure_detail(store, far["id"], "remind-tomorrow")
    assert store.intents_for_events([deep["id"]]) == []
    reasons = [q["reason"] for q in store.quarantined()]
    assert sum("out of range for an id" in r for r in reasons) == 2
    assert sum("nested too deeply" in r for r in reasons) == 2


HOOKED = """
rules:
  - id: tell-the-hook              # its receiver never answers
    when: {type: 19}
    actions:
      - webhook: {url: "${STUCK_HOOK}", timeout: 30, body: {iccid: "{{ event.sim.iccid }}"}}
  - id: suspend-on-quota
    when: {type: 19}
    actions:
      - suspend_sim: {}
      - log: {message: "{{ 100 * event.detail.used / event.detail.total }}% used"}
"""


async def test_every_class_of_poison_at_once_leaves_the_daemon_ready_and_acting(
    tmp_path, simulator, monkeypatch
):
    simulator.state.set_event_rate(0)
    simulator.state.clear_events()
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "main.yaml").write_text(HOOKED, encoding="utf-8")
    config = replace(
        engine_config(tmp_path, simulator), rules=folder, sources=("poller", "data_streamer")
    ).with_source_settings(data_streamer=StreamerSettings(secret=SECRET, max_body_bytes=4_000_000))
    service = HttpService(HttpSettings(port=0))
    service.bind()
    reloader = RuleReloader(folder, debounce=0.05)
    async with RawReceiver(answer_never) as stuck:
        monkeypatch.setenv("STUCK_HOOK", f"{stuck.base_url}/hook")
        daemon = Daemon(config, load_rules(folder), TOKEN, services=[service, reloader])
        with capture_logs() as logs:
            async with running_daemon(daemon), httpx.AsyncClient() as client:
                await asyncio.wait_for(reloader.ready.wait(), 5.0)
                # Idle connections, a bad rule file, webhooks that hang, poison events.
                idle = [
                    await asyncio.open_connection("127.0.0.1", service.port) for _ in range(100)
                ]
                (folder / "bomb.yaml").write_text(BILLION_LAUGHS, encoding="utf-8")
                polled = [_quota(simulator, i, detail={"used": 1, "total": 0}) for i in range(3)]
                pushed = _quota(simulator, 3, detail={"used": 1, "total": 0})
                body = b"[" + orjson.dumps(pushed) + b"," + UNREADABLE + b"]"
                answer = await _ingest(client, service, body)
                await eventually(
                    lambda: any("aliases" in str(e.get("problem")) for e in logs), 10.0
                )
                # A SIM of another device still gets suspended while the webhooks hang.
                last = _quota(simulator, 4, detail={"used": 1, "total": 2})
                await eventually(
                    lambda: simulator.state.sim(last["sim"]["id"])["status"]["id"] == 2, 15.0
                )
                # The next good rule file is taken.
                (folder / "bomb.yaml").write_text(
                    "rules:\n  - id: fixed\n    actions: [{log: {}}]\n", encoding="utf-8"
                )
                await eventually(lambda: daemon.pipeline.rules.get("fixed") is not None, 10.0)
                health = await client.get(service.base_url + "/healthz")
                ready = await client.get(service.base_url + "/readyz")
                for _, writer in idle:
                    writer.close()
                await stuck.hang_up()
    assert answer.status_code == 200 and answer.json()["quarantined"] == 1
    assert (health.status_code, ready.status_code) == (200, 200), ready.text
    store = SqliteStore(daemon.config.store_path)
    for event in [*polled, pushed, last]:
        assert _suspended(store, event["id"])
    assert stuck.most_open <= 2  # its share of the webhook slots, no more
    text = " ".join(str(e) for e in logs)
    assert "Traceback" not in text and "never retrieved" not in text
    division = [e for e in logs if "division by zero" in str(e.get("reason"))]
    assert len(division) == 1  # four events failed that way: one line
