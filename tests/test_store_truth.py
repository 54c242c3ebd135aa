"""The store tells the truth about itself, over real SQLite files: a damaged file stops `run`,
`status` and `why` with one line that names it and what to do; `/readyz` turns unready, in
words, when the store file is deleted or replaced or its writes fail; the Data Streamer
ingress answers 503 (never 500) when the store cannot take a delivery; a failed COMMIT says
why; and the dispatcher and `/metrics` outlive a store that fails under them.

Disk full is a real full file system (a small tmpfs) and an unwritable store a real immutable
file (`chattr +i`): both need root, and those tests are skipped without it. SQLite's own
`max_page_count` gives the same "database or disk is full" anywhere.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
from structlog.testing import capture_logs

from engine import logging as engine_logging
from engine.cli import main
from engine.daemon import Daemon
from engine.digest_schedule import Digests
from engine.errors import EngineError, StoreError
from engine.http.service import HttpService
from engine.http.settings import HttpSettings
from engine.model import AuditRow, Batch, StoreCondition
from engine.pipeline import Pipeline
from engine.reload import RuleReloader
from engine.rules import load_rules
from engine.simulator import SimulatorServer
from engine.sources.streamer import StreamerSettings
from engine.store import SqliteStore

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

NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)  # when the store is told things happen

SECRET = "streamer-secret-for-store-tests"
RULES = """
rules:
  - id: suspend-on-quota
    when: {source: policy_control, type: "Quota used up"}
    actions: [{suspend_sim: {}}]
"""
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _batch(first_id: int, count: int) -> Batch:
    ids = range(first_id, first_id + count)
    return Batch(
        seen=[(i, T0) for i in ids],
        audit=[AuditRow(i, "r", None, "matched", "detail " * 20) for i in ids],
    )


def _filled_store(path: Path) -> Path:
    """A store with a few hundred pages of rows, closed (its log folded into the file)."""
    store = SqliteStore(path)
    store.commit_batch(_batch(1, 5000), NOW)
    store.close()
    return path


def _damage(path: Path) -> None:
    """Write garbage over a page in the middle of the file."""
    pages = path.stat().st_size // 4096
    with path.open("r+b") as handle:
        handle.seek((pages // 2) * 4096)
        handle.write(os.urandom(4096))


@contextlib.contextmanager
def _immutable(*paths: Path) -> Iterator[None]:
    """The files cannot be written, not even through descriptors already open (root only)."""
    names = [str(p) for p in paths]
    if os.geteuid() != 0:
        pytest.skip("making a file immutable needs root")
    if subprocess.run(["chattr", "+i", *names], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *names], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real file system of 8 MB (a tmpfs), so that a disk can be filled up (root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    chunk = b"\0" * 4096
    with filler.open("wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(chunk)
    return filler


@pytest.fixture
def engine_log() -> Iterator[io.StringIO]:
    """What the engine logs (JSON lines), for counting lines."""
    stream = io.StringIO()
    engine_logging.configure("info", "json", stream=stream)
    yield stream


def _streaming_daemon(
    tmp_path: Path, simulator: SimulatorServer, store_path: Path | None = None
) -> tuple[Daemon, HttpService]:
    """A daemon whose only source is the Data Streamer: nothing writes but the deliveries."""
    config = replace(
        engine_config(tmp_path, simulator), sources=("data_streamer",)
    ).with_source_settings(data_streamer=StreamerSettings(secret=SECRET))
    if store_path is not None:
        config = replace(config, store_path=store_path)
    service = HttpService(HttpSettings(port=0))
    service.bind()
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN, services=[service])
    return daemon, service


def _quota_events(simulator: SimulatorServer, count: int) -> list[dict]:
    sims = simulator.state.sims()
    return simulator.state.store_events(
        [{"event_type": {"id": 19}, "sim_id": sims[n % len(sims)]["id"]} for n in range(count)]
    )


async def _deliver(
    client: httpx.AsyncClient, service: HttpService, records: list
) -> httpx.Response:
    return await client.post(
        ingest_url(service),
        content=orjson.dumps(records),
        headers={"X-Emnify-Secret": SECRET},
    )


# -- the store itself ------------------------------------------------------------------------


def test_a_store_that_cannot_grow_raises_a_store_error_naming_the_file_and_the_fix(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite3")
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own SQLITE_FULL
    with pytest.raises(StoreError) as raised:
        store.commit_batch(_batch(1, 2000), NOW)
    message = str(raised.value)
    assert str(tmp_path / "s.sqlite3") in message
    assert "database or disk is full" in message
    assert "free space" in message
    assert store.unseen([1]) == {1}  # nothing of the batch was kept


def test_a_commit_the_disk_refuses_reports_its_cause_not_cannot_rollback(tmp_path):
    path = tmp_path / "s.sqlite3"
    store = SqliteStore(path)
    store.commit_batch(_batch(1, 10), NOW)
    with _immutable(path, Path(f"{path}-wal")), pytest.raises(StoreError) as raised:
        store.commit_batch(_batch(100, 10), NOW)
    assert "cannot rollback" not in str(raised.value)
    assert "disk I/O error" in str(raised.value)
    assert store.unseen([100]) == {100}
    store.commit_batch(_batch(100, 10), NOW)  # writable again: the store carries on
    assert store.unseen([100]) == set()


def test_reading_a_damaged_store_raises_a_store_error_that_says_what_to_do(tmp_path):
    path = _filled_store(tmp_path / "s.sqlite3")
    _damage(path)
    store = SqliteStore(path)
    with pytest.raises(StoreError) as raised:
        store.audit_rows()
    assert "malformed" in str(raised.value)
    assert "restore them from a backup" in str(raised.value)


def test_the_integrity_check_finds_a_damaged_page_and_names_the_file(tmp_path):
    sound = SqliteStore(_filled_store(tmp_path / "sound.sqlite3"))
    assert sound.check_integrity() is True
    path = _filled_store(tmp_path / "s.sqlite3")
    _damage(path)
    with pytest.raises(StoreError) as raised:
        SqliteStore(path).check_integrity()
    message = str(raised.value)
    assert message.startswith(
        f"the state store {path} is damaged (database disk image is malformed): stop the engine"
    )
    assert "move the file and its -wal and -shm files aside" in message


def _rewrite_schema(path: Path, table: str, before: str, after: str) -> None:
    """Change a table's declared schema in place, past SQLite's checks."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA writable_schema=ON")
    db.execute(
        "UPDATE sqlite_master SET sql = replace(sql, ?, ?) WHERE name = ?", (before, after, table)
    )
    db.close()


