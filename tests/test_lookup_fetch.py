"""Fetching lookups over loopback HTTP against the simulator: the calls behind each name,
the cache per endpoint, failures that stay unavailable, and a catch-up whose lookups stay
within their budget per second and a bounded wait, judged by the pipeline end to end."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.emnify.client import ClientSettings, EmnifyClient
from engine.events import format_timestamp
from engine.lookup_fetch import LookupFetcher, LookupSettings
from engine.lookups import Fact, LookupTable
from engine.metrics import Metrics
from engine.pipeline import Pipeline
from engine.simulator import FIRST_ENDPOINT_ID, FaultRule, SimulatorConfig, SimulatorServer
from engine.sources.poller import Poller, PollerSettings
from engine.store import SqliteStore

from helpers import metric_value, rules_from

FAST: dict[str, Any] = {"event_rate_limit": 1000.0, "action_rate_limit": 1000.0}
ENDPOINTS = 40

HEAVY_USERS = """
rules:
  - id: cap-heavy-users
    when: {type: [18]}
    lookup: [stats.month]
    condition: {">": [{"var": "lookup.stats.month.data.volume"}, 500]}
    actions: [{log: {message: "over 500 MB"}}]
"""


async def no_sleep(seconds: float) -> None:
    return None


@pytest.fixture(scope="module")
def shared_simulator() -> Iterator[SimulatorServer]:
    with SimulatorServer(SimulatorConfig(seed=5, endpoints=ENDPOINTS)) as server:
        yield server


@pytest.fixture
def simulator(shared_simulator: SimulatorServer) -> SimulatorServer:
    shared_simulator.state.reset()
    shared_simulator.lookups.clear()
    return shared_simulator


def connect(server: SimulatorServer) -> EmnifyClient:
    settings = ClientSettings(base_url=server.base_url, **FAST)
    return EmnifyClient(server.application_token, settings, sleep=no_sleep)


def lookup_calls(server: SimulatorServer) -> list[str]:
    """Paths of the lookup GETs the simulator answered (its log is written after answering)."""
    pattern = re.compile(r"^/api/v1/endpoint/\d+/(quota/\w+|stats|connectivity)$")
    seen: list[str] = []
    for _ in range(50):
        now = [r.path for r in server.state.requests() if r.method == "GET"]
        now = [path for path in now if pattern.match(path)]
        if now == seen and seen:
            break
        seen = now
        time.sleep(0.02)
    return seen


def usage(volume: float) -> dict[str, Any]:
    month = {"data": {"volume": volume, "volume_tx": 0.0, "volume_rx": volume}, "sms": {}}
    return {"current_month": month, "last_month": month, "last_hour": month}


async def test_each_lookup_reads_its_call_and_a_second_batch_is_served_from_the_cache(
    simulator: SimulatorServer,
) -> None:
    endpoint = FIRST_ENDPOINT_ID
    quota = {"status": {"id": 1}, "volume": 12.5, "expiry_date": "2025-06-01T00:00:00Z"}
    online = {"status": {"description": "ONLINE"}, "services": ["GPRS"]}
    simulator.lookups.set(endpoint, quota_data=quota, stats=usage(640.0), connectivity=online)
    async with connect(simulator) as client:
        fetcher = LookupFetcher(client, LookupSettings(per_second=100.0))
        names = {"quota.data", "quota.sms", "stats.month", "connectivity"}

        first = await fetcher.fetch({endpoint: names})
        again = await fetcher.fetch({endpoint: names})

    assert first[endpoint] == {
        "quota.data": Fact(quota),
        "quota.sms": Fact(None),  # the endpoint has no SMS quota: the API answers 404
        "stats.month": Fact(usage(640.0)["current_month"]),
        "connectivity": Fact(online),
    }
    assert again == first
    assert sorted(lookup_calls(simulator)) == sorted(
        f"/api/v1/endpoint/{endpoint}/{tail}"
        for tail in ("quota/data", "quota/sms", "stats", "connectivity")
    )


async def test_a_fact_older_than_the_ttl_is_fetched_again(simulator: SimulatorServer) -> None:
    endpoint = FIRST_ENDPOINT_ID
    now = [1000.0]
    async with connect(simulator) as client:
        fetcher = LookupFetcher(
            client,
            LookupSettings(ttl=timedelta(minutes=5), per_second=100.0),
            monotonic=lambda: now[0],
        )
        simulator.lookups.set(endpoint, stats=usage(10.0))
        await fetcher.fetch({endpoint: {"stats.month"}})
        simulator.lookups.set(endpoint, stats=usage(900.0))
        now[0] += 299
        cached = await fetcher.fetch({endpoint: {"stats.month"}})
        now[0] += 2
        fresh = await fetcher.fetch({endpoint: {"stats.month"}})

    assert cached[endpoint]["stats.month"].value["data"]["volume"] == 10.0
    assert fresh[endpoint]["stats.month"].value["data"]["volume"] == 900.0
    assert fetcher.fetched == 2


async def test_a_throttled_lookup_is_unavailable_and_not_cached(
    simulator: SimulatorServer,
) -> None:
    endpoint = FIRST_ENDPOINT_ID
    simulator.state.set_faults([FaultRule.parse({"kind": "429", "path": ".*/connectivity$"})])
    async with connect(simulator) as client:
        fetcher = LookupFetcher(client, LookupSettings(per_second=100.0))
        throttled = await fetcher.fetch({endpoint: {"connectivity"}})
        simulator.state.set_faults([])
        recovered = await fetcher.fetch({endpoint: {"connectivity"}})

    fact = throttled[endpoint]["connectivity"]
    assert not fact.available
    assert fact.error is not None and fact.error.startswith("HTTP 429 from the API")
    assert recovered[endpoint]["connectivity"].value["status"] == {"description": "OFFLINE"}


async def test_a_catch_up_fetches_within_its_budget_and_the_rest_is_unavailable(
    simulator: SimulatorServer, tmp_path: Path
) -> None:
    """A catch-up: one quota event for each of 40 endpoints in one batch, lookups at
    10 per second, a batch waiting at most 0.5 s. About six are fetched, the rest are
    `lookup unavailable`, and the batch is judged within about the wait."""
    endpoints = [FIRST_ENDPOINT_ID + n for n in range(ENDPOINTS)]
    for endpoint in endpoints:
        simulator.lookups.set(endpoint, stats=usage(800.0))
    records = [
        {
            "id": n + 1,
            "timestamp": "2025-05-01T10:00:00Z",
            "event_type": {"id": 18},
            "event_source": {"id": 1},
            "event_severity": {"id": 1},
            "endpoint": {"id": endpoint, "name": f"truck-{n}"},
        }
        for n, endpoint in enumerate(endpoints)
    ]
    pipeline = Pipeline(rules_from(tmp_path, HEAVY_USERS), SqliteStore(tmp_path / "e.sqlite3"))
    settings = LookupSettings(per_second=10.0, max_wait=timedelta(seconds=0.5))
    async with connect(simulator) as client:
        fetcher = LookupFetcher(client, settings)
        started = time.monotonic()
        lookups = await fetcher.fetch(pipeline.wanted_lookups(records))
        took = time.monotonic() - started
        result = pipeline.process(records, source="poller", lookups=lookups)

    outcomes = [d.outcome for d in result.decisions]
    assert 3 <= fetcher.fetched <= 8
    assert fetcher.fetched + fetcher.over_budget == ENDPOINTS
    assert outcomes.count("fired") == fetcher.fetched
    assert outcomes.count("lookup_unavailable") == ENDPOINTS - fetcher.fetched
    assert took < 1.5
    assert len(lookup_calls(simulator)) == fetcher.fetched


def test_the_config_sets_the_lookups_budget(tmp_path: Path) -> None:
    from engine.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text("lookups: {ttl: 2m, per_second: 2.5, max_wait: 0.3}\n", encoding="utf-8")
    config = load_config(path)
    assert config.lookups == LookupSettings(
        ttl=timedelta(minutes=2), per_second=2.5, max_wait=timedelta(milliseconds=300)
    )


async def test_a_slow_answer_is_unavailable_after_max_wait(simulator: SimulatorServer) -> None:
    endpoint = FIRST_ENDPOINT_ID
    simulator.state.set_faults(
        [FaultRule.parse({"kind": "slow", "path": ".*/connectivity$", "delay": 1})]
    )
    async with connect(simulator) as client:
        fetcher = LookupFetcher(client, LookupSettings(max_wait=timedelta(seconds=0.3)))
        started = time.monotonic()
        table = await fetcher.fetch({endpoint: {"connectivity"}})
        took = time.monotonic() - started
    simulator.state.set_faults([])

    assert table[endpoint]["connectivity"] == Fact(error="no answer within 0.3s")
    assert took < 1.0


async def test_a_poller_catch_up_under_a_rate_limit_keeps_moving_and_judges_every_window(
    simulator: SimulatorServer, tmp_path: Path
) -> None:
    """Three hours of backlog, 40 devices over their usage, lookups at 4 a second and a
    batch waiting 0.3 s, the API throttling some of the stats calls: every window is judged
    and committed, no rule acts on a fact it does not have, and the catch-up takes about
    the windows' waits, not the lookups' backlog."""
    sims = simulator.state.sims()[:ENDPOINTS]
    now = datetime.now(UTC)
    partials = [
        {
            "event_type": {"id": 18},
            "sim_id": sim["id"],
            "timestamp": format_timestamp(now - timedelta(hours=2, minutes=50) + n * step),
        }
        for n, sim in enumerate(sims)
        for step in (timedelta(minutes=4),)
    ]
    stored = simulator.state.store_events(partials)
    for event in stored:
        simulator.lookups.set(event["endpoint"]["id"], stats=usage(800.0))
    simulator.state.set_faults(
        [FaultRule.parse({"kind": "429", "path": ".*/stats$", "count": 2, "retry_after": 0})]
    )
    store = SqliteStore(tmp_path / "state.sqlite3")
    pipeline = Pipeline(rules_from(tmp_path, HEAVY_USERS), store)
    settings = LookupSettings(per_second=4.0, max_wait=timedelta(seconds=0.3))
    async with connect(simulator) as client:
        fetcher = LookupFetcher(client, settings)

        async def look_up(records: Sequence[object]) -> LookupTable | None:
            return await fetcher.fetch(pipeline.wanted_lookups(records))

        poller = Poller(
            client,
            pipeline.process,
            PollerSettings(initial_lookback=timedelta(hours=3), max_window=timedelta(hours=1)),
            store=store,
            look_up=look_up,
        )
        started = time.monotonic()
        result = await poller.poll_once()
        took = time.monotonic() - started
    simulator.state.set_faults([])

    rows = store.audit_rows()
    fired = {intent.event_id for intent in store.intents()}
    unavailable = {r["event_id"] for r in rows if r["outcome"] == "lookup_unavailable"}
    assert result.windows >= 3
    assert result.new_events == len(stored)
    assert fired | unavailable == {e["id"] for e in stored}
    assert not fired & unavailable
    assert 0 < len(fired) <= fetcher.fetched
    assert len(fired) < len(stored)  # the budget, not the backlog, set the pace
    assert took < result.windows * 0.6 + 2.0


async def test_metrics_tell_an_exhausted_budget_from_an_api_error(
    simulator: SimulatorServer,
) -> None:
    """One call a second and a 0.3 s wait: of three endpoints' facts one is fetched and two
    find no budget; a throttled call (429) is an api_error, and every call made is timed."""
    metrics = Metrics()
    endpoints = [FIRST_ENDPOINT_ID + n for n in range(3)]
    settings = LookupSettings(per_second=1.0, max_wait=timedelta(seconds=0.3))
    async with connect(simulator) as client:
        fetcher = LookupFetcher(client, settings, on_lookup=metrics.observe_lookup)
        await fetcher.fetch({endpoint: {"stats.month"} for endpoint in endpoints})
        simulator.state.set_faults([FaultRule.parse({"kind": "429", "path": ".*/connectivity$"})])
        await asyncio.sleep(1.0)  # the budget's next call
        await fetcher.fetch({endpoints[0]: {"connectivity"}})

    text = metrics.render().decode()

    def counted(fact: str, outcome: str) -> float | None:
        return metric_value(text, "event_engine_lookups_total", fact=fact, outcome=outcome)

    assert counted("stats.month", "fetched") == 1.0
    assert counted("stats.month", "budget_exhausted") == 2.0
    assert counted("connectivity", "api_error") == 1.0
    timed = "event_engine_lookup_fetch_duration_seconds_count"
    assert metric_value(text, timed, fact="stats.month") == 1.0
    assert metric_value(text, timed, fact="connectivity") == 1.0
