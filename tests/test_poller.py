"""The poller over loopback HTTP: windows, overlap, order, cursor, retention, refused tokens,
and a backlog fetched a window ahead of the one being judged."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from urllib.parse import parse_qs

import httpx
import orjson
import pytest
from structlog.testing import capture_logs

from engine.clock import FixedClock
from engine.config import load_config
from engine.daemon import Daemon
from engine.emnify import ClientSettings, EmnifyClient
from engine.errors import ConfigError, StoreError
from engine.events import format_timestamp
from engine.pipeline import Pipeline
from engine.simulator import FaultRule, SimulatorConfig, SimulatorServer
from engine.sources import poller as poller_module
from engine.sources.base import Check
from engine.sources.poller import Poller, PollerSettings, PollerSource
from engine.store import SqliteStore

from helpers import TOKEN, engine_config, metric_value, rules_from, with_poller

LOG_ALL = """
rules:
  - id: every-quota-event
    when: {type: [18, 19]}
    actions: [{log: {}}]
"""


@pytest.fixture
async def client(simulator: SimulatorServer):
    settings = ClientSettings(base_url=simulator.base_url, event_rate_limit=100.0)
    async with EmnifyClient(simulator.application_token, settings) as client:
        yield client


def _poller(tmp_path, client, settings: PollerSettings, *, on_batch=None, **kwargs) -> Poller:
    store = SqliteStore(tmp_path / "state.sqlite3")
    pipeline = Pipeline(rules_from(tmp_path, LOG_ALL), store)
    return Poller(client, _ingest(pipeline, on_batch), settings, store=store, **kwargs)


def _ingest(pipeline: Pipeline, on_batch=None):
    """The pipeline as the poller's door, telling `on_batch` of each committed batch."""

    def ingest(records, **options):
        batch = pipeline.process(records, **options)
        if on_batch is not None and records:  # not the first start's empty cursor batch
            on_batch(batch)
        return batch

    return ingest


def _quota(simulator: SimulatorServer, ago: timedelta, **extra) -> dict:
    sim = simulator.state.sims()[0]
    moment = datetime.now(UTC) - ago
    return {
        "event_type": {"id": 19},
        "sim_id": sim["id"],
        "timestamp": format_timestamp(moment),
        **extra,
    }


def _matched(poller: Poller) -> list[int]:
    rows = poller.store.audit_rows()
    return [r["event_id"] for r in rows if r["outcome"] == "matched"]


async def test_first_start_reads_back_only_the_initial_lookback(tmp_path, simulator, client):
    _old, recent = simulator.state.store_events(
        [_quota(simulator, timedelta(minutes=20)), _quota(simulator, timedelta(minutes=3))]
    )
    poller = _poller(
        tmp_path,
        client,
        PollerSettings(initial_lookback=timedelta(minutes=5), overlap=timedelta(0)),
    )
    await poller.poll_once()
    assert _matched(poller) == [recent["id"]]
    assert poller.store.get_cursor() is not None


async def test_with_no_lookback_no_event_from_before_the_first_start_is_acted_on(
    tmp_path, simulator, client
):
    # The overlap (120 s) would reach back before the first start: a SIM was once suspended
    # for an event 20 s older than the engine.
    (before,) = simulator.state.store_events([_quota(simulator, timedelta(seconds=20))])
    poller = _poller(tmp_path, client, PollerSettings(overlap=timedelta(seconds=120)))
    await poller.poll_once()
    assert _matched(poller) == []
    # Later polls, a late event stamped before the start, and a restart change nothing.
    (after,) = simulator.state.store_events([_quota(simulator, timedelta(0))])
    (late,) = simulator.state.store_events([_quota(simulator, timedelta(seconds=10))])
    poller.clock = lambda: datetime.now(UTC) + timedelta(seconds=3)
    await poller.poll_once()
    restarted = Poller(
        poller.client,
        poller.ingest,
        poller.settings,
        store=poller.store,
        clock=lambda: datetime.now(UTC) + timedelta(seconds=5),
    )
    await restarted.poll_once()
    assert _matched(poller) == [after["id"]]
    assert before["id"] not in _matched(restarted) and late["id"] not in _matched(restarted)


async def test_events_are_handed_on_in_timestamp_then_id_order(tmp_path, simulator, client):
    base = datetime.now(UTC) - timedelta(minutes=1)
    records = [
        {"id": 900, "timestamp": format_timestamp(base + timedelta(seconds=3))},
        {"id": 800, "timestamp": format_timestamp(base + timedelta(seconds=1))},
        {"id": 950, "timestamp": format_timestamp(base + timedelta(seconds=1))},
        {"id": 700, "timestamp": format_timestamp(base + timedelta(seconds=2))},
    ]
    sim_id = simulator.state.sims()[0]["id"]
    simulator.state.store_events(
        [{**r, "event_type": {"id": 19}, "sim_id": sim_id} for r in records]
    )
    poller = _poller(tmp_path, client, PollerSettings(initial_lookback=timedelta(minutes=5)))
    await poller.poll_once()
    assert _matched(poller) == [800, 950, 700, 900]


