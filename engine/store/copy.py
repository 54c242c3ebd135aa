"""`event-engine store copy`: a SQLite store moved into PostgreSQL without losing anything a
running deployment needs.

Every table is copied row by row, converted to its PostgreSQL column's type (epoch seconds
to `timestamptz`, JSON text to `json`/`jsonb` or `double precision[]`, a quarantined record
to its bytes), in batches, in one transaction: a copy that fails leaves the target as it
was. The ids of intents and audit rows are kept (the audit log and the attempt history
refer to them) and the target's id sequences are moved past them. The SIM index of the
SQLite audit log is not copied: PostgreSQL keeps it as an index of the audit table. At the
end each table's rows are counted on both sides; a difference fails the copy.

Stop the engine before copying: rows it writes meanwhile would be missing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg

from engine.errors import StoreError
from engine.store.postgres import PostgresStore, connection_settings, describe
from engine.store.sqlite import SqliteStore

Convert = Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _moment(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _numbers(text: str) -> list[float]:
    return [float(v) for v in orjson.loads(text)]


def _flag(value: int) -> bool:
    return bool(value)


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _day(text: str) -> date:
    return date.fromisoformat(text)


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    columns: tuple[tuple[str, Convert], ...]
    # How many rows the target should have: `SELECT COUNT(*) ...` on the source.
    expected: str = ""
    identity: bool = False  # an id column whose sequence must move past the copied ids
    # Rows that may repeat in an old store, kept once: inserted instead of COPYed.
    upsert: bool = False

    @property
    def names(self) -> str:
        return ", ".join(name for name, _ in self.columns)


def _t(name: str, *columns: tuple[str, Convert], **options: Any) -> _Table:
    return _Table(name, columns, **options)


_TEXT: Convert = _same
# In the order the copy takes them (no foreign keys tie them: any order would do).
TABLES = (
    _t("meta", ("key", _TEXT), ("value", _TEXT)),
    _t("seen", ("event_id", _same), ("event_ts", _moment)),
    _t("seen_org", ("organisation", _TEXT), ("event_id", _same), ("event_ts", _moment)),
    _t(
        "outbox",
        ("id", _same), ("idempotency_key", _TEXT), ("event_id", _same), ("rule_id", _TEXT),
        ("action_index", _same), ("kind", _TEXT), ("params", _same), ("target", _same),
        ("status", _TEXT), ("attempts", _same), ("created_at", _moment), ("due_at", _moment),
        ("updated_at", _moment), ("last_error", _TEXT), ("lane", _TEXT),
        identity=True,
    ),
    _t(
        "audit",
        ("id", _same), ("at", _moment), ("event_id", _same), ("rule_id", _TEXT),
        ("action", _TEXT), ("outcome", _TEXT), ("detail", _TEXT), ("sim_id", _same),
        ("endpoint_id", _same), ("iccid", _TEXT), ("intent_id", _same), ("event_ts", _same),
        ("steps", _TEXT),
        ("organisation", _TEXT),
        identity=True,
    ),
    _t(
        "quarantine",
        ("id", _same), ("at", _moment), ("source", _TEXT), ("reason", _TEXT), ("payload", _raw),
        expected="SELECT COUNT(*) FROM (SELECT DISTINCT source, payload FROM quarantine)",
        identity=True,
        upsert=True,
    ),
    _t(
        "intent_attempts",
        ("intent_id", _same), ("total", _same), ("first_at", _moment), ("last_at", _moment),
        ("deadline_from", _moment),
    ),
    _t(
        "digest_events",
        ("rule_id", _TEXT), ("event_id", _same), ("event_ts", _moment), ("payload", _same),
        ("run_at", _moment),
    ),
    _t("digest_runs", ("rule_id", _TEXT), ("last_run", _moment), ("claimed_for", _moment)),
    _t(
        "rule_windows",
        ("rule_id", _TEXT), ("key", _TEXT), ("entries", _numbers), ("expires", _same),
    ),
    _t("rule_throttles", ("rule_id", _TEXT), ("key", _TEXT), ("until", _same)),
    _t("rule_guards", ("scope", _TEXT), ("entries", _numbers)),
    _t(
        "rule_overrides",
        ("rule_id", _TEXT), ("mode", _TEXT), ("reason", _TEXT), ("since", _moment),
        ("event_id", _same), ("at", _moment),
    ),
    _t(
        "follow_up_keys",
        ("idempotency_key", _TEXT), ("key_path", _TEXT), ("key", _TEXT),
        ("planned_at", _moment), ("shadow", _flag),
    ),
    _t(
        "absence_keys",
        ("rule_id", _TEXT), ("key", _TEXT), ("last_seen", _same), ("fired", _flag),
        ("seen", _flag), ("pending", _numbers), ("last_event", _TEXT),
    ),
    _t("audit_recent", ("iccid", _TEXT), ("rule_id", _TEXT), ("audit_id", _same),
       ("event_id", _same)),
    _t(
        "audit_summary",
        ("iccid", _TEXT), ("rule_id", _TEXT), ("outcome", _TEXT), ("day", _day),
        ("count", _same), ("first_ts", _same), ("last_ts", _same), ("last_at", _moment),
    ),
    _t(
        "silences",
        ("id", _same), ("matchers", _TEXT), ("comment", _TEXT), ("created_by", _TEXT),
        ("created_at", _moment), ("ends_at", _moment), ("expired_by", _TEXT),
        ("expired_at", _moment),
        identity=True,
    ),
)  # fmt: skip
_BATCH = 5000


@dataclass(frozen=True, slots=True)
class Copied:
    """One table's rows: in the source, and in the target after the copy."""

    table: str
    source: int
    target: int


