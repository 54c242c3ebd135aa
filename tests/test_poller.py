"""The poller over loopback HTTP: windows, overlap, order, cursor, retention, refused tokens."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

import pytest
from structlog.testing import capture_logs

from engine.emnify import ClientSettings, EmnifyClient
from engine.events import format_timestamp
from engine.pipeline import Pipeline
from engine.simulator import SimulatorConfig, SimulatorServer
from engine.sources.poller import Poller, PollerSettings
from engine.store import SqliteStore

from helpers import rules_from

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


def _poller(tmp_path, client, settings: PollerSettings, **kwargs) -> Poller:
    store = SqliteStore(tmp_path / "state.sqlite3")
    return Poller(client, Pipeline(rules_from(tmp_path, LOG_ALL), store), settings, **kwargs)


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
    rows = poller.pipeline.store.audit_rows()
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
    assert poller.pipeline.store.get_cursor() is not None


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
    poller = _poller(tmp_path, client, PollerSettings(overlap=timedelta(seconds=120)))
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


async def test_a_cursor_older_than_the_retention_logs_that_events_were_lost(
    tmp_path, simulator, client
):
    poller = _poller(tmp_path, client, PollerSettings())
    poller.pipeline.store.set_meta("cursor", (datetime.now(UTC) - timedelta(days=31)).isoformat())
    poller.settings = replace(poller.settings, max_window=timedelta(days=31))
    with capture_logs() as logs:
        await poller.poll_once()
    lost = [entry for entry in logs if "events were lost" in entry["event"]]
    assert len(lost) == 1 and lost[0]["log_level"] == "error"
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
