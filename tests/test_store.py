"""The SQLite store: one transaction per batch, and an outbox that survives a restart. What
every store backend promises through the ports is `test_store_contract.py`'s."""

import sqlite3
import time
from datetime import UTC, datetime

import pytest
from structlog.testing import capture_logs

from engine.errors import StoreError
from engine.model import AuditRow, Batch, Intent, IntentStatus
from engine.store import SqliteStore

NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)  # when the store is told things happen

T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)


def _intent(key: str, **extra) -> Intent:
    return Intent(
        idempotency_key=key,
        event_id=1,
        rule_id="r",
        action_index=0,
        kind="suspend_sim",
        params={},
        target={"sim_id": 9, "endpoint_id": 5, "iccid": "89"},
        **extra,
    )


def test_uses_wal_mode_on_a_real_file(tmp_path):
    path = tmp_path / "state.sqlite3"
    SqliteStore(path).close()
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_batch_records_seen_ids_intents_audit_and_cursor_together(tmp_path):
    path = tmp_path / "state.sqlite3"
    store = SqliteStore(path)
    store.commit_batch(
        Batch(
            seen=[(1, T0), (2, T0)],
            intents=[_intent("k1")],
            audit=[AuditRow(1, "r", None, "matched")],
            cursor=T0,
        ),
        NOW,
    )
    store.close()
    reopened = SqliteStore(path)
    assert reopened.unseen([1, 2, 3]) == {3}
    assert reopened.get_cursor() == T0
    assert [i.idempotency_key for i in reopened.intents()] == ["k1"]
    assert reopened.audit_rows()[0]["outcome"] == "matched"


