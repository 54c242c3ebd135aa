"""What runs beside the sources for the daemon's lifetime (the HTTP server, the rule reloader,
the digests, the catalog refresh, the store's retention), and what the daemon gives it.

A service sees the daemon through `ServiceContext`, a Protocol of the few things services
use, so no service imports the daemon (only the CLI and start-up do): each one can be started
in a test over a real daemon, or over anything else that has these parts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from engine.clock import Clock
    from engine.emitter import EngineEvents
    from engine.emnify import EmnifyClient
    from engine.metrics import Metrics
    from engine.pipeline import Pipeline
    from engine.ports import Store
    from engine.sources.base import Source


class ServiceContext(Protocol):
    """The daemon, as its services see it."""

    @property
    def clock(self) -> Clock: ...

    @property
    def store(self) -> Store: ...

    @property
    def scheduler(self) -> AsyncIOScheduler:
        """Runs jobs on the daemon's event loop; services add theirs in `start`."""
        ...

    @property
    def client(self) -> EmnifyClient: ...

    @property
    def organisation_clients(self) -> Mapping[str, EmnifyClient]:
        """Each configured organisation's client, by name (`organisations:`); empty for
        the single organisation of a config without that key (`client` is its)."""
        ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def pipeline(self) -> Pipeline:
        """Judges batches; a reload puts new rules in force through it."""
        ...

    @property
    def sources(self) -> Sequence[Source[Any]]:
        """The running sources (their readiness and HTTP routes)."""
        ...

    @property
    def dry_run(self) -> bool: ...

    @property
    def leading(self) -> bool:
        """Whether this instance holds the leader lease (one running alone always does)."""
        ...

    @property
    def api_url(self) -> str:
        """The emnify API's base URL, as `/readyz` names it."""
        ...

    @property
    def engine_events(self) -> EngineEvents:
        """Says engine events (`engine.engine_events`), judged like any other event."""
        ...

    def emit_engine_event(
        self,
        kind: str,
        *,
        detail: Mapping[str, Any] | None = None,
        sim: Mapping[str, Any] | None = None,
        endpoint: Mapping[str, Any] | None = None,
    ) -> None:
        """Say one engine event of `kind` (one of `engine.engine_events.KINDS`) now."""
        ...

    def wake_dispatcher(self) -> None:
        """New intents are in the outbox (committed outside a source's batch)."""
        ...


class Service(Protocol):
    """Something that runs beside the sources for the daemon's lifetime. `start` returns
    once it is running; `stop` within the daemon's grace. One with a true `leader_only`
    attribute runs on one instance of a cluster at a time: it is started when its instance
    gains the leader lease and stopped when it loses it."""

    async def start(self, context: ServiceContext) -> None: ...

    async def stop(self) -> None: ...


def run_every(
    scheduler: AsyncIOScheduler,
    job_id: str,
    job: Callable[[], object],
    every: timedelta,
    first: datetime,
) -> None:
    """Run `job` every `every` from `first` on: one run at a time, runs missed while the
    loop was busy folded into one and never dropped (a service's periodic work)."""
    scheduler.add_job(
        job,
        "interval",
        seconds=every.total_seconds(),
        next_run_time=first,
        id=job_id,
        replace_existing=True,
        coalesce=True,
        max_instances=1,
        misfire_grace_time=None,
    )


def stop_running(scheduler: AsyncIOScheduler, job_id: str) -> None:
    """No more runs of the job `run_every` scheduled (gone already is fine)."""
    job = scheduler.get_job(job_id)
    if job is not None:
        job.remove()
