"""Graceful shutdown: SIGTERM or SIGINT stops polling, lets in-flight actions finish (or
leaves them pending when they take too long), exits 0 within 10 s; the next start finishes
what was left."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import engine.daemon as daemon_module
from engine.daemon import Daemon
from engine.model import IntentStatus
from engine.simulator import FaultRule, SimulatorServer

from helpers import TOKEN, engine_config, eventually, rules_from

RULES = """\
rules:
  - id: quota
    when: {type: 19}
    actions: [{suspend_sim: {}}]
"""
CONFIG = """\
api: {{base_url: {base_url}, read_timeout: 30, action_rate_limit: 50}}
rules: rules.yaml
store: {{path: state/engine.sqlite3}}
poller: {{interval: 1s, initial_lookback: 60s}}
actions: {{concurrency: 2}}
http: {{port: 0}}
log: {{format: json}}
"""


def _statuses(store: Path) -> dict[str, int]:
    if not store.exists():
        return {}
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall())
    except sqlite3.Error:
        return {}
    finally:
        db.close()


def _start(tmp_path: Path) -> subprocess.Popen[bytes]:
    with (tmp_path / "engine.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "engine", "run", "--config", "config.yaml"],
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "EMNIFY_APPLICATION_TOKEN": TOKEN},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_polling_finishes_in_flight_actions_and_exits_0(
    tmp_path, simulator: SimulatorServer, sig
):
    (tmp_path / "rules.yaml").write_text(RULES, encoding="utf-8")
    (tmp_path / "config.yaml").write_text(
        CONFIG.format(base_url=simulator.base_url), encoding="utf-8"
    )
    store = tmp_path / "state" / "engine.sqlite3"
    sims = simulator.state.sims()[:5]
    simulator.state.store_events([{"event_type": 19, "sim_id": s["id"]} for s in sims])
    # Every SIM read takes 2 s: two actions are in flight at a time, the rest wait.
    simulator.state.set_faults(
        [FaultRule.parse({"path": "^/api/v1/sim/", "method": "GET", "kind": "slow", "delay": 2})]
    )
    process = _start(tmp_path)
    _wait_for(lambda: _statuses(store).get("running") == 2)
    asked = time.monotonic()
    process.send_signal(sig)
    code = process.wait(timeout=15)
    took = time.monotonic() - asked
    statuses = _statuses(store)
    polls_after = [
        r
        for r in simulator.state.requests()
        if r.path == "/api/v1/event" and r.monotonic_time > asked + 0.1
    ]

    assert code == 0 and took < 10
    assert statuses == {"done": 2, "pending": 3}  # the two in flight finished
    assert polls_after == []

    simulator.state.clear_faults()
    process = _start(tmp_path)
    _wait_for(lambda: _statuses(store) == {"done": 5})
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    assert all(simulator.state.sim(s["id"])["status"]["id"] == 2 for s in sims)
    log = (tmp_path / "engine.log").read_text(encoding="utf-8")
    assert log.count("shutting down: polling stopped, finishing in-flight actions") == 2


async def test_an_action_longer_than_the_grace_is_left_pending_and_done_at_the_next_start(
    tmp_path, simulator, monkeypatch
):
    monkeypatch.setattr(daemon_module, "SHUTDOWN_GRACE", 0.5)
    sim = simulator.state.sims()[0]
    simulator.state.store_events([{"event_type": 19, "sim_id": sim["id"]}])
    simulator.state.set_faults(
        [FaultRule.parse({"path": "^/api/v1/sim/", "method": "GET", "kind": "slow", "delay": 5})]
    )
    config = engine_config(tmp_path, simulator)
    config = replace(config, api=replace(config.api, read_timeout=30.0))
    rules = rules_from(tmp_path, RULES)
    daemon = Daemon(config, rules, TOKEN)
    stop = asyncio.Event()
    running = asyncio.create_task(daemon.run(stop))
    probe = Daemon(config, rules, TOKEN)  # a second connection to read the store
    try:
        await eventually(lambda: probe.store.counts().get("intents_running") == 1)
        asked = time.monotonic()
        stop.set()
        await running
        took = time.monotonic() - asked
        (left,) = probe.store.intents()
    finally:
        await probe.aclose()
    assert took < 2.5
    assert left.status is IntentStatus.PENDING and left.last_error == "interrupted"
    assert left.attempts == 1

    simulator.state.clear_faults()
    restarted = Daemon(config, rules, TOKEN)
    try:
        await restarted.dispatcher.run_due()
        (done,) = restarted.store.intents()
    finally:
        await restarted.aclose()
    assert done.status is IntentStatus.DONE and done.attempts == 2
    assert simulator.state.sim(sim["id"])["status"]["id"] == 2