def test_the_integrity_check_names_a_row_that_breaks_the_schema(tmp_path):
    # A NULL where the schema allows none (as a damaged or hand-edited file may hold one):
    # quick_check reports it as a row of its answer, not as an error.
    path = tmp_path / "s.sqlite3"
    SqliteStore(path).close()
    _rewrite_schema(path, "meta", "value TEXT NOT NULL", "value TEXT")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("INSERT INTO meta (key, value) VALUES ('x', NULL), ('y', NULL)")
    db.close()
    _rewrite_schema(path, "meta", "value TEXT", "value TEXT NOT NULL")
    with pytest.raises(StoreError) as raised:
        SqliteStore(path).check_integrity()
    assert str(raised.value).startswith(
        f"the state store {path} is damaged (NULL value in meta.value; NULL value in meta.value):"
        " stop the engine"
    )


def test_the_integrity_check_stops_when_its_time_is_up(tmp_path):
    store = SqliteStore(_filled_store(tmp_path / "s.sqlite3"))
    assert store.check_integrity(budget=0.0) is False
    assert store.audit_rows(limit=1)  # the store is usable after the interrupted check


def test_the_file_system_counts_as_full_only_below_the_room_a_commit_needs(tmp_path, monkeypatch):
    store = SqliteStore(tmp_path / "s.sqlite3")
    fields = list(os.statvfs(tmp_path))  # f_bsize, f_frsize, ..., f_bavail (4), ..., f_flag (8)
    fields[1] = 1024

    def volume(free_kib: int, flag: int = 0) -> None:
        fields[4], fields[8] = free_kib, flag
        monkeypatch.setattr(os, "statvfs", lambda _folder: os.statvfs_result(fields))

    room = store.low_space_bytes // 1024
    volume(room)
    assert store.condition(NOW).ok
    volume(room - 1)
    assert store.condition(NOW) == StoreCondition(
        False,
        f"the file system holding {store.path} is full ({room - 1} KiB free): free space on it",
    )
    volume(room, os.ST_RDONLY)
    assert store.condition(NOW) == StoreCondition(
        False, f"the file system holding {store.path} is mounted read-only"
    )


