"""The SQLite store: cursor, seen event ids, the outbox of action intents, and the audit log.

One `commit_batch` call is one transaction: the ids seen, the new intents, their audit rows
and the advanced cursor land together or not at all. A crash before the commit means the
batch is evaluated again (nothing was recorded as seen); a crash after it means the
dispatcher finds the intents on start-up.
"""

# The SQL is written in triple quotes. SQLite reads its keywords and names in any case, so
# the mutants mutmut makes of a string by changing its case would all be equivalent here, and
# mutmut leaves triple-quoted text alone (docs/testing.md, "The SQL text").

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from engine.actions import lane_of
from engine.errors import LeaseLost, StaleRuleState, StoreError
from engine.model import (
    AbsenceMark,
    AttemptHistory,
    AuditRow,
    Batch,
    FollowUpKey,
    Intent,
    IntentStatus,
    LeaseState,
    Member,
    OwnStatusAction,
    ResumeResult,
    RuleOverride,
    RuleStateChanges,
    Silence,
    StoreCondition,
    cursor_key,
    steps_text,
)
from engine.store.failures import Failure, failures_as_store_errors, recent_failure
from engine.store.migrations import (
    Migration,
    MigrationPlan,
    check_steps,
    plan,
    refuse_unless_allowed,
)

if TYPE_CHECKING:
    from engine.ports import Store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    event_id INTEGER PRIMARY KEY,
    event_ts REAL NOT NULL
) WITHOUT ROWID;
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
    intent_id INTEGER,
    event_ts REAL
);
-- The audit log by SIM, for `why --sim`: kept up to date in bulk, not per row (see
-- `_index_audit_by_sim`); the audit rows after `audit_by_sim_upto` are not in it yet.
CREATE TABLE IF NOT EXISTS audit_by_sim (
    iccid TEXT NOT NULL,
    audit_id INTEGER NOT NULL,
    PRIMARY KEY (iccid, audit_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload TEXT NOT NULL
);
-- A malformed record comes back in every overlapping poll: it is quarantined once.
CREATE INDEX IF NOT EXISTS quarantine_by_payload ON quarantine (source, payload);
-- Attempt history of an intent, kept across `dead-letters retry` (which resets the outbox's
-- retry budget, not the fact that the action may already have run).
CREATE TABLE IF NOT EXISTS intent_attempts (
    intent_id INTEGER PRIMARY KEY,
    total INTEGER NOT NULL,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    deadline_from REAL NOT NULL
);
-- Scheduled digests: events collected per rule until its next run (`run_at` is set when a
-- run claims them), and per rule the last completed run and the fire time of a claim made
-- but not yet finished (a crash in between is finished at the next start).
CREATE TABLE IF NOT EXISTS digest_events (
    rule_id TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    event_ts REAL NOT NULL,
    payload TEXT NOT NULL,
    run_at REAL,
    PRIMARY KEY (rule_id, event_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS digest_runs (
    rule_id TEXT PRIMARY KEY,
    last_run REAL NOT NULL,
    claimed_for REAL
);
"""

# What rules remember between events: threshold windows, throttle marks, blast-radius guard
# entries (scope "*" is the global guard), rules the guard switched to shadow, and the keys
# that cancel pending follow-ups. Times are event times in epoch seconds.
_RULE_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS rule_windows (
    rule_id TEXT NOT NULL,
    key TEXT NOT NULL,
    entries TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (rule_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rule_windows_by_expiry ON rule_windows (expires);
CREATE TABLE IF NOT EXISTS rule_throttles (
    rule_id TEXT NOT NULL,
    key TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (rule_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rule_throttles_by_until ON rule_throttles (until);
CREATE TABLE IF NOT EXISTS rule_guards (
    scope TEXT PRIMARY KEY,
    entries TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rule_overrides (
    rule_id TEXT PRIMARY KEY,
    mode TEXT NOT NULL,
    reason TEXT NOT NULL,
    since REAL NOT NULL,
    event_id INTEGER,
    at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS follow_up_keys (
    idempotency_key TEXT PRIMARY KEY,
    key_path TEXT NOT NULL,
    key TEXT NOT NULL,
    planned_at REAL NOT NULL,
    shadow INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"""
# Indexes for the queries of the running daemon and the CLI: pruning seen ids, picking due
# intents, looking up the audit log.
#
# Audit rows by SIM and by endpoint are not indexed per row: their keys fall at random
# places, so each insert dirtied a page of its own, written again at every commit; the two
# indexes were two thirds of a catch-up's store time. The endpoint index serves only
# `outcomes_on_endpoint`, which reads the dispatcher's rows (those with an intent), so it
# holds only those; the SIM index is a table filled in bulk. Stores made before are migrated
# by dropping the indexes (the first batch then fills the table).
_QUERY_INDEXES = """
DROP INDEX IF EXISTS audit_by_endpoint;
DROP INDEX IF EXISTS audit_by_iccid;
CREATE INDEX IF NOT EXISTS seen_by_ts ON seen (event_ts);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, due_at);
CREATE INDEX IF NOT EXISTS audit_by_event ON audit (event_id);
CREATE INDEX IF NOT EXISTS audit_outcomes_by_endpoint ON audit (endpoint_id)
    WHERE intent_id IS NOT NULL;
"""
_SCHEMA_VERSION = """
-- One row per schema step applied (engine.store.migrations).
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL
);
"""
_AUDIT_BY_SIM_UPTO = "audit_by_sim_upto"
_log = structlog.get_logger(__name__)
_RULE_STATE_VERSION = "rule_state_version"

_OPEN_STATUSES = (IntentStatus.PENDING.value, IntentStatus.RUNNING.value)


_RESTORE = (
    "stop the engine, move the file and its -wal and -shm files aside, and restore them from "
    "a backup or start afresh without them"
)
# What to do, by SQLite's (extended) result code; the first name that prefixes the code wins.
_ADVICE = (
    ("SQLITE_READONLY_DBMOVED", "the file was moved or deleted while in use: restart the engine"),
    ("SQLITE_FULL", "free space on its file system"),
    ("SQLITE_READONLY", "let the engine's user write the file, its folder and its -wal file"),
    ("SQLITE_IOERR", "the disk or its file system failed: see the system log"),
    ("SQLITE_BUSY", "another process keeps it locked: an event-engine command, a sqlite3 shell?"),
    ("SQLITE_CANTOPEN", "check that its folder exists and the engine's user may write there"),
    ("SQLITE_CORRUPT", _RESTORE),
    ("SQLITE_NOTADB", _RESTORE),
)
# Free space under which the store's file system counts as full: a batch's commit and a
# checkpoint of the write-ahead log need room of this order.
LOW_SPACE_BYTES = 4 * 1024 * 1024


def _advice(error: sqlite3.Error) -> str:
    name = getattr(error, "sqlite_errorname", "")
    return next((advice for prefix, advice in _ADVICE if name.startswith(prefix)), "")


def _describe(path: str, error: sqlite3.Error, doing: str = "") -> str:
    """One line for the operator: the file, what failed, and what to do about it."""
    advice = _advice(error)
    return f"{doing}state store {path}: {error}" + (f" ({advice})" if advice else "")


def _refuse_a_folder(path: str) -> None:
    """A folder given as the store says so (SQLite would call it an I/O error)."""
    if Path(path).is_dir():
        raise StoreError(
            f"cannot open the state store {path}: it is a folder; store.path names the "
            f"store's file (such as {Path(path) / 'engine.sqlite3'})"
        )


def _use_wal(db: sqlite3.Connection, patience: float = 5.0) -> None:
    """Switch to WAL mode. On a new file another engine is making at the same moment, SQLite
    refuses the switch at once ("database is locked") instead of waiting as it does for a
    write: try again for up to `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            db.execute("""PRAGMA journal_mode=WAL""")
            return
        except sqlite3.OperationalError as error:
            busy = getattr(error, "sqlite_errorname", "") == "SQLITE_BUSY"
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _marks(count: int) -> str:
    """The placeholders of an `IN (...)` list of `count` values."""
    return ", ".join("?" * count)


def _dicts(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    """A query's rows as dicts by column name."""
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _describe_failure(store: SqliteStore, error: sqlite3.Error) -> str:
    return _describe(store.path, error)


# A disk that fills up or a damaged page reaches the operator as a line in words.
@failures_as_store_errors((sqlite3.Error,), _describe_failure)
class SqliteStore:
    """State in one SQLite file (WAL mode); ":memory:" opens a store that ends with the
    process (the rule-test runner's)."""

    # Audit rows waiting before a batch adds them to the SIM table (`_index_audit_by_sim`).
    audit_by_sim_every = 20_000
    # `condition` writes a probe value when the engine has not written for this long (or its
    # last write failed), and not more often.
    probe_every = 10.0
    low_space_bytes = LOW_SPACE_BYTES

    def __init__(self, path: str | Path, *, migrate: bool = True):
        """`migrate`: bring an older schema up to date (the default); when False, a store
        that needs a step is refused with MigrationNeeded (`store.migrate: never`)."""
        self.path = str(path)
        # By method: its last failure, until it succeeds again (see `engine.store.failures`).
        self._failures: dict[str, Failure] = {}
        self._wrote_at: float | None = None  # monotonic time of the last successful write
        self._probed_at = float("-inf")
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file opened
        if self.path != ":memory:":
            _refuse_a_folder(self.path)
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StoreError(
                    f"cannot open the state store {self.path}: cannot create its folder: "
                    f"{error.strerror}"
                ) from None
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise StoreError(_describe(self.path, error, "cannot open the ")) from None
        try:
            # (In memory, SQLite keeps its own journal mode; these two then change nothing.)
            _use_wal(self._db)
            # NORMAL is durable against process crashes in WAL mode; FULL adds power-loss
            # safety at the price of an fsync per commit.
            self._db.execute("""PRAGMA synchronous=NORMAL""")
            self._db.execute("""PRAGMA busy_timeout=5000""")
            self._migrate(migrate or self.path == ":memory:")
            if self.path != ":memory:":
                found = os.stat(self.path)
                self._identity = (found.st_dev, found.st_ino)
        except (sqlite3.Error, OSError, StoreError) as error:
            self._db.close()
            if isinstance(error, StoreError):
                raise
            if isinstance(error, sqlite3.Error):
                raise StoreError(_describe(self.path, error, "cannot open the ")) from None
            raise StoreError(f"cannot open the state store {self.path}: {error}") from None

    def close(self) -> None:
        self._db.close()

    def _migrate(self, allowed: bool) -> None:
        """Apply the schema steps this store lacks, each in its own transaction with the row
        that records it (`engine.store.migrations`)."""
        found = plan(self.path, _schema_version(self._db), SCHEMA_STEPS)
        refuse_unless_allowed(found, allowed)
        fresh = self._db.execute("""SELECT COUNT(*) FROM sqlite_master""").fetchone()[0] == 0
        for step in SCHEMA_STEPS[found.current :]:
            with self._transaction() as db:
                if _schema_version(db) >= step.version:
                    continue  # another process applied it meanwhile
                step.apply(db)
                db.execute(
                    """INSERT INTO schema_version (version, description) VALUES (?, ?)""",
                    (step.version, step.description),
                )
        if found.pending and not fresh:
            _log.info("store schema migrated", store=self.path, **_steps_taken(found))

    # -- the truth about the store: integrity, identity, writability -----------------------

    def check_integrity(self, budget: float = 15.0) -> bool:
        """SQLite's `quick_check` of every page, for at most `budget` seconds (it reads the
        whole file: a large store on a cold disk takes a while). Raises StoreError, naming
        the file and what to do, when the file is damaged; returns False when the time ran
        out first (what was checked is sound), True when the whole file was checked."""
        if self.path == ":memory:":
            return True
        deadline = time.monotonic() + budget
        self._db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        try:
            rows = self._db.execute("""PRAGMA quick_check(3)""").fetchall()
        except sqlite3.Error as error:
            if getattr(error, "sqlite_errorname", "") == "SQLITE_INTERRUPT":
                return False
            raise StoreError(self._damaged(str(error))) from None
        finally:
            self._db.set_progress_handler(None, 0)
        problems = [str(row[0]) for row in rows if row[0] != "ok"]
        if problems:
            raise StoreError(self._damaged("; ".join(problems)))
        return True

    def _damaged(self, what: str) -> str:
        return f"the state store {self.path} is damaged ({what}): {_RESTORE}"

    def condition(self, now: datetime) -> StoreCondition:
        """Whether the store can do its job now: its file is still the one it opened, the
        file system takes writes and has room, and no operation has failed since it last
        succeeded (within the last minute). When the engine has not written for
        `probe_every` seconds, or something failed, a probe writes one meta value (at most
        that often) to find out; so `/readyz` may ask on every call without writing a row
        each time."""
        if self._identity is None:
            return StoreCondition(True, "in memory")
        problem = self._file_problem() or self._space_problem()
        if problem is not None:
            return StoreCondition(False, problem)
        tick = time.monotonic()
        idle = self._wrote_at is None or tick - self._wrote_at >= self.probe_every
        if (self._failures or idle) and tick - self._probed_at >= self.probe_every:
            self._probed_at = tick
            with suppress(StoreError):  # remembered among the failures
                self.set_meta("ready_probe", now.isoformat())
        failed = recent_failure(self._failures)
        if failed is not None:
            return StoreCondition(False, failed)
        return StoreCondition(True, "writable")

    def _file_problem(self) -> str | None:
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return (
                f"the store file {self.path} was deleted while the engine runs (what it "
                "writes now is lost when it stops): restart the engine"
            )
        except OSError as error:
            return f"the store file {self.path} cannot be looked at: {error.strerror}"
        if (found.st_dev, found.st_ino) != self._identity:
            return (
                f"the store file {self.path} was replaced while the engine runs (it still "
                "writes to the file it opened): restart the engine"
            )
        return None

    def _space_problem(self) -> str | None:
        if not hasattr(os, "statvfs"):
            return None
        try:
            volume = os.statvfs(Path(self.path).parent)
        except OSError:
            return None  # the file check above speaks for a folder that is gone
        if volume.f_flag & os.ST_RDONLY:
            return f"the file system holding {self.path} is mounted read-only"
        free = volume.f_bavail * volume.f_frsize
        if free < self.low_space_bytes:
            return (
                f"the file system holding {self.path} is full ({free // 1024} KiB free): "
                "free space on it"
            )
        return None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a failure leaves as it came (the public method calling
        this turns a `sqlite3.Error` into a StoreError)."""
        self._db.execute("""BEGIN IMMEDIATE""")
        try:
            yield self._db
            self._db.execute("""COMMIT""")
        except BaseException:
            # A failed COMMIT (disk full, I/O error) has often rolled back already; a
            # ROLLBACK then would only say "no transaction is active" over the real cause.
            if self._db.in_transaction:
                with suppress(sqlite3.Error):  # the error that got us here is the one to report
                    self._db.execute("""ROLLBACK""")
            raise
        self._wrote_at = time.monotonic()

    # -- cursor and meta ---------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("""SELECT value FROM meta WHERE key = ?""", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as db:
            db.execute("""INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)""", (key, value))

    def get_cursor(self, organisation: str = "") -> datetime | None:
        value = self.get_meta(cursor_key(organisation))
        return datetime.fromisoformat(value) if value else None

    # -- seen ids: the single organisation's in `seen`, each named one's in `seen_org` ----

    def unseen(self, event_ids: Sequence[int], organisation: str = "") -> set[int]:
        """The ids among `event_ids` not yet recorded as evaluated."""
        if not event_ids:
            return set()
        wanted = set(event_ids)
        seen: set[int] = set()
        ids = list(wanted)
        table, org_clause, org_args = _seen_table(organisation)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = _marks(len(chunk))
            rows = self._db.execute(
                f"SELECT event_id FROM {table} WHERE {org_clause}event_id IN ({marks})",
                [*org_args, *chunk],
            )
            seen.update(r[0] for r in rows)
        return wanted - seen

    def prune_seen(self, before: datetime, organisation: str = "") -> int:
        """Forget seen ids of events older than `before` (past the dedup horizon)."""
        table, org_clause, org_args = _seen_table(organisation)
        with self._transaction() as db:
            return db.execute(
                f"DELETE FROM {table} WHERE {org_clause}event_ts < ?", (*org_args, _ts(before))
            ).rowcount

    def seen_count(self) -> int:
        return int(
            self._db.execute(
                """SELECT (SELECT COUNT(*) FROM seen) + (SELECT COUNT(*) FROM seen_org)"""
            ).fetchone()[0]
        )

    # -- the batch transaction -----------------------------------------------------------

    def commit_batch(self, batch: Batch, now: datetime) -> int:
        """Record a batch atomically; returns how many new intents it put in the outbox (an
        intent whose idempotency key is there already is not planned twice)."""
        at = _ts(now)
        with self._transaction() as db:
            if batch.fence is not None:
                self._check_fence(db, batch, at)
            if batch.state.version is not None:
                self._check_rule_state_version(db, batch.state)
            try:
                if batch.organisation:
                    db.executemany(
                        """INSERT INTO seen_org (organisation, event_id, event_ts)
                        VALUES (?, ?, ?)""",
                        [(batch.organisation, event_id, _ts(ts)) for event_id, ts in batch.seen],
                    )
                else:
                    db.executemany(
                        """INSERT INTO seen (event_id, event_ts) VALUES (?, ?)""",
                        [(event_id, _ts(ts)) for event_id, ts in batch.seen],
                    )
            except sqlite3.IntegrityError:
                # Another instance (or process) recorded one of these events since the
                # batch was judged: judge it again, without those.
                raise StaleRuleState("events of the batch were recorded meanwhile") from None
            before = db.total_changes
            db.executemany(
                """INSERT OR IGNORE INTO outbox (idempotency_key, event_id, rule_id,
                action_index, kind, params, target, status, attempts, created_at, due_at,
                updated_at, lane) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)""",
                [
                    (
                        intent.idempotency_key,
                        intent.event_id,
                        intent.rule_id,
                        intent.action_index,
                        intent.kind,
                        orjson.dumps(intent.params).decode(),
                        orjson.dumps(intent.target).decode(),
                        intent.status.value,
                        at,
                        _ts(intent.due_at) if intent.due_at else at,
                        at,
                        lane_of(intent.kind, intent.target),
                    )
                    for intent in batch.intents
                ],
            )
            created = db.total_changes - before
            self._insert_audit(db, batch.audit, at)
            self._index_audit_by_sim(db)
            self._apply_rule_state(db, batch.state, at)
            db.executemany(
                """INSERT OR IGNORE INTO digest_events (rule_id, event_id, event_ts, payload)
                VALUES (?, ?, ?, ?)""",
                [(e.rule_id, e.event_id, _ts(e.event_ts), e.payload) for e in batch.digest_events],
            )
            for source, reason, payload in batch.quarantine:
                db.execute(
                    """INSERT INTO quarantine (at, source, reason, payload) SELECT ?, ?, ?, ?
                    WHERE NOT EXISTS (SELECT 1 FROM quarantine WHERE source = ? AND payload = ?)""",
                    (at, source, reason, payload, source, payload),
                )
            if batch.cursor is not None:
                db.execute(
                    """INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)""",
                    (cursor_key(batch.organisation), batch.cursor.isoformat()),
                )
        return created

    @staticmethod
    def _insert_audit(db: sqlite3.Connection, rows: Iterable[AuditRow], now: float) -> None:
        db.executemany(
            """INSERT INTO audit (at, event_id, rule_id, action, outcome, detail, sim_id,
            endpoint_id, iccid, intent_id, event_ts, steps, organisation)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
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
                    r.event_ts,
                    steps_text(r.steps),
                    r.organisation or None,
                )
                for r in rows
            ],
        )

    def _index_audit_by_sim(self, db: sqlite3.Connection) -> None:
        """Bring `audit_by_sim` up to date once `audit_by_sim_every` rows wait for it.

        In bulk and in key order, each page of the table is written once per run, however
        many rows land on it; `audit_rows(iccid=...)` reads the rows not yet in it directly."""
        row = db.execute(
            """SELECT (SELECT MAX(id) FROM audit), (SELECT value FROM meta WHERE key = ?)""",
            (_AUDIT_BY_SIM_UPTO,),
        ).fetchone()
        newest, upto = int(row[0] or 0), int(row[1] or 0)
        if newest - upto < self.audit_by_sim_every:
            return
        started = time.perf_counter()
        added = db.execute(
            """INSERT OR IGNORE INTO audit_by_sim (iccid, audit_id) SELECT iccid, id FROM audit
            WHERE id > ? AND id <= ? AND iccid IS NOT NULL ORDER BY iccid, id""",
            (upto, newest),
        ).rowcount
        db.execute(
            """INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)""",
            (_AUDIT_BY_SIM_UPTO, str(newest)),
        )
        seconds = time.perf_counter() - started
        if seconds > 1.0:  # the first batch after an upgrade indexes the whole audit log
            _log.info("audit log indexed by SIM", rows=added, seconds=round(seconds, 1))

    # -- rule state: windows, throttles, guards, overrides, cancellable follow-ups --------

    def rule_state_version(self) -> int:
        """Bumped by anyone but the pipeline that changes rule state (`rules resume`)."""
        value = self.get_meta(_RULE_STATE_VERSION)
        return int(value) if value else 0

    @staticmethod
    def _check_rule_state_version(db: sqlite3.Connection, state: RuleStateChanges) -> None:
        """Refuse a batch judged on a rule-state version that is no longer current; one
        that changes the rules' state makes a new version (what another instance has cached
        of the old one is then reloaded)."""
        row = db.execute(
            """SELECT value FROM meta WHERE key = ?""", (_RULE_STATE_VERSION,)
        ).fetchone()
        current = int(row[0]) if row else 0
        if current != state.version:
            raise StaleRuleState("rule state changed while the batch was judged")
        if state.changes_state():
            state.version = current + 1
            db.execute(
                """INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)""",
                (_RULE_STATE_VERSION, str(state.version)),
            )

    @staticmethod
    def _check_fence(db: sqlite3.Connection, batch: Batch, at: float) -> None:
        fence = batch.fence
        assert fence is not None
        row = db.execute(
            """SELECT holder, token, expires_at FROM leases WHERE name = ?""", (fence.name,)
        ).fetchone()
        if row is None or row[0] != fence.holder or row[1] != fence.token or row[2] < at:
            raise LeaseLost(
                f"the {fence.name} lease moved on (token {fence.token} is no longer current):"
                " this batch is not recorded"
            )

    def window(self, rule_id: str, key: str) -> list[float]:
        row = self._db.execute(
            """SELECT entries FROM rule_windows WHERE rule_id = ? AND key = ?""", (rule_id, key)
        ).fetchone()
        return list(orjson.loads(row[0])) if row else []

    def has_windows_or_throttles(self) -> bool:
        row = self._db.execute(
            """SELECT EXISTS (SELECT 1 FROM rule_windows)
            OR EXISTS (SELECT 1 FROM rule_throttles)"""
        ).fetchone()
        return bool(row[0])

    def throttle_until(self, rule_id: str, key: str) -> float | None:
        row = self._db.execute(
            """SELECT until FROM rule_throttles WHERE rule_id = ? AND key = ?""", (rule_id, key)
        ).fetchone()
        return float(row[0]) if row else None

    def guard_entries(self, scope: str) -> list[float]:
        row = self._db.execute(
            """SELECT entries FROM rule_guards WHERE scope = ?""", (scope,)
        ).fetchone()
        return list(orjson.loads(row[0])) if row else []

    def rule_overrides(self) -> dict[str, RuleOverride]:
        rows = self._db.execute(
            """SELECT rule_id, mode, reason, since, event_id FROM rule_overrides ORDER BY rule_id"""
        )
        return {
            rule_id: RuleOverride(rule_id, mode, reason, _dt(since), event_id)
            for rule_id, mode, reason, since, event_id in rows
        }

    def cancellable_follow_ups(self) -> list[FollowUpKey]:
        """Follow-ups with `cancel_if` that have not run yet (shadow ones included)."""
        rows = self._db.execute(
            """SELECT f.idempotency_key, o.rule_id, o.action_index, o.event_id, f.key_path,
            f.key, f.planned_at, o.due_at, f.shadow FROM follow_up_keys f
            JOIN outbox o ON o.idempotency_key = f.idempotency_key
            WHERE o.status IN (?, ?) ORDER BY o.id""",
            (IntentStatus.PENDING.value, IntentStatus.SHADOW.value),
        )
        return [
            FollowUpKey(
                idempotency_key=row[0],
                rule_id=row[1],
                action_index=row[2],
                event_id=row[3],
                key_path=row[4],
                key=row[5],
                planned_at=_dt(row[6]),
                due_at=_dt(row[7]),
                shadow=bool(row[8]),
            )
            for row in rows
        ]

    def status_actions(
        self, target: str, kinds: Sequence[str], since: float, until: float
    ) -> list[OwnStatusAction]:
        marks = _marks(len(kinds))
        # The statuses written out, not bound: only then can SQLite use the partial index.
        rows = self._db.execute(
            f"""SELECT kind, rule_id, idempotency_key, updated_at, id FROM outbox
            WHERE lane = ? AND status IN ('done', 'running') AND kind IN ({marks})
            AND updated_at BETWEEN ? AND ? ORDER BY id""",
            (target, *kinds, since, until),
        )
        return [OwnStatusAction(target, *row) for row in rows]

    def absence_marks(self) -> list[AbsenceMark]:
        rows = self._db.execute(
            """SELECT rule_id, key, last_seen, fired, seen, pending, last_event FROM absence_keys
            ORDER BY rule_id, key"""
        )
        return [
            AbsenceMark(r, k, last, bool(fired), bool(seen), tuple(orjson.loads(p)), event)
            for r, k, last, fired, seen, p, event in rows
        ]

    def guard_summary(self) -> dict[str, tuple[list[float], int]]:
        """Per guard scope: its entries, and per rule the number of held intents."""
        scopes: dict[str, tuple[list[float], int]] = {
            scope: (list(orjson.loads(entries)), 0)
            for scope, entries in self._db.execute("""SELECT scope, entries FROM rule_guards""")
        }
        held = self._db.execute(
            """SELECT rule_id, COUNT(*) FROM outbox WHERE status = ? GROUP BY rule_id""",
            (IntentStatus.HELD.value,),
        )
        for rule_id, count in held:
            entries = scopes.get(rule_id, ([], 0))[0]
            scopes[rule_id] = (entries, int(count))
        return scopes

    def resume_rule(
        self,
        rule_id: str,
        *,
        now: datetime,
        release_held: bool = False,
        by: str = "an operator",
    ) -> ResumeResult | None:
        """Undo a guard trip: the rule acts again with an empty guard window. Held intents
        stay held unless `release_held`. None when the rule was not switched by the guard."""
        at = _ts(now)
        with self._transaction() as db:
            row = db.execute(
                """SELECT rule_id, mode, reason, since, event_id FROM rule_overrides
                WHERE rule_id = ?""",
                (rule_id,),
            ).fetchone()
            if row is None:
                return None
            override = RuleOverride(row[0], row[1], row[2], _dt(row[3]), row[4])
            db.execute("""DELETE FROM rule_overrides WHERE rule_id = ?""", (rule_id,))
            db.execute("""DELETE FROM rule_guards WHERE scope = ?""", (rule_id,))
            released = 0
            if release_held:
                released = db.execute(
                    """UPDATE outbox SET status = ?, attempts = 0, due_at = MAX(due_at, ?),
                    updated_at = ? WHERE (rule_id = ? OR lane = ?) AND status = ?""",
                    (IntentStatus.PENDING.value, at, at, rule_id, rule_id, IntentStatus.HELD.value),
                ).rowcount
            still_held = db.execute(
                """SELECT COUNT(*) FROM outbox WHERE (rule_id = ? OR lane = ?) AND status = ?""",
                (rule_id, rule_id, IntentStatus.HELD.value),
            ).fetchone()[0]
            detail = f"resumed by {by}; {released} held actions released"
            self._insert_audit(db, [AuditRow(None, rule_id, None, "resumed", detail)], at)
            db.execute(
                """INSERT INTO meta (key, value) VALUES (?, '1') ON CONFLICT (key)
                DO UPDATE SET value = CAST(value AS INTEGER) + 1""",
                (_RULE_STATE_VERSION,),
            )
        return ResumeResult(override, released, int(still_held))

    @staticmethod
    def _apply_counters(db: sqlite3.Connection, state: RuleStateChanges) -> None:
        """Threshold windows, throttle marks and guard entries after the batch."""
        if state.windows:
            kept = [(r, k, orjson.dumps(e).decode(), x) for (r, k), (e, x) in state.windows.items()]
            db.executemany(
                """INSERT OR REPLACE INTO rule_windows (rule_id, key, entries, expires)
                VALUES (?, ?, ?, ?)""",
                [row for row in kept if row[2] != "[]"],
            )
            db.executemany(
                """DELETE FROM rule_windows WHERE rule_id = ? AND key = ?""",
                [(r, k) for r, k, entries, _ in kept if entries == "[]"],
            )
        if state.throttles:
            db.executemany(
                """INSERT OR REPLACE INTO rule_throttles (rule_id, key, until) VALUES (?, ?, ?)""",
                [(r, k, until) for (r, k), until in state.throttles.items()],
            )
        if state.guards:
            db.executemany(
                """INSERT OR REPLACE INTO rule_guards (scope, entries) VALUES (?, ?)""",
                [(scope, orjson.dumps(e).decode()) for scope, e in state.guards.items()],
            )
        if state.absences:
            marks = [m for m in state.absences.values() if m is not None]
            db.executemany(
                """INSERT OR REPLACE INTO absence_keys (rule_id, key, last_seen, fired, seen,
                pending, last_event) VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [
                    (
                        m.rule_id,
                        m.key,
                        m.last_seen,
                        int(m.fired),
                        int(m.seen),
                        orjson.dumps(m.pending).decode(),
                        m.last_event,
                    )
                    for m in marks
                ],
            )
            db.executemany(
                """DELETE FROM absence_keys WHERE rule_id = ? AND key = ?""",
                [slot for slot, m in state.absences.items() if m is None],
            )

    def _apply_rule_state(
        self, db: sqlite3.Connection, state: RuleStateChanges, now: float
    ) -> None:
        self._apply_counters(db, state)
        db.executemany(
            """INSERT OR REPLACE INTO rule_overrides (rule_id, mode, reason, since, event_id, at)
            VALUES (?, ?, ?, ?, ?, ?)""",
            [(o.rule_id, o.mode, o.reason, _ts(o.since), o.event_id, now) for o in state.overrides],
        )
        db.executemany(
            """INSERT OR IGNORE INTO follow_up_keys (idempotency_key, key_path, key, planned_at,
            shadow) VALUES (?, ?, ?, ?, ?)""",
            [
                (f.idempotency_key, f.key_path, f.key, _ts(f.planned_at), int(f.shadow))
                for f in state.follow_ups
            ],
        )
        for cancel in state.cancels:
            # After the intents of this batch are in: a follow-up may be cancelled by an
            # event of the same batch that planned it.
            if cancel.shadow:
                hit = True
            else:
                hit = (
                    db.execute(
                        """UPDATE outbox SET status = ?, updated_at = ?
                        WHERE idempotency_key = ? AND status = ?""",
                        (
                            IntentStatus.CANCELLED.value,
                            now,
                            cancel.idempotency_key,
                            IntentStatus.PENDING.value,
                        ),
                    ).rowcount
                    > 0
                )
            audit = cancel.audit if hit else cancel.too_late
            intent_id = db.execute(
                """SELECT id FROM outbox WHERE idempotency_key = ?""", (cancel.idempotency_key,)
            ).fetchone()
            if intent_id is not None:
                audit = replace(audit, intent_id=intent_id[0])
            self._insert_audit(db, [audit], now)
            db.execute(
                """DELETE FROM follow_up_keys WHERE idempotency_key = ?""",
                (cancel.idempotency_key,),
            )
        if state.prune_before is not None:
            before = state.prune_before
            db.execute("""DELETE FROM rule_windows WHERE expires < ?""", (before,))
            db.execute("""DELETE FROM rule_throttles WHERE until < ?""", (before,))
            # Driven by the few waiting follow-ups, each looked up by key: written as a join,
            # SQLite scanned the whole outbox instead, which grows with every intent.
            db.execute(
                """DELETE FROM follow_up_keys WHERE EXISTS (SELECT 1 FROM outbox o
                WHERE o.idempotency_key = follow_up_keys.idempotency_key
                AND (o.due_at < ? OR o.status NOT IN (?, ?)))""",
                (before, IntentStatus.PENDING.value, IntentStatus.SHADOW.value),
            )

    # -- the outbox ----------------------------------------------------------------------

    def due_intents(
        self,
        now: datetime,
        limit: int = 100,
        *,
        kinds: Sequence[str] | None = None,
        except_kinds: Sequence[str] = (),
        owner: str | None = None,
        claim_until: datetime | None = None,
    ) -> list[Intent]:
        """Open intents whose time has come, oldest first, of `kinds` (all when None) but
        not of `except_kinds`, none behind an earlier one on its lane that is due or was
        attempted (a follow-up due tomorrow holds nothing up; an action waiting for its
        retry does). `running` ones were interrupted by a crash or a shutdown and are due
        again. With `owner`, another owner's claim that has not run out keeps its intent
        out (`start_attempt` claims); with `claim_until` too, the intents given are claimed
        for `owner` until then (an own claim keeps a later end) in the same transaction."""
        at = _ts(now)
        where = """o.status IN (?, ?) AND o.due_at <= ?
            AND (o.claimed_by IS NULL OR o.claimed_until < ? OR o.claimed_by = ?)
            AND (o.lane IS NULL OR NOT EXISTS (SELECT 1 FROM outbox e WHERE e.lane = o.lane
            AND e.id < o.id AND e.status IN (?, ?) AND (e.due_at <= ? OR e.attempts > 0)))"""
        args: list[Any] = [*_OPEN_STATUSES, at, at, owner, *_OPEN_STATUSES, at]
        if kinds is not None:
            where += f" AND o.kind IN ({_marks(len(kinds))})"  # SQLite: `IN ()` is false
            args.extend(kinds)
        if except_kinds:
            where += f" AND o.kind NOT IN ({_marks(len(except_kinds))})"
            args.extend(except_kinds)
        query = f"SELECT o.* FROM outbox o WHERE {where} ORDER BY o.id LIMIT ?"
        if claim_until is None or owner is None:
            rows = self._db.execute(query, (*args, limit)).fetchall()
            return [self._intent(row) for row in rows]
        if not self._db.execute(query, (*args, limit)).fetchone():
            return []  # an idle look writes nothing
        with self._transaction() as db:
            rows = db.execute(query, (*args, limit)).fetchall()
            until = _ts(claim_until)
            db.executemany(
                """UPDATE outbox SET claimed_until = CASE WHEN claimed_by = ?
                THEN MAX(COALESCE(claimed_until, 0), ?) ELSE ? END, claimed_by = ?
                WHERE id = ?""",
                [(owner, until, until, owner, row[0]) for row in rows],
            )
        return [self._intent(row) for row in rows]

    def renew_claims(self, owner: str, intent_ids: Sequence[int], until: datetime) -> int:
        """Extend `owner`'s claims on `intent_ids` (the attempts it runs) to `until`."""
        if not intent_ids:
            return 0
        marks = _marks(len(intent_ids))
        with self._transaction() as db:
            return int(
                db.execute(
                    f"UPDATE outbox SET claimed_until = ? WHERE claimed_by = ? AND id IN ({marks})",
                    (_ts(until), owner, *intent_ids),
                ).rowcount
            )

    def next_due(self, after: datetime) -> datetime | None:
        """When the first open intent falls due after `after` (those due by then, and the
        ones running, are not counted)."""
        row = self._db.execute(
            """SELECT MIN(due_at) FROM outbox WHERE status IN (?, ?) AND due_at > ?""",
            (*_OPEN_STATUSES, _ts(after)),
        ).fetchone()
        return _dt(row[0]) if row and row[0] is not None else None

    def retrying_intents(self) -> list[Intent]:
        """Open intents that were attempted already (waiting for a retry, or interrupted):
        what came after them on the same SIM or endpoint waits for them."""
        rows = self._db.execute(
            """SELECT * FROM outbox WHERE status IN (?, ?) AND attempts > 0 ORDER BY id""",
            _OPEN_STATUSES,
        ).fetchall()
        return [self._intent(row) for row in rows]

    def start_attempt(
        self,
        intent_id: int,
        now: datetime,
        *,
        owner: str | None = None,
        claim_until: datetime | None = None,
    ) -> int | None:
        """Count an attempt *before* making it, so a crash mid-call is known on restart,
        and claim the intent for `owner` until `claim_until`. Returns the attempts counted
        against the retry budget (see `attempt_history`), or None when the intent is no
        longer open (a follow-up cancelled since it was read) or another owner's claim on it
        still runs."""
        at = _ts(now)
        until = _ts(claim_until) if claim_until is not None else None
        with self._transaction() as db:
            rows = db.execute(
                """UPDATE outbox SET attempts = attempts + 1, status = ?, updated_at = ?,
                claimed_by = ?, claimed_until = ?
                WHERE id = ? AND status IN (?, ?)
                AND (claimed_by IS NULL OR claimed_until < ? OR claimed_by IS ?)
                RETURNING attempts""",
                (
                    IntentStatus.RUNNING.value,
                    at,
                    owner,
                    until,
                    intent_id,
                    *_OPEN_STATUSES,
                    at,
                    owner,
                ),
            ).fetchall()
            if not rows:
                return None
            db.execute(
                """INSERT INTO intent_attempts (intent_id, total, first_at, last_at, deadline_from)
                VALUES (?, 1, ?, ?, ?) ON CONFLICT (intent_id) DO UPDATE SET
                total = total + 1, last_at = excluded.last_at""",
                (intent_id, at, at, at),
            )
        return int(rows[0][0])

    def attempt_history(self, intent_id: int) -> AttemptHistory | None:
        """Every attempt ever started for an intent; None if it never ran."""
        row = self._db.execute(
            """SELECT total, first_at, last_at, deadline_from FROM intent_attempts
            WHERE intent_id = ?""",
            (intent_id,),
        ).fetchone()
        if row is None:
            return None
        return AttemptHistory(int(row[0]), _dt(row[1]), _dt(row[2]), _dt(row[3]))

    def outcomes_on_endpoint(
        self, action: str, endpoint_id: int, since: datetime, *, excluding_intent: int
    ) -> list[str]:
        """Outcomes other intents of `action` recorded on one endpoint since `since`: how a
        non-repeatable action tells what its siblings did from what it may have done."""
        rows = self._db.execute(
            """SELECT outcome FROM audit WHERE endpoint_id = ? AND action = ? AND at >= ?
            AND intent_id IS NOT NULL AND intent_id != ?""",
            (endpoint_id, action, _ts(since), excluding_intent),
        )
        return [row[0] for row in rows]

    def finish_intent(
        self,
        intent: Intent,
        status: IntentStatus,
        *,
        now: datetime,
        error: str | None = None,
        due_at: datetime | None = None,
        audit: AuditRow | None = None,
        owner: str | None = None,
    ) -> bool:
        """Record an attempt's outcome and release the claim. Only an open intent (pending
        or running) changes, so one cancelled since it was read stays cancelled, and with
        `owner`, one another owner has claimed since (this one's claim ran out) is
        theirs; returns whether it changed."""
        at = _ts(now)
        with self._transaction() as db:
            changed = (
                db.execute(
                    """UPDATE outbox SET status = ?, last_error = ?, due_at = COALESCE(?, due_at),
                    updated_at = ?, claimed_by = NULL, claimed_until = NULL
                    WHERE id = ? AND status IN (?, ?)
                    AND (? IS NULL OR claimed_by IS NULL OR claimed_by = ?)""",
                    (
                        status.value,
                        error,
                        _ts(due_at) if due_at else None,
                        at,
                        intent.id,
                        *_OPEN_STATUSES,
                        owner,
                        owner,
                    ),
                ).rowcount
                > 0
            )
            if changed and audit is not None:
                self._insert_audit(db, [audit], at)
        return changed

    def get_intent(self, intent_id: int) -> Intent | None:
        row = self._db.execute("""SELECT * FROM outbox WHERE id = ?""", (intent_id,)).fetchone()
        return self._intent(row) if row else None

    def intents(self, status: IntentStatus | None = None, limit: int = 1000) -> list[Intent]:
        if status is None:
            rows = self._db.execute("""SELECT * FROM outbox ORDER BY id LIMIT ?""", (limit,))
        else:
            rows = self._db.execute(
                """SELECT * FROM outbox WHERE status = ? ORDER BY id LIMIT ?""",
                (status.value, limit),
            )
        return [self._intent(row) for row in rows.fetchall()]

    def requeue(self, intent_id: int, *, now: datetime, audit: AuditRow | None = None) -> bool:
        """Put a dead-lettered intent back in the queue with a fresh retry budget (attempts
        and deadline); its attempt history stays, so it still knows it may have run."""
        at = _ts(now)
        with self._transaction() as db:
            changed = (
                db.execute(
                    """UPDATE outbox SET status = ?, attempts = 0, due_at = ?, updated_at = ?
                    WHERE id = ? AND status = ?""",
                    (IntentStatus.PENDING.value, at, at, intent_id, IntentStatus.DEAD.value),
                ).rowcount
                > 0
            )
            if changed:
                db.execute(
                    """UPDATE intent_attempts SET deadline_from = ? WHERE intent_id = ?""",
                    (at, intent_id),
                )
                if audit is not None:
                    self._insert_audit(db, [audit], at)
        return changed

    def discard(
        self,
        intent_id: int,
        *,
        now: datetime,
        audit: AuditRow | None = None,
        from_status: IntentStatus = IntentStatus.DEAD,
    ) -> bool:
        """Give up on a dead-lettered (or held) intent for good (it stays in the outbox as
        discarded)."""
        at = _ts(now)
        with self._transaction() as db:
            changed = (
                db.execute(
                    """UPDATE outbox SET status = ?, updated_at = ? WHERE id = ? AND status = ?""",
                    (IntentStatus.DISCARDED.value, at, intent_id, from_status.value),
                ).rowcount
                > 0
            )
            if changed and audit is not None:
                self._insert_audit(db, [audit], at)
        return changed

    def release(self, intent_id: int, *, now: datetime, audit: AuditRow | None = None) -> bool:
        at = _ts(now)
        with self._transaction() as db:
            changed = (
                db.execute(
                    """UPDATE outbox SET status = ?, attempts = 0, due_at = MAX(due_at, ?),
                    updated_at = ? WHERE id = ? AND status = ?""",
                    (IntentStatus.PENDING.value, at, at, intent_id, IntentStatus.HELD.value),
                ).rowcount
                > 0
            )
            if changed and audit is not None:
                self._insert_audit(db, [audit], at)
        return changed

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
        ) = row[:14]  # then lane and claim, which the outbox's readers do not need
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

    # -- rule reload ---------------------------------------------------------------------

    def reset_rule_windows(self, rule_id: str) -> int:
        """Forget a rule's threshold windows and the keys its absence watches (its `when`,
        `condition`, `threshold` or `absence.per` changed, so what they counted no longer
        means the same). Bumps the rule-state version so a batch judged on the old state is
        judged again. Returns the windows and keys dropped."""
        with self._transaction() as db:
            dropped = db.execute(
                """DELETE FROM rule_windows WHERE rule_id = ?""", (rule_id,)
            ).rowcount
            dropped += db.execute(
                """DELETE FROM absence_keys WHERE rule_id = ?""", (rule_id,)
            ).rowcount
            db.execute(
                """INSERT INTO meta (key, value) VALUES (?, '1') ON CONFLICT (key)
                DO UPDATE SET value = CAST(value AS INTEGER) + 1""",
                (_RULE_STATE_VERSION,),
            )
        return int(dropped)

    # -- scheduled digests ---------------------------------------------------------------

    def digest_run_state(self, rule_id: str) -> tuple[datetime, datetime | None] | None:
        """(last completed run, fire time of an unfinished claim) or None if never started."""
        row = self._db.execute(
            """SELECT last_run, claimed_for FROM digest_runs WHERE rule_id = ?""", (rule_id,)
        ).fetchone()
        if row is None:
            return None
        return _dt(row[0]), _dt(row[1]) if row[1] is not None else None

    def start_digest(self, rule_id: str, now: datetime) -> None:
        """Record `now` as the first "last run" of a digest seen for the first time."""
        self._db.execute(
            """INSERT OR IGNORE INTO digest_runs (rule_id, last_run) VALUES (?, ?)""",
            (rule_id, _ts(now)),
        )

    def claim_digest(
        self, rule_id: str, fire_time: datetime, limit: int
    ) -> tuple[int, list[dict[str, Any]]]:
        """Take the collected events for the run at `fire_time`: their number and the first
        `limit` of them in (timestamp, id) order. Claiming the same fire time again (after a
        crash) returns the same events and takes no newer ones."""
        fire = _ts(fire_time)
        with self._transaction() as db:
            row = db.execute(
                """SELECT claimed_for FROM digest_runs WHERE rule_id = ?""", (rule_id,)
            ).fetchone()
            if row is None or row[0] != fire:
                db.execute(
                    """UPDATE digest_events SET run_at = ? WHERE rule_id = ?
                    AND (run_at IS NULL OR run_at < ?)""",
                    (fire, rule_id, fire),
                )
                db.execute(
                    """INSERT INTO digest_runs (rule_id, last_run, claimed_for) VALUES (?, 0, ?)
                    ON CONFLICT (rule_id) DO UPDATE SET claimed_for = excluded.claimed_for""",
                    (rule_id, fire),
                )
            count = db.execute(
                """SELECT COUNT(*) FROM digest_events WHERE rule_id = ? AND run_at = ?""",
                (rule_id, fire),
            ).fetchone()[0]
            rows = db.execute(
                """SELECT payload FROM digest_events WHERE rule_id = ? AND run_at = ?
                ORDER BY event_ts, event_id LIMIT ?""",
                (rule_id, fire, limit),
            ).fetchall()
        return int(count), [orjson.loads(payload) for (payload,) in rows]

    def finish_digest(self, rule_id: str, fire_time: datetime) -> None:
        """The run at `fire_time` is recorded (its intents are in the outbox): forget its
        events and make it the last run."""
        fire = _ts(fire_time)
        with self._transaction() as db:
            db.execute(
                """DELETE FROM digest_events WHERE rule_id = ? AND run_at = ?""", (rule_id, fire)
            )
            db.execute(
                """UPDATE digest_runs SET last_run = MAX(last_run, ?), claimed_for = NULL
                WHERE rule_id = ?""",
                (fire, rule_id),
            )

    def digest_backlog(self, rule_id: str) -> int:
        """Events collected for the rule's next digest run."""
        row = self._db.execute(
            """SELECT COUNT(*) FROM digest_events WHERE rule_id = ? AND run_at IS NULL""",
            (rule_id,),
        ).fetchone()
        return int(row[0])

    # -- reading for status, why and tests -----------------------------------------------

    def counts(self) -> dict[str, int]:
        out = {
            f"intents_{s}": n
            for s, n in self._db.execute("""SELECT status, COUNT(*) FROM outbox GROUP BY status""")
        }
        out["events_seen"] = self.seen_count()
        out["quarantined"] = int(
            self._db.execute("""SELECT COUNT(*) FROM quarantine""").fetchone()[0]
        )
        out["actions_not_planned"] = int(self._db.execute(_NOT_PLANNED).fetchone()[0])
        return out

    def audit_rows(
        self, *, event_id: int | None = None, iccid: str | None = None, limit: int = 10000
    ) -> list[dict[str, Any]]:
        if event_id is not None:
            query = """SELECT * FROM audit WHERE event_id = :event_id"""
        elif iccid is not None:
            # The rows in the SIM table, and the newer ones not in it yet; one statement, so
            # an indexing run in between cannot move the boundary between the two.
            query = """SELECT * FROM audit WHERE id IN
                (SELECT audit_id FROM audit_by_sim WHERE iccid = :iccid)
                UNION ALL SELECT * FROM audit WHERE iccid = :iccid
                AND id > COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = :upto), 0)"""
        else:
            query = """SELECT * FROM audit"""
        cursor = self._db.execute(
            query + """ ORDER BY id LIMIT :limit""",
            {"event_id": event_id, "iccid": iccid, "upto": _AUDIT_BY_SIM_UPTO, "limit": limit},
        )
        return _dicts(cursor)

    def latest_audit_rows(self, limit: int = 50) -> list[dict[str, Any]]:
        cursor = self._db.execute("""SELECT * FROM audit ORDER BY id DESC LIMIT ?""", (limit,))
        return _dicts(cursor)

    def quarantined(self, limit: int = 100) -> list[dict[str, Any]]:
        cursor = self._db.execute("""SELECT * FROM quarantine ORDER BY id DESC LIMIT ?""", (limit,))
        return _dicts(cursor)

    def intents_for_events(self, event_ids: Sequence[int]) -> list[Intent]:
        """Every intent planned for these events, in planning order (for `why`)."""
        found: list[Intent] = []
        ids = list(dict.fromkeys(event_ids))
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = _marks(len(chunk))
            rows = self._db.execute(f"SELECT * FROM outbox WHERE event_id IN ({marks})", chunk)
            found.extend(self._intent(row) for row in rows.fetchall())
        return sorted(found, key=lambda intent: intent.id or 0)

    def seen_at(self, event_id: int, organisation: str = "") -> datetime | None:
        """The timestamp of a seen event, while it is within the dedup horizon."""
        table, org_clause, org_args = _seen_table(organisation)
        row = self._db.execute(
            f"SELECT event_ts FROM {table} WHERE {org_clause}event_id = ?", (*org_args, event_id)
        )
        found = row.fetchone()
        return _dt(found[0]) if found else None

    # -- retention: pruning old rows, summarizing repetitive decisions ------------------
    #
    # Two jobs keep the store from growing without bound (engine/retention.py runs them in
    # the background, one short transaction at a time). Pruning deletes what is older than
    # the retention period: audit rows, finished intents, quarantined records, summaries.
    # Summarizing keeps, per SIM and rule, only the newest decisions that did nothing
    # ("below threshold", "throttled": a threshold rule on location updates writes two rows
    # for every event) and counts the older ones per day in `audit_summary`, so `why` still
    # explains the last ones in full and says how many came before.

    def prune_older_than(self, before: datetime, limit: int) -> int:
        """Delete up to `limit` each of the oldest audit rows, finished intents, quarantined
        records and decision summaries written before `before`, in one short transaction.
        Returns how many rows went (0: nothing older is left)."""
        cut = _ts(before)
        with self._transaction() as db:
            # The oldest rows first, by id (the order they were written in): a lookup of
            # the first `limit` rows, not a scan for old ones, which would read the whole
            # table once none are left.
            audit = db.execute(
                """SELECT id, iccid, rule_id FROM audit WHERE id IN
                (SELECT id FROM audit ORDER BY id LIMIT ?) AND at < ?""",
                (limit, cut),
            ).fetchall()
            self._delete_audit(db, audit)
            intents = db.execute(
                f"""SELECT id, idempotency_key FROM outbox WHERE status IN ({_FINISHED_MARKS})
                AND due_at < ? AND updated_at < ? LIMIT ?""",
                (*_FINISHED_STATUSES, cut, cut, limit),
            ).fetchall()
            db.executemany("""DELETE FROM outbox WHERE id = ?""", [(i,) for i, _ in intents])
            db.executemany(
                """DELETE FROM intent_attempts WHERE intent_id = ?""", [(i,) for i, _ in intents]
            )
            db.executemany(
                """DELETE FROM follow_up_keys WHERE idempotency_key = ?""",
                [(k,) for _, k in intents],
            )
            quarantined = db.execute(
                """DELETE FROM quarantine
                WHERE id IN (SELECT id FROM quarantine ORDER BY id LIMIT ?) AND at < ?""",
                (limit, cut),
            ).rowcount
            summaries = db.execute(
                """DELETE FROM audit_summary WHERE rowid IN (SELECT rowid FROM audit_summary
                WHERE day < ? LIMIT ?)""",
                (_day(cut), limit),
            ).rowcount
        return len(audit) + len(intents) + int(quarantined) + int(summaries)

    @staticmethod
    def _delete_audit(db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        """Delete audit rows (id, iccid, rule_id) and their entries in the SIM tables."""
        db.executemany("""DELETE FROM audit WHERE id = ?""", [(row[0],) for row in rows])
        by_sim = [(row[1], row[0]) for row in rows if row[1] is not None]
        db.executemany("""DELETE FROM audit_by_sim WHERE iccid = ? AND audit_id = ?""", by_sim)
        db.executemany(
            """DELETE FROM audit_recent WHERE iccid = ? AND rule_id = ? AND audit_id = ?""",
            [(row[1], row[2], row[0]) for row in rows if row[1] is not None and row[2]],
        )

    def summarize_decisions(self, keep: int, span: int) -> int | None:
        """Look at the next `span` audit rows not yet looked at: per SIM and rule, keep the
        newest `keep` decisions that did nothing in full and fold the older ones into the
        day's count in `audit_summary`. One short transaction; returns the decisions folded,
        or None when every audit row has been looked at."""
        with self._transaction() as db:
            row = db.execute(
                """SELECT (SELECT MAX(id) FROM audit), (SELECT value FROM meta WHERE key = ?)""",
                (_SUMMARIZED_UPTO,),
            ).fetchone()
            newest, upto = int(row[0] or 0), int(row[1] or 0)
            if upto >= newest:
                return None
            until = min(newest, upto + span)
            fresh = f"""SELECT iccid, rule_id, id, event_id FROM audit
                WHERE id > :upto AND id <= :until
                AND outcome IN ({_SUMMARIZED_NAMES}) AND iccid IS NOT NULL
                AND rule_id IS NOT NULL AND event_id IS NOT NULL"""
            bounds = {"upto": upto, "until": until, **_SUMMARIZED_PARAMS}
            db.execute(
                """INSERT OR IGNORE INTO audit_recent (iccid, rule_id, audit_id, event_id) """
                + fresh,
                bounds,
            )
            # Of the SIM-and-rule pairs this span touched, the decisions beyond the newest.
            older = db.execute(
                f"""SELECT iccid, rule_id, audit_id, event_id FROM (SELECT *, ROW_NUMBER() OVER
                (PARTITION BY iccid, rule_id ORDER BY audit_id DESC) AS newer FROM
                audit_recent WHERE (iccid, rule_id) IN (SELECT iccid, rule_id FROM
                ({fresh}))) WHERE newer > :keep""",
                {**bounds, "keep": keep},
            ).fetchall()
            self._fold_decisions(db, older)
            db.execute(
                """INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)""",
                (_SUMMARIZED_UPTO, str(until)),
            )
        return len(older)

    def _fold_decisions(self, db: sqlite3.Connection, older: list[tuple[Any, ...]]) -> None:
        """Count decisions (iccid, rule_id, audit_id, event_id) in their day's summary and
        delete their rows: the decision and the `matched` row before it."""
        wanted = {(event_id, rule_id) for _, rule_id, _, event_id in older}
        decisions = {audit_id for _, _, audit_id, _ in older}
        rows: list[tuple[Any, ...]] = []
        event_ids = sorted({event_id for event_id, _ in wanted})
        for start in range(0, len(event_ids), 500):
            chunk = event_ids[start : start + 500]
            rows.extend(
                row
                for row in db.execute(
                    f"""SELECT id, iccid, rule_id, outcome, at, event_ts, event_id FROM audit
                    WHERE event_id IN ({_marks(len(chunk))}) AND intent_id IS NULL
                    AND outcome IN ('matched', {_SUMMARIZED_MARKS})""",
                    (*chunk, *SUMMARIZED_OUTCOMES),
                )
                if (row[6], row[2]) in wanted
            )
        counts: dict[tuple[str, str, str, str], list[Any]] = {}
        for audit_id, iccid, rule_id, outcome, at, event_ts, _ in rows:
            if audit_id not in decisions:
                continue  # the `matched` row: deleted, not counted
            key = (iccid, rule_id, outcome, _day(at))
            found = counts.setdefault(key, [0, event_ts, event_ts, at])
            found[0] += 1
            found[1] = _least(found[1], event_ts)
            found[2] = _greatest(found[2], event_ts)
            found[3] = max(found[3], at)
        db.executemany(
            """INSERT INTO audit_summary (iccid, rule_id, outcome, day, count, first_ts, last_ts,
            last_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (iccid, rule_id, outcome, day)
            DO UPDATE SET count = count + excluded.count,
            first_ts = MIN(COALESCE(first_ts, excluded.first_ts), excluded.first_ts),
            last_ts = MAX(COALESCE(last_ts, excluded.last_ts), excluded.last_ts),
            last_at = MAX(last_at, excluded.last_at)""",
            [(*key, *values) for key, values in counts.items()],
        )
        self._delete_audit(db, rows)
        db.executemany(
            """DELETE FROM audit_recent WHERE iccid = ? AND rule_id = ? AND audit_id = ?""",
            [(iccid, rule_id, audit_id) for iccid, rule_id, audit_id, _ in older],
        )

    def rule_activity(self, since: datetime) -> list[dict[str, Any]]:
        cursor = self._db.execute(_RULE_ACTIVITY, (since.timestamp(),))
        return _dicts(cursor)

    def decision_summaries(self, iccid: str) -> list[dict[str, Any]]:
        """The decisions of one SIM folded into counts, per rule and outcome (for `why`)."""
        cursor = self._db.execute(
            """SELECT rule_id, outcome, SUM(count) AS count, MIN(first_ts) AS first_ts,
            MAX(last_ts) AS last_ts FROM audit_summary WHERE iccid = ?
            GROUP BY rule_id, outcome ORDER BY rule_id, outcome""",
            (iccid,),
        )
        return _dicts(cursor)

    def disk_bytes(self) -> int:
        """The store's size on disk: the database file and its write-ahead log."""
        if self.path == ":memory:":
            return 0
        total = 0
        for suffix in ("", "-wal"):
            with suppress(OSError):  # no WAL file between checkpoints is no bytes
                total += Path(self.path + suffix).stat().st_size
        return total

    def oldest_kept(self) -> dict[str, datetime | None]:
        """When the oldest row still kept of each kind was written."""
        found: dict[str, datetime | None] = {}
        for name, query in (
            ("audit", """SELECT at FROM audit ORDER BY id LIMIT 1"""),
            ("intent", """SELECT MIN(created_at) FROM outbox"""),
            ("quarantine", """SELECT at FROM quarantine ORDER BY id LIMIT 1"""),
        ):
            row = self._db.execute(query).fetchone()
            found[name] = _dt(row[0]) if row and row[0] is not None else None
        return found

    # -- running together: leases, members (engine.ports.Leases, Members) -------------------

    def acquire_lease(self, name: str, holder: str, ttl: timedelta, now: datetime) -> int | None:
        at = _ts(now)
        with self._transaction() as db:
            row = db.execute(
                """SELECT holder, token, expires_at FROM leases WHERE name = ?""", (name,)
            ).fetchone()
            if row is None:
                token = 1
                db.execute(
                    """INSERT INTO leases (name, holder, token, expires_at, changed_at)
                    VALUES (?, ?, ?, ?, ?)""",
                    (name, holder, token, at + ttl.total_seconds(), at),
                )
                return token
            current, token, expires = row
            if current == holder and expires >= at:
                db.execute(
                    """UPDATE leases SET expires_at = ? WHERE name = ?""",
                    (at + ttl.total_seconds(), name),
                )
                return int(token)
            if current is not None and current != holder and expires >= at:
                return None
            token = int(token) + 1  # a new holder, or one whose lease ran out: a new token
            db.execute(
                """UPDATE leases SET holder = ?, token = ?, expires_at = ?, changed_at = ?
                WHERE name = ?""",
                (holder, token, at + ttl.total_seconds(), at, name),
            )
            return token

    def release_lease(self, name: str, holder: str, now: datetime) -> None:
        with self._transaction() as db:
            db.execute(
                """UPDATE leases SET holder = NULL, expires_at = ?, changed_at = ?
                WHERE name = ? AND holder = ?""",
                (_ts(now), _ts(now), name, holder),
            )

    def lease(self, name: str) -> LeaseState | None:
        row = self._db.execute(
            """SELECT holder, token, expires_at, changed_at FROM leases WHERE name = ?""", (name,)
        ).fetchone()
        if row is None:
            return None
        changed = _dt(row[3]) if row[3] is not None else None
        return LeaseState(name, row[0], int(row[1]), _dt(row[2]), changed)

    def heartbeat(self, member: Member) -> None:
        with self._transaction() as db:
            db.execute(
                """INSERT OR REPLACE INTO members (instance_id, host, pid, version, rules_hash,
                started_at, heartbeat_at, leader) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    member.instance_id,
                    member.host,
                    member.pid,
                    member.version,
                    member.rules_hash,
                    _ts(member.started_at),
                    _ts(member.heartbeat_at),
                    int(member.leader),
                ),
            )

    def members(self) -> list[Member]:
        rows = self._db.execute(
            """SELECT instance_id, host, pid, version, rules_hash, started_at, heartbeat_at, leader
            FROM members ORDER BY instance_id"""
        ).fetchall()
        return [
            Member(r[0], r[1], int(r[2]), r[3], r[4], _dt(r[5]), _dt(r[6]), bool(r[7]))
            for r in rows
        ]

    def forget_member(self, instance_id: str) -> None:
        with self._transaction() as db:
            db.execute("""DELETE FROM members WHERE instance_id = ?""", (instance_id,))

    # -- silences ---------------------------------------------------------------------------

    def add_silence(self, silence: Silence) -> Silence:
        with self._transaction() as db:
            cursor = db.execute(
                """INSERT INTO silences (matchers, comment, created_by, created_at, ends_at)
                VALUES (?, ?, ?, ?, ?)""",
                (
                    orjson.dumps(silence.matchers).decode(),
                    silence.comment,
                    silence.created_by,
                    _ts(silence.created_at),
                    _ts(silence.ends_at),
                ),
            )
        return replace(silence, id=cursor.lastrowid)

    def silences(self, ending_after: datetime) -> list[Silence]:
        rows = self._db.execute(
            f"{_SILENCE_SELECT} WHERE ends_at > ? ORDER BY id DESC", (_ts(ending_after),)
        ).fetchall()
        return [_silence(row) for row in rows]

    def expire_silence(self, silence_id: int, by: str, now: datetime) -> Silence | None:
        with self._transaction() as db:
            db.execute(
                """UPDATE silences SET ends_at = ?, expired_by = ?, expired_at = ?
                WHERE id = ? AND ends_at > ?""",
                (_ts(now), by, _ts(now), silence_id, _ts(now)),
            )
            row = db.execute(f"{_SILENCE_SELECT} WHERE id = ?", (silence_id,)).fetchone()
        return None if row is None else _silence(row)


# Actions that could not be planned for their event (a `suspend_sim` on an event without a
# SIM): failed for good, with no intent in the outbox, only their audit row.
_NOT_PLANNED = (
    "SELECT COUNT(*) FROM audit"
    " WHERE outcome = 'failed' AND action IS NOT NULL AND intent_id IS NULL"
)

_SILENCE_SELECT = (
    "SELECT id, matchers, comment, created_by, created_at, ends_at, expired_by, expired_at"
    " FROM silences"
)


def _silence(row: tuple[Any, ...]) -> Silence:
    return Silence(
        matchers=tuple((str(name), str(value)) for name, value in orjson.loads(row[1])),
        comment=row[2],
        created_by=row[3],
        created_at=_dt(row[4]),
        ends_at=_dt(row[5]),
        id=int(row[0]),
        expired_by=row[6],
        expired_at=None if row[7] is None else _dt(row[7]),
    )


# Decisions that did nothing, which a rule on a busy event type writes for most events.
SUMMARIZED_OUTCOMES = ("below_threshold", "throttled", "seen")

_SUMMARIZED_MARKS = ", ".join("?" * len(SUMMARIZED_OUTCOMES))
_SUMMARIZED_PARAMS = {f"outcome{n}": outcome for n, outcome in enumerate(SUMMARIZED_OUTCOMES)}
_SUMMARIZED_NAMES = ", ".join(f":{name}" for name in _SUMMARIZED_PARAMS)
_SUMMARIZED_UPTO = "audit_summarized_upto"
_FINISHED_STATUSES = tuple(
    s.value
    for s in (
        IntentStatus.DONE,
        IntentStatus.FAILED,
        IntentStatus.DISCARDED,
        IntentStatus.SHADOW,
        IntentStatus.CANCELLED,
    )
)
_FINISHED_MARKS = ", ".join("?" * len(_FINISHED_STATUSES))
# The outbox's columns for lanes and claims, added to a store made before them (step 4).
_CLUSTER_COLUMNS = (("lane", "TEXT"), ("claimed_by", "TEXT"), ("claimed_until", "REAL"))
_CLUSTER_SCHEMA = """
CREATE INDEX IF NOT EXISTS outbox_open_by_lane ON outbox (lane, id)
    WHERE status IN ('pending', 'running');
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT,
    token INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    changed_at REAL
);
CREATE TABLE IF NOT EXISTS members (
    instance_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    version TEXT NOT NULL,
    rules_hash TEXT NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    leader INTEGER NOT NULL
);
"""
_RETENTION_SCHEMA = """
-- The newest summarizable decisions per SIM and rule (see `summarize_decisions`).
CREATE TABLE IF NOT EXISTS audit_recent (
    iccid TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    audit_id INTEGER NOT NULL,
    event_id INTEGER NOT NULL,
    PRIMARY KEY (iccid, rule_id, audit_id)
) WITHOUT ROWID;
-- Older ones, counted per SIM, rule, outcome and day (UTC) of the decision.
CREATE TABLE IF NOT EXISTS audit_summary (
    iccid TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    day TEXT NOT NULL,
    count INTEGER NOT NULL,
    first_ts REAL,
    last_ts REAL,
    last_at REAL NOT NULL,
    UNIQUE (iccid, rule_id, outcome, day)
);
CREATE INDEX IF NOT EXISTS audit_summary_by_day ON audit_summary (day);
"""


def _least(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _greatest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _day(at: float) -> str:
    return _day_of(int(at // 86400))


@lru_cache(maxsize=64)
def _day_of(days: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=days)).strftime("%Y-%m-%d")


# -- the schema, step by step (engine.store.migrations) -----------------------------------


# The echo lookup (`status_actions`): the intents done on one SIM or endpoint, by time.
_DONE_BY_LANE = """
CREATE INDEX IF NOT EXISTS outbox_acted_by_lane ON outbox (lane, updated_at)
    WHERE status IN ('done', 'running') AND lane IS NOT NULL;
"""


def _statements(script: str) -> Iterator[str]:
    """The statements of a script, one by one: `executescript` would commit the step's
    transaction before its first statement."""
    pending = ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        yield pending.strip()


def _run_script(script: str) -> Callable[[sqlite3.Connection], None]:
    def apply(db: sqlite3.Connection) -> None:
        for statement in _statements(script):
            db.execute(statement)

    return apply


def _audit_event_time_and_retention(db: sqlite3.Connection) -> None:
    # Stores made before the retention release lack the audit log's event time.
    columns = {row[1] for row in db.execute("""PRAGMA table_info(audit)""")}
    if "event_ts" not in columns:
        db.execute("""ALTER TABLE audit ADD COLUMN event_ts REAL""")
    _run_script(_RETENTION_SCHEMA)(db)


def _audit_steps(db: sqlite3.Connection) -> None:
    columns = {row[1] for row in db.execute("""PRAGMA table_info(audit)""")}
    if "steps" not in columns:
        db.execute("""ALTER TABLE audit ADD COLUMN steps TEXT""")


def _outbox_lanes_claims_leases_members(db: sqlite3.Connection) -> None:
    columns = {row[1] for row in db.execute("""PRAGMA table_info(outbox)""")}
    for column, kind in _CLUSTER_COLUMNS:
        if column not in columns:
            db.execute(f"ALTER TABLE outbox ADD COLUMN {column} {kind}")
    _run_script(_CLUSTER_SCHEMA)(db)
    # Open intents of an older store get the lane their action says.
    rows = db.execute(
        """SELECT id, kind, target FROM outbox WHERE status IN (?, ?) AND lane IS NULL""",
        _OPEN_STATUSES,
    ).fetchall()
    db.executemany(
        """UPDATE outbox SET lane = ? WHERE id = ?""",
        [(lane_of(kind, orjson.loads(target)), id_) for id_, kind, target in rows],
    )


_ABSENCE_SCHEMA = """
CREATE TABLE IF NOT EXISTS absence_keys (
    rule_id TEXT NOT NULL,
    key TEXT NOT NULL,
    last_seen REAL NOT NULL,
    fired INTEGER NOT NULL,
    seen INTEGER NOT NULL,
    pending TEXT NOT NULL,
    last_event TEXT,
    PRIMARY KEY (rule_id, key)
);
"""


def _absence_keys(db: sqlite3.Connection) -> None:
    _run_script(_ABSENCE_SCHEMA)(db)


# Operators' silences (`event-engine silence`): kept after they end, as their audit trail.
_SILENCES_SCHEMA = """
CREATE TABLE IF NOT EXISTS silences (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    matchers TEXT NOT NULL,
    comment TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at REAL NOT NULL,
    ends_at REAL NOT NULL,
    expired_by TEXT,
    expired_at REAL
);
CREATE INDEX IF NOT EXISTS silences_by_end ON silences (ends_at);
CREATE INDEX IF NOT EXISTS audit_not_planned ON audit (id)
    WHERE outcome = 'failed' AND action IS NOT NULL AND intent_id IS NULL;
"""


# The seen ids of each organisation named under `organisations:` (two may reuse an event
# id); the single organisation of a config without that key keeps `seen`. The audit log
# names the organisation of each row (NULL: the single one).
_ORGANISATIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen_org (
    organisation TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    event_ts REAL NOT NULL,
    PRIMARY KEY (organisation, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_org_by_ts ON seen_org (organisation, event_ts);
"""


def _organisations(db: sqlite3.Connection) -> None:
    _run_script(_ORGANISATIONS_SCHEMA)(db)
    columns = {row[1] for row in db.execute("""PRAGMA table_info(audit)""")}
    if "organisation" not in columns:
        db.execute("""ALTER TABLE audit ADD COLUMN organisation TEXT""")


def _seen_table(organisation: str) -> tuple[str, str, tuple[str, ...]]:
    """Where an organisation's seen ids are: the table, its WHERE prefix and arguments."""
    if organisation:
        return "seen_org", """organisation = ? AND """, (organisation,)
    return "seen", "", ()


def _schema_version(db: sqlite3.Connection) -> int:
    """The highest step applied; 0 for a new file or one made before steps were counted."""
    table = db.execute(
        """SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"""
    ).fetchone()
    if table is None:
        return 0
    return int(db.execute("""SELECT COALESCE(MAX(version), 0) FROM schema_version""").fetchone()[0])


def _steps_taken(found: MigrationPlan) -> dict[str, int]:
    return {"from_version": found.current, "to_version": found.latest}


# Every step creates only what is missing, so a store of any release before steps were
# counted (version 0) goes through all of them without losing a row.
SCHEMA_STEPS: tuple[Migration[sqlite3.Connection], ...] = (
    Migration(
        1,
        "the tables of the first release: meta, seen ids, outbox, audit log, quarantine, "
        "attempts, digests, rule state, schema_version",
        _run_script(_SCHEMA + _RULE_STATE_SCHEMA + _SCHEMA_VERSION),
    ),
    Migration(
        2,
        "the audit log's event time; the retention tables (audit_recent, audit_summary)",
        _audit_event_time_and_retention,
    ),
    Migration(
        3,
        "query indexes; the audit log by SIM kept in bulk instead of per-row indexes",
        _run_script(_QUERY_INDEXES),
    ),
    Migration(
        4,
        "running as a cluster: the outbox's lane and claim; leases; members",
        _outbox_lanes_claims_leases_members,
    ),
    Migration(
        5,
        "the status changes done per target, to recognize their echoes",
        _run_script(_DONE_BY_LANE),
    ),
    Migration(
        6,
        "absence rules: the keys each one watches (absence_keys)",
        _absence_keys,
    ),
    Migration(
        7,
        "silences: who silenced what, until when, and why; an index of the actions that"
        " could not be planned (for `status`)",
        _run_script(_SILENCES_SCHEMA),
    ),
    Migration(
        8,
        "the audit log's trace of each rule's match: the values it read, its counts (steps)",
        _audit_steps,
    ),
    Migration(
        9,
        "several organisations: their seen ids (seen_org); the audit log's organisation",
        _organisations,
    ),
)
check_steps(SCHEMA_STEPS)


def schema_plan(path: str | Path) -> MigrationPlan:
    """Where the SQLite store at `path` stands against this code's steps, without changing it
    (a file that does not exist is at version 0 and is not created)."""
    if not Path(path).exists():
        return plan(str(path), 0, SCHEMA_STEPS)
    _refuse_a_folder(str(path))
    try:
        db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
        try:
            return plan(str(path), _schema_version(db), SCHEMA_STEPS)
        finally:
            db.close()
    except sqlite3.Error as error:
        raise StoreError(_describe(str(path), error, "cannot read the ")) from None


if TYPE_CHECKING:  # mypy checks here that the SQLite store implements every port

    def _implements_every_port(store: SqliteStore) -> Store:
        return store


# Per rule, over the audit rows since a time: an action planned or scheduled is the rule
# firing; "matched" rows count its matches whatever came of them (throttled, held, ...).
_ACTED = "action IS NOT NULL AND outcome IN ('planned', 'scheduled')"
_RULE_ACTIVITY = (
    "SELECT rule_id, SUM(CASE WHEN outcome = 'matched' THEN 1 ELSE 0 END) AS matches,"
    f" SUM(CASE WHEN {_ACTED} THEN 1 ELSE 0 END) AS actions,"
    f" MAX(CASE WHEN {_ACTED} THEN at END) AS last_fired"
    " FROM audit WHERE at >= ? AND rule_id IS NOT NULL GROUP BY rule_id ORDER BY rule_id"
)
