"""The store does not grow without bound: old rows are pruned after `store.retention`, and
decisions that did nothing are kept in full only for the newest few per SIM and rule.

Over a real SQLite file, with events judged by the real pipeline; time passes by giving the
retention a clock (or, for the daemon, by ageing rows in the file)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.cli import main
from engine.commands import why
from engine.config import load_config
from engine.daemon import Daemon
from engine.errors import ConfigError
from engine.model import IntentStatus
from engine.pipeline import Pipeline
from engine.retention import Retention, RetentionSettings
from engine.store import SqliteStore

from helpers import TOKEN, engine_config, eventually, rules_from, running_daemon

NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)  # when the store is told things happen

RULES = """
rules:
  - id: many-location-updates
    when: {type: 1}
    threshold: {count: 1000, within: 1h, per: sim.iccid}
    actions: [{log: {}}]
  - id: log-quota-used-up
    when: {type: 19}
    actions: [{log: {}}]
"""
START = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def _event(event_id: int, iccid: str, at: datetime, type_id: int = 1) -> dict[str, Any]:
    return {
        "id": event_id,
        "timestamp": at.isoformat(),
        "description": "an event",
        "event_type": {"id": type_id, "description": f"type {type_id}"},
        "sim": {"id": int(iccid[-3:]), "iccid": iccid},
        "endpoint": {"id": int(iccid[-3:]), "name": f"tracker-{iccid[-3:]}"},
    }


def _pipeline(tmp_path: Path) -> Pipeline:
    store = SqliteStore(tmp_path / "state" / "engine.sqlite3")
    return Pipeline(rules_from(tmp_path, RULES), store)


def _location_updates(pipeline: Pipeline, iccid: str, count: int, first_id: int) -> None:
    """`count` location updates of one SIM, a minute apart, each its own batch."""
    for n in range(count):
        at = START + timedelta(minutes=n)
        pipeline.process([_event(first_id + n, iccid, at)], source="poller")


def _audit_outcomes(store: SqliteStore, iccid: str) -> list[tuple[int, str]]:
    return [(r["event_id"], r["outcome"]) for r in store.audit_rows(iccid=iccid)]


async def test_below_threshold_decisions_keep_the_newest_per_sim_and_count_the_rest(tmp_path):
    pipeline = _pipeline(tmp_path)
    store = pipeline.store
    _location_updates(pipeline, "8988000000000000101", 30, first_id=1000)
    _location_updates(pipeline, "8988000000000000102", 3, first_id=2000)
    pipeline.process([_event(3000, "8988000000000000101", START, type_id=19)], source="poller")
    retention = Retention(RetentionSettings(decisions_per_sim=5, batch_rows=7))

    run = await retention.run_once(store)

    assert run.summarized == 25
    assert run.batches > 5  # small batches, each its own transaction
    kept = _audit_outcomes(store, "8988000000000000101")
    below = [event for event, outcome in kept if outcome == "below_threshold"]
    assert below == list(range(1025, 1030))  # the newest five, in full
    assert [o for e, o in kept if e in below] == ["matched", "below_threshold"] * 5
    assert (3000, "planned") in kept  # a decision that did something stays
    assert len(_audit_outcomes(store, "8988000000000000102")) == 6  # under the limit

    explained = why.collect(store, iccid="8988000000000000101")
    assert [e["event_id"] for e in explained["events"]] == [3000, *range(1025, 1030)]
    assert explained["summarized"] == [
        {
            "rule": "many-location-updates",
            "outcome": "below_threshold",
            "count": 25,
            "first_event_at": "2026-03-01T08:00:00Z",
            "last_event_at": "2026-03-01T08:24:00Z",
        }
    ]
    text = why.render(explained)
    assert "earlier decisions that did nothing, counted instead of kept one by one" in text
    # Summarizing again finds nothing new; newer events are looked at next time.
    assert (await retention.run_once(store)).summarized == 0


async def test_rows_older_than_the_retention_are_pruned_but_open_actions_stay(tmp_path):
    pipeline = _pipeline(tmp_path)
    store = pipeline.store
    for n, iccid in enumerate(
        ("8988000000000000101", "8988000000000000102", "8988000000000000103")
    ):
        pipeline.process([_event(n + 1, iccid, START, type_id=19)], source="poller")
    pipeline.process(["not an event"], source="poller")  # quarantined
    done, pending, dead = store.intents()
    store.finish_intent(done, IntentStatus.DONE, now=NOW)
    store.finish_intent(dead, IntentStatus.DEAD, error="gave up", now=NOW)
    assert store.counts()["quarantined"] == 1

    # Nothing is old yet.
    assert (await Retention().run_once(store)).pruned == 0
    later = Retention(clock=lambda: datetime.now(UTC) + timedelta(days=31))
    run = await later.run_once(store)

    assert run.pruned > 0
    assert store.audit_rows() == []
    assert {i.id: i.status for i in store.intents()} == {
        pending.id: IntentStatus.PENDING,
        dead.id: IntentStatus.DEAD,
    }
    assert store.counts()["quarantined"] == 0
    assert store.oldest_kept()["audit"] is None


async def test_summaries_are_pruned_with_the_rest_after_the_retention(tmp_path):
    pipeline = _pipeline(tmp_path)
    _location_updates(pipeline, "8988000000000000101", 8, first_id=1000)
    await Retention(RetentionSettings(decisions_per_sim=2)).run_once(pipeline.store)
    assert why.collect(pipeline.store, iccid="8988000000000000101")["summarized"]
    later = Retention(clock=lambda: datetime.now(UTC) + timedelta(days=32))
    await later.run_once(pipeline.store)
    assert why.collect(pipeline.store, iccid="8988000000000000101") == {
        "sim": "8988000000000000101",
        "events": [],
        "summarized": [],
    }


async def test_retention_hands_the_event_loop_back_between_batches(tmp_path):
    pipeline = _pipeline(tmp_path)
    _location_updates(pipeline, "8988000000000000101", 40, first_id=1000)
    turns = 0
    running = True

    async def other_work() -> None:  # stands for a poll waiting to commit
        nonlocal turns
        while running:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    run = await Retention(RetentionSettings(decisions_per_sim=1, batch_rows=5)).run_once(
        pipeline.store
    )
    running = False
    await task
    assert run.batches >= 16
    assert turns >= run.batches - 2  # the other task ran between (nearly) every two batches


def test_status_shows_the_store_size_and_the_oldest_row_kept(tmp_path, capsys):
    pipeline = _pipeline(tmp_path)
    pipeline.process([_event(1, "8988000000000000101", START, type_id=19)], source="poller")
    path = pipeline.store.path
    pipeline.store.close()
    assert main(["status", "--store", path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["store_bytes"] > 0
    assert data["store_bytes"] == sum(
        p.stat().st_size for p in Path(path).parent.iterdir() if p.name.endswith(("3", "-wal"))
    )
    oldest = datetime.fromisoformat(data["oldest_kept"]["audit"])
    assert abs((datetime.now(UTC) - oldest).total_seconds()) < 60
    assert main(["status", "--store", path]) == 0
    text = capsys.readouterr().out
    assert "store size    " in text and "oldest row kept " in text


def test_the_retention_and_decisions_kept_are_read_from_the_config(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("store:\n  retention: 7d\n  decisions_per_sim: 50\n", encoding="utf-8")
    settings = load_config(config).retention
    assert (settings.period, settings.decisions_per_sim) == (timedelta(days=7), 50)
    assert load_config(None).retention.period == timedelta(days=30)
    config.write_text("store:\n  retention: 2h\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"config.yaml:2: `store.retention` must be at least 1d"):
        load_config(config)


async def test_the_daemon_prunes_its_store_in_the_background(tmp_path, simulator):
    config = engine_config(tmp_path, simulator)
    store_path = config.store_path
    # A store with a month-old audit log and quarantine, as a long-running engine has.
    old = _pipeline(tmp_path)
    old.process([_event(1, "8988000000000000101", START, type_id=19)], source="poller")
    old.process(["not an event"], source="poller")
    old.store.close()
    with sqlite3.connect(store_path) as db:
        month_ago = (datetime.now(UTC) - timedelta(days=40)).timestamp()
        db.execute("UPDATE audit SET at = ?", (month_ago,))
        db.execute("UPDATE quarantine SET at = ?", (month_ago,))
    config = replace(config, retention=RetentionSettings(first_after=timedelta(0)))
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN)

    def old_rows_left() -> bool:
        old_record = [q for q in daemon.store.quarantined() if q["payload"] == '"not an event"']
        audit = daemon.store.audit_rows()
        return bool(old_record) or any(row["at"] == month_ago for row in audit)

    assert old_rows_left()
    async with running_daemon(daemon):
        await eventually(lambda: not old_rows_left())