def test_a_store_reopened_without_a_write_probes_once_that_it_can_write(tmp_path):
    path = tmp_path / "s.sqlite3"
    SqliteStore(path).close()
    store = SqliteStore(path)  # up to date: nothing written since it opened
    store.probe_every = 3600.0
    assert store.condition(NOW) == StoreCondition(True, "writable")
    assert store.get_meta("ready_probe") == NOW.isoformat()


def test_a_store_probes_at_most_once_a_probe_time_and_not_just_after_a_write(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite3")
    store.probe_every = 3600.0
    store.set_meta("marker", "1")  # written just now: nothing to find out
    assert store.condition(NOW) == StoreCondition(True, "writable")
    assert store.get_meta("ready_probe") is None
    idle = SqliteStore(tmp_path / "s.sqlite3")  # reopened: nothing written since
    idle.probe_every = 3600.0
    idle.condition(NOW)
    idle.condition(NOW.replace(hour=13))  # asked again within the probe time
    assert idle.get_meta("ready_probe") == NOW.isoformat()


def test_a_store_whose_calls_fail_is_not_ready_and_says_why(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite3")
    store.close()  # every call fails from now on
    with pytest.raises(StoreError):
        store.get_meta("marker")
    condition = store.condition(NOW)
    assert condition.ok is False
    assert str(tmp_path / "s.sqlite3") in condition.detail


def test_a_store_in_memory_is_ready_and_sound_without_a_file_to_look_at():
    store = SqliteStore(":memory:")
    assert store.condition(NOW) == StoreCondition(True, "in memory")
    assert store.check_integrity() is True
    assert store.disk_bytes() == 0


def test_a_store_in_memory_is_made_whole_even_where_migrating_is_off():
    # It is new every time: there is no older schema a migration could surprise.
    store = SqliteStore(":memory:", migrate=False)
    assert store.get_meta("marker") is None


def test_a_store_is_made_in_a_folder_made_with_its_parents(tmp_path):
    path = tmp_path / "var" / "lib" / "engine.sqlite3"
    SqliteStore(path).close()
    assert path.is_file()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_store_whose_file_cannot_be_made_names_it_and_what_to_do():
    # No file can be made in /proc, whoever asks: as a folder the engine may not write to.
    with pytest.raises(StoreError) as raised:
        SqliteStore("/proc/self/engine.sqlite3")
    assert str(raised.value) == (
        "cannot open the state store /proc/self/engine.sqlite3: unable to open database file"
        " (check that its folder exists and the engine's user may write there)"
    )


def test_a_store_that_cannot_be_opened_names_the_file_and_what_to_do(tmp_path):
    with pytest.raises(StoreError) as raised:
        SqliteStore(tmp_path)  # a folder
    assert str(raised.value) == (
        f"cannot open the state store {tmp_path}: it is a folder; store.path names the store's"
        f" file (such as {tmp_path / 'engine.sqlite3'})"
    )
    path = tmp_path / "s.sqlite3"
    path.write_text("not a database\n" * 100)
    with pytest.raises(StoreError) as raised:
        SqliteStore(path)
    assert str(raised.value).startswith(
        f"cannot open the state store {path}: file is not a database (stop the engine,"
    )


# -- commands on a damaged store -------------------------------------------------------------


def test_run_refuses_a_damaged_store_with_one_line_that_names_it_and_what_to_do(tmp_path):
    store = _filled_store(tmp_path / "engine.sqlite3")
    _damage(store)
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: [{id: r, actions: [log: {}]}]\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        "api: {base_url: 'http://127.0.0.1:9', max_retries: 0}\n"
        f"rules: {rules}\nstore: {{path: {store}}}\nhttp: {{enabled: false}}\n"
        "log: {level: warning}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "engine", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EMNIFY_APPLICATION_TOKEN": TOKEN},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]]
    assert f"the state store {store} is damaged" in errors[0]
    assert "restore them from a backup" in errors[0]


