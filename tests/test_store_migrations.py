"""Versioned schema steps, on both backends: a new store starts at the last step, a store
made by the release before steps were counted opens with every row kept, a store written by
a newer engine is refused, and `store.migrate: never` leaves the steps to
`event-engine store migrate` (whose `--dry-run` changes nothing)."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from engine.cli import main
from engine.errors import StoreError
from engine.model import IntentStatus
from engine.store import SqliteStore, StoreSettings, open_store, schema_plan
from engine.store import postgres as postgres_backend
from engine.store import sqlite as sqlite_backend
from engine.store.migrations import MigrationNeeded, SchemaTooNew

PREVIOUS_RELEASE = Path(__file__).parent / "data" / "stores" / "previous-release.sqlite3"
T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
LATEST_SQLITE = sqlite_backend.SCHEMA_STEPS[-1].version
LATEST_POSTGRES = postgres_backend.SCHEMA_STEPS[-1].version


def _previous_release(tmp_path: Path) -> Path:
    """A copy of the store made by commit dbf81b2 (tests/data/stores/make_previous_release.py)."""
    path = tmp_path / "engine.sqlite3"
    shutil.copyfile(PREVIOUS_RELEASE, path)
    return path


def _versions(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone():
            return []
        return [row[0] for row in db.execute("SELECT version FROM schema_version ORDER BY 1")]


def _config(tmp_path: Path, store: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"store:\n{store}")
    return path


def test_a_new_sqlite_store_has_every_step_recorded(tmp_path):
    with capture_logs() as logs:
        SqliteStore(tmp_path / "s.sqlite3").close()
    assert logs == []  # a store made new is not said to be migrated
    assert _versions(tmp_path / "s.sqlite3") == list(range(1, LATEST_SQLITE + 1))


def test_engines_opening_a_new_store_together_apply_each_step_once(tmp_path):
    # A race: each round is one chance to meet it (before the WAL switch was retried, about
    # one round in fifteen failed), so the test makes twenty.
    failed: list[BaseException] = []
    for round_ in range(20):
        path = tmp_path / f"s{round_}.sqlite3"
        together = threading.Barrier(4)

        def open_it(path: Path = path, together: threading.Barrier = together) -> None:
            together.wait()
            try:
                SqliteStore(path).close()
            except BaseException as error:  # said below, with the others'
                failed.append(error)

        engines = [threading.Thread(target=open_it) for _ in range(4)]
        for engine in engines:
            engine.start()
        for engine in engines:
            engine.join()
        assert failed == []
        assert _versions(path) == list(range(1, LATEST_SQLITE + 1))


def test_a_store_made_by_the_previous_release_opens_with_every_row_kept(tmp_path):
    path = _previous_release(tmp_path)
    assert _versions(path) == []  # made before steps were counted
    with capture_logs() as logs:
        store = SqliteStore(path)
    try:
        assert logs == [
            {
                "event": "store schema migrated",
                "log_level": "info",
                "store": str(path),
                "from_version": 0,
                "to_version": LATEST_SQLITE,
            }
        ]
        assert _versions(path) == list(range(1, LATEST_SQLITE + 1))
        assert store.get_cursor() == datetime(2025, 5, 1, 10, 5, tzinfo=UTC)
        assert store.get_meta("marker") == "kept"
        assert store.unseen([1, 2, 3]) == {3}
        assert store.seen_at(1) == T0
        by_key = {i.idempotency_key: i for i in store.intents()}
        assert {k: (i.status, i.attempts) for k, i in by_key.items()} == {
            "1-r-0": (IntentStatus.DONE, 1),
            "1-r-1": (IntentStatus.PENDING, 0),
            "2-w-0": (IntentStatus.DEAD, 1),
        }
        assert by_key["2-w-0"].params == {"body": {"b": 1, "a": 2}}
        assert by_key["2-w-0"].last_error == "503 from the receiver"
        assert store.attempt_history(by_key["2-w-0"].id).total == 1
        rows = store.audit_rows(event_id=1)
        assert [(r["outcome"], r["event_ts"]) for r in rows] == [
            ("matched", None),
            ("planned", None),
        ]
        assert [r["event_id"] for r in store.audit_rows(iccid="8988")] == [1, 1, 2]
        assert [q["payload"] for q in store.quarantined()] == ["{oops"]
        assert store.window("w", "9") == [T0.timestamp(), T0.timestamp() + 1]
        assert store.throttle_until("r", "9") == T0.timestamp() + 3600
        assert store.guard_entries("*") == [T0.timestamp()]
        assert store.rule_overrides()["g"].reason == "5 actions in 1h"
        assert [f.idempotency_key for f in store.cancellable_follow_ups()] == ["1-r-1"]
        # The open follow-up is put on its SIM's lane (cluster step): it keeps its order.
        with sqlite3.connect(path) as db:
            lanes = db.execute("SELECT idempotency_key, lane FROM outbox WHERE status = 'pending'")
            assert lanes.fetchall() == [("1-r-1", "sim:9")]
        assert store.digest_backlog("d") == 1
        assert store.digest_run_state("d") == (T0, None)
        # What the new steps added works on the old rows: the retention's summaries.
        assert store.summarize_decisions(keep=5, span=100) == 0
    finally:
        store.close()


def test_a_sqlite_store_written_by_a_newer_engine_is_refused(tmp_path):
    path = tmp_path / "s.sqlite3"
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version VALUES (99, 'from the future')")
    with pytest.raises(SchemaTooNew) as refused:
        SqliteStore(path)
    assert str(refused.value) == (
        f"the store {path} was written by a newer event-engine (schema 99, this one knows "
        f"{LATEST_SQLITE}): upgrade this event-engine to the version that wrote it, or "
        "restore the store from a backup made before the upgrade"
    )


def test_migrate_never_refuses_a_store_that_needs_steps_until_store_migrate_ran(tmp_path, capsys):
    path = _previous_release(tmp_path)
    config = _config(tmp_path, f"  path: {path}\n  migrate: never\n")
    assert main(["status", "--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert f"the store {path} is at schema version 0 and this event-engine needs" in error
    assert "run `event-engine store migrate`" in error

    assert main(["store", "migrate", "--config", str(config), "--dry-run"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0] == (
        f"{path}: schema version 0, this event-engine knows {LATEST_SQLITE}; "
        f"{LATEST_SQLITE} step(s) to apply:"
    )
    assert [line.split(":")[0].strip() for line in listed[1:]] == [
        str(n) for n in range(1, LATEST_SQLITE + 1)
    ]
    assert _versions(path) == []  # a dry run changes nothing

    assert main(["store", "migrate", "--config", str(config)]) == 0
    assert f"migrated from schema version 0 to {LATEST_SQLITE}" in capsys.readouterr().out
    assert main(["status", "--config", str(config)]) == 0
    assert main(["store", "migrate", "--config", str(config), "--dry-run"]) == 0
    assert capsys.readouterr().out.endswith(f"{path}: schema version {LATEST_SQLITE}, up to date\n")


def test_opening_a_store_with_migrate_off_refuses_it_before_changing_anything(tmp_path):
    path = _previous_release(tmp_path)
    with pytest.raises(MigrationNeeded):
        open_store(StoreSettings(path, migrate=False))
    assert _versions(path) == []
    assert schema_plan(StoreSettings(path)).current == 0


def test_the_plan_for_a_store_file_not_made_yet_is_every_step_and_makes_no_file(tmp_path):
    path = tmp_path / "s.sqlite3"
    found = schema_plan(StoreSettings(path))
    assert (found.current, found.latest) == (0, LATEST_SQLITE)
    assert [version for version, _ in found.pending] == list(range(1, LATEST_SQLITE + 1))
    assert found.lines()[0] == (
        f"{path}: schema version 0, this event-engine knows {LATEST_SQLITE}; "
        f"{LATEST_SQLITE} step(s) to apply:"
    )
    assert not path.exists()


def test_the_plan_for_a_file_that_is_not_a_store_says_which_and_what_to_do(tmp_path):
    with pytest.raises(StoreError) as raised:
        schema_plan(StoreSettings(tmp_path))  # a folder
    assert str(raised.value) == (
        f"cannot open the state store {tmp_path}: it is a folder; store.path names the store's"
        f" file (such as {tmp_path / 'engine.sqlite3'})"
    )
    path = tmp_path / "s.sqlite3"
    path.write_text("not a database\n" * 100)
    with pytest.raises(StoreError) as raised:
        schema_plan(StoreSettings(path))
    assert str(raised.value) == (
        f"cannot read the state store {path}: file is not a database (stop the engine, move "
        "the file and its -wal and -shm files aside, and restore them from a backup or start "
        "afresh without them)"
    )


# -- PostgreSQL -------------------------------------------------------------------------------


def _postgres(server: Any, url: str, **options: Any) -> Any:
    from engine.store.postgres import PostgresStore

    return PostgresStore(url, password=server.password, **options)


def test_a_new_postgres_store_has_every_step_recorded(postgres_server, postgres_url):
    from engine.store import postgres

    assert postgres.schema_plan(postgres_url, postgres_server.password).current == 0
    _postgres(postgres_server, postgres_url).close()
    found = postgres.schema_plan(postgres_url, postgres_server.password)
    assert (found.current, found.pending) == (postgres.SCHEMA_STEPS[-1].version, ())
    assert found.lines() == [f"{postgres_url}: schema version {LATEST_POSTGRES}, up to date"]


def test_a_postgres_store_says_it_was_migrated_only_when_it_was_not_new(
    postgres_server, postgres_url
):
    with capture_logs() as logs:
        _postgres(postgres_server, postgres_url).close()
    assert logs == []  # made new
    # A store made by the first release that counted steps: only the first applied.
    older = postgres_url.replace("search_path%3Dtest_", "search_path%3Dolder_")
    schema = older.rsplit("%3D", 1)[1]
    with psycopg.connect(postgres_url, password=postgres_server.password, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    try:
        with psycopg.connect(older, password=postgres_server.password) as db, db.cursor() as cursor:
            for step in postgres_backend.SCHEMA_STEPS[:1]:
                step.apply(cursor)
                cursor.execute(
                    "INSERT INTO schema_version (version, description) VALUES (%s, %s)",
                    (step.version, step.description),
                )
        with capture_logs() as logs:
            _postgres(postgres_server, older).close()
    finally:
        with psycopg.connect(postgres_url, password=postgres_server.password) as db:
            db.execute(f"DROP SCHEMA {schema} CASCADE")
    assert logs == [
        {
            "event": "store schema migrated",
            "log_level": "info",
            "store": older,
            "from_version": 1,
            "to_version": LATEST_POSTGRES,
        }
    ]


def test_a_postgres_store_written_by_a_newer_engine_is_refused(postgres_server, postgres_url):
    _postgres(postgres_server, postgres_url).close()
    with psycopg.connect(postgres_url, password=postgres_server.password, autocommit=True) as db:
        db.execute("INSERT INTO schema_version VALUES (99, 'from the future')")
    with pytest.raises(SchemaTooNew) as newer:
        _postgres(postgres_server, postgres_url)
    assert str(newer.value).startswith(
        f"the store {postgres_url} was written by a newer event-engine (schema 99, this one "
        f"knows {LATEST_POSTGRES})"
    )


def test_a_postgres_store_that_needs_steps_is_refused_when_migrating_is_off(
    postgres_server, postgres_url
):
    with pytest.raises(MigrationNeeded, match="is at schema version 0"):
        _postgres(postgres_server, postgres_url, migrate=False)


def test_instances_starting_together_migrate_a_new_database_once(postgres_server, postgres_url):
    opened: list[Any] = []
    failed: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(_postgres(postgres_server, postgres_url))
        except StoreError as error:  # pragma: no cover - the failure this test looks for
            failed.append(error)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in opened:
        store.close()
    assert failed == [] and len(opened) == 3
