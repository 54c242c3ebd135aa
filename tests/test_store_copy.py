"""`event-engine store copy`: a SQLite store moved into PostgreSQL reads back the same
through every port, a target holding state is refused unless --force, and a daemon started
on the copy goes on where the SQLite one stopped (its cursor, a waiting follow-up, a
throttle)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD_VARIABLE

from engine.cli import main
from engine.daemon import Daemon
from engine.events import format_timestamp
from engine.model import (
    AuditRow,
    Batch,
    DigestEvent,
    FollowUpKey,
    Intent,
    IntentStatus,
    RuleOverride,
    RuleStateChanges,
)
from engine.simulator import SimulatorServer
from engine.store import SqliteStore

from helpers import TOKEN, engine_config, poller_of, rules_from

T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=24)
TARGET = {"sim_id": 9, "endpoint_id": 5, "iccid": "89-a"}


def _intent(key: str, event_id: int, kind: str = "suspend_sim", **extra: Any) -> Intent:
    return Intent(key, event_id, "r", 0, kind, extra.pop("params", {}), TARGET, **extra)


def _everything(path: Path) -> None:
    """A SQLite store with a row of every kind a running deployment keeps."""
    store = SqliteStore(path)
    store.audit_by_sim_every = 2  # part of the audit log in its SIM table, part not yet
    follow_up = FollowUpKey("1-r-1", "r", 1, 1, "sim.id", "9", T0, LATER)
    store.commit_batch(
        Batch(
            seen=[(1, T0), (2, T0 + timedelta(seconds=1)), (3, T0 + timedelta(seconds=2))],
            intents=[
                _intent("1-r-0", 1),
                _intent("1-r-1", 1, "activate_sim", due_at=LATER),
                _intent("2-w-0", 2, "webhook", params={"body": {"b": "\u00e9", "a": [1, 2]}}),
                _intent("3-r-0", 3, status=IntentStatus.HELD),
            ],
            audit=[
                AuditRow(n, "r", None, outcome, iccid="89-a", event_ts=T0.timestamp() + n)
                for n in (1, 2, 3)
                for outcome in ("matched", "throttled")
            ],
            quarantine=[("poller", "not JSON", "{oops"), ("data_streamer", "no id", "{}")],
            cursor=T0 + timedelta(minutes=5),
            state=RuleStateChanges(
                windows={("w", "9"): ([T0.timestamp(), T0.timestamp() + 0.25], 1e10)},
                throttles={("r", "9"): T0.timestamp() + 3600},
                guards={"r": [T0.timestamp()], "*": [T0.timestamp(), T0.timestamp() + 1]},
                overrides=[RuleOverride("g", "shadow", "5 actions in 1h", T0, 3)],
                follow_ups=[follow_up],
            ),
            digest_events=[
                DigestEvent("d", 1, T0, '{"id": 1, "text": "first"}'),
                DigestEvent("d", 2, T0 + timedelta(seconds=1), '{"id": 2}'),
            ],
        ),
        NOW,
    )
    store.start_digest("d", T0)
    store.claim_digest("d", NOW, limit=10)  # a run claimed, not finished: finished later
    store.commit_batch(Batch(digest_events=[DigestEvent("d", 3, NOW, '{"id": 3}')]), NOW)
    by_key = {i.idempotency_key: i for i in store.intents()}
    store.start_attempt(by_key["1-r-0"].id, NOW)
    done = AuditRow(1, "r", "suspend_sim", "done", endpoint_id=5, intent_id=by_key["1-r-0"].id)
    store.finish_intent(by_key["1-r-0"], IntentStatus.DONE, now=NOW, audit=done)
    store.start_attempt(by_key["2-w-0"].id, NOW)
    store.finish_intent(by_key["2-w-0"], IntentStatus.DEAD, now=NOW, error="503")
    store.summarize_decisions(keep=1, span=100)
    store.set_meta("marker", "kept")
    store.close()


def _snapshot(store: Any) -> dict[str, Any]:
    """Everything the ports read back."""
    intents = store.intents()
    return {
        "intents": intents,
        "attempts": [store.attempt_history(i.id) for i in intents],
        "due": store.due_intents(LATER + timedelta(days=1)),
        "next_due": store.next_due(NOW),
        "retrying": store.retrying_intents(),
        "outcomes": store.outcomes_on_endpoint("suspend_sim", 5, T0, excluding_intent=0),
        "audit": store.audit_rows(),
        "audit_by_sim": store.audit_rows(iccid="89-a"),
        "summaries": store.decision_summaries("89-a"),
        "quarantine": store.quarantined(),
        "window": store.window("w", "9"),
        "throttle": store.throttle_until("r", "9"),
        "guards": store.guard_summary(),
        "overrides": store.rule_overrides(),
        "follow_ups": store.cancellable_follow_ups(),
        "version": store.rule_state_version(),
        "digest": (store.digest_run_state("d"), store.digest_backlog("d")),
        "claimed": store.claim_digest("d", NOW, limit=10),
        "cursor": store.get_cursor(),
        "marker": store.get_meta("marker"),
        "seen": (store.unseen([1, 2, 3, 4]), [store.seen_at(n) for n in (1, 2, 3)]),
        "counts": store.counts(),
        "oldest": store.oldest_kept(),
    }


def _open_postgres(server: Any, url: str) -> Any:
    from engine.store.postgres import PostgresStore

    return PostgresStore(url, password=server.password)


def _copy(path: Path, url: str, *more: str) -> int:
    return main(
        ["store", "copy", "--from", f"sqlite:{path}", "--to", url,
         "--password-env", PASSWORD_VARIABLE, *more]
    )  # fmt: skip


@pytest.fixture
def password_env(postgres_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_VARIABLE, postgres_server.password or "")


def test_a_copied_store_reads_back_the_same_through_every_port(
    tmp_path, postgres_server, postgres_url, password_env, capsys
):
    path = tmp_path / "engine.sqlite3"
    _everything(path)
    assert _copy(path, postgres_url) == 0
    out = capsys.readouterr().out
    assert f"copied {path} into {postgres_url}" in out
    assert "every table's count checked" in out
    sqlite, copied = SqliteStore(path), _open_postgres(postgres_server, postgres_url)
    try:
        before, after = _snapshot(sqlite), _snapshot(copied)
        assert after == before
        # New rows take ids past the copied ones.
        copied.commit_batch(Batch(intents=[_intent("4-r-0", 4)]), NOW)
        assert copied.intents()[-1].id == max(i.id for i in before["intents"]) + 1
    finally:
        sqlite.close()
        copied.close()


def test_a_target_holding_state_is_refused_unless_forced(
    tmp_path, postgres_server, postgres_url, password_env, capsys
):
    path = tmp_path / "engine.sqlite3"
    _everything(path)
    assert _copy(path, postgres_url) == 0
    capsys.readouterr()
    assert _copy(path, postgres_url) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: the store {postgres_url} holds state already (meta, seen,")
    assert line.endswith("copy into an empty database, or add --force to replace what it holds")
    assert _copy(path, postgres_url, "--force") == 0
    copied = _open_postgres(postgres_server, postgres_url)
    try:
        assert len(copied.intents()) == 4
    finally:
        copied.close()


def test_a_password_in_the_target_url_is_refused_without_being_shown(tmp_path, capsys):
    path = tmp_path / "engine.sqlite3"
    SqliteStore(path).close()
    url = "postgresql://engine:hunter2-secret@127.0.0.1:9/engine"
    assert main(["store", "copy", "--from", f"sqlite:{path}", "--to", url]) == 1
    err = capsys.readouterr().err
    assert "store.url must not hold the password" in err
    assert "hunter2-secret" not in err.replace(url, "")


RULES = """
rules:
  - id: suspend-for-an-hour
    when: {type: 19}
    throttle: {per: sim.iccid, for: 1h}
    actions:
      - suspend_sim: {}
      - after: 1h
        do: {activate_sim: {}}
        cancel_if:
          when: {source: api, type: "SIM activation"}
