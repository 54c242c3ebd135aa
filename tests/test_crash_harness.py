"""`scripts/crash-test`: the short version runs in `make test`; its checks (shared with the
cluster's harness, `engine.sandbox.crash`) are shown to fail on the doubled and lost effects
they are there to catch."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import random
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from engine.sandbox import crash
from engine.simulator import SimulatorConfig, SimulatorState
from engine.simulator.webhook_sink import WebhookSink

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "crash-test"


def _harness() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("crash_test", str(SCRIPT))
    spec = importlib.util.spec_from_loader("crash_test", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_test"] = module  # its dataclasses look their module up by name
    loader.exec_module(module)
    return module


harness = _harness()


def test_three_kills_lose_nothing_and_double_nothing(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--kills", "3", "--events", "12", "--duration", "5"],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "4: 3 ended by SIGKILL, the last by SIGTERM" in out
    assert "FAIL" not in out and "crash test PASSED" in out
    for figure in (
        "events evaluated exactly once",
        "every action executed",
        "SIM and endpoint states as the rules dictate",
        "each status change made once",
        "webhook Idempotency-Keys",
        "SMS sent once each",
        "event API rate at the simulator",
        "graceful stop on SIGTERM",
    ):
        assert f"ok   {figure}" in out


def test_help_names_every_option():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0
    for option in ("--kills", "--seed", "--events", "--duration", "--faults", "--keep"):
        assert option in done.stdout


def test_bad_options_are_refused_with_a_message():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--faults", "0.9"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "--faults must be between 0 and 0.5" in done.stderr


# -- the checks catch what they are for -------------------------------------------------------


@pytest.fixture
def planned() -> tuple[SimulatorState, list]:
    state = SimulatorState(SimulatorConfig(seed=2, endpoints=6))
    items = crash.plan_events(state, 6, random.Random(1))
    stored = []
    for item in items:
        (record,) = state.store_events([item.record])
        stored.append(crash.Planned(item.kind, record, item.sim_id, item.endpoint_id, False, False))
    return state, stored


def _only(report) -> tuple[bool, str]:
    (check,) = report.checks
    return check.ok, check.text


def test_an_sms_sent_twice_fails_the_sms_check(planned):
    state, items = planned
    for item in items:
        if item.kind == "notify":
            state.send_sms(item.endpoint_id, {"payload": f"Quota notice {item.event_id}"})
    report = crash.Report()
    crash.check_sms(report, state, items)
    assert _only(report)[0]

    notify = next(i for i in items if i.kind == "notify")
    state.send_sms(notify.endpoint_id, {"payload": f"Quota notice {notify.event_id}"})
    report = crash.Report()
    crash.check_sms(report, state, items)
    assert _only(report) == (False, "3 sent for 2 planned, 1 sent twice")


def test_a_status_change_made_twice_fails_the_change_check(planned):
    state, items = planned
    block = next(i for i in items if i.kind == "block")
    state.change_sim_status(block.sim_id, 2)
    state.change_endpoint(block.endpoint_id, status_id=1)
    state.change_sim_status(block.sim_id, 1, emit=False)
    state.change_sim_status(block.sim_id, 2)  # suspended a second time
    report = crash.Report()
    crash.check_states(report, state, [block])
    assert [c.ok for c in report.checks] == [True, False]
    assert "1 doubled" in report.checks[1].text


def test_an_event_evaluated_twice_or_never_fails_the_evaluation_check(tmp_path, planned):
    state, _ = planned
    db = sqlite3.connect(tmp_path / "audit.sqlite3")
    db.execute("CREATE TABLE audit (event_id INTEGER, rule_id TEXT, outcome TEXT)")
    ids = [int(e["id"]) for e in state.events()]
    rows = [(i, "every-event", "matched") for i in ids[1:]] + [(ids[1], "every-event", "matched")]
    db.executemany("INSERT INTO audit VALUES (?, ?, ?)", rows)
    report = crash.Report()
    crash.check_evaluations(report, lambda sql: db.execute(sql).fetchall(), state)
    ok, text = _only(report)
    assert not ok and f"{len(ids) - 1}/{len(ids)} once, 1 twice, 1 never" in text


def test_a_missing_webhook_fails_the_idempotency_key_check(planned):
    _, items = planned
    sink = WebhookSink()
    report = crash.Report()
    crash.check_webhooks(report, sink, items)
    assert _only(report) == (False, "0 distinct for 4 planned, 0 redelivered with the same key")


def test_fault_shares_add_up_to_the_fraction_asked_for():
    rules = harness.injected_faults(0.2)
    chain = rules[: len(harness.FAULT_KINDS)]
    untouched = 1.0
    for rule in chain:
        untouched *= 1 - rule["probability"]
    assert 1 - untouched == pytest.approx(0.2)
    assert {r["kind"] for r in rules[len(chain) :]} == {"duplicate_across_pages", "clamp_per_page"}
