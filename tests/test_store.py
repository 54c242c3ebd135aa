"""The SQLite store: one transaction per batch, and an outbox that survives a restart."""

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from engine.store import AuditRow, Batch, Intent, IntentStatus, SqliteStore

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
        )
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
    with pytest.raises(sqlite3.IntegrityError):
        store.commit_batch(bad)
    assert store.unseen([1]) == {1}
    assert store.get_cursor() is None


def test_the_same_idempotency_key_is_planned_only_once(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite3")
    assert store.commit_batch(Batch(intents=[_intent("k1")])) == 1
    assert store.commit_batch(Batch(intents=[_intent("k1")])) == 0
    assert len(store.intents()) == 1


def test_an_attempt_interrupted_by_a_crash_is_due_again_with_its_count(tmp_path):
    path = tmp_path / "s.sqlite3"
    store = SqliteStore(path)
    store.commit_batch(Batch(intents=[_intent("k1")]))
    (intent_id,) = [i.id for i in store.intents()]
    assert store.start_attempt(intent_id) == 1
    store.close()  # the process dies mid-call
    reopened = SqliteStore(path)
    (due,) = reopened.due_intents(datetime.now(UTC))
    assert due.status is IntentStatus.RUNNING
    assert due.attempts == 1


def test_follow_ups_wait_until_their_time(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite3")
    later = datetime.now(UTC) + timedelta(hours=24)
    store.commit_batch(Batch(intents=[_intent("k1", due_at=later)]))
    assert store.due_intents(datetime.now(UTC)) == []
    assert len(store.due_intents(later + timedelta(seconds=1))) == 1


def test_pruning_forgets_only_ids_older_than_the_horizon(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite3")
    store.commit_batch(Batch(seen=[(1, T0), (2, T0 + timedelta(hours=2))]))
    assert store.prune_seen(T0 + timedelta(hours=1)) == 1
    assert store.unseen([1, 2]) == {1}


def test_a_dead_intent_can_be_requeued(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite3")
    store.commit_batch(Batch(intents=[_intent("k1")]))
    (intent_id,) = [i.id for i in store.intents()]
    intent = store.get_intent(intent_id)
    assert intent is not None
    store.finish_intent(intent, IntentStatus.DEAD, error="HTTP 503")
    assert store.requeue(intent_id)
    requeued = store.get_intent(intent_id)
    assert requeued is not None and requeued.status is IntentStatus.PENDING
    assert requeued.attempts == 0
