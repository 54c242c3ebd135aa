"""`event-engine status` over a state file the daemon wrote (polling the simulator)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from engine.cli import main
from engine.daemon import Daemon
from engine.store import SqliteStore

from helpers import TOKEN, engine_config, eventually, rules_from, running_daemon

RULES = """
rules:
  - id: suspend-then-restore
    when: {source: policy_control, type: "Quota used up"}
    actions:
      - suspend_sim: {}
      - after: 1h
        do: {activate_sim: {}}
"""


async def _run_once(tmp_path, simulator) -> Daemon:
    """Run the daemon until it has polled the quota event and suspended the SIM."""
    sim = simulator.state.sims()[0]
    simulator.state.store_events([{"event_type": {"id": 19}, "sim_id": sim["id"]}])
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, RULES), TOKEN)
    async with running_daemon(daemon):
        await eventually(lambda: daemon.summary.actions[("suspend_sim", "done")] == 1)
    return daemon


def _output_of(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the daemon logged
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_status_json_reports_cursor_last_poll_and_actions_by_status(
    tmp_path, simulator, capsys
):
    daemon = await _run_once(tmp_path, simulator)
    started = datetime.now(UTC)
    code, out, _ = _output_of(capsys, "status", "--store", str(daemon.config.store_path), "--json")
    data = json.loads(out)
    assert code == 0
    cursor = datetime.fromisoformat(data["cursor"])
    assert abs((started - cursor).total_seconds()) < 30
    assert 0 <= data["lag_seconds"] < 30
    assert data["last_poll"]["ok"] is True
    assert data["last_poll"]["fetched"] >= 1
    assert data["last_successful_poll"] == data["last_poll"]["at"]
    assert data["intents"]["done"] == 1  # the suspension
    assert data["pending"] == 1  # the activation an hour later
    assert data["dead"] == 0
    assert data["held"] == 0
    assert data["guards"] == []
    assert data["events"]["seen"] == SqliteStore(daemon.config.store_path).seen_count() >= 1


async def test_status_reads_the_store_named_in_the_config_and_prints_a_table(
    tmp_path, simulator, capsys
):
    daemon = await _run_once(tmp_path, simulator)
    config_file = tmp_path / "engine.yaml"
    config_file.write_text(f"store: {{path: {daemon.config.store_path}}}\n", encoding="utf-8")
    code, out, _ = _output_of(capsys, "status", "--config", str(config_file))
    assert code == 0
    assert f"state store   {daemon.config.store_path}" in out
    assert "ok, " in out  # the last poll
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert lines["pending"] == ["1"]
    assert lines["done"] == ["1"]


def test_status_without_a_store_says_so_instead_of_creating_one(tmp_path, capsys):
    missing = tmp_path / "nowhere.sqlite3"
    assert main(["status", "--store", str(missing)]) == 1
    assert f"no state store at {missing}" in capsys.readouterr().err
    assert not missing.exists()


async def test_status_records_a_failed_poll_with_its_reason(tmp_path, simulator, capsys):
    config = engine_config(tmp_path, simulator)
    simulator.stop()  # the API is gone before the first poll
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN)
    async with running_daemon(daemon):
        await eventually(lambda: daemon.source("poller").polls >= 1)
    code, out, _ = _output_of(capsys, "status", "--store", str(config.store_path), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["last_poll"]["ok"] is False
    assert "no response" in data["last_poll"]["error"]
    assert data["last_successful_poll"] is None


GUARDED = """
rules:
  - id: suspend-on-quota
    when: {type: 19}
    max_actions: {count: 2, within: 10m}
    actions: [{suspend_sim: {}}]
"""


async def test_status_shows_a_tripped_guard_and_the_actions_it_holds(tmp_path, simulator, capsys):
    sims = simulator.state.sims()[:4]
    simulator.state.store_events([{"event_type": {"id": 19}, "sim_id": s["id"]} for s in sims])
    config = engine_config(tmp_path, simulator)
    daemon = Daemon(config, rules_from(tmp_path, GUARDED), TOKEN)
    async with running_daemon(daemon):
        await eventually(lambda: daemon.summary.actions[("suspend_sim", "done")] == 2)
    code, out, _ = _output_of(capsys, "status", "--store", str(config.store_path), "--json")
    assert code == 0
    data = json.loads(out)
    (guard,) = data["guards"]
    assert guard["rule"] == "suspend-on-quota"
    assert guard["mode"] == "shadow"
    assert "blast-radius guard" in guard["reason"]
    assert guard["held_intents"] == data["held"] >= 1
    code, out, _ = _output_of(capsys, "status", "--store", str(config.store_path))
    assert "guards holding actions back" in out
    assert "suspend-on-quota" in out