@pytest.mark.parametrize("command", [["status"], ["why", "--event", "1"]])
def test_status_and_why_on_a_damaged_store_exit_1_with_one_clear_line(tmp_path, capsys, command):
    store = _filled_store(tmp_path / "engine.sqlite3")
    _damage(store)
    assert main([*command, "--store", str(store)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"error: the state store {store} is damaged")


# -- the running daemon: /readyz, the ingress, the dispatcher, /metrics ------------------------


@pytest.mark.parametrize("change", ["deleted", "replaced"])
async def test_readyz_says_when_the_store_file_was_deleted_or_replaced(tmp_path, simulator, change):
    path = tmp_path / "state" / "engine.sqlite3"
    daemon, service = _streaming_daemon(tmp_path, simulator)
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        assert (await client.get(service.base_url + "/readyz")).status_code == 200
        if change == "deleted":
            path.unlink()
        else:
            path.rename(path.with_name("old.sqlite3"))
            SqliteStore(path).close()
        answer = await client.get(service.base_url + "/readyz")
    assert answer.status_code == 503
    store = answer.json()["checks"]["store"]
    assert store["ok"] is False
    why = {
        "deleted": "what it writes now is lost when it stops",
        "replaced": "it still writes to the file it opened",
    }[change]
    assert store["detail"] == (
        f"the store file {path} was {change} while the engine runs ({why}): restart the engine"
    )


async def test_readyz_asks_the_store_without_writing_on_every_call(tmp_path, simulator):
    daemon, service = _streaming_daemon(tmp_path, simulator)
    probes = set()
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        for _ in range(20):
            assert (await client.get(service.base_url + "/readyz")).status_code == 200
            probes.add(daemon.store.get_meta("ready_probe"))
    assert len(probes - {None}) <= 1


async def test_a_full_disk_answers_deliveries_503_and_readyz_says_so_until_space_returns(
    tmp_path, small_disk, simulator, engine_log, caplog
):
    path = small_disk / "engine.sqlite3"
    daemon, service = _streaming_daemon(tmp_path, simulator, path)
    daemon.store.probe_every = 0.1
    events = _quota_events(simulator, 500)
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        assert (await client.get(service.base_url + "/readyz")).status_code == 200
        filler = _fill(small_disk)
        refused = await _deliver(client, service, events)
        full = await client.get(service.base_url + "/readyz")
        filler.unlink()
        taken = await _deliver(client, service, events)  # the stream sends it again
        await eventually(lambda: _status_is(client, service.base_url + "/readyz", 200))
    assert refused.status_code == 503
    assert "retry later" in refused.json()["error"]
    assert full.status_code == 503
    detail = full.json()["checks"]["store"]["detail"]
    assert f"the file system holding {path} is full" in detail
    assert taken.status_code == 200 and taken.json()["new"] == 500
    _assert_no_tracebacks(engine_log.getvalue() + caplog.text)


async def test_a_full_disk_fails_polls_in_words_and_loses_no_event_once_space_returns(
    tmp_path, small_disk, simulator, engine_log, caplog
):
    config = replace(engine_config(tmp_path, simulator), store_path=small_disk / "engine.sqlite3")
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN)
    async with running_daemon(daemon):
        await eventually(lambda: poller_of(daemon).last_success is not None)
        filler = _fill(small_disk)
        sims = simulator.state.sims()
        events = simulator.state.store_events(
            [{"event_type": {"id": 3}, "sim_id": sims[n % len(sims)]["id"]} for n in range(2000)]
        )
        await eventually(lambda: "database or disk is full" in (poller_of(daemon).last_error or ""))
        filler.unlink()
        ids = [event["id"] for event in events]
        await eventually(lambda: not daemon.store.unseen(ids))
    _assert_no_tracebacks(engine_log.getvalue() + caplog.text)


async def test_an_unwritable_store_answers_deliveries_503_and_readyz_names_the_failure(
    tmp_path, simulator, engine_log, caplog
):
    path = tmp_path / "state" / "engine.sqlite3"
    daemon, service = _streaming_daemon(tmp_path, simulator)
    daemon.store.probe_every = 0.1
    events = _quota_events(simulator, 5)
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        with _immutable(path, Path(f"{path}-wal")):
            refused = await _deliver(client, service, events)
            unready = await client.get(service.base_url + "/readyz")
        taken = await _deliver(client, service, events)  # the stream sends it again
        await eventually(lambda: _status_is(client, service.base_url + "/readyz", 200))
    assert refused.status_code == 503
    assert unready.status_code == 503
    detail = unready.json()["checks"]["store"]["detail"]
    assert detail.startswith("failed ") and "disk I/O error" in detail and str(path) in detail
    assert taken.status_code == 200 and taken.json()["new"] == 5
    _assert_no_tracebacks(engine_log.getvalue() + caplog.text)