async def test_a_late_event_inside_the_overlap_is_caught_once(tmp_path, simulator, client):
    settings = PollerSettings(overlap=timedelta(seconds=120), initial_lookback=timedelta(minutes=5))
    poller = _poller(tmp_path, client, settings)
    (first,) = simulator.state.store_events([_quota(simulator, timedelta(seconds=1))])
    await poller.poll_once()
    # Stored now, but stamped 60 s ago: its window has passed, the overlap still covers it.
    (late,) = simulator.state.store_events([_quota(simulator, timedelta(seconds=60))])
    poller.clock = lambda: datetime.now(UTC) + timedelta(seconds=2)
    await poller.poll_once()
    await poller.poll_once()
    assert sorted(_matched(poller)) == sorted([first["id"], late["id"]])


async def test_a_backlog_is_caught_up_in_bounded_windows_each_committing_its_cursor(
    tmp_path, simulator, client
):
    hours = [timedelta(hours=h, minutes=10) for h in (2, 1, 0)]
    stored = simulator.state.store_events([_quota(simulator, ago) for ago in hours])
    poller = _poller(
        tmp_path,
        client,
        PollerSettings(initial_lookback=timedelta(hours=3), max_window=timedelta(hours=1)),
    )
    result = await poller.poll_once()
    assert result.windows == 3
    assert sorted(_matched(poller)) == sorted(e["id"] for e in stored)
    windows = [
        parse_qs(r.query)["q"][0] for r in simulator.state.requests() if r.path == "/api/v1/event"
    ]
    assert len(windows) == 3


async def test_a_backlog_logs_its_progress_window_by_window(tmp_path, simulator, client):
    hours = [timedelta(hours=h, minutes=10) for h in (3, 2, 1, 0)]
    simulator.state.store_events([_quota(simulator, ago) for ago in hours])
    settings = PollerSettings(
        initial_lookback=timedelta(hours=4),
        max_window=timedelta(hours=1),
        progress_every=timedelta(0),  # every window
    )
    poller = _poller(tmp_path, client, settings)
    with capture_logs() as logs:
        result = await poller.poll_once()
    assert result.windows == 4
    (start,) = [e for e in logs if e["event"] == "catching up a backlog"]
    assert start["windows"] == 4
    assert datetime.fromisoformat(start["until"]) == result.cursor
    span = datetime.fromisoformat(start["until"]) - datetime.fromisoformat(start["start"])
    assert span == timedelta(hours=4)  # from the first start's lookback: no overlap before it
    progress = [e for e in logs if e["event"] == "catch-up progress"]
    # The last window is reported by "poll done" instead.
    assert [e["windows"] for e in progress] == ["1/4", "2/4", "3/4"]
    assert [e["new"] for e in progress] == [1, 2, 3]
    cursors = [datetime.fromisoformat(e["cursor"]) for e in progress]
    assert cursors == sorted(cursors) and cursors[-1] < result.cursor
    assert all(e["eta_seconds"] >= 0 and e["events_per_second"] >= 0 for e in progress)


async def test_a_catch_up_reports_its_progress_only_now_and_then(tmp_path, simulator, client):
    settings = PollerSettings(initial_lookback=timedelta(hours=2), max_window=timedelta(hours=1))
    poller = _poller(tmp_path, client, settings)  # every 10 s by default: never in this test
    with capture_logs() as logs:
        await poller.poll_once()  # two windows: a backlog
        poller.clock = lambda: datetime.now(UTC) + timedelta(seconds=3)
        await poller.poll_once()  # one window: nothing to catch up
    events = [e["event"] for e in logs]
    assert events.count("catching up a backlog") == 1
    assert "catch-up progress" not in events


