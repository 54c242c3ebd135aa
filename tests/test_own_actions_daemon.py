"""Never fight yourself, in the running engine: the daemon polls the simulator over loopback
HTTP, its status actions change SIMs there, the simulator logs the platform's events for
them (source API), and the next polls bring those echoes back. Real SQLite file."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.cli import main
from engine.daemon import Daemon
from engine.events import format_timestamp
from engine.leadership import ClusterSettings
from engine.model import IntentStatus
from engine.simulator import SimulatorServer
from engine.store.settings import StoreSettings

from helpers import TOKEN, engine_config, poller_of, rules_from

ACTIVE, SUSPENDED = 1, 2

ONE_WAY = """
rules:
  - id: suspend-on-quota
    when: {type: 19}
    actions: [{suspend_sim: {}}]
  - id: reactivate-suspended
    when: {source: api, type: "SIM suspension"}
    actions: [{activate_sim: {}}]
"""

PING_PONG = """
rules:
  - id: suspend-on-quota
    when: {type: 19}
    actions: [{suspend_sim: {}}]
  - id: reactivate-suspended
    when: {source: api, type: "SIM suspension"}
    on_own_actions: true
    actions: [{activate_sim: {}}]
  - id: suspend-activated
    when: {source: api, type: "SIM activation"}
    on_own_actions: true
    actions: [{suspend_sim: {}}]
  - id: page-on-flapping
    when: {source: engine, type: target_flapping}
    actions: [{log: {message: "{{ event.detail.target }} flapping"}}]