async def test_the_dispatcher_and_metrics_outlive_a_store_that_fails_under_them(
    tmp_path, simulator, engine_log, caplog, monkeypatch
):
    monkeypatch.setattr("engine.daemon.DISPATCH_RETRY", 0.1)
    path = tmp_path / "state" / "engine.sqlite3"
    daemon, service = _streaming_daemon(tmp_path, simulator)
    (event,) = _quota_events(simulator, 1)
    sim_id = event["sim"]["id"]
    other = sqlite3.connect(path)
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        # Another process takes the outbox away: every read and write of it fails.
        other.execute("ALTER TABLE outbox RENAME TO outbox_aside")
        await eventually(lambda: "cannot read the outbox" in engine_log.getvalue())
        metrics = await client.get(service.base_url + "/metrics")
        refused = await _deliver(client, service, [event])
        other.execute("ALTER TABLE outbox_aside RENAME TO outbox")
        taken = await _deliver(client, service, [event])
        await eventually(lambda: simulator.state.sim(sim_id)["status"]["id"] == 2)  # suspended
    other.close()
    assert metrics.status_code == 200
    assert metric_value(metrics.text, "event_engine_store_ok") == 0
    assert refused.status_code == 503
    assert taken.status_code == 200 and taken.json()["new"] == 1
    gc.collect()  # a task that died unawaited would say so now
    log = engine_log.getvalue() + caplog.text
    _assert_no_tracebacks(log)
    assert log.count("cannot read the outbox") == 1


async def _status_is(client: httpx.AsyncClient, url: str, status: int) -> bool:
    return (await client.get(url)).status_code == status


def _assert_no_tracebacks(log: str) -> None:
    for sign in ("Traceback", "never retrieved", "Exception in ASGI application"):
        assert sign not in log


async def test_a_reload_the_store_cannot_record_keeps_the_old_rules_and_says_so_once(tmp_path):
    rules_file = tmp_path / "rules.yaml"
    threshold = "rules: [{{id: burst, when: {{type: 19}}, threshold: {{count: 3, within: {}}},"
    threshold += " actions: [log: {{}}]}}]\n"
    rules_file.write_text(threshold.format("10m"))
    store = SqliteStore(tmp_path / "s.sqlite3")
    pipeline = Pipeline(load_rules(rules_file), store)
    reloader = RuleReloader(rules_file, watch=False)
    reloader.attach(pipeline)
    before = pipeline.rules
    rules_file.write_text(threshold.format("20m"))  # its window must be reset
    other = sqlite3.connect(store.path)
    other.execute("ALTER TABLE rule_windows RENAME TO rule_windows_aside")
    with capture_logs() as logs:
        changes = await reloader.reload("SIGHUP")
    other.close()
    assert changes is None
    assert pipeline.rules is before
    (line,) = [entry for entry in logs if entry["log_level"] == "error"]
    assert line["event"].startswith("rules not reloaded: the state store could not reset")
    assert "no such table: rule_windows" in line["error"]


async def test_a_digest_job_the_store_fails_logs_one_line_instead_of_a_traceback(
    tmp_path, simulator
):
    rules = rules_from(
        tmp_path,
        "rules: [{id: daily, when: {type: 11}, schedule: '0 8 * * *', digest: {},"
        " actions: [log: {}]}]",
    )
    digests = Digests()
    daemon = Daemon(engine_config(tmp_path, simulator), rules, TOKEN, services=[digests])
    try:
        await digests.start(daemon)
        job = daemon.scheduler.get_job("digest:daily")
        other = sqlite3.connect(daemon.store.path)
        other.execute("ALTER TABLE digest_runs RENAME TO digest_runs_aside")
        with capture_logs() as logs:
            await job.func(*job.args)  # what the scheduler runs at 08:00
        other.close()
    finally:
        await digests.stop()
        await daemon.aclose()
    (line,) = logs
    assert line["event"] == "digest not run: the state store failed; it runs at the next fire time"
    assert "no such table: digest_runs" in line["error"]


def test_a_store_folder_that_cannot_be_made_is_a_store_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(EngineError, match="cannot open the state store"):
        SqliteStore(blocker / "engine.sqlite3")
