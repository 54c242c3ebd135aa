"""`event-engine dead-letters list|retry|discard` on a real state file."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from engine.cli import main
from engine.config import Config
from engine.daemon import Daemon
from engine.dispatch import RetryPolicy
from engine.model import IntentStatus
from engine.simulator import FaultRule, SimulatorServer
from engine.store import SqliteStore

from helpers import TOKEN, engine_config, poller_of, rules_from

RULES = """
rules:
  - id: quota
    when: {type: 19}
    actions: [{suspend_sim: {}}, {disable_endpoint: {}}]
"""


def _config(tmp_path: Path, simulator: SimulatorServer) -> Config:
    config = engine_config(tmp_path, simulator)
    return replace(
        config,
        api=replace(config.api, max_retries=0),
        retry=RetryPolicy(
            max_attempts=2,
            initial_backoff=timedelta(milliseconds=1),
            max_backoff=timedelta(milliseconds=1),
        ),
    )


async def _dead_letters(tmp_path: Path, simulator: SimulatorServer, events: int) -> Config:
    """Run the engine while every device call fails with 503, until its intents are dead."""
    sims = simulator.state.sims()[:events]
    simulator.state.store_events([{"event_type": 19, "sim_id": s["id"]} for s in sims])
    simulator.state.set_faults(
        [FaultRule.parse({"path": "^/api/v1/(sim|endpoint)/", "kind": "503"})]
    )
    config = _config(tmp_path, simulator)
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        for _ in range(20):
            await daemon.dispatcher.run_due()
            if daemon.store.counts().get("intents_dead") == 2 * events:
                break
    finally:
        await daemon.aclose()
    simulator.state.clear_faults()
    return config


def _store_args(config: Config) -> list[str]:
    return ["--store", str(config.store_path)]


async def _dispatch(config: Config, simulator: SimulatorServer, tmp_path: Path) -> None:
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN)
    try:
        await daemon.dispatcher.run_due()
    finally:
        await daemon.aclose()


async def test_list_shows_each_dead_letter_with_its_last_error(tmp_path, simulator, capsys):
    config = await _dead_letters(tmp_path, simulator, events=1)
    capsys.readouterr()  # the engine's own log lines
    assert main(["dead-letters", "list", *_store_args(config)]) == 0
    text = capsys.readouterr().out
    assert "suspend_sim" in text and "disable_endpoint" in text
    assert "gave up after 2: GET /api/v1/sim/" in text and "HTTP 503" in text
    assert "2 dead-lettered" in text

    assert main(["dead-letters", "list", "--json", *_store_args(config)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["action"] for r in rows] == ["suspend_sim", "disable_endpoint"]
    assert all(r["attempts"] == 2 and r["rule"] == "quota" for r in rows)


async def test_retry_queues_them_again_and_the_next_run_completes_them(tmp_path, simulator, capsys):
    config = await _dead_letters(tmp_path, simulator, events=1)
    capsys.readouterr()  # the engine's own log lines
    store = SqliteStore(config.store_path)
    ids = [i.id for i in store.intents(IntentStatus.DEAD)]
    store.close()
    assert main(["dead-letters", "retry", str(ids[0]), *_store_args(config)]) == 0
    assert capsys.readouterr().out.strip() == f"requeued 1: {ids[0]}"

    await _dispatch(config, simulator, tmp_path)
    store = SqliteStore(config.store_path)
    try:
        statuses = {i.id: i.status for i in store.intents()}
        audit = [r for r in store.audit_rows() if r["intent_id"] == ids[0]]
    finally:
        store.close()
    assert statuses == {ids[0]: IntentStatus.DONE, ids[1]: IntentStatus.DEAD}
    assert [r["outcome"] for r in audit[-2:]] == ["requeued", "done"]
    assert audit[-2]["detail"].startswith("queued again by the CLI (")
    sim = simulator.state.sims()[0]
    assert simulator.state.sim(sim["id"])["status"]["id"] == 2


async def test_retry_all_and_discard(tmp_path, simulator, capsys):
    config = await _dead_letters(tmp_path, simulator, events=2)
    capsys.readouterr()
    assert main(["dead-letters", "discard", "1", *_store_args(config)]) == 0
    assert main(["dead-letters", "retry", "--all", "--json", *_store_args(config)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "discarded 1: 1"
    assert json.loads(out[1]) == {"requeued": [2, 3, 4], "not_dead": []}
    store = SqliteStore(config.store_path)
    try:
        assert store.counts().get("intents_dead", 0) == 0
        assert store.counts()["intents_discarded"] == 1
        assert store.counts()["intents_pending"] == 3
    finally:
        store.close()


async def test_ids_that_are_not_dead_letters_are_refused_by_name(tmp_path, simulator, capsys):
    config = await _dead_letters(tmp_path, simulator, events=1)
    capsys.readouterr()  # the engine's own log lines
    await _dispatch(config, simulator, tmp_path)  # nothing is due: both stay dead
    capsys.readouterr()
    assert (
        main(["dead-letters", "retry", "1", "99", "--config", str(_write(tmp_path, config))]) == 1
    )
    captured = capsys.readouterr()
    assert captured.out.strip() == "requeued 1: 1"
    assert "intent 99 is not dead-lettered" in captured.err
    assert main(["dead-letters", "retry", *_store_args(config)]) == 2
    assert "name the intent ids to retry, or give --all" in capsys.readouterr().err


def _write(tmp_path: Path, config: Config) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"store: {{path: {config.store_path}}}\n", encoding="utf-8")
    return path


def test_a_missing_state_file_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["dead-letters", "list", "--store", str(tmp_path / "none.sqlite3")]) == 1
    assert "no state store at" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["list", "retry", "discard"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["dead-letters", verb, "--help"])
    assert exit_info.value.code == 0
    assert "--store" in capsys.readouterr().out
