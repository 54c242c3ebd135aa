"""Poll → rule → action, over loopback HTTP against the simulator and a real SQLite file."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from engine.daemon import Daemon, stop_after
from engine.model import IntentStatus
from engine.simulator import SimulatorServer
from engine.simulator.webhook_sink import WebhookSink

from helpers import TOKEN, engine_config, poller_of, rules_from

QUOTA_RULES = """
rules:
  - id: suspend-on-quota
    when: {source: policy_control, type: "Quota used up"}
    actions:
      - suspend_sim: {}
      - webhook:
          url: ${OPS_WEBHOOK_URL}
          body:
            text: "SIM {{ event.sim.iccid }} suspended by {{ rule.id }}"
            event_id: "{{ event.id }}"
"""


def _first_sim(simulator: SimulatorServer) -> dict:
    return simulator.state.sims()[0]


def _quota_used_up(sim_id: int, **extra) -> dict:
    return {"event_type": {"id": 19}, "sim_id": sim_id, **extra}


async def _poll_and_dispatch(daemon: Daemon) -> None:
    await poller_of(daemon).poll_once()
    while await daemon.dispatcher.run_due():
        pass


async def test_quota_event_suspends_the_sim_and_delivers_the_rendered_webhook(
    tmp_path, simulator, hook_env: WebhookSink
):
    sim = _first_sim(simulator)
    (event,) = simulator.state.store_events([_quota_used_up(sim["id"])])
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, QUOTA_RULES), TOKEN)
    try:
        await _poll_and_dispatch(daemon)
    finally:
        await daemon.aclose()

    assert simulator.state.sim(sim["id"])["status"]["id"] == 2
    (call,) = hook_env.calls("ops")
    assert call.body == {
        "text": f"SIM {sim['iccid']} suspended by suspend-on-quota",
        "event_id": str(event["id"]),
    }
    assert call.headers["idempotency-key"] == f"{event['id']}-suspend-on-quota-1"


async def test_the_suspension_the_engine_caused_comes_back_as_an_api_event(
    tmp_path, simulator, hook_env
):
    sim = _first_sim(simulator)
    simulator.state.store_events([_quota_used_up(sim["id"])])
    rules = rules_from(
        tmp_path,
        QUOTA_RULES
        + """
  - id: log-suspensions
    when: {source: api, type: "SIM suspension"}
    on_own_actions: true
    actions: [{log: {}}]
""",
    )
    daemon = Daemon(engine_config(tmp_path, simulator), rules, TOKEN)
    try:
        await _poll_and_dispatch(daemon)
        await asyncio.sleep(1.1)  # the API's window has whole-second bounds
        await _poll_and_dispatch(daemon)
        echoes = [r for r in daemon.store.audit_rows() if r["outcome"] == "echo"]
    finally:
        await daemon.aclose()
    assert daemon.summary.matches_by_rule["log-suspensions"] == 1
    [echo] = echoes
    assert echo["rule_id"] == "suspend-on-quota"


async def test_an_already_suspended_sim_counts_as_done_without_a_patch(
    tmp_path, simulator, hook_env
):
    sim = _first_sim(simulator)
    simulator.state.change_sim_status(sim["id"], 2, emit=False)
    simulator.state.store_events([_quota_used_up(sim["id"])])
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, QUOTA_RULES), TOKEN)
    try:
        await _poll_and_dispatch(daemon)
    finally:
        await daemon.aclose()
    patches = [r for r in simulator.state.requests() if r.method == "PATCH"]
    assert patches == []
    assert daemon.summary.actions[("suspend_sim", "already")] == 1


async def test_an_event_without_a_sim_fails_that_action_with_a_reason_and_goes_on(
    tmp_path, simulator, hook_env
):
    endpoint = simulator.state.endpoints()[0]
    simulator.state.store_events(
        [{"event_type": {"id": 19}, "endpoint_id": endpoint["id"], "sim": None}]
    )
    config = engine_config(tmp_path, simulator)
    daemon = Daemon(config, rules_from(tmp_path, QUOTA_RULES), TOKEN)
    try:
        await _poll_and_dispatch(daemon)
        rows = daemon.store.audit_rows()
    finally:
        await daemon.aclose()
    failed = [r for r in rows if r["outcome"] == "failed"]
    assert [(r["action"], r["detail"]) for r in failed] == [
        ("suspend_sim", "suspend_sim: the event has no sim.id to act on"),
        ("webhook", "template error: 'None' has no attribute 'iccid'"),
    ]


async def test_a_restart_resumes_from_the_cursor_with_no_event_twice_and_none_skipped(
    tmp_path, simulator, hook_env
):
    sims = simulator.state.sims()
    config = engine_config(tmp_path, simulator)
    rules = rules_from(tmp_path, QUOTA_RULES)
    simulator.state.store_events([_quota_used_up(sims[0]["id"]), _quota_used_up(sims[1]["id"])])

    first = Daemon(config, rules, TOKEN)
    try:
        await _poll_and_dispatch(first)
    finally:
        await first.aclose()

    simulator.state.store_events([_quota_used_up(sims[2]["id"])])
    await asyncio.sleep(1.1)  # the API's window has whole-second bounds
    second = Daemon(config, rules, TOKEN)
    try:
        await _poll_and_dispatch(second)
        rows = second.store.audit_rows()
    finally:
        await second.aclose()

    matched = sorted(r["event_id"] for r in rows if r["outcome"] == "matched")
    assert len(matched) == 3 and len(set(matched)) == 3
    # The overlap re-read the first two quota events; dedup dropped them. (The two SIM
    # suspension events the first run caused are new to the second.)
    assert second.summary.matches_by_rule == {"suspend-on-quota": 1}
    assert {s["id"]: s["status"]["id"] for s in simulator.state.sims()[:3]} == {
        sims[0]["id"]: 2,
        sims[1]["id"]: 2,
        sims[2]["id"]: 2,
    }
    assert len(hook_env.calls("ops")) == 3


async def test_intents_left_by_a_crash_run_on_the_next_start(tmp_path, simulator, hook_env):
    sim = _first_sim(simulator)
    simulator.state.store_events([_quota_used_up(sim["id"])])
    config = engine_config(tmp_path, simulator)
    rules = rules_from(tmp_path, QUOTA_RULES)
    crashed = Daemon(config, rules, TOKEN)
    try:
        await poller_of(crashed).poll_once()  # planned and committed, never dispatched
    finally:
        await crashed.aclose()
    assert simulator.state.sim(sim["id"])["status"]["id"] == 1

    restarted = Daemon(config, rules, TOKEN)
    try:
        await restarted.dispatcher.run_due()
        statuses = {i.status for i in restarted.store.intents()}
    finally:
        await restarted.aclose()
    assert simulator.state.sim(sim["id"])["status"]["id"] == 2
    assert statuses == {IntentStatus.DONE}


async def test_the_daemon_runs_on_its_scheduler_and_stops_when_asked(tmp_path, simulator, hook_env):
    sim = _first_sim(simulator)
    simulator.state.store_events([_quota_used_up(sim["id"])])
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, QUOTA_RULES), TOKEN)
    stop = asyncio.Event()
    timer = asyncio.create_task(stop_after(stop, timedelta(seconds=2.5)))
    summary = await daemon.run(stop)
    await timer
    assert daemon.source("poller").polls >= 2
    assert summary.actions[("suspend_sim", "done")] == 1
    assert summary.actions[("webhook", "delivered")] == 1