async def test_a_cursor_older_than_the_retention_logs_that_events_were_lost(
    tmp_path, simulator, client
):
    poller = _poller(tmp_path, client, PollerSettings())
    cursor = (datetime.now(UTC) - timedelta(days=31)).isoformat()
    poller.store.set_meta("cursor", cursor)
    poller.settings = replace(poller.settings, max_window=timedelta(days=31))
    with capture_logs() as logs:
        await poller.poll_once()
    lost = [entry for entry in logs if "events were lost" in entry["event"]]
    assert len(lost) == 1 and lost[0]["log_level"] == "error"
    assert lost[0]["cursor"] == lost[0]["lost_from"] == cursor
    lost_until = datetime.fromisoformat(lost[0]["lost_until"])
    assert (
        timedelta(0) <= datetime.now(UTC) - timedelta(days=30) - lost_until < timedelta(minutes=1)
    )
    (query,) = [
        parse_qs(r.query)["q"][0] for r in simulator.state.requests() if r.path == "/api/v1/event"
    ]
    start = datetime.strptime(query.split(",")[0], "from:%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert timedelta(days=29, hours=23) < datetime.now(UTC) - start <= timedelta(days=30, seconds=5)


async def test_a_refused_application_token_pauses_polling_instead_of_hammering_the_login(
    tmp_path,
):
    with SimulatorServer(SimulatorConfig(seed=1, endpoints=2)) as simulator:
        settings = ClientSettings(base_url=simulator.base_url, max_retries=0)
        async with EmnifyClient("not-the-token", settings) as client:
            poller = _poller(tmp_path, client, PollerSettings(initial_lookback=timedelta(1)))
            with capture_logs() as logs:
                await poller.poll_once()
                await poller.poll_once()
        logins = [r for r in simulator.state.requests() if r.path == "/api/v1/authenticate"]
    assert len(logins) == 1
    assert any("pauses for 5 minutes" in entry["event"] for entry in logs)
    assert poller.last_error is not None and "not-the-token" not in poller.last_error


async def test_a_login_forbidden_with_403_pauses_polling_as_a_refused_token_does(tmp_path):
    """A gateway's 403 (an IP restriction, a token blocked after failed logins) is as final
    as a 401: polling on would only extend the block."""
    with SimulatorServer(SimulatorConfig(seed=1, endpoints=2)) as simulator:
        simulator.state.set_faults(
            [FaultRule.parse({"path": "/api/v1/authenticate", "kind": "403"})]
        )
        settings = ClientSettings(base_url=simulator.base_url, max_retries=0)
        async with EmnifyClient(simulator.application_token, settings) as client:
            poller = _poller(tmp_path, client, PollerSettings(initial_lookback=timedelta(1)))
            await poller.poll_once()
            await poller.poll_once()
            poller.clock = lambda: datetime.now(UTC) + timedelta(minutes=5, seconds=1)
            await poller.poll_once()
        logins = [r for r in simulator.state.requests() if r.path == "/api/v1/authenticate"]
    assert len(logins) == 2  # the first, then one more once the pause is over
    assert poller.last_error is not None and "rejected" in poller.last_error


async def test_a_login_that_fails_otherwise_is_tried_again_at_the_next_poll(tmp_path):
    with SimulatorServer(SimulatorConfig(seed=1, endpoints=2)) as simulator:
        simulator.state.set_faults(
            [FaultRule.parse({"path": "/api/v1/authenticate", "kind": "500"})]
        )
        settings = ClientSettings(base_url=simulator.base_url, max_retries=0)
        async with EmnifyClient(simulator.application_token, settings) as client:
            poller = _poller(tmp_path, client, PollerSettings(initial_lookback=timedelta(1)))
            with capture_logs() as logs:
                await poller.poll_once()
                await poller.poll_once()
        logins = [r for r in simulator.state.requests() if r.path == "/api/v1/authenticate"]
    assert len(logins) == 2
    assert not any("pauses" in entry["event"] for entry in logs)
    assert poller.last_error is not None and "login failed" in poller.last_error


# --- a backlog: the next window is fetched while the current one is judged ------------------


class SentLog(httpx.AsyncBaseTransport):
    """The real transport, noting each event-page request as it goes out; the ones numbered
    in `refuse` fail as if the connection had been refused."""

    def __init__(self, log: list[str], refuse: frozenset[int] | set[int] = frozenset()) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._log = log
        self._refuse = refuse
        self._count = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/event":
            self._count += 1
            if self._count in self._refuse:
                self._log.append("refused")
                raise httpx.ConnectError("connection refused", request=request)
            self._log.append("asked")
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _hourly_backlog(simulator: SimulatorServer, hours: int) -> list[dict]:
    return simulator.state.store_events(
        [_quota(simulator, timedelta(hours=h, minutes=30)) for h in range(hours)]
    )


def _fetches_left() -> list[asyncio.Task]:
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and getattr(t.get_coro(), "__qualname__", "") == "Poller._fetch"
    ]


def _noting_commits(tmp_path, api: EmnifyClient, *, hours: int, log: list[str]) -> Poller:
    """A poller over a backlog of `hours` hourly windows that notes each commit in `log`."""
    return _poller(
        tmp_path,
        api,
        PollerSettings(initial_lookback=timedelta(hours=hours), overlap=timedelta(0)),
        on_batch=lambda batch: log.append("committed"),
    )


async def test_the_next_window_is_asked_for_before_the_current_one_is_committed(
    tmp_path, simulator
):
    stored = _hourly_backlog(simulator, 3)
    log: list[str] = []
    # A rate limit with room for the next request at once: otherwise it waits for its turn
    # while the window before it is judged.
    settings = ClientSettings(base_url=simulator.base_url, event_rate_limit=1e6)
    async with EmnifyClient(simulator.application_token, settings, transport=SentLog(log)) as api:
        poller = _noting_commits(tmp_path, api, hours=3, log=log)
        result = await poller.poll_once()
    assert result.windows == 3
    assert log == ["asked", "asked", "committed", "asked", "committed", "committed"]
    assert sorted(_matched(poller)) == sorted(e["id"] for e in stored)


