"""Lookups: facts a rule asks for before its condition is judged (`lookup:` in a rule).

A rule such as

    lookup: [quota.data, stats.month, connectivity]
    condition: {">": [{"var": "lookup.stats.month.data.volume"}, 500]}

decides on facts that are not in the event: the data quota left, this month's usage, whether
the device is online. Fetching them is I/O, and the core does none: an adapter
(`engine.lookup_fetch` against the API, `LookupFixture` in replay and rule tests) asks
`wanted` which endpoints need which facts, fetches them, and hands the pipeline a
`LookupTable` as plain data. The pipeline then judges the rule's condition on the event
with the facts under `lookup`, or, when a fact could not be had, records
`lookup unavailable` and acts or not as the rule's `on_lookup_error` says.

This module is pure: names, values and the question "what is needed", nothing fetched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from engine.events import Event

# What a rule may look up, and what each holds (the API call behind it is the fetcher's).
LOOKUP_NAMES: Mapping[str, str] = {
    "quota.data": "the endpoint's data quota (volume left in MB, status, expiry_date)",
    "quota.sms": "the endpoint's SMS quota (messages left, status, expiry_date)",
    "stats.month": "this month's usage (data.volume in MB, sms counts)",
    "connectivity": "whether the device is online (status.description) and where",
}

OnLookupError = Literal["act", "skip"]
ON_LOOKUP_ERROR: tuple[OnLookupError, ...] = ("skip", "act")
UNAVAILABLE = "lookup unavailable"


@dataclass(frozen=True, slots=True)
class Fact:
    """One looked-up fact for one endpoint: its value, or why it could not be had."""

    value: Any = None
    error: str | None = None

    @property
    def available(self) -> bool:
        return self.error is None


class _Admits(Protocol):
    def mismatch(self, event: Event) -> str | None: ...


class AsksLookups(Protocol):
    """What `wanted` reads of a rule (`engine.rules.Rule`, which imports this module)."""

    @property
    def lookup(self) -> tuple[str, ...]: ...
    @property
    def enabled(self) -> bool: ...
    @property
    def when(self) -> _Admits: ...


# Facts per endpoint id, per lookup name: what the adapter hands the pipeline for a batch.
LookupTable = Mapping[int, Mapping[str, Fact]]


def endpoint_of(event: Event) -> int | None:
    """The endpoint whose facts an event's lookups are about (None: the event names none)."""
    endpoint = event.raw.get("endpoint")
    ident = endpoint.get("id") if isinstance(endpoint, dict) else None
    if isinstance(ident, bool):
        return None
    if isinstance(ident, int):
        return ident
    if isinstance(ident, str) and ident.isdigit():
        return int(ident)
    return None


def wanted(events: Iterable[Event], rules: Iterable[AsksLookups]) -> dict[int, set[str]]:
    """Which facts are needed for which endpoint: those of every enabled rule with
    `lookup` whose `when` admits the event (the condition is judged only once the facts
    are there, so it cannot narrow this down)."""
    asking = [rule for rule in rules if rule.lookup and rule.enabled]
    needed: dict[int, set[str]] = {}
    if not asking:
        return needed
    for event in events:
        endpoint = endpoint_of(event)
        if endpoint is None:
            continue
        for rule in asking:
            if rule.when.mismatch(event) is None:
                needed.setdefault(endpoint, set()).update(rule.lookup)
    return needed


def facts_for(
    table: LookupTable | None, endpoint: int | None, names: Iterable[str]
) -> tuple[dict[str, Any], str | None]:
    """The facts `names` for `endpoint` nested as a condition reads them
    (`quota.data` → `{"quota": {"data": ...}}`), and the first reason one is missing
    (None: all are there)."""
    nested: dict[str, Any] = {}
    if endpoint is None:
        return nested, f"{UNAVAILABLE}: the event names no endpoint"
    known = (table or {}).get(endpoint, {})
    missing: str | None = None
    for name in names:
        fact = known.get(name)
        if fact is None:
            missing = missing or f"{UNAVAILABLE}: {name} for endpoint {endpoint} was not fetched"
            continue
        if fact.error is not None:
            missing = missing or f"{UNAVAILABLE}: {name} for endpoint {endpoint}: {fact.error}"
            continue
        *parents, leaf = name.split(".")
        place = nested
        for part in parents:
            place = place.setdefault(part, {})
        place[leaf] = fact.value
    return nested, missing
