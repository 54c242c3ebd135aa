"""Stateful rules in the running engine: poll → window/throttle/guard → actions, over loopback
HTTP against the simulator and a real SQLite file, with restarts in between."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from structlog.testing import capture_logs

from engine.cli import main
from engine.daemon import Daemon
from engine.events import format_timestamp
from engine.model import IntentStatus
from engine.simulator import SimulatorServer

from helpers import TOKEN, engine_config, poller_of, rules_from

ACTIVE, SUSPENDED = 1, 2


def _quota(simulator: SimulatorServer, sim_id: int, seconds_ago: float) -> dict[str, Any]:
    moment = simulator.state.now() - timedelta(seconds=seconds_ago)
    return {"event_type": {"id": 19}, "sim_id": sim_id, "timestamp": format_timestamp(moment)}


def _status(simulator: SimulatorServer, sim_id: int) -> int:
    return int(simulator.state.sim(sim_id)["status"]["id"])


def _patches(simulator: SimulatorServer) -> list[str]:
    return [r.path for r in simulator.state.requests() if r.method == "PATCH"]


def _seconds_on(daemon: Daemon, seconds: float) -> None:
    """Run the daemon's poller clock ahead: the poll window has whole-second bounds, and a
    poll in the same second as the last one has nothing to ask for."""
    poller_of(daemon).clock = lambda: datetime.now(UTC) + timedelta(seconds=seconds)


async def _poll_and_dispatch(daemon: Daemon) -> None:
    await poller_of(daemon).poll_once()
    while await daemon.dispatcher.run_due():
        pass


async def _run_once(daemon: Daemon) -> None:
    try:
        await _poll_and_dispatch(daemon)
    finally:
        await daemon.aclose()


WINDOW = """
rules:
  - id: suspend-after-3-quota-events
    when: {type: 19}
    threshold: {count: 3, within: 10m, per: sim.iccid}
    throttle: {per: sim.iccid, for: 1h}
    actions: [{suspend_sim: {}}]
"""


async def test_a_daemon_restarted_mid_window_suspends_once_on_the_third_event(tmp_path, simulator):
    sim = simulator.state.sims()[0]["id"]
    config = engine_config(tmp_path, simulator)
    rules = rules_from(tmp_path, WINDOW)
    simulator.state.store_events([_quota(simulator, sim, 90), _quota(simulator, sim, 80)])
    await _run_once(Daemon(config, rules, TOKEN))
    assert _status(simulator, sim) == ACTIVE

    simulator.state.store_events([_quota(simulator, sim, 70)])
    restarted = Daemon(config, rules, TOKEN)
    _seconds_on(restarted, 2)
    try:
        await _poll_and_dispatch(restarted)  # the overlap re-reads the first two: dropped
        await _poll_and_dispatch(restarted)
        intents = restarted.store.intents()
    finally:
        await restarted.aclose()
    assert _status(simulator, sim) == SUSPENDED
    assert len(_patches(simulator)) == 1
    assert [(i.kind, i.status) for i in intents] == [("suspend_sim", IntentStatus.DONE)]

    # Three more within the hour fill the window again, but the throttle keeps it quiet.
    simulator.state.store_events([_quota(simulator, sim, s) for s in (60, 50, 40)])
    again = Daemon(config, rules, TOKEN)
    _seconds_on(again, 4)
    try:
        await _poll_and_dispatch(again)
        throttled = [r for r in again.store.audit_rows() if r["outcome"] == "throttled"]
    finally:
        await again.aclose()
    assert len(throttled) == 1 and len(_patches(simulator)) == 1


FOLLOW_UP = """
rules:
  - id: suspend-for-an-hour
    when: {type: 19}
    actions:
      - suspend_sim: {}
      - after: 1h
        do: {activate_sim: {}}
        cancel_if:
          when: {source: api, type: "SIM activation"}