# Progress of one table: (table, rows copied so far, rows in all).
OnProgress = Callable[[str, int, int], None]


def copy_store(
    source: str,
    target: str,
    *,
    password: str | None = None,
    force: bool = False,
    on_progress: OnProgress | None = None,
    batch: int = _BATCH,
) -> list[Copied]:
    """Copy the SQLite store at `source` into the PostgreSQL database at `target` (its
    schema made or brought up to date first; the source's too). A target that holds state
    already is refused unless `force`, which empties it first. StoreError when the copy
    cannot be made or its counts differ."""
    if not Path(source).is_file():
        raise StoreError(f"no state store at {source}: name the SQLite file the engine wrote")
    SqliteStore(source).close()  # its schema up to date, as the engine would open it
    PostgresStore(target, password=password).close()
    try:
        reader = sqlite3.connect(Path(source).resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as error:
        raise StoreError(f"cannot read the state store {source}: {error}") from None
    try:
        with psycopg.connect(target, **connection_settings(target, password)) as writer:
            with writer.transaction(), writer.cursor() as cursor:
                _make_room(cursor, target, force)
                for table in TABLES:
                    _copy_table(reader, cursor, table, batch, on_progress)
            return [_count(reader, writer, table) for table in TABLES]
    except psycopg.Error as error:
        raise StoreError(describe(target, error, "cannot copy into the ")) from None
    except sqlite3.Error as error:
        raise StoreError(f"cannot read the state store {source}: {error}") from None
    finally:
        reader.close()


def check_counts(copied: list[Copied], target: str) -> None:
    """StoreError naming the tables whose rows differ."""
    wrong = [f"{c.table} {c.source} -> {c.target}" for c in copied if c.source != c.target]
    if wrong:
        raise StoreError(
            f"the copy into {target} is incomplete ({', '.join(wrong)}): was the engine "
            "still running? Stop it and copy again with --force"
        )


def _make_room(cursor: psycopg.Cursor[Any], target: str, force: bool) -> None:
    """An empty target (a fresh schema holds only its version rows), or emptied by force."""
    held = [
        table.name
        for table in TABLES
        if table.name != "meta"
        and cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {table.name})").fetchone() == (True,)
    ]
    meta = cursor.execute(
        "SELECT COUNT(*) FROM meta WHERE key <> 'rule_state_version' OR value <> '0'"
    ).fetchone()
    if meta and meta[0]:
        held.insert(0, "meta")
    if held and not force:
        raise StoreError(
            f"the store {target} holds state already ({', '.join(held)}): copy into an empty "
            "database, or add --force to replace what it holds"
        )
    names = ", ".join(table.name for table in TABLES)
    cursor.execute(f"TRUNCATE {names} RESTART IDENTITY")


def _rows(reader: sqlite3.Connection, table: _Table, batch: int) -> Iterator[list[tuple[Any, ...]]]:
    found = reader.execute(f"SELECT {table.names} FROM {table.name}")
    converters = [convert for _, convert in table.columns]
    while chunk := found.fetchmany(batch):
        yield [tuple(c(v) for c, v in zip(converters, row, strict=True)) for row in chunk]


def _copy_table(
    reader: sqlite3.Connection,
    cursor: psycopg.Cursor[Any],
    table: _Table,
    batch: int,
    on_progress: OnProgress | None,
) -> None:
    total = int(reader.execute(f"SELECT COUNT(*) FROM {table.name}").fetchone()[0])
    done = 0
    if on_progress is not None:
        on_progress(table.name, 0, total)
    marks = ", ".join(["%s"] * len(table.columns))
    for rows in _rows(reader, table, batch):
        if table.upsert:
            cursor.executemany(
                f"INSERT INTO {table.name} ({table.names}) VALUES ({marks}) ON CONFLICT DO NOTHING",
                rows,
            )
        else:
            with cursor.copy(f"COPY {table.name} ({table.names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        done += len(rows)
        if on_progress is not None:
            on_progress(table.name, done, total)
    if table.identity:
        cursor.execute(
            f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'),"
            f" COALESCE(MAX(id), 0) + 1, false) FROM {table.name}"
        )
    if table.name == "meta":
        # The row a batch locks to check its rule-state version (see PostgresStore).
        cursor.execute(
            "INSERT INTO meta (key, value) VALUES ('rule_state_version', '0')"
            " ON CONFLICT DO NOTHING"
        )


def _count(reader: sqlite3.Connection, writer: psycopg.Connection[Any], table: _Table) -> Copied:
    expected = table.expected or f"SELECT COUNT(*) FROM {table.name}"
    source = int(reader.execute(expected).fetchone()[0])
    found = writer.execute(f"SELECT COUNT(*) FROM {table.name}").fetchone()
    target = int(found[0]) if found else 0
    if table.name == "meta":
        has_version = reader.execute(
            "SELECT COUNT(*) FROM meta WHERE key = 'rule_state_version'"
        ).fetchone()[0]
        source += 0 if has_version else 1  # the row the copy adds
    return Copied(table.name, source, target)
