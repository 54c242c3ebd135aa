"""The event-type catalog that rule names resolve through, kept current from the API.

The engine ships the event types it could confirm (`engine/data/event-types.json`). The
platform knows more, and names new ones over time: `GET /api/v1/event/type` lists them all.
`CatalogRefresh` fetches that list at start-up and then daily, and merges it over the
bundled one (the API's name wins where both name an id). When the API cannot be reached or
answers nonsense, the bundled list (or the last good fetch) stays in use, with a warning.

Once per cluster: the daily fetch is the leader's. Each fetch is kept in the store (meta
`event_type_catalog`: when, and the API's records), and every instance looks there each
hour and takes a newer list than its own, so N instances ask the API once a day between
them, not N times, and all resolve names through the same list within the hour. (Each
instance still fetches once as it starts: its rules may need a name only the API knows
before it can join.) A failed fetch is tried again at the next hourly look.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from engine.clock import Clock, system_clock
from engine.errors import ApiError, StoreError
from engine.rules import EventTypeCatalog
from engine.services import run_every, stop_running

if TYPE_CHECKING:
    from engine.emnify import EmnifyClient
    from engine.services import ServiceContext

_log = structlog.get_logger(__name__)

REFRESH_EVERY = timedelta(days=1)
LOOK_EVERY = timedelta(hours=1)  # how often each instance looks for a newer list in the store
META_KEY = "event_type_catalog"
_JOB_ID = "event-type-catalog"


class CatalogRefresh:
    """Holds the current catalog (`catalog`) and refreshes it; a daemon service.

    Listeners added with `on_change` hear of a refreshed catalog whose names differ from
    the one before (rules are then loaded again, so names resolve through it)."""

    def __init__(
        self,
        *,
        every: timedelta = REFRESH_EVERY,
        look_every: timedelta = LOOK_EVERY,
        fetch_timeout: float = 20.0,
        clock: Clock = system_clock,
    ):
        self.catalog = EventTypeCatalog.bundled()
        self.source = "bundled"  # or "api" once a fetch succeeded
        self.fetched_at: datetime | None = None
        self.api_catalog: EventTypeCatalog | None = None  # the API's own list, last fetched
        self._every = every
        self._look_every = min(look_every, every)
        self._records: list[dict[str, Any]] = []  # the API's usable records, last fetched
        self._timeout = fetch_timeout
        self._clock = clock
        self._listeners: list[Callable[[EventTypeCatalog], None]] = []
        self._context: ServiceContext | None = None

    def on_change(self, listener: Callable[[EventTypeCatalog], None]) -> None:
        self._listeners.append(listener)

    def current(self) -> EventTypeCatalog:
        return self.catalog

    async def refresh(self, client: EmnifyClient) -> EventTypeCatalog:
        """Fetch the API's event types and merge them over the bundled ones; on any
        failure keep the catalog in use. Returns the catalog now in use."""
        kept = "the bundled list" if self.source == "bundled" else "the last fetched list"
        try:
            records = await asyncio.wait_for(client.event_types(), self._timeout)
        except ApiError as error:
            _log.warning(
                f"event-type catalog not fetched; using {kept}", error=str(error), kept=kept
            )
            return self.catalog
        except TimeoutError:
            _log.warning(
                f"event-type catalog not fetched within {self._timeout:.0f}s; using {kept}"
            )
            return self.catalog
        usable, skipped = _usable(records)
        if not usable:
            _log.warning(f"the API listed no usable event types; using {kept}", skipped=skipped)
            return self.catalog
        merged = self._take(usable, self._clock())
        _log.info(
            "event-type catalog fetched",
            types=len(usable),
            beyond_bundled=len(merged) - len(EventTypeCatalog.bundled()),
            skipped=skipped,
        )
        return merged

    def _take(self, records: list[dict[str, Any]], fetched_at: datetime) -> EventTypeCatalog:
        """Use the API's `records` (fetched at `fetched_at`) merged over the bundled list;
        tell the listeners when a name changed."""
        fetched = EventTypeCatalog.from_records(records)
        merged = EventTypeCatalog.bundled().merged(fetched)
        changed = _names(merged) != _names(self.catalog)
        self.catalog = merged
        self.api_catalog = fetched
        self._records = records
        self.source = "api"
        self.fetched_at = fetched_at
        if changed:
            for listener in self._listeners:
                listener(merged)
        return merged

    async def start(self, context: ServiceContext) -> None:
        """Look in the store each hour (right away, in the background, when the start-up
        fetch failed: with the API down a fetch takes all of its retries, and the daemon's
        other services wait for this one to start); fetch when the list is a day old and
        this instance leads. A start-up fetch newer than the stored one is shared."""
        self._context = context
        if self.fetched_at is not None:
            self._share(context)
        first = self._clock() + (self._look_every if self.fetched_at is not None else timedelta(0))
        run_every(context.scheduler, _JOB_ID, self._refresh_job, self._look_every, first)

    async def stop(self) -> None:
        if self._context is not None:
            stop_running(self._context.scheduler, _JOB_ID)
        self._context = None

    async def _refresh_job(self) -> None:
        context = self._context
        if context is None:
            return
        stored = self._stored(context)
        if stored is not None and (self.fetched_at is None or stored[0] > self.fetched_at):
            self._take(stored[1], stored[0])
            _log.info(
                "event-type catalog taken from the store (another instance fetched it)",
                types=len(stored[1]),
                fetched_at=stored[0].isoformat(),
            )
        stale = self.fetched_at is None or self._clock() - self.fetched_at >= self._every
        if stale and context.leading:
            before = self.fetched_at
            await self.refresh(context.client)
            if self.fetched_at != before:
                self._share(context)

    def _stored(self, context: ServiceContext) -> tuple[datetime, list[dict[str, Any]]] | None:
        """The list some instance fetched last, from the store; None when there is none
        or it cannot be read (then this instance goes on with its own)."""
        try:
            text = context.store.get_meta(META_KEY)
        except StoreError as error:
            _log.warning("cannot read the shared event-type catalog", error=str(error))
            return None
        if text is None:
            return None
        try:
            value = orjson.loads(text)
            fetched_at = datetime.fromisoformat(value["fetched_at"])
            records, _ = _usable([r for r in value["types"] if isinstance(r, dict)])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            _log.warning(
                "the shared event-type catalog is unreadable; fetching anew", error=str(error)
            )
            return None
        return (fetched_at, records) if records else None

    def _share(self, context: ServiceContext) -> None:
        """Keep this instance's fetch in the store for the others, unless a newer one is
        there already."""
        if self.fetched_at is None:
            return
        stored = self._stored(context)
        if stored is not None and stored[0] >= self.fetched_at:
            return
        value = {"fetched_at": self.fetched_at.isoformat(), "types": self._records}
        try:
            context.store.set_meta(META_KEY, orjson.dumps(value).decode())
        except StoreError as error:
            _log.warning("cannot share the event-type catalog", error=str(error))


def _usable(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The records with an integer id and a name; one odd record must not cost the rest."""
    usable = []
    for record in records:
        type_id = record.get("id")
        name = record.get("name") or record.get("description")
        has_id = isinstance(type_id, int) and not isinstance(type_id, bool)
        if has_id and isinstance(name, str) and name.strip():
            usable.append(record)
    return usable, len(records) - len(usable)


def _names(catalog: EventTypeCatalog) -> dict[int, str | None]:
    return {type_id: catalog.name_of(type_id) for type_id in catalog}