class SlowSecondAnswer(SentLog):
    """As SentLog, noting each event page's answer too; the second comes half a second late."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if request.url.path == "/api/v1/event":
            if self._count == 2:
                await asyncio.sleep(0.5)
            self._log.append("answered")
        return response


async def test_a_window_is_judged_while_the_next_ones_answer_is_still_awaited(tmp_path, simulator):
    _hourly_backlog(simulator, 2)
    log: list[str] = []
    settings = ClientSettings(base_url=simulator.base_url, event_rate_limit=1e6)
    transport = SlowSecondAnswer(log)
    async with EmnifyClient(simulator.application_token, settings, transport=transport) as api:
        poller = _noting_commits(tmp_path, api, hours=2, log=log)
        await poller.poll_once()
    assert log == ["asked", "answered", "asked", "committed", "answered", "committed"]


async def test_the_poller_walks_a_windows_pages_in_id_order_at_its_own_page_size(
    tmp_path, simulator, client
):
    simulator.state.store_events([_quota(simulator, timedelta(minutes=3))] * 5)
    settings = PollerSettings(initial_lookback=timedelta(minutes=5), per_page=2)
    result = await _poller(tmp_path, client, settings).poll_once()
    asked = [parse_qs(r.query) for r in simulator.state.requests() if r.path == "/api/v1/event"]
    assert (result.pages, result.fetched) == (3, 5)
    assert [(q["sort"], q["per_page"], q["page"]) for q in asked] == [
        (["id"], ["2"], [str(page)]) for page in (1, 2, 3)
    ]


async def test_an_api_error_mid_backlog_keeps_the_windows_before_it_and_the_next_poll_resumes(
    tmp_path, simulator
):
    stored = _hourly_backlog(simulator, 4)
    log: list[str] = []
    transport = SentLog(log, refuse={3})  # a failure of exactly that request: mocked
    settings = ClientSettings(base_url=simulator.base_url, event_rate_limit=1e6, max_retries=0)
    async with EmnifyClient(simulator.application_token, settings, transport=transport) as api:
        poller = _noting_commits(tmp_path, api, hours=4, log=log)
        failed = await poller.poll_once()
        assert poller.last_error is not None and "ConnectError" in poller.last_error
        # Windows 1 and 2 committed (2 was fetched while 1 was judged), 3 failed, 4 not asked.
        assert log == ["asked", "asked", "committed", "refused", "committed"]
        assert failed.windows == 2 and failed.cursor == poller.store.get_cursor()
        assert not _fetches_left()
        assert len(_matched(poller)) == 2
        resumed = await poller.poll_once()
    assert poller.last_error is None and resumed.new_events == 2
    assert sorted(_matched(poller)) == sorted(e["id"] for e in stored)  # each once


async def test_a_store_failure_mid_backlog_abandons_the_window_fetched_ahead(
    tmp_path, simulator, client, monkeypatch
):
    stored = _hourly_backlog(simulator, 3)
    poller = _poller(
        tmp_path, client, PollerSettings(initial_lookback=timedelta(hours=3), overlap=timedelta(0))
    )
    store = poller.store
    real_commit = store.commit_batch
    calls = []

    def second_commit_fails(batch, now):  # a failure the simulator cannot produce: the store's
        if batch.seen:  # a window's (not the first start's cursor)
            calls.append(batch)
        if len(calls) == 2 and batch.seen:
            raise StoreError("cannot commit to the state store: database or disk is full")
        return real_commit(batch, now)

    monkeypatch.setattr(store, "commit_batch", second_commit_fails)
    await poller.poll_once()
    assert poller.last_error is not None and "disk is full" in poller.last_error
    assert not _fetches_left()
    assert len(_matched(poller)) == 1
    await poller.poll_once()
    assert poller.last_error is None
    assert sorted(_matched(poller)) == sorted(e["id"] for e in stored)


async def test_a_poll_cancelled_mid_backlog_leaves_no_fetch_behind(tmp_path, simulator, client):
    _hourly_backlog(simulator, 3)
    poll = None

    def stop_after_the_first_window(batch) -> None:
        assert poll is not None
        poll.cancel()

    poller = _poller(
        tmp_path,
        client,
        PollerSettings(initial_lookback=timedelta(hours=3), overlap=timedelta(0)),
        on_batch=stop_after_the_first_window,
    )
    poll = asyncio.create_task(poller.poll_once())
    with pytest.raises(asyncio.CancelledError):
        await poll
    assert not _fetches_left()
    assert len(_matched(poller)) == 1


class HoldSecondRequest(SentLog):
    """As SentLog, but the second event page's request is held before it goes out."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/event" and self._count == 1:
            self._log.append("held")
            await asyncio.Event().wait()
        return await super().handle_async_request(request)


async def test_a_poll_cancelled_while_the_next_windows_request_waits_to_go_out_leaves_no_fetch(
    tmp_path, simulator
):
    _hourly_backlog(simulator, 2)
    log: list[str] = []
    settings = ClientSettings(base_url=simulator.base_url, event_rate_limit=1e6)
    transport = HoldSecondRequest(log)
    async with EmnifyClient(simulator.application_token, settings, transport=transport) as api:
        poller = _noting_commits(tmp_path, api, hours=2, log=log)
        poll = asyncio.create_task(poller.poll_once())
        while "held" not in log:
            await asyncio.sleep(0.01)
        poll.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poll
        left = _fetches_left()
    assert not left
    assert log == ["asked", "held"]  # the first window was not judged either


async def test_a_page_holding_json_the_fast_parser_refuses_is_read_and_passed(
    tmp_path, simulator, client
):
    # Valid JSON that orjson refuses: a number beyond a double, a lone surrogate. Sent over
    # the wire exactly so (orjson.Fragment goes into the simulator's page verbatim).
    odd = [
        _quota(simulator, timedelta(minutes=2), detail={"volume": orjson.Fragment(b"1e400")}),
        _quota(simulator, timedelta(minutes=1), description=orjson.Fragment(b'"a \\ud800 b"')),
    ]
    stored = simulator.state.store_events([_quota(simulator, timedelta(minutes=3)), *odd])
    rules = rules_from(
        tmp_path,
        LOG_ALL.replace(
            "actions: [{log: {}}]", 'actions: [{log: {message: "{{ event.description }}"}}]'
        ),
    )
    store = SqliteStore(tmp_path / "state.sqlite3")
    poller = Poller(
        client,
        Pipeline(rules, store).process,
        PollerSettings(initial_lookback=timedelta(minutes=5)),
        store=store,
    )
    result = await poller.poll_once()
    assert poller.last_error is None
    assert sorted(_matched(poller)) == sorted(e["id"] for e in stored)  # none lost
    assert result.intents == 3
    messages = [i.params["message"] for i in poller.store.intents()]
    assert "a \ufffd b" in messages  # the lone surrogate, replaced: the store can hold it


