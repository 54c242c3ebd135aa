"""Fetching the facts rules look up (`lookup:`), for a batch, before the pipeline judges it.

The pipeline says which facts which endpoints need (`Pipeline.wanted_lookups`); this
adapter answers from its cache or the API and hands back a `LookupTable`, which the core
reads as plain data (`engine.lookups`). Three things keep it from hurting the rest:

- **a cache per endpoint and fact**, kept for `ttl`: a flapping device asks the API once
  per `ttl`, not once per event;
- **a budget per second** (`per_second`, a token bucket from aiolimiter), well inside the
  API's per-path limits (emnify-api.md §7.1: 100 req/s for `/endpoint/{id}/stats/*`, 50
  for `/endpoint/{id}/connectivity`, 2 000 per IP per 5 minutes overall);
- **a bound on the wait** (`max_wait`): a batch waits at most this long for budget, and
  what is still unfetched then is *unavailable*; a call given budget has `max_wait` again
  to answer (the client's own retries of a 429 or a 5xx included), or it is unavailable
  too. A catch-up of thousands of events thus costs each batch at most twice `max_wait`,
  and the poller keeps moving; the rules record `lookup unavailable` and act or not as
  their `on_lookup_error` says.

A failed call (429, 5xx, no answer) is unavailable too, and never cached: the next batch
asks again.

Each fact asked for ends one way, told to `on_lookup` (the daemon's metrics,
`event_engine_lookups_total`): `cache_hit`, `fetched`, or, unavailable to the rule,
`budget_exhausted` (no budget within `max_wait`), `timeout` (no answer within it) or
`api_error` (the API refused or failed); a call that was made also gives its seconds.

The calls behind each name. Confirmed in emnify-api.md (with its sources): the paths of
all four [OAS]; the quota's fields and that a quota is absent after DELETE (§6.4); the
connectivity answer's `status.description` values and a recorded answer (§6.5, [OAS,
CASS]); the per-path rate limits (§7.1). **Not confirmed**: the shape of the stats answer
(`current_month` with `data.volume` in MB) is this engine's and its simulator's reading,
not a recorded answer; and that a missing quota answers 404 (the simulator does; an unknown
endpoint answers 404 too, and both read as "no quota").

| lookup | call | value |
|---|---|---|
| `quota.data` | `GET /api/v1/endpoint/{id}/quota/data` | the quota; `null` when none (404) |
| `quota.sms` | `GET /api/v1/endpoint/{id}/quota/sms` | likewise |
| `stats.month` | `GET /api/v1/endpoint/{id}/stats` | its `current_month` |
| `connectivity` | `GET /api/v1/endpoint/{id}/connectivity` | the whole answer |
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from aiolimiter import AsyncLimiter

from engine.errors import ApiError
from engine.lookups import LOOKUP_NAMES, Fact, LookupTable

_CACHE_HIT = "cache_hit"
_FETCHED = "fetched"
_BUDGET_EXHAUSTED = "budget_exhausted"
_TIMEOUT = "timeout"
_API_ERROR = "api_error"

# `on_lookup(fact, outcome, seconds)`: seconds is the API call's time, None without a call.
LookupObserver = Callable[[str, str, float | None], None]


def _ignore(fact: str, outcome: str, seconds: float | None) -> None:
    pass


class LookupCalls(Protocol):
    """The API calls lookups make (`EmnifyClient` has them)."""

    async def get_quota(self, endpoint_id: int, kind: str) -> dict[str, Any] | None: ...
    async def get_endpoint_stats(self, endpoint_id: int) -> dict[str, Any]: ...
    async def get_connectivity(self, endpoint_id: int) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class LookupSettings:
    """`ttl`: how long a fetched fact is used again; `per_second`: the API calls lookups
    may make per second; `max_wait`: the longest a batch waits for that budget, and the
    longest a call may take."""

    ttl: timedelta = timedelta(minutes=5)
    per_second: float = 5.0
    max_wait: timedelta = timedelta(seconds=1)


async def _fetch_one(calls: LookupCalls, endpoint: int, name: str) -> Any:
    if name == "quota.data":
        return await calls.get_quota(endpoint, "data")
    if name == "quota.sms":
        return await calls.get_quota(endpoint, "sms")
    if name == "stats.month":
        return (await calls.get_endpoint_stats(endpoint)).get("current_month")
    if name == "connectivity":
        return await calls.get_connectivity(endpoint)
    raise ValueError(f"unknown lookup {name!r}; known: {', '.join(LOOKUP_NAMES)}")


class LookupFetcher:
    """Facts for a batch: from the cache, else from the API within the budget."""

    def __init__(
        self,
        calls: LookupCalls,
        settings: LookupSettings | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        on_lookup: LookupObserver = _ignore,
    ):
        self.calls = calls
        self.settings = settings or LookupSettings()
        self._monotonic = monotonic
        self._on_lookup = on_lookup
        # One token at a time, `per_second` of them a second: no burst beyond the rate.
        self._budget = AsyncLimiter(1, 1 / self.settings.per_second)
        self._cache: dict[tuple[int, str], tuple[float, Any]] = {}
        self.fetched = 0  # API calls made (for metrics and tests)
        self.over_budget = 0  # facts left unavailable because the budget ran out

    async def fetch(self, wanted: Mapping[int, set[str]]) -> LookupTable:
        """The facts `wanted` (endpoint id → names), each a value or why it is missing."""
        table: dict[int, dict[str, Fact]] = {}
        now = self._monotonic()
        ttl = self.settings.ttl.total_seconds()
        missing: list[tuple[int, str]] = []
        for endpoint, names in wanted.items():
            facts = table.setdefault(endpoint, {})
            for name in sorted(names):
                cached = self._cache.get((endpoint, name))
                if cached is not None and now - cached[0] < ttl:
                    facts[name] = Fact(cached[1])
                    self._on_lookup(name, _CACHE_HIT, None)
                else:
                    missing.append((endpoint, name))
        if missing:
            deadline = now + self.settings.max_wait.total_seconds()
            found = await asyncio.gather(*(self._fetched(e, n, deadline) for e, n in missing))
            for (endpoint, name), fact in zip(missing, found, strict=True):
                table[endpoint][name] = fact
        return table

    async def _fetched(self, endpoint: int, name: str, deadline: float) -> Fact:
        waited = await _within(self._budget.acquire(), deadline - self._monotonic())
        if not waited:
            self.over_budget += 1
            self._on_lookup(name, _BUDGET_EXHAUSTED, None)
            rate = f"{self.settings.per_second:g}/s"
            return Fact(error=f"lookup budget spent ({rate}): not fetched")
        self.fetched += 1
        allowed = self.settings.max_wait.total_seconds()
        started = self._monotonic()
        try:
            value = await asyncio.wait_for(_fetch_one(self.calls, endpoint, name), allowed)
        except TimeoutError:
            self._on_lookup(name, _TIMEOUT, self._monotonic() - started)
            return Fact(error=f"no answer within {allowed:g}s")
        except ApiError as error:
            self._on_lookup(name, _API_ERROR, self._monotonic() - started)
            status = "no answer" if error.status is None else f"HTTP {error.status}"
            return Fact(error=f"{status} from the API: {error.message}")
        self._cache[(endpoint, name)] = (self._monotonic(), value)
        self._on_lookup(name, _FETCHED, self._monotonic() - started)
        return Fact(value)


async def _within(waiting: Awaitable[Any], seconds: float) -> bool:
    """Whether `waiting` finished within `seconds` (it is cancelled otherwise)."""
    if seconds <= 0:
        return False
    try:
        await asyncio.wait_for(waiting, seconds)
    except TimeoutError:
        return False
    return True
