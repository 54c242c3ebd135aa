"""Lookups through the running daemon: a Data Streamer delivery's lookup rules are judged on
facts the daemon fetched from the API (the simulator, over loopback) before judging."""

from __future__ import annotations

from dataclasses import replace

import httpx
import orjson

from engine.daemon import Daemon
from engine.http.service import HttpService
from engine.http.settings import HttpSettings
from engine.lookup_fetch import LookupSettings
from engine.model import IntentStatus
from engine.sources.streamer import StreamerSettings
from engine.store import SqliteStore

from helpers import TOKEN, engine_config, ingest_url, metric_value, rules_from, running_daemon

SECRET = "streamer-secret-for-tests-0123"
RULES = """
rules:
  - id: tell-ops-when-online-and-heavy
    when: {type: [19]}
    lookup: [stats.month, connectivity]
    condition:
      and:
        - {">": [{"var": "lookup.stats.month.data.volume"}, 500]}
        - {"==": [{"var": "lookup.connectivity.status.description"}, "ONLINE"]}
    actions:
      - log: {message: "{{ lookup.stats.month.data.volume }} MB"}
"""


def _usage(volume: float) -> dict:
    month = {"data": {"volume": volume}, "sms": {"volume": 0}}
    return {"current_month": month, "last_month": month, "last_hour": month}


async def test_a_delivery_is_judged_on_the_facts_the_daemon_looked_up(tmp_path, simulator):
    sims = simulator.state.sims()[:3]
    events = simulator.state.store_events(
        [{"event_type": {"id": 19}, "sim_id": s["id"]} for s in sims]
    )
    heavy, light, offline = (event["endpoint"]["id"] for event in events)
    online = {"status": {"description": "ONLINE"}, "services": []}
    simulator.lookups.set(heavy, stats=_usage(812.0), connectivity=online)
    simulator.lookups.set(light, stats=_usage(12.0), connectivity=online)
    simulator.lookups.set(offline, stats=_usage(900.0))  # connectivity: OFFLINE
    config = replace(
        engine_config(tmp_path, simulator),
        sources=("data_streamer",),
        lookups=LookupSettings(per_second=50.0),
    )
    config = config.with_source_settings(data_streamer=StreamerSettings(secret=SECRET))
    service = HttpService(HttpSettings(port=0))
    service.bind()
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN, services=[service])
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        answer = await client.post(
            ingest_url(service), content=orjson.dumps(events), headers={"X-Emnify-Secret": SECRET}
        )
    assert answer.status_code == 200

    store = SqliteStore(config.store_path)
    planned = store.intents()
    assert [intent.event_id for intent in planned] == [events[0]["id"]]
    assert planned[0].status in (IntentStatus.SHADOW, IntentStatus.PENDING, IntentStatus.DONE)
    outcomes = {(r["event_id"], r["outcome"]) for r in store.audit_rows()}
    assert (events[1]["id"], "condition_false") in outcomes
    assert (events[2]["id"], "condition_false") in outcomes


async def test_metrics_count_each_lookup_by_fact_and_outcome(tmp_path, simulator):
    """Two deliveries for the same three endpoints: the first fetches both facts of each,
    the second finds them in the cache; /metrics counts both, and times the calls."""
    sims = simulator.state.sims()[:3]
    quota_events = [{"event_type": {"id": 19}, "sim_id": s["id"]} for s in sims]
    first = simulator.state.store_events(quota_events)
    again = simulator.state.store_events(quota_events)
    config = replace(
        engine_config(tmp_path, simulator),
        sources=("data_streamer",),
        lookups=LookupSettings(per_second=50.0),
    )
    config = config.with_source_settings(data_streamer=StreamerSettings(secret=SECRET))
    service = HttpService(HttpSettings(port=0))
    service.bind()
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN, services=[service])
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        for events in (first, again):
            answer = await client.post(
                ingest_url(service),
                content=orjson.dumps(events),
                headers={"X-Emnify-Secret": SECRET},
            )
            assert answer.status_code == 200
        text = (await client.get(service.base_url + "/metrics")).text

    for fact in ("stats.month", "connectivity"):
        for outcome in ("fetched", "cache_hit"):
            counted = metric_value(text, "event_engine_lookups_total", fact=fact, outcome=outcome)
            assert counted == 3.0, (fact, outcome)
        timed = metric_value(text, "event_engine_lookup_fetch_duration_seconds_count", fact=fact)
        assert timed == 3.0
    assert metric_value(text, "event_engine_lookups_total", outcome="budget_exhausted") is None
