"""One organisation of `organisations:` as its poller sees the engine (`engine.organisations`).

The daemon builds one poller per organisation, each over an `OrganisationContext`: the
daemon's clock, scheduler and metrics, but the organisation's own client (its login, its
rate budget), a view of the store in which the cursor, the seen ids and the poller's small
values (`last_poll`, `poll_floor`) are the organisation's own, and an `ingest` that hands
every batch to the pipeline as that organisation's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from engine.lookups import LookupTable
from engine.ports import Store

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from engine.clock import Clock
    from engine.emnify import EmnifyClient
    from engine.lookup_fetch import LookupFetcher
    from engine.metrics import Metrics
    from engine.pipeline import BatchResult


class OrganisationStore:
    """The store as one organisation's poller uses it: its own cursor, seen ids and small
    values (each meta key suffixed with `:name`)."""

    def __init__(self, store: Store, organisation: str) -> None:
        self._store = store
        self.organisation = organisation

    def get_meta(self, key: str) -> str | None:
        return self._store.get_meta(f"{key}:{self.organisation}")

    def set_meta(self, key: str, value: str) -> None:
        self._store.set_meta(f"{key}:{self.organisation}", value)

    def get_cursor(self, organisation: str = "") -> datetime | None:
        return self._store.get_cursor(organisation or self.organisation)

    def unseen(self, event_ids: Sequence[int], organisation: str = "") -> set[int]:
        return self._store.unseen(event_ids, organisation or self.organisation)

    def seen_count(self) -> int:
        return self._store.seen_count()

    def prune_seen(self, before: datetime, organisation: str = "") -> int:
        return self._store.prune_seen(before, organisation or self.organisation)

    def seen_at(self, event_id: int, organisation: str = "") -> datetime | None:
        return self._store.seen_at(event_id, organisation or self.organisation)


class _Daemon(Protocol):
    """What an organisation's context uses of the daemon."""

    @property
    def clock(self) -> Clock: ...

    @property
    def scheduler(self) -> AsyncIOScheduler: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def store(self) -> Store: ...

    def ingest(
        self,
        records: Sequence[object],
        *,
        source: str,
        cursor: datetime | None = None,
        complete: datetime | None = None,
        lookups: LookupTable | None = None,
        organisation: str = "",
    ) -> BatchResult: ...

    def emit_engine_event(
        self,
        kind: str,
        *,
        detail: Mapping[str, Any] | None = None,
        sim: Mapping[str, Any] | None = None,
        endpoint: Mapping[str, Any] | None = None,
    ) -> None: ...


@dataclass(slots=True)
class OrganisationRun:
    """One organisation's running parts: its client and its lookups' fetcher."""

    name: str
    client: EmnifyClient
    lookups: LookupFetcher


class OrganisationContext:
    """`engine.sources.base.SourceContext` for one organisation's poller."""

    def __init__(self, daemon: _Daemon, run: OrganisationRun, wanted: _Wanted) -> None:
        self._daemon = daemon
        self._run = run
        self._wanted = wanted
        self._store = OrganisationStore(daemon.store, run.name)

    @property
    def organisation(self) -> str:
        return self._run.name

    @property
    def clock(self) -> Clock:
        return self._daemon.clock

    @property
    def client(self) -> EmnifyClient:
        return self._run.client

    @property
    def store(self) -> OrganisationStore:
        return self._store

    @property
    def scheduler(self) -> AsyncIOScheduler:
        return self._daemon.scheduler

    @property
    def metrics(self) -> Metrics:
        return self._daemon.metrics

    def ingest(
        self,
        records: Sequence[object],
        *,
        source: str,
        cursor: datetime | None = None,
        complete: datetime | None = None,
        lookups: LookupTable | None = None,
    ) -> BatchResult:
        return self._daemon.ingest(
            records,
            source=source,
            cursor=cursor,
            complete=complete,
            lookups=lookups,
            organisation=self._run.name,
        )

    async def look_up(self, records: Sequence[object]) -> LookupTable | None:
        wanted = self._wanted(records)
        if not wanted:
            return None
        return await self._run.lookups.fetch(wanted)

    def emit_engine_event(
        self,
        kind: str,
        *,
        detail: Mapping[str, Any] | None = None,
        sim: Mapping[str, Any] | None = None,
        endpoint: Mapping[str, Any] | None = None,
    ) -> None:
        self._daemon.emit_engine_event(
            kind,
            detail={**(detail or {}), "organisation": self._run.name},
            sim=sim,
            endpoint=endpoint,
        )


class _Wanted(Protocol):
    def __call__(self, records: Sequence[object]) -> dict[int, set[str]]: ...
