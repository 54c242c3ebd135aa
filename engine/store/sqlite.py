"""The SQLite store: cursor, seen event ids, the outbox of action intents, and the audit log.

One `commit_batch` call is one transaction: the ids seen, the new intents, their audit rows
and the advanced cursor land together or not at all. A crash before the commit means the
batch is evaluated again (nothing was recorded as seen); a crash after it means the
dispatcher finds the intents on start-up.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from engine.errors import EngineError
from engine.store.model import AuditRow, Batch, Intent, IntentStatus

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    event_id INTEGER PRIMARY KEY,
    event_ts REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_by_ts ON seen (event_ts);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT NOT NULL UNIQUE,
    event_id INTEGER,
    rule_id TEXT NOT NULL,
    action_index INTEGER NOT NULL,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    target TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    due_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, due_at);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    event_id INTEGER,
    rule_id TEXT,
    action TEXT,
    outcome TEXT NOT NULL,
    detail TEXT,
    sim_id INTEGER,
    endpoint_id INTEGER,
    iccid TEXT,
    intent_id INTEGER
);
CREATE INDEX IF NOT EXISTS audit_by_event ON audit (event_id);
CREATE INDEX IF NOT EXISTS audit_by_iccid ON audit (iccid);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload TEXT NOT NULL
);
"""

_OPEN_STATUSES = (IntentStatus.PENDING.value, IntentStatus.RUNNING.value)


class StoreError(EngineError):
    """The state store cannot be opened or written."""


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


