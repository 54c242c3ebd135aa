"""The event-type catalog that rule names resolve through, kept current from the API.

The engine ships the event types it could confirm (`engine/data/event-types.json`). The
platform knows more, and names new ones over time: `GET /api/v1/event/type` lists them all.
`CatalogRefresh` fetches that list at start-up and then daily, and merges it over the
bundled one (the API's name wins where both name an id). When the API cannot be reached or
answers nonsense, the bundled list (or the last good fetch) stays in use, with a warning.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from engine.clock import Clock, system_clock
from engine.errors import ApiError
from engine.rules import EventTypeCatalog

if TYPE_CHECKING:
    from engine.emnify import EmnifyClient
    from engine.services import ServiceContext

_log = structlog.get_logger(__name__)

REFRESH_EVERY = timedelta(days=1)
_JOB_ID = "event-type-catalog"


class CatalogRefresh:
    """Holds the current catalog (`catalog`) and refreshes it; a daemon service.

    Listeners added with `on_change` hear of a refreshed catalog whose names differ from
    the one before (rules are then loaded again, so names resolve through it)."""

    def __init__(
        self,
        *,
        every: timedelta = REFRESH_EVERY,
        fetch_timeout: float = 20.0,
        clock: Clock = system_clock,
    ):
        self.catalog = EventTypeCatalog.bundled()
        self.source = "bundled"  # or "api" once a fetch succeeded
        self.fetched_at: datetime | None = None
        self.api_catalog: EventTypeCatalog | None = None  # the API's own list, last fetched
        self._every = every
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
        fetched = EventTypeCatalog.from_records(usable)
        bundled = EventTypeCatalog.bundled()
        merged = bundled.merged(fetched)
        changed = _names(merged) != _names(self.catalog)
        self.catalog = merged
        self.api_catalog = fetched
        self.source = "api"
        self.fetched_at = self._clock()
        _log.info(
            "event-type catalog fetched",
            types=len(fetched),
            beyond_bundled=len(merged) - len(bundled),
            skipped=skipped,
        )
        if changed:
            for listener in self._listeners:
                listener(merged)
        return merged

    async def start(self, context: ServiceContext) -> None:
        """Refresh daily; right away (in the background) when the start-up fetch failed.
        In the background: with the API down, a fetch takes all of its retries, and the
        daemon's other services wait for this one to start."""
        self._context = context
        first = self._clock() + (self._every if self.fetched_at is not None else timedelta(0))
        context.scheduler.add_job(
            self._refresh_job,
            "interval",
            seconds=self._every.total_seconds(),
            next_run_time=first,
            id=_JOB_ID,
            replace_existing=True,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )

    async def stop(self) -> None:
        if self._context is not None:
            job = self._context.scheduler.get_job(_JOB_ID)
            if job is not None:
                job.remove()
        self._context = None

    async def _refresh_job(self) -> None:
        if self._context is not None:
            await self.refresh(self._context.client)


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