"""


def _quota(simulator: SimulatorServer, sim_id: int) -> dict[str, Any]:
    moment = simulator.state.now() - timedelta(seconds=5)
    return {"event_type": {"id": 19}, "sim_id": sim_id, "timestamp": format_timestamp(moment)}


def _sim_patches(simulator: SimulatorServer, sim_id: int) -> int:
    return sum(
        1
        for r in simulator.state.requests()
        if r.method == "PATCH" and r.path.endswith(f"/sim/{sim_id}")
    )


async def _rounds(daemon: Daemon, count: int) -> None:
    """Poll and dispatch `count` times, the poller's clock a second on each time (a poll in
    the same second as the last one has nothing new to ask for)."""
    for second in range(1, count + 1):
        poller_of(daemon).clock = lambda s=second: datetime.now(UTC) + timedelta(seconds=s)
        await poller_of(daemon).poll_once()
        while await daemon.dispatcher.run_due():
            pass


def _why(capsys, store: str, event_id: int) -> str:
    capsys.readouterr()
    assert main(["why", "--store", store, "--event", str(event_id)]) == 0
    return capsys.readouterr().out


async def test_the_engines_own_suspension_comes_back_and_no_rule_undoes_it(
    tmp_path, simulator, capsys
):
    sim = simulator.state.sims()[0]["id"]
    config = engine_config(tmp_path, simulator)
    daemon = Daemon(config, rules_from(tmp_path, ONE_WAY), TOKEN)
    simulator.state.store_events([_quota(simulator, sim)])
    try:
        await _rounds(daemon, 4)
        intents = daemon.store.intents()
        echoes = [r for r in daemon.store.audit_rows() if r["outcome"] == "echo"]
    finally:
        await daemon.aclose()

    assert simulator.state.sim(sim)["status"]["id"] == SUSPENDED
    assert _sim_patches(simulator, sim) == 1
    assert [(i.rule_id, i.status) for i in intents] == [("suspend-on-quota", IntentStatus.DONE)]
    [echo] = echoes
    why = _why(capsys, str(config.store_path), echo["event_id"])
    assert f"echo of intent {intents[0].id} (rule suspend-on-quota)" in why
    assert "does not act on the engine's own actions" in why


async def test_two_rules_that_would_ping_pong_a_sim_stop_at_the_loop_breaker(
    tmp_path, simulator, capsys
):
    sim = simulator.state.sims()[0]["id"]
    config = engine_config(tmp_path, simulator)
    daemon = Daemon(config, rules_from(tmp_path, PING_PONG), TOKEN)
    simulator.state.store_events([_quota(simulator, sim)])
    try:
        await _rounds(daemon, 12)
        intents = daemon.store.intents()
        audit = daemon.store.audit_rows()
        holds = daemon.store.rule_overrides()
    finally:
        await daemon.aclose()

    # Four status changes went through (suspend, activate, suspend, activate); the fifth
    # was held, and the SIM stays as the fourth left it.
    assert _sim_patches(simulator, sim) == 4
    assert simulator.state.sim(sim)["status"]["id"] == ACTIVE
    done = [i for i in intents if i.status is IntentStatus.DONE and i.kind != "log"]
    held = [i for i in intents if i.status is IntentStatus.HELD]
    assert [i.kind for i in done] == ["suspend_sim", "activate_sim"] * 2
    assert [i.kind for i in held] == ["suspend_sim"]
    assert holds[f"sim:{sim}"].mode == "hold"
    flapping = [r for r in audit if r["outcome"] == "target flapping"]
    assert len(flapping) == 1
    # The engine said so as an event of its own, and a rule routed it.
    assert any(r["outcome"] == "planned" and r["rule_id"] == "page-on-flapping" for r in audit), (
        "target_flapping was not judged as an engine event"
    )
    why = _why(capsys, str(config.store_path), held[0].event_id)
    assert "held" in why and "target flapping: 5 status changes" in why
    assert "echo of intent" in why

    store = str(config.store_path)
    rules = str(tmp_path / "rules.yaml")
    capsys.readouterr()
    assert main(["rules", "list", "--store", store, "--rules", rules]) == 0
    listed = capsys.readouterr().out
    assert f"sim:{sim}" in listed and "held (loop breaker)" in listed
    assert main(["status", "--store", store]) == 0
    status = capsys.readouterr().out
    assert f"sim:{sim}" in status and "target flapping" in status
    assert main(["rules", "resume", f"sim:{sim}", "--store", store, "--release-held"]) == 0
    resumed = capsys.readouterr().out
    assert f"sim:{sim} resumed: its status actions run again" in resumed
    assert "1 held actions put back in the queue" in resumed
    assert main(["rules", "resume", f"sim:{sim}", "--store", store]) == 1
    assert "target `sim:" in capsys.readouterr().err


@pytest.fixture(params=["sqlite", "postgres"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    if request.param == "sqlite":
        return StoreSettings(tmp_path / "state" / "engine.sqlite3")
    return StoreSettings(postgres=request.getfixturevalue("postgres_settings"))


def _instance(
    tmp_path: Path, simulator: SimulatorServer, store: StoreSettings, name: str
) -> Daemon:
    config = replace(
        engine_config(tmp_path, simulator),
        store_path=store.path,
        store_postgres=store.postgres,
        cluster=ClusterSettings(instance_id=name),
    )
    return Daemon(config, rules_from(tmp_path, ONE_WAY), TOKEN)


async def test_an_instance_knows_the_echo_of_a_suspension_another_instance_made(
    tmp_path, simulator, shared_store
):
    sim = simulator.state.sims()[0]["id"]
    first = _instance(tmp_path, simulator, shared_store, "first")
    second = _instance(tmp_path, simulator, shared_store, "second")
    simulator.state.store_events([_quota(simulator, sim)])
    try:
        await _rounds(first, 1)  # polls the quota event and suspends the SIM
        [echo] = [e for e in simulator.state.events() if e["event_type"]["id"] == 9]
        # The platform's event reaches the other instance (the Data Streamer pushes it there).
        result = second.pipeline.process([echo], source="data_streamer")
        intents = second.store.intents()
    finally:
        await first.aclose()
        await second.aclose()

    assert [(d.rule_id, d.outcome) for d in result.decisions] == [
        ("reactivate-suspended", "own_echo")
    ]
    assert result.planned == [] and len(intents) == 1
    assert f"echo of intent {intents[0].id} (rule suspend-on-quota)" in result.decisions[0].reason
