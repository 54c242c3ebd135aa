"""`event-engine held list|release|discard` on a real state file: the actions a tripped
blast-radius guard held, reviewed from the command line."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from engine.cli import main
from engine.config import Config
from engine.daemon import Daemon
from engine.model import IntentStatus
from engine.simulator import SimulatorServer
from engine.store import SqliteStore

from helpers import TOKEN, engine_config, poller_of, rules_from

# The guard lets one suspension through in 10 minutes: the second is held (and the rule
# switches to shadow, so nothing later is planned).
RULES = """
rules:
  - id: guarded
    when: {type: 11}
    max_actions: {count: 1, within: 10m}
    actions: [{suspend_sim: {}}]
"""


async def _held_actions(tmp_path: Path, simulator: SimulatorServer) -> Config:
    sims = simulator.state.sims()[:2]
    simulator.state.store_events([{"event_type": 11, "sim_id": s["id"]} for s in sims])
    config = engine_config(tmp_path, simulator)
    await _run_once(config, tmp_path)
    return config


async def _run_once(config: Config, tmp_path: Path) -> None:
    """One poll and what is due of the outbox, as a daemon would."""
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        await daemon.dispatcher.run_due()
    finally:
        await daemon.aclose()


def _store_args(config: Config) -> list[str]:
    return ["--store", str(config.store_path)]


def _held_ids(config: Config) -> list[int]:
    store = SqliteStore(config.store_path)
    try:
        return [i.id for i in store.intents(IntentStatus.HELD) if i.id is not None]
    finally:
        store.close()


def _audit_of(config: Config, intent_id: int) -> list[dict]:
    store = SqliteStore(config.store_path)
    try:
        return [r for r in store.audit_rows() if r["intent_id"] == intent_id]
    finally:
        store.close()


async def test_list_shows_each_held_action_with_its_rule_and_target(tmp_path, simulator, capsys):
    config = await _held_actions(tmp_path, simulator)
    held = _held_ids(config)
    capsys.readouterr()  # the engine's own log lines
    assert main(["held", "list", *_store_args(config)]) == 0
    text = capsys.readouterr().out
    assert "suspend_sim" in text and "guarded" in text and "sim_id=" in text
    assert "1 held; `event-engine held release ID…`" in text

    assert main(["held", "list", "--json", *_store_args(config)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == held
    assert all(r["rule"] == "guarded" and r["action"] == "suspend_sim" for r in rows)


async def test_a_released_action_runs_and_the_audit_log_names_the_cli_user(
    tmp_path, simulator, capsys
):
    config = await _held_actions(tmp_path, simulator)
    (held,) = _held_ids(config)
    sim_id = simulator.state.sims()[1]["id"]
    assert simulator.state.sim(sim_id)["status"]["id"] == 1  # active: the guard held it
    capsys.readouterr()
    assert main(["held", "release", str(held), *_store_args(config)]) == 0
    assert capsys.readouterr().out.strip() == f"released 1: {held}"

    await _run_once(config, tmp_path)
    assert simulator.state.sim(sim_id)["status"]["id"] == 2  # suspended
    store = SqliteStore(config.store_path)
    try:
        assert store.get_intent(held).status is IntentStatus.DONE
    finally:
        store.close()
    (released,) = [r for r in _audit_of(config, held) if r["outcome"] == "released"]
    assert released["detail"].startswith("released by the CLI (")
    assert released["detail"].endswith(f"@{socket.gethostname()})")


async def test_a_discarded_action_never_runs(tmp_path, simulator, capsys):
    config = await _held_actions(tmp_path, simulator)
    (held,) = _held_ids(config)
    capsys.readouterr()
    assert main(["held", "discard", str(held), "--json", *_store_args(config)]) == 0
    assert json.loads(capsys.readouterr().out) == {"discarded": [held], "not_held": []}
    await _run_once(config, tmp_path)
    assert _held_ids(config) == []
    store = SqliteStore(config.store_path)
    try:
        assert store.get_intent(held).status is IntentStatus.DISCARDED
    finally:
        store.close()
    (discarded,) = [r for r in _audit_of(config, held) if r["outcome"] == "discarded"]
    assert discarded["detail"].startswith("discarded by the CLI (")
    assert main(["held", "list", *_store_args(config)]) == 0
    assert "no held actions in" in capsys.readouterr().out


async def test_unknown_and_not_held_ids_are_refused_each_with_its_reason(
    tmp_path, simulator, capsys
):
    config = await _held_actions(tmp_path, simulator)
    (first,) = _held_ids(config)
    done = 1  # the suspension the guard let through, which ran
    capsys.readouterr()
    code = main(["held", "release", str(first), str(done), "99", *_store_args(config)])
    assert code == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == f"released 1: {first}"
    assert f"error: intent {done} is not held: it is done (see `list`)" in captured.err
    assert "error: intent 99 is not held: there is no such intent (see `list`)" in captured.err


def test_release_without_ids_says_to_name_them(tmp_path, capsys):
    store = tmp_path / "engine.sqlite3"
    SqliteStore(store).close()
    assert main(["held", "release", "--store", str(store)]) == 2
    assert "error: name the intent ids to release" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["list", "release", "discard"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["held", verb, "--help"])
    assert exit_info.value.code == 0
    assert "--store" in capsys.readouterr().out
