"""Failed actions show where operators look: `status`, `/metrics`, an engine event rules can
route, and `validate`'s warning before it ever happens. Over loopback HTTP against the
simulator and a real SQLite file."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from engine.cli import main
from engine.daemon import Daemon
from engine.events import format_timestamp
from engine.simulator import SimulatorServer

from helpers import TOKEN, engine_config, metric_value, poller_of, rules_from

# "Critical, Policy Control" admits "Organisation blocked", which carries no SIM.
CRITICAL = """
rules:
  - id: suspend-on-critical-policy-control
    when: {severity: critical, source: policy_control}
    actions: [{suspend_sim: {}}]
  - id: tell-ops-an-action-failed
    when: {source: engine, type: action_failed}
    actions: [{log: {message: "{{ event.detail.rule }}: {{ event.detail.reason }}"}}]
"""


def _organisation_blocked(simulator: SimulatorServer) -> dict[str, object]:
    moment = simulator.state.now() - timedelta(seconds=1)
    return {
        "event_type": {"id": 12, "description": "Organisation blocked"},
        "event_source": {"id": 1, "description": "Policy Control"},
        "event_severity": {"id": 2, "description": "Critical"},
        "timestamp": format_timestamp(moment),
    }


async def test_an_action_that_cannot_be_planned_counts_as_failed_everywhere(
    tmp_path, simulator, capsys
):
    config = engine_config(tmp_path, simulator)
    daemon = Daemon(config, rules_from(tmp_path, CRITICAL), TOKEN)
    simulator.state.store_events([_organisation_blocked(simulator)])
    try:
        poller_of(daemon).clock = lambda: datetime.now(UTC) + timedelta(seconds=2)
        await poller_of(daemon).poll_once()
        while await daemon.dispatcher.run_due():
            pass
        rows = daemon.store.audit_rows()
        scraped = daemon.metrics.render().decode()
    finally:
        await daemon.aclose()

    (failed,) = [r for r in rows if r["outcome"] == "failed"]
    assert failed["action"] == "suspend_sim" and "no sim.id" in failed["detail"]
    # The engine event was judged: the rule routing it planned its log action.
    routed = [r for r in rows if r["rule_id"] == "tell-ops-an-action-failed"]
    assert [r["outcome"] for r in routed if r["action"]] == ["planned", "logged"]
    assert (
        metric_value(scraped, "event_engine_actions_failed_total", kind="suspend_sim", stage="plan")
        == 1
    )
    assert metric_value(scraped, "event_engine_actions_not_planned") == 1

    store = str(config.store_path)
    capsys.readouterr()  # the daemon's log lines
    assert main(["status", "--store", store, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["failed"] == {"total": 1, "run": 0, "not_planned": 1}
    assert status["intents"]["failed"] == 1
    assert main(["status", "--store", store]) == 0
    shown = capsys.readouterr().out
    assert "1 could not be planned for their event" in shown


def test_validate_warns_when_when_admits_types_without_the_target_an_action_needs(tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text(CRITICAL.split("  - id: tell-ops")[0])
    assert main(["validate", str(rules)]) == 0  # a warning does not fail it
    err = capsys.readouterr()
    warning = err.out + err.err
    assert f"{rules}:4:" in warning  # the line of `when`
    assert "`suspend_sim` needs the event's sim" in warning
    assert "12 (Organisation blocked)" in warning

    # Narrowed to the types that carry a SIM, or with the others left out: no warning.
    rules.write_text(
        CRITICAL.split("  - id: tell-ops")[0].replace(
            "source: policy_control}", "source: policy_control, not: {type: 12}}"
        )
    )
    assert main(["validate", str(rules)]) == 0
    err = capsys.readouterr()
    assert "warning" not in err.out + err.err