async def test_an_internal_error_in_a_poll_is_reported_and_the_next_poll_runs(
    tmp_path, simulator, client, monkeypatch
):
    simulator.state.store_events([_quota(simulator, timedelta(seconds=30))])
    poller = _poller(tmp_path, client, PollerSettings(initial_lookback=timedelta(minutes=5)))
    real_process = poller.ingest
    calls = []

    def broken_once(records, **options):  # a bug no input of the simulator's produces
        calls.append(records)
        if len(calls) == 1:
            raise RuntimeError("a bug in the pipeline")
        return real_process(records, **options)

    monkeypatch.setattr(poller, "ingest", broken_once)
    with capture_logs() as logs:
        await poller.poll_once()  # does not raise: the scheduler would only log it
    assert poller.last_error == "internal error: RuntimeError: a bug in the pipeline"
    assert [e["exc_info"] for e in logs if e["event"].startswith("poll failed")] == [True]
    await poller.poll_once()
    assert poller.last_error is None
    assert len(_matched(poller)) == 1


# --- readiness: how old the last good poll may be ------------------------------------------


async def test_the_poller_is_ready_while_its_last_good_poll_is_at_most_three_intervals_old(
    tmp_path, simulator
):
    config = with_poller(engine_config(tmp_path, simulator), interval=timedelta(seconds=4))
    daemon = Daemon(config, rules_from(tmp_path, LOG_ALL), TOKEN)
    source = daemon.source(PollerSource.name)
    assert isinstance(source, PollerSource)
    try:
        assert source.readiness() == Check("poll", False, "no successful poll yet (not yet)")
        await source.poll()
        fresh = source.readiness()
        interval = source.settings.interval.total_seconds()
        source.poller.last_success = time.monotonic() - 3 * interval + 1
        still = source.readiness()
        source.poller.last_success = time.monotonic() - 3 * interval - 1
        stale = source.readiness()
        source.poller.last_error = "HTTP 503"
        failing = source.readiness()
    finally:
        await daemon.aclose()
    assert fresh.ok and fresh.detail.startswith("last successful poll 0.")
    assert still.ok and still.name == "poll"
    limit = f"{3 * interval:.0f}s"
    ago = f"last successful poll {3 * interval + 1:.0f}s ago (limit {limit})"
    assert stale == Check("poll", False, ago)
    assert failing == Check("poll", False, ago + "; last error: HTTP 503")


async def test_a_poll_that_failed_before_any_good_one_says_why_it_is_not_ready(tmp_path):
    with SimulatorServer(SimulatorConfig(seed=1, endpoints=2)) as simulator:
        config = engine_config(tmp_path, simulator)
        config = replace(config, api=replace(config.api, max_retries=0))
        simulator.state.set_faults([FaultRule.parse({"path": "/api/v1/event", "kind": "500"})])
        daemon = Daemon(config, rules_from(tmp_path, LOG_ALL), TOKEN)
        source = daemon.source(PollerSource.name)
        assert isinstance(source, PollerSource)
        try:
            await source.poll()
            check = source.readiness()
            last = orjson.loads(daemon.store.get_meta("last_poll") or "{}")
            good = daemon.store.get_meta("last_poll_ok")
        finally:
            await daemon.aclose()
    assert not check.ok and check.detail.startswith("no successful poll yet (last poll failed: ")
    assert "HTTP 500" in check.detail
    assert last["ok"] is False and "HTTP 500" in last["error"] and good is None


# --- stopping: a poll under way finishes, none starts after -------------------------------


async def test_stopping_waits_for_the_poll_under_way_and_no_poll_runs_after(tmp_path):
    with SimulatorServer(SimulatorConfig(seed=1, endpoints=2)) as simulator:
        slow = {"path": "^/api/v1/event$", "kind": "slow", "delay": 0.5, "count": 1}
        simulator.state.set_faults([FaultRule.parse(slow)])
        daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, LOG_ALL), TOKEN)
        source = daemon.source(PollerSource.name)
        assert isinstance(source, PollerSource)
        try:
            polling = asyncio.create_task(source.poll())
            await asyncio.sleep(0.2)  # the poll waits for its slow page
            await source.stop()
            finished_first = polling.done()
            after = await source.poll()
        finally:
            await daemon.aclose()
    assert finished_first and polling.result() is not None and source.polls == 1
    assert after is None


async def test_a_poller_that_never_polled_stops_at_once(tmp_path, simulator):
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, LOG_ALL), TOKEN)
    source = daemon.source(PollerSource.name)
    assert isinstance(source, PollerSource)
    try:
        await asyncio.wait_for(source.stop(), timeout=2)
    finally:
        await daemon.aclose()
    assert source.polls == 0


async def test_a_poller_started_again_keeps_one_poll_job(tmp_path, simulator):
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, LOG_ALL), TOKEN)
    source = daemon.source(PollerSource.name)
    assert isinstance(source, PollerSource)
    scheduler = source.context.scheduler
    scheduler.start(paused=True)  # no job runs; the jobs are stored as the daemon's are
    try:
        await source.start()
        await source.start()  # leadership lost and won back, say
        jobs = scheduler.get_jobs()
        await source.stop()
    finally:
        scheduler.shutdown(wait=False)
        await daemon.aclose()
    assert [job.id for job in jobs] == ["poll"]