class SqliteStore:
    """State in one SQLite file (WAL mode), or in memory for `replay` (path ":memory:")."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against process crashes in WAL mode; FULL adds power-loss
            # safety at the price of an fsync per commit.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open the state store {self.path}: {error}") from None

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise StoreError(f"cannot write the state store {self.path}: {error}") from None
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                self._db.execute("ROLLBACK")
                raise StoreError(f"cannot commit to the state store: {error}") from None

    # -- cursor and meta ---------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_cursor(self) -> datetime | None:
        value = self.get_meta("cursor")
        return datetime.fromisoformat(value) if value else None

    # -- seen ids ------------------------------------------------------------------------

    def unseen(self, event_ids: Sequence[int]) -> set[int]:
        """The ids among `event_ids` not yet recorded as evaluated."""
        if not event_ids:
            return set()
        wanted = set(event_ids)
        seen: set[int] = set()
        ids = list(wanted)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT event_id FROM seen WHERE event_id IN ({marks})", chunk)
            seen.update(r[0] for r in rows)
        return wanted - seen

    def prune_seen(self, before: datetime) -> int:
        """Forget seen ids of events older than `before` (past the dedup horizon)."""
        with self._transaction() as db:
            return db.execute("DELETE FROM seen WHERE event_ts < ?", (_ts(before),)).rowcount

    def seen_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM seen").fetchone()[0])

    # -- the batch transaction -----------------------------------------------------------

    def commit_batch(self, batch: Batch) -> list[int]:
        """Record a batch atomically; returns the outbox ids of the intents it created."""
        now = time.time()
        created: list[int] = []
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO seen (event_id, event_ts) VALUES (?, ?)",
                [(event_id, _ts(ts)) for event_id, ts in batch.seen],
            )
            for intent in batch.intents:
                cur = db.execute(
                    "INSERT OR IGNORE INTO outbox (idempotency_key, event_id, rule_id,"
                    " action_index, kind, params, target, status, attempts, created_at, due_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                    (
                        intent.idempotency_key,
                        intent.event_id,
                        intent.rule_id,
                        intent.action_index,
                        intent.kind,
                        orjson.dumps(intent.params).decode(),
                        orjson.dumps(intent.target).decode(),
                        intent.status.value,
                        now,
                        _ts(intent.due_at) if intent.due_at else now,
                        now,
                    ),
                )
                if cur.rowcount and cur.lastrowid is not None:
                    created.append(cur.lastrowid)
            self._insert_audit(db, batch.audit, now)
            for source, reason, payload in batch.quarantine:
                db.execute(
                    "INSERT INTO quarantine (at, source, reason, payload) VALUES (?, ?, ?, ?)",
                    (now, source, reason, payload),
                )
            if batch.cursor is not None:
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('cursor', ?)",
                    (batch.cursor.isoformat(),),
                )
        return created

    @staticmethod
    def _insert_audit(db: sqlite3.Connection, rows: Iterable[AuditRow], now: float) -> None:
        db.executemany(
            "INSERT INTO audit (at, event_id, rule_id, action, outcome, detail, sim_id,"
            " endpoint_id, iccid, intent_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    now,
                    r.event_id,
                    r.rule_id,
                    r.action,
                    r.outcome,
                    r.detail,
                    r.sim_id,
                    r.endpoint_id,
                    r.iccid,
                    r.intent_id,
                )
                for r in rows
            ],
        )

    # -- the outbox ----------------------------------------------------------------------

    def due_intents(self, now: datetime, limit: int = 100) -> list[Intent]:
        """Open intents whose time has come, oldest first. `running` ones were interrupted
        by a crash or a shutdown and are due again."""
        rows = self._db.execute(
            "SELECT * FROM outbox WHERE status IN (?, ?) AND due_at <= ? ORDER BY id LIMIT ?",
            (*_OPEN_STATUSES, _ts(now), limit),
        ).fetchall()
        return [self._intent(row) for row in rows]

    def next_due(self) -> datetime | None:
        row = self._db.execute(
            "SELECT MIN(due_at) FROM outbox WHERE status IN (?, ?)", _OPEN_STATUSES
        ).fetchone()
        return _dt(row[0]) if row and row[0] is not None else None

    def start_attempt(self, intent_id: int) -> int:
        """Count an attempt *before* making it, so a crash mid-call is known on restart."""
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, status = ?, updated_at = ?"
                " WHERE id = ?",
                (IntentStatus.RUNNING.value, time.time(), intent_id),
            )
            row = db.execute("SELECT attempts FROM outbox WHERE id = ?", (intent_id,)).fetchone()
        return int(row[0])

    def finish_intent(
        self,
        intent: Intent,
        status: IntentStatus,
        *,
        error: str | None = None,
        due_at: datetime | None = None,
        audit: AuditRow | None = None,
    ) -> None:
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET status = ?, last_error = ?, due_at = COALESCE(?, due_at),"
                " updated_at = ? WHERE id = ?",
                (status.value, error, _ts(due_at) if due_at else None, now, intent.id),
            )
            if audit is not None:
                self._insert_audit(db, [audit], now)

    def get_intent(self, intent_id: int) -> Intent | None:
        row = self._db.execute("SELECT * FROM outbox WHERE id = ?", (intent_id,)).fetchone()
        return self._intent(row) if row else None

    def intents(self, status: IntentStatus | None = None, limit: int = 1000) -> list[Intent]:
        if status is None:
            rows = self._db.execute("SELECT * FROM outbox ORDER BY id LIMIT ?", (limit,))
        else:
            rows = self._db.execute(
                "SELECT * FROM outbox WHERE status = ? ORDER BY id LIMIT ?", (status.value, limit)
            )
        return [self._intent(row) for row in rows.fetchall()]

    def requeue(self, intent_id: int) -> bool:
        """Put a dead-lettered intent back in the queue with a fresh attempt count."""
        with self._transaction() as db:
            return (
                db.execute(
                    "UPDATE outbox SET status = ?, attempts = 0, due_at = ?, updated_at = ?"
                    " WHERE id = ? AND status = ?",
                    (
                        IntentStatus.PENDING.value,
                        time.time(),
                        time.time(),
                        intent_id,
                        IntentStatus.DEAD.value,
                    ),
                ).rowcount
                > 0
            )

    def _intent(self, row: tuple[Any, ...]) -> Intent:
        (
            intent_id,
            key,
            event_id,
            rule_id,
            action_index,
            kind,
            params,
            target,
            status,
            attempts,
            created_at,
            due_at,
            _updated_at,
            last_error,
        ) = row
        return Intent(
            id=intent_id,
            idempotency_key=key,
            event_id=event_id,
            rule_id=rule_id,
            action_index=action_index,
            kind=kind,
            params=orjson.loads(params),
            target=orjson.loads(target),
            status=IntentStatus(status),
            attempts=attempts,
            created_at=_dt(created_at),
            due_at=_dt(due_at),
            last_error=last_error,
        )

    # -- reading for status, why and tests -----------------------------------------------

    def counts(self) -> dict[str, int]:
        out = {
            f"intents_{s}": n
            for s, n in self._db.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status")
        }
        out["events_seen"] = self.seen_count()
        out["quarantined"] = int(self._db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0])
        return out

    def audit_rows(
        self, *, event_id: int | None = None, iccid: str | None = None, limit: int = 10000
    ) -> list[dict[str, Any]]:
        query = "SELECT * FROM audit"
        args: list[Any] = []
        if event_id is not None:
            query += " WHERE event_id = ?"
            args.append(event_id)
        elif iccid is not None:
            query += " WHERE iccid = ?"
            args.append(iccid)
        query += " ORDER BY id LIMIT ?"
        args.append(limit)
        cursor = self._db.execute(query, args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def quarantined(self, limit: int = 100) -> list[dict[str, Any]]:
        cursor = self._db.execute("SELECT * FROM quarantine ORDER BY id DESC LIMIT ?", (limit,))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
