"""The PostgreSQL store as an operator meets it: chosen by `store.url`, its password kept
out of the config and the logs, a failure to reach it said in one line with what to do,
`/readyz` unready while the database is down (and ready again when it is back), and the
daemon polling, judging and acting on it against the simulator."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import psycopg_pool
import pytest
from conftest import PASSWORD_VARIABLE

from engine import secrets
from engine.cli import main
from engine.config import load_config
from engine.daemon import Daemon
from engine.errors import ConfigError, StoreError
from engine.http.service import HttpService
from engine.http.settings import HttpSettings
from engine.leadership import ClusterSettings
from engine.model import AuditRow, Batch, IntentStatus, StoreCondition
from engine.sandbox.postgres import TcpProxy
from engine.sources.streamer import StreamerSettings
from engine.store import SqliteStore
from engine.store import postgres as postgres_backend
from engine.store.migrations import SchemaTooNew
from engine.store.postgres import (
    PostgresStore,
    application_name,
    connection_settings,
    describe,
)
from engine.store.settings import PostgresSettings

from helpers import (
    TOKEN,
    engine_config,
    eventually,
    ingest_url,
    metric_value,
    poller_of,
    rules_from,
    running_daemon,
)

RULES = """
rules:
  - id: suspend-on-quota
    when: {source: policy_control, type: "Quota used up"}
    actions: [{suspend_sim: {}}]