async def test_a_poller_whose_job_is_already_gone_stops_at_once_and_quietly(tmp_path, simulator):
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, LOG_ALL), TOKEN)
    source = daemon.source(PollerSource.name)
    assert isinstance(source, PollerSource)
    try:
        await source.start()
        source.context.scheduler.remove_all_jobs()  # the scheduler dropped it first
        await asyncio.wait_for(source.stop(), timeout=0.9)
    finally:
        await daemon.aclose()
    assert source.polls == 0


def test_the_pollers_start_up_line_says_how_often_it_polls_and_how_far_back_it_reaches(
    tmp_path, simulator
):
    config = with_poller(
        engine_config(tmp_path, simulator),
        interval=timedelta(seconds=4),
        overlap=timedelta(seconds=90),
    )
    daemon = Daemon(config, rules_from(tmp_path, LOG_ALL), TOKEN)
    try:
        line = daemon.source(PollerSource.name).startup_line()
    finally:
        asyncio.run(daemon.aclose())
    assert line == "poller (every 4s, overlap 1m30s)"


def _poller_settings(tmp_path, text: str) -> PollerSettings:
    path = tmp_path / "engine.yaml"
    path.write_text(text, encoding="utf-8")
    settings = load_config(path).source_settings["poller"]
    assert isinstance(settings, PollerSettings)
    return settings


def test_the_poller_section_sets_its_interval_overlap_lookback_and_window(tmp_path):
    settings = _poller_settings(
        tmp_path,
        "poller:\n  interval: 1s\n  overlap: 30s\n  initial_lookback: 2h\n  max_window: 15m\n",
    )
    assert settings == PollerSettings(
        interval=timedelta(seconds=1),
        overlap=timedelta(seconds=30),
        initial_lookback=timedelta(hours=2),
        max_window=timedelta(minutes=15),
    )


def test_without_a_poller_section_the_poller_keeps_its_defaults(tmp_path):
    assert _poller_settings(tmp_path, "sources: [poller]\n") == PollerSettings()


def test_a_poll_interval_under_a_second_is_refused_where_it_is_written(tmp_path):
    with pytest.raises(
        ConfigError, match=r"engine\.yaml:3: `poller\.interval` must be at least 1s"
    ):
        _poller_settings(tmp_path, "poller:\n  overlap: 30s\n  interval: 0.5\n")


async def test_a_poll_that_finds_new_events_says_so_at_info_with_what_it_did(
    tmp_path, simulator, client
):
    simulator.state.store_events([_quota(simulator, timedelta(minutes=3))] * 2)
    poller = _poller(tmp_path, client, PollerSettings(initial_lookback=timedelta(minutes=5)))
    with capture_logs() as logs:
        await poller.poll_once()
    (first,) = [entry for entry in logs if entry["event"] == "first start: polling from"]
    (line,) = [entry for entry in logs if entry["event"] == "poll done"]
    assert "organisation" not in line  # the single organisation is not named
    cursor = poller.store.get_cursor()
    assert cursor is not None
    assert first["start"] == (cursor - timedelta(minutes=5)).isoformat()
    assert line["log_level"] == "info"
    assert (line["windows"], line["pages"], line["fetched"]) == (1, 1, 2)
    assert (line["new"], line["matched"], line["intents"]) == (2, 2, 2)


async def test_a_poll_that_finds_nothing_new_says_so_only_at_debug(tmp_path, simulator, client):
    simulator.state.store_events([_quota(simulator, timedelta(seconds=30))])
    poller = _poller(tmp_path, client, PollerSettings(initial_lookback=timedelta(minutes=5)))
    await poller.poll_once()
    poller.clock = lambda: datetime.now(UTC) + timedelta(seconds=3)  # the overlap re-reads it
    with capture_logs() as logs:
        await poller.poll_once()
    (line,) = [entry for entry in logs if entry["event"] == "poll done"]
    assert line["log_level"] == "debug"
    assert (line["fetched"], line["new"], line["matched"]) == (1, 0, 0)


async def test_a_catch_up_counts_what_every_window_fetched_judged_and_planned(
    tmp_path, simulator, client
):
    hours = [timedelta(hours=h, minutes=10) for h in (2, 1, 0)]
    simulator.state.store_events([_quota(simulator, ago) for ago in hours])
    settings = PollerSettings(
        initial_lookback=timedelta(hours=3), max_window=timedelta(hours=1), overlap=timedelta(0)
    )
    poller = _poller(tmp_path, client, settings)
    result = await poller.poll_once()
    assert (result.windows, result.pages, result.fetched) == (3, 3, 3)
    assert (result.new_events, result.matches, result.intents) == (3, 3, 3)
    assert result.cursor == poller.store.get_cursor()


async def test_the_poller_notes_when_it_last_found_events_no_other_source_had_delivered(
    tmp_path, simulator, client
):
    simulator.state.store_events([_quota(simulator, timedelta(seconds=30))])
    poller = _poller(tmp_path, client, PollerSettings(initial_lookback=timedelta(minutes=5)))
    before = datetime.now(UTC)
    await poller.poll_once()
    fresh = poller.last_fresh_at
    poller.clock = lambda: datetime.now(UTC) + timedelta(seconds=3)  # the overlap re-reads it
    await poller.poll_once()
    assert fresh is not None and before <= fresh <= datetime.now(UTC)
    assert poller.last_fresh_at == fresh  # nothing new the second time


