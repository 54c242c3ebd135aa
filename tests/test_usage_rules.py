"""Usage records as rule input, over loopback: the Data Streamer pushes usage records, a rule
with `usage:` sums them per endpoint in a sliding window kept in the SQLite file, and acts
once the sum crosses its limit (issue 17, deliverable 4)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
from structlog.testing import capture_logs

from engine.cli import main
from engine.daemon import Daemon
from engine.http.service import HttpService
from engine.http.settings import HttpSettings
from engine.simulator import SimulatorServer
from engine.sources.streamer import INGEST_PATH, StreamerSettings
from engine.store import SqliteStore

from helpers import (
    TOKEN,
    engine_config,
    eventually,
    ingest_url,
    metric_value,
    rules_from,
    running_daemon,
)

SECRET = "streamer-secret-for-usage-tests"
THROTTLED = 102  # the simulator's "Throttled 64 kbps" service profile
RULES = """
rules:
  - id: heavy-data-user
    description: Throttle an endpoint that used more than 200 MB in a day
    usage:
      data: ">200MB"
      within: 24h
      per: endpoint
    throttle: {per: endpoint.id, for: 24h}
    actions:
      - change_service_profile: {name: "Throttled 64 kbps"}
"""
NOW = datetime.now(UTC).replace(microsecond=0)


def data_record(
    record_id: int, endpoint: dict[str, Any], mb: float, at: datetime = NOW
) -> dict[str, Any]:
    """A data usage record as the Data Streamer sends it (emnify-api.md §8): `mb` used in the
    45 s before `at`."""
    return {
        "id": record_id,
        "traffic_type": {"id": 5, "description": "Data"},
        "start_timestamp": (at - timedelta(seconds=45)).isoformat().replace("+00:00", "Z"),
        "end_timestamp": at.isoformat().replace("+00:00", "Z"),
        "volume": {"rx": mb * 0.8, "tx": mb * 0.2, "total": mb},
        "cost": 0.01,
        "currency": {"id": 1, "code": "EUR", "symbol": "€"},
        "endpoint": {"id": endpoint["id"], "name": endpoint["name"], "tags": endpoint["tags"]},
        "sim": {"id": endpoint["sim"]["id"], "iccid": endpoint["sim"]["iccid"]},
        "imsi": endpoint["sim"]["imsi"],
        "operator": {"id": 2, "name": "Telekom", "country": {"id": 74, "name": "Germany"}},
    }


def _daemon(tmp_path: Path, simulator: SimulatorServer, rules: str = RULES) -> Daemon:
    config = replace(engine_config(tmp_path, simulator), sources=("data_streamer",))
    config = config.with_source_settings(data_streamer=StreamerSettings(secret=SECRET))
    service = HttpService(HttpSettings(port=0))
    service.bind()
    return Daemon(config, rules_from(tmp_path, rules), TOKEN, services=[service])


@asynccontextmanager
async def daemon_client(daemon: Daemon) -> AsyncIterator[httpx.AsyncClient]:
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        yield client


def _url(daemon: Daemon) -> str:
    (service,) = [s for s in daemon.services if isinstance(s, HttpService)]
    return ingest_url(service)


async def _push(client: httpx.AsyncClient, daemon: Daemon, *records: object) -> dict[str, int]:
    answer = await client.post(
        _url(daemon), content=orjson.dumps(list(records)), headers={"X-Emnify-Secret": SECRET}
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, int] = answer.json()
    return body


def _profile(simulator: SimulatorServer, endpoint: dict[str, Any]) -> int:
    return int(simulator.state.endpoint(endpoint["id"])["service_profile"]["id"])


def _intents(daemon: Daemon) -> list[str]:
    store = SqliteStore(daemon.config.store_path)
    return [intent.kind for intent in store.intents()]


def _decisions(daemon: Daemon, outcome: str) -> list[str]:
    store = SqliteStore(daemon.config.store_path)
    return [row["detail"] for row in store.audit_rows() if row["outcome"] == outcome]


async def test_the_service_profile_changes_once_the_pushed_usage_sums_past_the_limit(
    tmp_path, simulator
):
    endpoint = simulator.state.endpoints()[0]
    daemon = _daemon(tmp_path, simulator)
    async with daemon_client(daemon) as client:
        first = await _push(client, daemon, data_record(1001, endpoint, 150.0))
        assert _profile(simulator, endpoint) != THROTTLED
        second = await _push(client, daemon, data_record(1002, endpoint, 62.4))
        await eventually(lambda: _profile(simulator, endpoint) == THROTTLED)
        third = await _push(client, daemon, data_record(1003, endpoint, 300.0))
    assert first["usage_used"] == 1 and first["new"] == 1
    assert second["usage_used"] == 1
    assert third["usage_used"] == 1  # counted into a fresh window; the throttle holds it
    assert _intents(daemon) == ["change_service_profile"]
    assert _decisions(daemon, "fired") == [
        f"usage 212.4 MB in 24h > 200 MB for endpoint.id={endpoint['id']}"
    ]
    below = _decisions(daemon, "below_threshold")
    assert below == [f"usage 150 MB in 24h, not > 200 MB for endpoint.id={endpoint['id']}"]


async def test_why_tells_the_usage_that_made_the_rule_act(tmp_path, simulator, capsys):
    endpoint = simulator.state.endpoints()[0]
    daemon = _daemon(tmp_path, simulator)
    async with daemon_client(daemon) as client:
        await _push(client, daemon, data_record(8001, endpoint, 150.0))
        await _push(client, daemon, data_record(8002, endpoint, 62.4))
    capsys.readouterr()
    iccid = endpoint["sim"]["iccid"]
    assert main(["why", "--store", str(daemon.config.store_path), "--sim", iccid]) == 0
    shown = capsys.readouterr().out
    assert "usage record 8001" in shown and "usage record 8002" in shown
    assert f"usage 212.4 MB in 24h > 200 MB for endpoint.id={endpoint['id']}" in shown


async def test_a_usage_record_pushed_twice_counts_once(tmp_path, simulator):
    endpoint = simulator.state.endpoints()[0]
    daemon = _daemon(tmp_path, simulator)
    record = data_record(2001, endpoint, 150.0)
    async with daemon_client(daemon) as client:
        first = await _push(client, daemon, record)
        again = await _push(client, daemon, record, record)
    assert first["new"] == 1
    assert again["new"] == 0 and again["duplicates"] == 2
    assert _intents(daemon) == []
    assert _profile(simulator, endpoint) != THROTTLED


async def test_the_usage_window_survives_a_restart_of_the_engine(tmp_path, simulator):
    endpoint = simulator.state.endpoints()[0]
    before = _daemon(tmp_path, simulator)
    async with daemon_client(before) as client:
        await _push(client, before, data_record(3001, endpoint, 150.0))
    after = _daemon(tmp_path, simulator)  # a new process on the same SQLite file
    assert after.config.store_path == before.config.store_path
    async with daemon_client(after) as client:
        await _push(client, after, data_record(3002, endpoint, 60.0))
        await eventually(lambda: _profile(simulator, endpoint) == THROTTLED)
    assert _decisions(after, "fired") == [
        f"usage 210 MB in 24h > 200 MB for endpoint.id={endpoint['id']}"
    ]


async def test_records_of_other_endpoints_do_not_count(tmp_path, simulator):
    one, other = simulator.state.endpoints()[:2]
    daemon = _daemon(tmp_path, simulator)
    async with daemon_client(daemon) as client:
        await _push(
            client,
            daemon,
            data_record(4001, one, 150.0),
            data_record(4002, other, 150.0),
            data_record(4003, other, 10.0),
        )
    assert _intents(daemon) == []
    assert sorted(_decisions(daemon, "below_threshold")) == sorted(
        [
            f"usage 150 MB in 24h, not > 200 MB for endpoint.id={one['id']}",
            f"usage 10 MB in 24h, not > 200 MB for endpoint.id={other['id']}",
            f"usage 160 MB in 24h, not > 200 MB for endpoint.id={other['id']}",
        ]
    )


async def test_records_older_than_the_window_fall_out_of_the_sum(tmp_path, simulator):
    endpoint = simulator.state.endpoints()[0]
    daemon = _daemon(tmp_path, simulator)
    async with daemon_client(daemon) as client:
        await _push(client, daemon, data_record(5001, endpoint, 150.0, NOW - timedelta(hours=25)))
        await _push(client, daemon, data_record(5002, endpoint, 100.0))
        await _push(client, daemon, data_record(5003, endpoint, 100.1, NOW + timedelta(hours=1)))
        await eventually(lambda: _profile(simulator, endpoint) == THROTTLED)
    assert _decisions(daemon, "below_threshold")[-1] == (
        f"usage 100 MB in 24h, not > 200 MB for endpoint.id={endpoint['id']}"
    )
    assert _decisions(daemon, "fired") == [
        f"usage 200.1 MB in 24h > 200 MB for endpoint.id={endpoint['id']}"
    ]


async def test_a_malformed_usage_record_is_quarantined_with_its_reason(tmp_path, simulator):
    endpoint = simulator.state.endpoints()[0]
    daemon = _daemon(tmp_path, simulator)
    broken = {**data_record(6001, endpoint, 1.0), "volume": {"total": "lots"}}
    no_volume = {key: value for key, value in data_record(6002, endpoint, 1.0).items()}
    del no_volume["volume"]
    async with daemon_client(daemon) as client:
        answer = await _push(client, daemon, broken, no_volume, data_record(6003, endpoint, 1.0))
    assert answer["quarantined"] == 2 and answer["usage_used"] == 1
    reasons = [row["reason"] for row in SqliteStore(daemon.config.store_path).quarantined()]
    assert sorted(reasons) == [
        "usage record volume.total: not a number: 'lots'",
        "usage record volume: missing or not an object",
    ]


async def test_usage_records_count_as_used_only_while_a_rule_uses_them(tmp_path, simulator):
    endpoint = simulator.state.endpoints()[0]
    event_rules = """
    rules:
      - id: log-quota
        when: {type: "Quota used up"}
        actions: [{log: {}}]
    """
    (tmp_path / "used").mkdir()
    (tmp_path / "ignored").mkdir()
    used = _daemon(tmp_path / "used", simulator)
    ignored = _daemon(tmp_path / "ignored", simulator, event_rules)
    counts = {}
    for name, daemon in (("used", used), ("ignored", ignored)):
        async with daemon_client(daemon) as client:
            await _push(client, daemon, data_record(7001, endpoint, 1.0))
            metrics = (await client.get(_url(daemon).replace(INGEST_PATH, "/metrics"))).text
        counts[name] = (
            metric_value(metrics, "event_engine_streamer_usage_records_used_total"),
            metric_value(metrics, "event_engine_streamer_usage_records_ignored_total"),
        )
    assert counts == {"used": (1.0, 0.0), "ignored": (0.0, 1.0)}
    assert SqliteStore(ignored.config.store_path).seen_count() == 0


async def test_the_engine_warns_at_start_when_no_source_delivers_usage_records(tmp_path, simulator):
    config = engine_config(tmp_path, simulator)  # the poller only: events, no usage records
    with capture_logs() as logs:
        daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN)
    await daemon.aclose()
    (warning,) = [entry for entry in logs if "source of usage records" in entry["event"]]
    assert warning["log_level"] == "warning" and warning["rules"] == ["heavy-data-user"]
