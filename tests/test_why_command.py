"""`event-engine why` over a state file the daemon wrote against the simulator."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from engine.cli import main
from engine.daemon import Daemon
from engine.dispatch import RetryPolicy
from engine.simulator import FaultRule
from engine.store import SqliteStore

from helpers import TOKEN, engine_config, eventually, rules_from, running_daemon

RULES = """
rules:
  - id: suspend-then-restore
    when: {source: policy_control, type: "Quota used up"}
    actions:
      - suspend_sim: {}
      - webhook:
          url: ${OPS_WEBHOOK_URL}
          body: {text: "SIM {{ event.sim.iccid }} suspended"}
      - after: 1h
        do: {activate_sim: {}}
  - id: log-api-suspensions
    when: {source: api, type: "SIM suspension"}
    actions: [{log: {}}]
"""


def _output_of(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the daemon logged
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def _run(tmp_path, simulator, hook_env) -> tuple[Daemon, dict, dict]:
    """Quota events on two SIMs; the webhook receiver refuses the first call once."""
    first, second = simulator.state.sims()[:2]
    events = simulator.state.store_events(
        [
            {"event_type": {"id": 19}, "sim_id": first["id"]},
            {"event_type": {"id": 19}, "sim_id": second["id"]},
        ]
    )
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, RULES), TOKEN)
    async with running_daemon(daemon):
        await eventually(lambda: daemon.summary.actions[("suspend_sim", "done")] == 2)
        await eventually(lambda: len(hook_env.calls()) == 2)
    return daemon, first, events[0]


async def test_why_sim_explains_each_action_on_that_sim_and_only_that_sim(
    tmp_path, simulator, hook_env, capsys
):
    daemon, sim, event = await _run(tmp_path, simulator, hook_env)
    code, out, _ = _output_of(
        capsys, "why", "--store", str(daemon.config.store_path), "--sim", sim["iccid"], "--json"
    )
    assert code == 0
    data = json.loads(out)
    assert data["sim"] == sim["iccid"]
    quota = next(e for e in data["events"] if e["event_id"] == event["id"])
    decisions = [(d["rule"], d["action"], d["outcome"]) for d in quota["decisions"]]
    assert decisions[:4] == [
        ("suspend-then-restore", None, "matched"),
        ("suspend-then-restore", "suspend_sim", "planned"),
        ("suspend-then-restore", "webhook", "planned"),
        ("suspend-then-restore", "activate_sim", "scheduled"),
    ]
    assert ("suspend-then-restore", "suspend_sim", "done") in decisions[4:]
    assert any(d[1] == "webhook" and d[2].startswith("delivered") for d in decisions[4:])
    actions = {a["action"]: a for a in quota["actions"]}
    assert actions["suspend_sim"]["status"] == "done"
    assert actions["webhook"]["status"] == "done"
    assert actions["activate_sim"]["status"] == "pending"
    assert actions["activate_sim"]["due_at"] is not None
    # Every event listed concerns this SIM: the other SIM's quota event is not here.
    iccids = {
        r["iccid"]
        for e in data["events"]
        for r in daemon_rows(daemon, e["event_id"])
        if r["iccid"] is not None
    }
    assert iccids == {sim["iccid"]}


def daemon_rows(daemon: Daemon, event_id: int) -> list[dict]:
    return SqliteStore(daemon.config.store_path).audit_rows(event_id=event_id)


async def test_why_prints_readable_tables(tmp_path, simulator, hook_env, capsys):
    daemon, sim, event = await _run(tmp_path, simulator, hook_env)
    code, out, _ = _output_of(
        capsys, "why", "--store", str(daemon.config.store_path), "--sim", sim["iccid"]
    )
    assert code == 0
    assert out.startswith(f"SIM {sim['iccid']}: ")
    assert f"event {event['id']}" in out
    assert "actions now:" in out
    table_rows = [line.split() for line in out.splitlines()]
    assert ["#3", "suspend-then-restore", "activate_sim", "pending", "0"] in [
        row[:5] for row in table_rows
    ]


async def test_why_event_shows_a_failed_attempt_its_retry_and_the_end(
    tmp_path, simulator, hook_env, capsys
):
    sim = simulator.state.sims()[0]
    refuse_once = {"kind": "500", "path": r"^/api/v1/sim/\d+$", "method": "PATCH", "count": 1}
    simulator.state.set_faults([FaultRule.parse(refuse_once)])
    (event,) = simulator.state.store_events([{"event_type": {"id": 19}, "sim_id": sim["id"]}])
    config = engine_config(tmp_path, simulator)
    config = replace(config, retry=RetryPolicy(initial_backoff=timedelta(milliseconds=10)))
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN)
    async with running_daemon(daemon):
        await eventually(lambda: daemon.summary.actions[("suspend_sim", "done")] == 1)
    code, out, _ = _output_of(
        capsys, "why", "--store", str(config.store_path), "--event", str(event["id"]), "--json"
    )
    assert code == 0
    (explained,) = json.loads(out)["events"]
    suspend = [d for d in explained["decisions"] if d["action"] == "suspend_sim"]
    assert [d["outcome"] for d in suspend] == ["planned", "retry", "done"]
    assert "HTTP 500" in suspend[1]["detail"]
    (intent,) = [a for a in explained["actions"] if a["action"] == "suspend_sim"]
    assert (intent["status"], intent["attempts"]) == ("done", 2)


async def test_why_for_an_unknown_event_says_nothing_was_recorded(
    tmp_path, simulator, hook_env, capsys
):
    daemon, _sim, _event = await _run(tmp_path, simulator, hook_env)
    code, out, _ = _output_of(
        capsys, "why", "--store", str(daemon.config.store_path), "--event", "7"
    )
    assert code == 0
    assert (
        out.strip()
        == "event 7: nothing in the audit log (no rule matched it, or it was never seen)"
    )


def test_why_explain_checks_every_current_rule_against_the_event_fetched_again(
    tmp_path, simulator, hook_env, capsys, monkeypatch
):
    daemon, _sim, event = asyncio.run(_run(tmp_path, simulator, hook_env))
    config_file = tmp_path / "engine.yaml"
    config_file.write_text(
        f"api: {{base_url: '{simulator.base_url}'}}\n"
        f"store: {{path: '{daemon.config.store_path}'}}\n"
        f"rules: '{tmp_path / 'rules.yaml'}'\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("EMNIFY_APPLICATION_TOKEN", TOKEN)
    code, out, err = _output_of(
        capsys,
        "why",
        "--config",
        str(config_file),
        "--event",
        str(event["id"]),
        "--explain",
        "--json",
    )
    assert code == 0, err
    rules = {r["rule"]: r for r in json.loads(out)["rules"]}
    assert rules["suspend-then-restore"] == {
        "rule": "suspend-then-restore",
        "matches": True,
        "reason": None,
    }
    assert rules["log-api-suspensions"]["matches"] is False
    assert rules["log-api-suspensions"]["reason"]


def test_why_explain_needs_an_event(tmp_path, capsys):
    store = tmp_path / "engine.sqlite3"
    SqliteStore(store).close()
    assert main(["why", "--store", str(store), "--sim", "8988", "--explain"]) == 1
    assert "--explain needs --event" in capsys.readouterr().err


def test_why_takes_a_sim_or_an_event_not_both(tmp_path):
    with pytest.raises(SystemExit):
        main(["why", "--sim", "8988", "--event", "1"])


def test_after_a_demo_the_commands_it_prints_work_as_printed(tmp_path):
    root = Path(__file__).resolve().parent.parent
    script = Path(sys.executable).parent / "event-engine"  # where `make demo` installs it
    demo = subprocess.run(
        [str(script), "demo", "--duration", "5s", "--rules", str(root / "rules")],
        cwd=tmp_path,  # the demo keeps its store in ./state/demo.sqlite3
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    hint = re.search(r"why --sim (\d+)", demo.stdout)
    assert hint is not None, demo.stdout
    iccid = hint.group(1)
    assert f"SIM {iccid}: Activated → Suspended" in demo.stdout
    printed = demo.stdout.split("why did that happen?")[1].splitlines()[1:]
    assert len(printed) == 2 and "status --store state/demo.sqlite3" in printed[1], printed

    def run_as_printed(line: str) -> subprocess.CompletedProcess[str]:
        # A new user's shell: the virtualenv is not activated, its bin/ is not on PATH.
        return subprocess.run(
            line,
            shell=True,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PATH": "/usr/bin:/bin"},
        )

    status = run_as_printed(printed[1])
    assert status.returncode == 0, status.stderr
    assert "actions by status" in status.stdout
    why = run_as_printed(printed[0] + " --json")
    assert why.returncode == 0, why.stderr
    data = json.loads(why.stdout)
    decisions = [d for e in data["events"] for d in e["decisions"]]
    actions = [a for e in data["events"] for a in e["actions"]]
    assert ("suspend_sim", "done") in {(d["action"], d["outcome"]) for d in decisions}
    assert actions and all(a["status"] in ("done", "pending") for a in actions)
    # Every action recorded for the SIM has its ending (or its pending state) explained.
    for action in actions:
        ends = [d for d in decisions if d["intent_id"] == action["id"]]
        assert ends or action["status"] == "pending"


def test_why_lists_events_in_the_order_they_happened_and_every_time_one_way(tmp_path):
    from engine.commands import why
    from engine.pipeline import Pipeline

    rules = rules_from(
        tmp_path,
        """
        rules:
          - id: suspend-then-restore
            when: {type: 19}
            actions:
              - suspend_sim: {}
              - after: 1h
                do: {activate_sim: {}}
        """,
    )
    store = SqliteStore(tmp_path / "engine.sqlite3")
    pipeline = Pipeline(rules, store)

    def quota(event_id: int, timestamp: str) -> dict:
        sim = {"id": 7, "iccid": "8988303000000000007"}
        return {"id": event_id, "timestamp": timestamp, "event_type": {"id": 19}, "sim": sim}

    # The newer event is judged first; the older one arrives late (or the stream had it).
    pipeline.process([quota(2, "2026-03-01T10:05:00.250Z")], source="data_streamer")
    pipeline.process([quota(1, "2026-03-01T10:00:00Z")], source="poller")
    data = why.collect(store, iccid="8988303000000000007")
    assert [e["event_id"] for e in data["events"]] == [1, 2]
    assert [e["seen_at"] for e in data["events"]] == [
        "2026-03-01T10:00:00Z",
        "2026-03-01T10:05:00Z",
    ]
    text = why.render(data)
    assert "due 2026-03-01T11:05:00Z" in text  # the follow-up's time, as every other
    times = re.findall(r"\d{4}-\d\d-\d\dT[\d:.]+(?:Z|[+-]\d\d:\d\d)?", text)
    assert times and all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", t) for t in times)
    store.close()
