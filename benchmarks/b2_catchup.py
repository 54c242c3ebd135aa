"""B2 catch-up: a backlog after downtime, polled over loopback HTTP, against a bare loop.

The simulator runs in its own process with a backlog of events spread over the last days
(up to the API's 30-day retention). The engine's poller (real client, real pipeline, a real
SQLite file) catches up from a cursor that far back, window by window, until the last event
is committed. The reference is a bare httpx loop that fetches the very same pages (the URLs
the poller asked for, read back from the simulator's request log) and parses them with orjson,
doing nothing else. Both run in this process, one after the other.

The client's rate limit (5 requests/s by default, emnify allows 10) is lifted for both: it
is a courtesy to the API, not a cost of the engine, and would make both sides equally slow.

Target: the engine catches up at least 3× faster than the real API can deliver. emnify
allows 2,000 requests per source IP per 5 minutes (emnify-api.md §7.1), 6.67 requests/s,
and a page holds at most what the client asks for, `ClientSettings.per_page` (1,000): the
API's own maximum for events is not documented and it clamps silently (§3.3, §12), so a
larger page is never what the engine gets. The API thus delivers at most 6.67 × 1,000 =
6,667 events/s, full pages every time; the backlog's pages here are not full (a window of
an hour holds a few hundred events), which only makes the engine's side harder. The bare
loop's rate is printed beside it, without a target: how close the engine comes to fetching
and parsing alone.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import httpx
import orjson

from benchmarks.harness import Figure, Report, at_least, rules_file
from benchmarks.simulator_process import simulator_process
from engine.emnify import ClientSettings, EmnifyClient
from engine.leadership import LEASE
from engine.model import Fence
from engine.pipeline import Pipeline
from engine.ports import Store
from engine.rules import RuleSet, load_rules
from engine.simulator import SimulatorConfig
from engine.sources.poller import Poller, PollerSettings
from engine.store import SqliteStore

# What the real API allows (emnify-api.md §7.1) and the page size the benchmark assumes.
API_REQUESTS = 2000
API_PERIOD_S = 300.0
PAGE_SIZE = ClientSettings().per_page
API_FACTOR = 3.0
_TOKEN = SimulatorConfig().application_token
_UNLIMITED = 1_000_000.0
_HOLDER = "bench"


async def engine_catch_up(
    base_url: str, rules: RuleSet, days: float, store: Store
) -> tuple[int, float]:
    """(events committed, seconds) for one poll from a cursor `days` back to now, into
    `store` (closed afterwards). Every window is committed under the leader lease's fence,
    as the daemon's poller commits it (an instance that runs alone leads)."""
    settings = ClientSettings(
        base_url=base_url, event_rate_limit=_UNLIMITED, action_rate_limit=_UNLIMITED
    )
    client = EmnifyClient(_TOKEN, settings)
    try:
        token = store.acquire_lease(LEASE, _HOLDER, timedelta(hours=1), datetime.now(UTC))
        assert token is not None, "a fresh store's lease is free"
        poller = Poller(
            client,
            partial(Pipeline(rules, store).process, fence=Fence(LEASE, _HOLDER, token)),
            PollerSettings(initial_lookback=timedelta(days=days + 0.5)),
            store=store,
        )
        await client.authenticate()  # the bare loop logs in before its clock starts, too
        started = time.perf_counter()
        result = await poller.poll_once()
        seconds = time.perf_counter() - started
        if poller.last_error:
            raise RuntimeError(f"the poll failed: {poller.last_error}")
    finally:
        await client.aclose()
        store.close()
    return result.new_events, seconds


async def event_queries(base_url: str) -> list[str]:
    """The event-page requests the simulator answered, in order (path and query)."""
    async with httpx.AsyncClient(base_url=base_url) as http:
        log = (await http.get("/admin/requests")).json()
    return [
        f"{r['path']}?{r['query']}"
        for r in log
        if r["method"] == "GET" and r["path"] == "/api/v1/event" and r["status"] == 200
    ]


async def bare_loop(base_url: str, queries: list[str]) -> tuple[int, float]:
    """(events, seconds) to fetch and parse the same pages with nothing else."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as http:
        login = await http.post("/api/v1/authenticate", json={"application_token": _TOKEN})
        headers = {"Authorization": f"Bearer {login.json()['auth_token']}"}
        events = 0
        started = time.perf_counter()
        for query in queries:
            response = await http.get(query, headers=headers)
            response.raise_for_status()
            events += len(orjson.loads(response.content))
        seconds = time.perf_counter() - started
    return events, seconds


async def _measure(report: Report, backlog: int, days: float) -> None:
    rules = load_rules(rules_file(50))
    engine_rate = bare_rate = 0.0
    pages = 0
    with simulator_process(backlog, days) as base_url, tempfile.TemporaryDirectory() as tmp:
        # The better of two, in the quick run too: its catch-up lasts about a second.
        for attempt in range(2):
            async with httpx.AsyncClient(base_url=base_url) as http:
                await http.delete("/admin/requests")  # from now on, the engine's requests only
            state = Path(tmp) / f"engine-{attempt}.sqlite3"
            committed, seconds = await engine_catch_up(base_url, rules, days, SqliteStore(state))
            if committed != backlog:
                report.note(f"B2: the engine committed {committed:,} of {backlog:,} events")
            engine_rate = max(engine_rate, committed / seconds)
            queries = await event_queries(base_url)
            pages = len(queries)
            fetched, seconds = await bare_loop(base_url, queries)
            bare_rate = max(bare_rate, backlog / seconds)
            del fetched
    ceiling = api_ceiling()
    report.add(
        Figure(
            "B2",
            f"catch-up of {backlog:,} events over {days:g} days ({pages} pages) vs what the "
            f"API can deliver",
            engine_rate,
            "events/s",
            f"the API at {API_REQUESTS:,} requests / {API_PERIOD_S / 60:g} min × "
            f"{PAGE_SIZE:,} events a page",
            ceiling,
            f"≥ {API_FACTOR:g}× the API's delivery",
            at_least(engine_rate, ceiling, API_FACTOR),
        )
    )
    report.add(
        Figure(
            "B2",
            "catch-up vs a bare httpx loop fetching and parsing the same pages",
            engine_rate,
            "events/s",
            "bare httpx loop",
            bare_rate,
        )
    )


def api_ceiling(page_size: int = PAGE_SIZE) -> float:
    """The most events a second the real API can deliver to one client: every request
    it allows returns a full page."""
    return API_REQUESTS / API_PERIOD_S * page_size


def run(report: Report, *, backlog: int, days: float = 29.0) -> None:
    asyncio.run(_measure(report, backlog, days))