"""
ACTIVE, SUSPENDED = 1, 2


def _quota(simulator: SimulatorServer, sim_id: int, seconds_ago: float) -> dict[str, Any]:
    moment = simulator.state.now() - timedelta(seconds=seconds_ago)
    return {"event_type": {"id": 19}, "sim_id": sim_id, "timestamp": format_timestamp(moment)}


def _status(simulator: SimulatorServer, sim_id: int) -> int:
    return int(simulator.state.sim(sim_id)["status"]["id"])


async def _poll_and_dispatch(daemon: Daemon) -> None:
    await poller_of(daemon).poll_once()
    while await daemon.dispatcher.run_due():
        pass


async def test_a_daemon_on_the_copy_goes_on_where_the_sqlite_one_stopped(
    tmp_path, simulator, postgres_settings, password_env
):
    sim = simulator.state.sims()[0]["id"]
    rules = rules_from(tmp_path, RULES)
    config = engine_config(tmp_path, simulator)
    simulator.state.store_events([_quota(simulator, sim, 30)])
    on_sqlite = Daemon(config, rules, TOKEN)
    try:
        await _poll_and_dispatch(on_sqlite)
        cursor = on_sqlite.store.get_cursor()
    finally:
        await on_sqlite.aclose()
    assert _status(simulator, sim) == SUSPENDED
    assert _copy(config.store_path, postgres_settings.url) == 0

    simulator.state.store_events([_quota(simulator, sim, 10)])  # within the throttle's hour
    on_postgres = Daemon(replace(config, store_postgres=postgres_settings), rules, TOKEN)
    poller_of(on_postgres).clock = lambda: datetime.now(UTC) + timedelta(seconds=2)
    try:
        assert on_postgres.store.get_cursor() == cursor
        await _poll_and_dispatch(on_postgres)
        throttled = [r for r in on_postgres.store.audit_rows() if r["outcome"] == "throttled"]
        two_hours_on = datetime.now(UTC) + timedelta(hours=2)
        on_postgres.dispatcher.clock = lambda: two_hours_on
        await on_postgres.dispatcher.run_due()
        intents = {i.kind: i.status for i in on_postgres.store.intents()}
    finally:
        await on_postgres.aclose()
    assert len(throttled) == 1  # the copied throttle held; the first event was not judged again
    assert intents == {"suspend_sim": IntentStatus.DONE, "activate_sim": IntentStatus.DONE}
    assert _status(simulator, sim) == ACTIVE  # the copied follow-up ran
    patches = [r.path for r in simulator.state.requests() if r.method == "PATCH"]
    assert len(patches) == 2