# --- complete time: how far the poller vouches that every event has been read ---------------


def _telling_complete(tmp_path, client, settings: PollerSettings, told: list) -> Poller:
    """A poller whose every committed window notes the complete time it told in `told`."""
    store = SqliteStore(tmp_path / "state.sqlite3")
    pipeline = Pipeline(rules_from(tmp_path, LOG_ALL), store)

    def ingest(records, **options):
        if records or options.get("complete") is not None:
            told.append(options.get("complete"))
        return pipeline.process(records, **options)

    return Poller(client, ingest, settings, store=store)


async def test_a_window_tells_its_newest_event_as_complete_when_that_is_older_than_its_overlap(
    tmp_path, simulator, client
):
    # The newer event is stored first: the API hands pages on by id, not by time.
    newer, _older = simulator.state.store_events(
        [_quota(simulator, timedelta(minutes=20)), _quota(simulator, timedelta(minutes=40))]
    )
    told: list = []
    settings = PollerSettings(initial_lookback=timedelta(hours=1), overlap=timedelta(minutes=2))
    await _telling_complete(tmp_path, client, settings, told).poll_once()
    assert told == [datetime.fromisoformat(newer["timestamp"].replace("Z", "+00:00"))]


async def test_a_window_tells_its_end_less_the_overlap_as_complete_when_events_are_newer(
    tmp_path, simulator, client
):
    simulator.state.store_events([_quota(simulator, timedelta(seconds=10))])
    told: list = []
    settings = PollerSettings(initial_lookback=timedelta(hours=1), overlap=timedelta(minutes=2))
    poller = _telling_complete(tmp_path, client, settings, told)
    result = await poller.poll_once()
    assert result.cursor is not None
    assert told == [result.cursor - timedelta(minutes=2)]


async def test_an_empty_answer_tells_no_complete_time_and_a_later_one_keeps_the_newest_seen(
    tmp_path, simulator, client
):
    told: list = []
    settings = PollerSettings(initial_lookback=timedelta(hours=1), overlap=timedelta(0))
    poller = _telling_complete(tmp_path, client, settings, told)
    await poller.poll_once()
    assert told == []  # nothing shown yet: no complete time at all
    (seen,) = simulator.state.store_events([_quota(simulator, timedelta(0))])
    poller.clock = lambda: datetime.now(UTC) + timedelta(seconds=3)
    await poller.poll_once()
    # A window past the event: the newest time the API showed still stands.
    poller.clock = lambda: datetime.now(UTC) + timedelta(minutes=10)
    await poller.poll_once()
    at = datetime.fromisoformat(seen["timestamp"].replace("Z", "+00:00"))
    assert told == [at, at]


# --- what each poll leaves for `event-engine status` ----------------------------------------


async def test_each_poll_keeps_when_it_ran_what_it_fetched_and_that_it_went_well(
    tmp_path, simulator
):
    simulator.state.store_events([_quota(simulator, timedelta(seconds=30))])
    clock = FixedClock(datetime.now(UTC).replace(microsecond=0))
    daemon = Daemon(
        engine_config(tmp_path, simulator), rules_from(tmp_path, LOG_ALL), TOKEN, clock=clock
    )
    source = daemon.source(PollerSource.name)
    assert isinstance(source, PollerSource)
    try:
        await source.poll()
        last = orjson.loads(daemon.store.get_meta("last_poll") or "{}")
        good = daemon.store.get_meta("last_poll_ok")
        clock.advance(timedelta(seconds=10))
        await source.poll()
        metrics = daemon.metrics.render().decode()
    finally:
        await daemon.aclose()
    at = (clock.now - timedelta(seconds=10)).isoformat()
    assert last == {"at": at, "ok": True, "fetched": 1, "error": None}
    assert good == at
    assert source.polls == 2
    assert metric_value(metrics, "event_engine_polls_total", result="ok") == 2
    assert metric_value(metrics, "event_engine_poll_duration_seconds_count") == 2


async def test_a_poll_refused_its_token_keeps_until_when_polling_pauses(tmp_path):
    with SimulatorServer(SimulatorConfig(seed=1, endpoints=2)) as simulator:
        simulator.state.set_faults(
            [FaultRule.parse({"path": "/api/v1/authenticate", "kind": "403"})]
        )
        config = engine_config(tmp_path, simulator)
        config = replace(config, api=replace(config.api, max_retries=0))
        clock = FixedClock(datetime.now(UTC).replace(microsecond=0))
        daemon = Daemon(config, rules_from(tmp_path, LOG_ALL), TOKEN, clock=clock)
        source = daemon.source(PollerSource.name)
        assert isinstance(source, PollerSource)
        try:
            await source.poll()
            last = orjson.loads(daemon.store.get_meta("last_poll") or "{}")
            good = daemon.store.get_meta("last_poll_ok")
            metrics = daemon.metrics.render().decode()
        finally:
            await daemon.aclose()
    assert metric_value(metrics, "event_engine_polls_total", result="failed") == 1
    assert last["at"] == clock().isoformat() and last["ok"] is False and last["fetched"] == 0
    assert last["paused_until"] == (clock() + timedelta(minutes=5)).isoformat()
    assert "rejected" in last["error"] and good is None