"""
SUSPENDED = 2
NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)


def _config(tmp_path: Path, store: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"store:\n{store}")
    return path


# -- the config ---------------------------------------------------------------------------------


def test_store_url_names_a_sqlite_file_or_a_postgres_database(tmp_path):
    assert load_config(_config(tmp_path, "  url: sqlite:state/x.sqlite3\n")).store_path == (
        tmp_path / "state" / "x.sqlite3"
    )
    assert load_config(_config(tmp_path, "  url: other.sqlite3\n")).store_path == (
        tmp_path / "other.sqlite3"
    )
    config = load_config(
        _config(
            tmp_path,
            "  url: postgresql://engine@db:5432/engine\n  password: ${ENGINE_DB}\n"
            "  pool_size: 8\n  migrate: never\n",
        )
    )
    assert config.store_postgres == PostgresSettings(
        "postgresql://engine@db:5432/engine", password_reference="${ENGINE_DB}", pool_size=8
    )
    assert config.store.where == "postgresql://engine@db:5432/engine"
    assert not config.store.migrate


@pytest.mark.parametrize(
    ("store", "line", "message"),
    [
        (
            "  url: postgresql://engine:s3cret-pw@db/engine\n",
            2,
            "`store.url` must not hold the password",
        ),
        (
            "  url: postgresql://engine@db/engine\n  password: s3cret-pw\n",
            3,
            "`store.password` must reference an environment variable",
        ),
        ("  password: ${PW}\n", 2, "`store.password` is for a PostgreSQL store"),
        ("  path: a.sqlite3\n  url: b.sqlite3\n", 3, "`store.path` and `store.url` both"),
        ("  url: postgresql://engine@db/engine\n  migrate: sometimes\n", 3, "migrate"),
    ],
)
def test_a_store_setting_that_cannot_work_is_refused_at_its_line(tmp_path, store, line, message):
    with pytest.raises(ConfigError) as refused:
        load_config(_config(tmp_path, store))
    assert str(refused.value.where) == f"{tmp_path / 'config.yaml'}:{line}"
    assert message in str(refused.value)
    assert "s3cret-pw" not in str(refused.value)


def test_the_store_password_is_read_from_its_file_and_never_shown(tmp_path):
    (tmp_path / "pw").write_text("file-held-password\n")
    config = load_config(
        _config(tmp_path, "  url: postgresql://engine@db/engine\n  password_file: pw\n")
    )
    assert config.store_postgres is not None
    assert config.store_postgres.password() == "file-held-password"
    assert secrets.redact("login with file-held-password") == "login with ***"


# -- failures in one line ------------------------------------------------------------------------


def _status_error(tmp_path: Path, capsys: Any, store: str) -> str:
    assert main(["status", "--config", str(_config(tmp_path, store))]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    (line,) = captured.err.splitlines()
    return line


def test_a_wrong_password_is_one_clear_line(tmp_path, capsys, postgres_server, monkeypatch):
    if not postgres_server.checks_passwords:
        pytest.skip(f"{postgres_server.where} lets any password in")
    monkeypatch.setenv(PASSWORD_VARIABLE, "not-the-password")
    url = postgres_server.url()
    line = _status_error(tmp_path, capsys, f"  url: {url}\n  password: ${{{PASSWORD_VARIABLE}}}\n")
    assert line.startswith(f"error: cannot open the state store {url}: ")
    assert 'password authentication failed for user "postgres"' in line
    assert line.endswith(
        "(check the password (PGPASSWORD, store.password: ${NAME} or store.password_file))"
    )
    assert "not-the-password" not in line


def test_a_missing_database_is_one_clear_line(tmp_path, capsys, postgres_server, monkeypatch):
    monkeypatch.setenv(PASSWORD_VARIABLE, postgres_server.password or "")
    url = postgres_server.url(dbname="no_such_database")
    line = _status_error(tmp_path, capsys, f"  url: {url}\n  password: ${{{PASSWORD_VARIABLE}}}\n")
    assert 'database "no_such_database" does not exist' in line
    assert line.endswith("(create it (createdb NAME) or correct store.url)")


def test_a_server_that_is_not_there_is_one_clear_line(tmp_path, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://engine@127.0.0.1:{port}/engine"
    line = _status_error(tmp_path, capsys, f"  url: {url}\n")
    assert line.startswith(f"error: cannot open the state store {url}: connection failed")
    assert "Connection refused" in line
    assert line.endswith("(is the server running, and are the host and port in store.url right?)")
    with pytest.raises(StoreError) as refused:  # `store migrate --dry-run` says the same
        postgres_backend.schema_plan(url)
    assert f"error: {refused.value}" == line


@pytest.mark.parametrize(
    ("error", "advice"),
    [
        (psycopg.errors.DiskFull("could not extend file"), "disk is full: free space on it"),
        (psycopg.errors.ReadOnlySqlTransaction("read-only"), "point store.url at the primary"),
        (psycopg.errors.TooManyConnections("sorry, too many clients"), "max_connections or run"
         " fewer engines"),
        (psycopg.errors.InsufficientPrivilege("permission denied"), "grant it rights on the"
         " database and its schema"),
        (psycopg_pool.PoolTimeout("no connection after 5 s"), "no connection to the database"
         " came in time: is the server up and reachable?"),
        (psycopg.errors.ConnectionFailure("server closed the connection"), "the connection to"
         " the database failed: is the server up and reachable?"),
    ],
)  # fmt: skip
def test_failures_the_tests_cannot_cause_are_said_with_what_to_do(error, advice):
    # A full disk or a standby cannot be had on a test server: their words, checked here.
    line = describe("postgresql://engine@db/engine", error)
    assert line.startswith(f"state store postgresql://engine@db/engine: {error}")
    assert line.endswith(f"{advice})")
    assert "\n" not in line


def test_a_failure_with_nothing_to_advise_is_said_alone():
    line = describe("postgresql://engine@db/engine", RuntimeError("something  else\tand\nmore"))
    assert line == "state store postgresql://engine@db/engine: something else and"  # one line
    # A failure without words is named by its kind.
    assert describe("postgresql://engine@db/engine", RuntimeError()) == (
        "state store postgresql://engine@db/engine: RuntimeError"
    )


def test_connections_wait_5_s_for_the_server_unless_the_url_says_how_long():
    settings = connection_settings("postgresql://engine@db/engine", None)
    assert settings == {
        "autocommit": True,
        "connect_timeout": 5,
        "application_name": "event-engine",
    }
    own = connection_settings("postgresql://engine@db/engine?connect_timeout=9", "pw", "e/1")
    assert own == {"autocommit": True, "password": "pw", "application_name": "e/1"}
    named = connection_settings("postgresql://engine@db/engine?application_name=mine", None)
    assert "application_name" not in named  # the URL's own name is kept


def test_a_store_url_with_a_password_or_that_is_no_url_is_refused_without_showing_it():
    with pytest.raises(StoreError) as refused:
        connection_settings("postgresql://engine:s3cret-pw@db/engine", None)
    assert str(refused.value) == (
        "store.url must not hold the password: give it in PGPASSWORD, "
        "store.password: ${NAME} or store.password_file"
    )
    with pytest.raises(StoreError) as refused:
        connection_settings("host=db password='s3cret-pw", None)  # its quote is not closed
    assert str(refused.value) == (
        "store.url is not a PostgreSQL URL: unterminated quoted string in connection info string"
    )


# -- the database going away under a running engine ------------------------------------------


def _proxied(postgres_server: Any, postgres_url: str, proxy: TcpProxy) -> str:
    host, port = postgres_server.address()
    return postgres_url.replace(f"@{host}:{port}/", f"@127.0.0.1:{proxy.port}/")


async def test_readyz_is_unready_while_the_database_is_down_and_ready_once_it_is_back(
    tmp_path, simulator, postgres_server, postgres_url, postgres_settings, monkeypatch
):
    monkeypatch.setattr("engine.daemon.DISPATCH_RETRY", 0.1)
    proxy = TcpProxy(*postgres_server.address())
    config = replace(
        engine_config(tmp_path, simulator),
        sources=("data_streamer",),
        store_postgres=replace(
            postgres_settings, url=_proxied(postgres_server, postgres_url, proxy)
        ),
    ).with_source_settings(data_streamer=StreamerSettings(secret="stream-secret-123"))
    service = HttpService(HttpSettings(port=0))
    service.bind()
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN, services=[service])
    daemon.store.probe_every = 0.1
    daemon.store.retry_every = 0.2
    readyz = service.base_url + "/readyz"
    events = simulator.state.store_events([{"event_type": {"id": 19}}])
    try:
        async with running_daemon(daemon), httpx.AsyncClient() as client:
            assert (await client.get(readyz)).status_code == 200
            up = (await client.get(service.base_url + "/metrics")).text
            proxy.cut()
            with pytest.raises(StoreError, match="the connection to the database failed"):
                daemon.store.set_meta("marker", "1")
            down = await client.get(readyz)
            metrics_down = (await client.get(service.base_url + "/metrics")).text
            refused = await _deliver(client, service, events)
            proxy.restore()
            answers: list[httpx.Response] = []

            async def sent_again() -> bool:  # as the stream does until it is taken
                answers.append(await _deliver(client, service, events))
                return answers[-1].status_code == 200

            await eventually(sent_again, timeout=15, every=0.5)
            await eventually(lambda: _status_is(client, readyz, 200), timeout=15)
    finally:
        proxy.close()
    assert down.status_code == 503
    assert metric_value(up, "event_engine_store_ok") == 1.0
    assert metric_value(up, "event_engine_outbox_intents", status="pending") is not None
    assert metric_value(metrics_down, "event_engine_store_ok") == 0.0
    store = down.json()["checks"]["store"]
    assert store["ok"] is False
    assert "state store" in store["detail"] and "the database" in store["detail"]
    assert refused.status_code == 503
    assert answers[-1].json()["new"] == 1


async def _deliver(
    client: httpx.AsyncClient, service: HttpService, records: list[Any]
) -> httpx.Response:
    return await client.post(
        ingest_url(service), json=records, headers={"X-Emnify-Secret": "stream-secret-123"}
    )


async def _status_is(client: httpx.AsyncClient, url: str, status: int) -> bool:
    return (await client.get(url)).status_code == status


# -- the daemon end to end ------------------------------------------------------------------------


async def test_the_daemon_polls_judges_and_acts_with_its_state_in_postgres(
    tmp_path, simulator, postgres_settings
):
    sims = simulator.state.sims()
    events = simulator.state.store_events(
        [{"event_type": {"id": 19}, "sim_id": sims[n]["id"]} for n in range(3)]
    )
    config = replace(engine_config(tmp_path, simulator), store_postgres=postgres_settings)
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN)
    try:
        assert isinstance(daemon.store, PostgresStore)
        await poller_of(daemon).poll_once()
        while await daemon.dispatcher.run_due():
            pass
        intents = daemon.store.intents()
        cursor = daemon.store.get_cursor()
        unseen = daemon.store.unseen([e["id"] for e in events])
    finally:
        await daemon.aclose()
    assert [i.status for i in intents] == [IntentStatus.DONE] * 3
    assert {int(simulator.state.sim(s["id"])["status"]["id"]) for s in sims[:3]} == {SUSPENDED}
    assert cursor is not None and unseen == set()
    assert not (tmp_path / "state" / "engine.sqlite3").exists()  # nothing went to SQLite


# -- the suite without PostgreSQL ---------------------------------------------------------------


@pytest.mark.parametrize(("ci", "code"), [(None, 0), ("1", 1)])
def test_without_postgres_its_tests_are_skipped_with_the_reason_or_fail_under_ci(ci, code):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["EVENT_ENGINE_TEST_POSTGRES"] = "off"
    if ci:
        env["CI"] = ci
    one = "tests/test_store_contract.py::TestRuleStateSource::test_a_fresh_store_remembers_nothing"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{one}[postgres]"],
        capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert run.returncode == code, run.stdout
    last = run.stdout.strip().splitlines()
    assert "PostgreSQL tests: SKIPPED, no PostgreSQL: EVENT_ENGINE_TEST_POSTGRES=off" in last
    if ci:
        assert "PostgreSQL tests cannot run under CI" in run.stdout
    else:
        assert "1 skipped" in last[-1]


def test_an_engine_on_sqlite_never_loads_the_postgres_driver(tmp_path):
    script = (
        "import sys\n"
        "from engine.cli import main\n"
        f"main(['status', '--store', {str(tmp_path / 's.sqlite3')!r}])\n"
        "from engine.daemon import Daemon\n"
        "assert not [m for m in sys.modules if m.startswith('psycopg')], 'psycopg loaded'\n"
    )
    SqliteStore(tmp_path / "s.sqlite3").close()
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


async def test_an_instances_connections_carry_its_id_in_pg_stat_activity(
    tmp_path, simulator, postgres_server, postgres_settings
):
    config = replace(
        engine_config(tmp_path, simulator),
        store_postgres=postgres_settings,
        cluster=ClusterSettings(instance_id="ops-east-1"),
    )
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN)
    try:
        with postgres_server.connect() as admin:
            names = {
                row[0]
                for row in admin.execute(
                    "SELECT application_name FROM pg_stat_activity"
                    " WHERE datname = current_database()"
                )
            }
    finally:
        await daemon.aclose()
    assert "event-engine/ops-east-1" in names
    # A command (no instance) keeps the plain name.
    assert application_name("") == "event-engine"


# -- what a store in use says -----------------------------------------------------------------


def test_text_with_a_nul_character_is_kept_with_the_replacement_character(
    postgres_server, postgres_url
):
    # PostgreSQL's text cannot hold U+0000, which a device's event text may carry.
    store = PostgresStore(postgres_url, password=postgres_server.password)
    try:
        store.commit_batch(Batch(audit=[AuditRow(1, "r", None, "x", detail="a\x00b")]), NOW)
        assert [row["detail"] for row in store.audit_rows(event_id=1)] == ["a\ufffdb"]
    finally:
        store.close()


def test_a_failing_call_on_a_store_in_use_names_the_store(postgres_server, postgres_url):
    store = PostgresStore(postgres_url, password=postgres_server.password)
    try:
        password = postgres_server.password
        with psycopg.connect(postgres_url, password=password, autocommit=True) as own:
            own.execute("DROP TABLE meta")  # in the test's own schema
        with pytest.raises(StoreError) as failed:
            store.get_meta("marker")
        assert str(failed.value).startswith(f"state store {store.path}: ")
    finally:
        store.close()


def test_a_store_probes_at_most_once_a_probe_time_and_not_just_after_a_write(
    postgres_server, postgres_url
):
    store = PostgresStore(postgres_url, password=postgres_server.password)
    try:
        store.probe_every = 3600.0
        store.set_meta("marker", "1")  # written just now: nothing to find out
        assert store.condition(NOW) == StoreCondition(True, "writable")
        assert store.get_meta("ready_probe") is None
    finally:
        store.close()
    idle = PostgresStore(postgres_url, password=postgres_server.password)  # nothing written
    try:
        idle.probe_every = 3600.0
        assert idle.condition(NOW) == StoreCondition(True, "writable")
        idle.condition(NOW.replace(hour=13))  # asked again within the probe time
        assert idle.get_meta("ready_probe") == NOW.isoformat()
    finally:
        idle.close()


def test_the_integrity_check_names_a_schema_behind_and_what_to_do(postgres_server, postgres_url):
    store = PostgresStore(postgres_url, password=postgres_server.password)
    try:
        assert store.check_integrity() is True
        latest = postgres_backend.SCHEMA_STEPS[-1].version
        with psycopg.connect(postgres_url, password=postgres_server.password) as own:
            own.execute("DELETE FROM schema_version WHERE version = %s", (latest,))
        with pytest.raises(StoreError) as behind:
            store.check_integrity()
        assert str(behind.value) == (
            f"the store {postgres_url} is at schema version {latest - 1}, not {latest}: "
            "run `event-engine store migrate`"
        )
        with psycopg.connect(postgres_url, password=postgres_server.password) as own:
            own.execute("INSERT INTO schema_version VALUES (99, 'from the future')")
        with pytest.raises(SchemaTooNew) as newer:
            store.check_integrity()
        assert str(newer.value).startswith(f"the store {postgres_url} was written by a newer")
    finally:
        store.close()


@pytest.mark.parametrize(
    ("error", "lost"),
    [
        (psycopg_pool.PoolTimeout("no connection after 5 s"), True),
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (psycopg.errors.ConnectionFailure("connection failure"), True),  # 08006
        (psycopg.errors.AdminShutdown("terminating connection"), True),  # 57P01
        (psycopg.errors.CrashShutdown("crash"), True),  # 57P02
        (psycopg.errors.CannotConnectNow("the database system is starting up"), True),  # 57P03
        (psycopg.errors.DiskFull("could not extend file"), False),  # the statement's
        (psycopg.errors.QueryCanceled("canceling statement"), False),
    ],
)
def test_only_failures_of_the_connection_itself_count_as_a_lost_connection(error, lost):
    # A lost connection sends the store into reconnecting (calls fail at once until a probe
    # gets through); a statement's own failure does not.
    assert postgres_backend._lost_connection(error) is lost


def test_pruned_audit_rows_leave_nothing_behind_in_the_newest_decisions(
    postgres_server, postgres_url
):
    store = PostgresStore(postgres_url, password=postgres_server.password)
    try:
        for event_id in (1, 2):
            rows = [
                AuditRow(event_id, "r", None, o, iccid="89-a") for o in ("matched", "throttled")
            ]
            store.commit_batch(Batch(audit=rows), NOW)
        store.summarize_decisions(keep=5, span=100)  # both among the newest per SIM and rule
        with psycopg.connect(postgres_url, password=postgres_server.password) as own:
            assert own.execute("SELECT COUNT(*) FROM audit_recent").fetchone() == (2,)
            assert store.prune_older_than(NOW.replace(day=2), limit=100) == 4
            assert own.execute("SELECT COUNT(*) FROM audit_recent").fetchone() == (0,)
    finally:
        store.close()