"""


async def test_a_follow_up_survives_a_restart_and_runs_at_start_up_when_overdue(
    tmp_path, simulator
):
    sim = simulator.state.sims()[0]["id"]
    config = engine_config(tmp_path, simulator)
    rules = rules_from(tmp_path, FOLLOW_UP)
    simulator.state.store_events([_quota(simulator, sim, 30)])
    await _run_once(Daemon(config, rules, TOKEN))
    assert _status(simulator, sim) == SUSPENDED

    restarted = Daemon(config, rules, TOKEN)
    two_hours_on = datetime.now(UTC) + timedelta(hours=2)
    restarted.dispatcher.clock = lambda: two_hours_on
    try:
        await restarted.dispatcher.run_due()
        (follow_up,) = [i for i in restarted.store.intents() if i.kind == "activate_sim"]
    finally:
        await restarted.aclose()
    assert follow_up.status is IntentStatus.DONE
    assert _status(simulator, sim) == ACTIVE


async def test_a_manual_activation_cancels_the_waiting_follow_up(tmp_path, simulator):
    sim = simulator.state.sims()[0]["id"]
    config = engine_config(tmp_path, simulator)
    rules = rules_from(tmp_path, FOLLOW_UP)
    simulator.state.store_events([_quota(simulator, sim, 30)])
    daemon = Daemon(config, rules, TOKEN)
    try:
        await _poll_and_dispatch(daemon)
        assert _status(simulator, sim) == SUSPENDED
        simulator.state.change_sim_status(sim, ACTIVE)  # an operator, in the Portal
        _seconds_on(daemon, 2)
        await _poll_and_dispatch(daemon)
        simulator.state.change_sim_status(sim, SUSPENDED, emit=False)  # to see what runs
        daemon.dispatcher.clock = lambda: datetime.now(UTC) + timedelta(hours=2)
        await daemon.dispatcher.run_due()
        (follow_up,) = [i for i in daemon.store.intents() if i.kind == "activate_sim"]
        (cancel,) = [r for r in daemon.store.audit_rows() if r["outcome"] == "cancelled"]
    finally:
        await daemon.aclose()
    assert follow_up.status is IntentStatus.CANCELLED
    activation = [e for e in simulator.state.events() if e["event_type"]["id"] == 8]
    assert cancel["event_id"] == activation[-1]["id"]
    assert _status(simulator, sim) == SUSPENDED  # the follow-up did not run


async def test_a_shadow_rule_counts_its_window_but_calls_nothing_and_logs_it(tmp_path, simulator):
    sim = simulator.state.sims()[0]["id"]
    rules = rules_from(tmp_path, WINDOW.replace("actions:", "mode: shadow\n    actions:"))
    events = simulator.state.store_events([_quota(simulator, sim, s) for s in (30, 20, 10)])
    daemon = Daemon(engine_config(tmp_path, simulator), rules, TOKEN)
    try:
        with capture_logs() as logs:
            await _poll_and_dispatch(daemon)
        rows = daemon.store.audit_rows()
        intents = daemon.store.intents()
    finally:
        await daemon.aclose()
    assert _patches(simulator) == []
    # The operator watching the log sees what the rule would have done, as for a live one.
    (line,) = [entry for entry in logs if entry["event"] == "would have acted"]
    assert line["rule"] == "suspend-after-3-quota-events"
    assert (line["outcome"], line["action"]) == ("shadow", "suspend_sim")
    assert line["event_id"] == events[-1]["id"]
    assert line["iccid"] == simulator.state.sim(sim)["iccid"]
    assert line["reason"] == "rule in shadow mode: would have acted"
    assert [i.status for i in intents] == [IntentStatus.SHADOW]
    assert [r["outcome"] for r in rows if r["rule_id"] and r["outcome"] != "matched"] == [
        "below_threshold",
        "below_threshold",
        "fired",
        "would have acted",
    ]


GUARDED = """
rules:
  - id: suspend-on-quota
    when: {type: 19}
    max_actions: {count: 2, within: 10m}
    actions: [{suspend_sim: {}}]
    on_guard_trip:
      - webhook:
          url: ${OPS_WEBHOOK_URL}
          body: {text: "{{ rule.id }} stopped: {{ guard.reason }}"}
"""


async def test_the_guard_holds_notifies_once_and_resume_releases(
    tmp_path, simulator, hook_env, capsys
):
    sims = [s["id"] for s in simulator.state.sims()[:5]]
    config = engine_config(tmp_path, simulator)
    simulator.state.store_events([_quota(simulator, s, 90 - n) for n, s in enumerate(sims[:4])])
    daemon = Daemon(config, rules_from(tmp_path, GUARDED), TOKEN)
    store = str(config.store_path)
    try:
        await _poll_and_dispatch(daemon)
        assert [_status(simulator, s) for s in sims[:4]] == [SUSPENDED, SUSPENDED, ACTIVE, ACTIVE]
        (call,) = hook_env.calls("ops")
        assert call.body == {
            "text": "suspend-on-quota stopped: blast-radius guard: 3 destructive actions "
            "within 10m > 2"
        }

        assert main(["rules", "list", "--store", store, "--rules", str(tmp_path)]) == 0
        listed = capsys.readouterr().out
        assert "suspend-on-quota  shadow (guard)  2/2 per 10m  1" in listed

        assert (
            main(["rules", "resume", "suspend-on-quota", "--store", store, "--release-held"]) == 0
        )
        assert "1 held actions put back in the queue" in capsys.readouterr().out
        while await daemon.dispatcher.run_due():
            pass
        assert [_status(simulator, s) for s in sims[:4]] == [
            SUSPENDED,
            SUSPENDED,
            SUSPENDED,
            ACTIVE,
        ]

        simulator.state.store_events([_quota(simulator, sims[4], 30)])
        _seconds_on(daemon, 2)
        await _poll_and_dispatch(daemon)  # the rule is live again, with an empty window
    finally:
        await daemon.aclose()
    assert _status(simulator, sims[4]) == SUSPENDED
    assert len(hook_env.calls("ops")) == 1
    assert main(["rules", "resume", "suspend-on-quota", "--store", store]) == 1
    assert "was not stopped by the blast-radius guard" in capsys.readouterr().err