async def test_a_store_that_cannot_keep_the_polls_outcome_does_not_fail_the_poll_job(
    tmp_path, simulator
):
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, LOG_ALL), TOKEN)
    source = daemon.source(PollerSource.name)
    assert isinstance(source, PollerSource)

    def broken(key: str, value: str) -> None:
        raise StoreError("disk full")

    try:
        source.context.store.set_meta = broken  # type: ignore[method-assign]
        result = await source.poll()
    finally:
        await daemon.aclose()
    assert result is not None and source.polls == 1
    assert source.poller.last_error is not None and "disk full" in source.poller.last_error


# --- what a failing poll says, and to whom --------------------------------------------------


async def test_a_failed_login_and_a_failed_poll_say_so_with_the_error_and_the_organisation(
    tmp_path,
):
    with SimulatorServer(SimulatorConfig(seed=1, endpoints=2)) as simulator:
        settings = ClientSettings(base_url=simulator.base_url, max_retries=0)
        async with EmnifyClient(simulator.application_token, settings) as client:
            poller = _poller(tmp_path, client, PollerSettings(initial_lookback=timedelta(1)))
            poller.organisation = "acme"
            simulator.state.set_faults(
                [FaultRule.parse({"path": "/api/v1/authenticate", "kind": "500"})]
            )
            with capture_logs() as login_logs:
                await poller.poll_once()
            login_error = poller.last_error
            simulator.state.set_faults([FaultRule.parse({"path": "/api/v1/event", "kind": "500"})])
            with capture_logs() as poll_logs:
                await poller.poll_once()
            poll_error = poller.last_error
    (login,) = [e for e in login_logs if e["log_level"] == "error"]
    assert login["event"] == "login failed; will try again at the next interval"
    assert login["error"] == login_error and "login failed" in login_error
    assert login["organisation"] == "acme"
    (poll,) = [e for e in poll_logs if e["log_level"] == "error"]
    assert poll["event"] == "poll failed; will try again at the next interval"
    assert poll["error"] == poll_error and "500" in poll_error
    assert poll["organisation"] == "acme"


async def test_an_internal_error_names_its_reason_each_time_and_its_traceback_once(
    tmp_path, simulator, client, monkeypatch
):
    poller = _poller(tmp_path, client, PollerSettings(initial_lookback=timedelta(minutes=5)))
    poller.organisation = "acme"
    failures = iter([RuntimeError("a bug"), RuntimeError("a bug"), KeyError("another")])

    async def broken(result):
        raise next(failures)

    monkeypatch.setattr(poller, "_poll", broken)
    with capture_logs() as logs:
        for _ in range(3):
            await poller.poll_once()
    failed = [e for e in logs if e["event"] == "poll failed; will try again at the next interval"]
    assert [(e["error"], e["exc_info"]) for e in failed] == [
        ("internal error: RuntimeError: a bug", True),
        ("internal error: RuntimeError: a bug", False),  # the same again: no second traceback
        ("internal error: KeyError: 'another'", True),
    ]
    assert {e["organisation"] for e in failed} == {"acme"}


async def test_polling_resumes_at_the_very_moment_a_refused_tokens_pause_ends(tmp_path):
    now = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
    with SimulatorServer(SimulatorConfig(seed=1, endpoints=2)) as simulator:
        settings = ClientSettings(base_url=simulator.base_url, max_retries=0)
        async with EmnifyClient("not-the-token", settings) as client:
            poller = _poller(tmp_path, client, PollerSettings(initial_lookback=timedelta(1)))
            poller.organisation = "acme"
            poller.clock = lambda: now
            with capture_logs() as logs:
                await poller.poll_once()
            assert poller.paused_until == now + timedelta(minutes=5)
            (refused,) = [e for e in logs if e["log_level"] == "error"]
            assert refused == {
                "event": "the application token was refused; polling pauses for 5 minutes",
                "log_level": "error",
                "error": poller.last_error,
                "resume_at": (now + timedelta(minutes=5)).isoformat(),
                "organisation": "acme",
            }
            poller.clock = lambda: now + timedelta(minutes=5)  # the pause's last instant is over
            await poller.poll_once()
        logins = [r for r in simulator.state.requests() if r.path == "/api/v1/authenticate"]
    assert len(logins) == 2


def test_catch_up_progress_gives_the_rate_so_far_and_the_time_left_at_that_pace(monkeypatch):
    ticks = iter([100.0, 104.0, 106.0, 108.0])
    monkeypatch.setattr(poller_module, "time", SimpleNamespace(monotonic=lambda: next(ticks)))
    start = datetime(2026, 12, 5, tzinfo=UTC)
    windows = [(start + timedelta(hours=h), start + timedelta(hours=h + 1)) for h in range(5)]
    with capture_logs() as logs:
        catch_up = poller_module._CatchUp(windows, every=timedelta(seconds=4))
        cursor = start + timedelta(hours=1)
        catch_up.window_done(1, poller_module.PollResult(new_events=8, cursor=cursor))  # 4 s in
        catch_up.window_done(2, poller_module.PollResult(new_events=8))  # 2 s later: quiet
        catch_up.window_done(3, poller_module.PollResult(new_events=16))  # 4 s later: said
    progress = [e for e in logs if e["event"] == "catch-up progress"]
    assert [
        (e["windows"], e["cursor"], e["new"], e["events_per_second"], e["eta_seconds"])
        for e in progress
    ] == [
        ("1/5", cursor.isoformat(), 8, 2, 16),  # 8 events in 4 s; 4 windows left at 4 s each
        ("3/5", None, 16, 2, 5),  # 16 in 8 s; 2 windows left at 8/3 s each
    ]