def test_a_failed_batch_changes_nothing(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite3")
    bad = Batch(seen=[(1, T0)], audit=[AuditRow(1, "r", None, None)], cursor=T0)  # type: ignore[arg-type]
    with pytest.raises(StoreError) as raised:
        store.commit_batch(bad, NOW)
    # No advice for a refused row: the file and SQLite's words only.
    assert (
        str(raised.value) == f"state store {store.path}: NOT NULL constraint failed: audit.outcome"
    )
    assert store.unseen([1]) == {1}
    assert store.get_cursor() is None


def test_a_closed_store_answers_with_a_store_error_naming_its_file(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite3")
    store.close()
    with pytest.raises(StoreError) as raised:
        store.unseen([1])
    assert str(raised.value) == f"state store {store.path}: Cannot operate on a closed database."


def test_an_attempt_interrupted_by_a_crash_is_due_again_with_its_count(tmp_path):
    path = tmp_path / "s.sqlite3"
    store = SqliteStore(path)
    store.commit_batch(Batch(intents=[_intent("k1")]), NOW)
    (intent_id,) = [i.id for i in store.intents()]
    assert store.start_attempt(intent_id, NOW) == 1
    store.close()  # the process dies mid-call
    reopened = SqliteStore(path)
    (due,) = reopened.due_intents(datetime.now(UTC))
    assert due.status is IntentStatus.RUNNING
    assert due.attempts == 1


def test_outcomes_on_an_endpoint_are_looked_up_in_an_index_of_dispatcher_rows(tmp_path):
    path = tmp_path / "state.sqlite3"
    # A store made before (schema step 3) held every audit row in its endpoint index.
    store = SqliteStore(path)
    store._db.execute("DROP INDEX audit_outcomes_by_endpoint")
    store._db.execute("CREATE INDEX audit_by_endpoint ON audit (endpoint_id)")
    store._db.execute("DELETE FROM schema_version WHERE version >= 3")
    store.close()
    store = SqliteStore(path)
    names = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "audit_by_endpoint" not in names  # the full index is dropped on opening
    pipeline_row = AuditRow(1, "r", "disable_endpoint", "planned", endpoint_id=5)
    store.commit_batch(Batch(seen=[(1, T0)], audit=[pipeline_row]), NOW)
    for intent_id, outcome in ((7, "done"), (8, "failed")):
        store._db.execute(
            "INSERT INTO audit (at, event_id, rule_id, action, outcome, endpoint_id, intent_id)"
            " VALUES (?, 1, 'r', 'disable_endpoint', ?, 5, ?)",
            (T0.timestamp(), outcome, intent_id),
        )
    found = store.outcomes_on_endpoint("disable_endpoint", 5, T0, excluding_intent=8)
    assert found == ["done"]  # the pipeline's "planned" row is not an outcome
    plan = store._db.execute(
        "EXPLAIN QUERY PLAN SELECT outcome FROM audit WHERE endpoint_id = ? AND action = ?"
        " AND at >= ? AND intent_id IS NOT NULL AND intent_id != ?",
        (5, "disable_endpoint", 0.0, 8),
    ).fetchall()
    assert "audit_outcomes_by_endpoint" in str(plan)


def _sim_rows(store: SqliteStore, iccid: str) -> list[tuple[int, str]]:
    return [(r["event_id"], r["outcome"]) for r in store.audit_rows(iccid=iccid)]


def test_the_audit_log_by_sim_holds_rows_indexed_in_bulk_and_the_newer_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(SqliteStore, "audit_by_sim_every", 5)
    store = SqliteStore(tmp_path / "state.sqlite3")
    expected: dict[str, list[tuple[int, str]]] = {"89-a": [], "89-b": []}
    for event_id in range(1, 8):  # 14 rows: indexed in bulk after the 3rd and the 6th batch
        iccid = "89-a" if event_id % 3 else "89-b"
        rows = [AuditRow(event_id, "r", None, o, iccid=iccid) for o in ("matched", "planned")]
        store.commit_batch(Batch(seen=[(event_id, T0)], audit=rows), NOW)
        expected[iccid] += [(event_id, "matched"), (event_id, "planned")]
        for sim, rows_of_sim in expected.items():
            assert _sim_rows(store, sim) == rows_of_sim  # every row once, in order
    indexed = store._db.execute("SELECT COUNT(*) FROM audit_by_sim").fetchone()[0]
    assert indexed == 12  # rows 13 and 14 wait for the next run; they were found all the same
    assert store.audit_rows(iccid="89-c") == []
    assert [r["event_id"] for r in store.audit_rows(iccid="89-a", limit=3)] == [1, 1, 2]


def test_a_store_with_the_old_sim_index_is_migrated_and_indexed_by_its_next_batch(tmp_path):
    path = tmp_path / "state.sqlite3"
    store = SqliteStore(path)
    store._db.execute("CREATE INDEX audit_by_iccid ON audit (iccid)")  # as stores had it
    store._db.execute("DELETE FROM schema_version WHERE version >= 3")  # before step 3
    old = [AuditRow(n, "r", None, "matched", iccid=f"89-{n % 2}") for n in range(1, 11)]
    store._insert_audit(store._db, old, T0.timestamp())
    store.close()
    store = SqliteStore(path)
    names = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "audit_by_iccid" not in names
    assert [e for e, _ in _sim_rows(store, "89-1")] == [1, 3, 5, 7, 9]  # before any run
    store.audit_by_sim_every = 10
    store.commit_batch(Batch(seen=[(11, T0)], audit=[AuditRow(11, "r", None, "matched")]), NOW)
    assert store._db.execute("SELECT COUNT(*) FROM audit_by_sim").fetchone()[0] == 10
    assert [e for e, _ in _sim_rows(store, "89-1")] == [1, 3, 5, 7, 9]


def test_pruned_audit_rows_leave_nothing_behind_in_the_sim_tables(tmp_path, monkeypatch):
    monkeypatch.setattr(SqliteStore, "audit_by_sim_every", 1)
    store = SqliteStore(tmp_path / "state.sqlite3")
    for event_id in (1, 2):
        rows = [AuditRow(event_id, "r", None, o, iccid="89-a") for o in ("matched", "throttled")]
        store.commit_batch(Batch(seen=[(event_id, T0)], audit=rows), NOW)
    # A row of a SIM that no rule wrote (a console press, an engine event) is in the SIM table.
    store.commit_batch(
        Batch(seen=[(3, T0)], audit=[AuditRow(3, None, None, "x", iccid="89-a")]), NOW
    )
    store.commit_batch(Batch(seen=[(4, T0)]), NOW)  # indexes the SIM table
    store.summarize_decisions(keep=5, span=100)  # keeps both in the newest per SIM and rule

    def left() -> tuple[int, int]:
        db = store._db
        by_sim = db.execute("SELECT COUNT(*) FROM audit_by_sim").fetchone()[0]
        return by_sim, db.execute("SELECT COUNT(*) FROM audit_recent").fetchone()[0]

    assert left() == (5, 2)
    assert store.prune_older_than(datetime(2025, 5, 2, tzinfo=UTC), limit=100) == 5
    assert left() == (0, 0)


def test_the_store_size_is_its_file_and_its_write_ahead_log(tmp_path):
    path = tmp_path / "state.sqlite3"
    store = SqliteStore(path)
    store.commit_batch(Batch(seen=[(1, T0)]), NOW)
    wal = tmp_path / "state.sqlite3-wal"
    assert wal.stat().st_size > 0
    assert store.disk_bytes() == path.stat().st_size + wal.stat().st_size
    wal.unlink()  # gone (as between checkpoints): no bytes of its own
    assert store.disk_bytes() == path.stat().st_size


def test_indexing_the_audit_log_by_sim_for_over_a_second_says_how_many_rows_in_how_long(
    tmp_path, monkeypatch
):
    # The first batch after an upgrade indexes a whole audit log: the operator is told why
    # it was slow. The time it took is given by a clock that says so.
    monkeypatch.setattr(SqliteStore, "audit_by_sim_every", 2)
    store = SqliteStore(tmp_path / "state.sqlite3")
    logged = []
    for event_id, took in ((1, 1.0), (2, 1.26)):
        readings = iter([100.0, 100.0 + took])
        rows = [AuditRow(event_id, "r", None, o, iccid="89-a") for o in ("matched", "throttled")]
        with monkeypatch.context() as clock, capture_logs() as logs:
            clock.setattr(time, "perf_counter", readings.__next__)
            store.commit_batch(Batch(seen=[(event_id, T0)], audit=rows), NOW)
        logged.append(logs)
    assert logged[0] == []  # a second is not over a second
    assert logged[1] == [
        {"event": "audit log indexed by SIM", "log_level": "info", "rows": 2, "seconds": 1.3}
    ]
