"""Keeping the store from growing without bound, in the background.

Every event a rule matches leaves audit rows, and a threshold rule on a busy event type
(location updates of a fleet) writes two for nearly every event: millions a day for a few
thousand devices, kept forever until now. `Retention` runs beside the poller and, every
`every`, does two things in small batches, each its own short transaction, handing the event
loop back between batches so a poll waiting to commit waits for one batch at most:

- summarizes: per SIM and rule, the newest `decisions_per_sim` decisions that did nothing
  ("below threshold", "throttled") stay in full, so `why` explains them; older ones become
  a count per day;
- prunes: audit rows, finished intents, quarantined records and those counts older than
  `period` are deleted. Pending, running, held and dead intents stay whatever their age.

SQLite reuses the pages freed, so the file stops growing once a period's worth is stored.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import structlog

from engine.clock import Clock, system_clock
from engine.errors import StoreError
from engine.ports import Retainer
from engine.services import run_every, stop_running

if TYPE_CHECKING:
    from engine.services import ServiceContext

_log = structlog.get_logger(__name__)
_JOB_ID = "store-retention"


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """`store.retention` and `store.decisions_per_sim` of the config, and the job's pace."""

    period: timedelta = timedelta(days=30)
    decisions_per_sim: int = 20
    every: timedelta = timedelta(minutes=10)
    first_after: timedelta = timedelta(minutes=1)  # after start-up, once the poller runs
    batch_rows: int = 1000  # audit rows looked at, or rows deleted, per transaction


@dataclass(slots=True)
class RetentionRun:
    """What one run did: rows summarized and pruned, and its longest single batch."""

    summarized: int = 0
    pruned: int = 0
    batches: int = 0
    longest_batch: float = 0.0  # seconds

    def timed(self, seconds: float) -> None:
        self.batches += 1
        self.longest_batch = max(self.longest_batch, seconds)


class Retention:
    """A daemon service (see module docstring); `run_once` is the job itself."""

    leader_only = True  # one instance prunes a shared store: the leader

    def __init__(
        self,
        settings: RetentionSettings | None = None,
        *,
        clock: Clock = system_clock,
    ):
        self.settings = settings or RetentionSettings()
        self._clock = clock
        self._context: ServiceContext | None = None

    async def start(self, context: ServiceContext) -> None:
        self._context = context
        run_every(
            context.scheduler,
            _JOB_ID,
            self._job,
            self.settings.every,
            self._clock() + self.settings.first_after,
        )

    async def stop(self) -> None:
        if self._context is not None:
            stop_running(self._context.scheduler, _JOB_ID)
        self._context = None

    async def _job(self) -> None:
        if self._context is not None:
            await self.run_once(self._context.store)

    async def run_once(self, store: Retainer) -> RetentionRun:
        """Summarize and prune until nothing is left to do; a store error ends the run
        (logged; the next run tries again)."""
        run = RetentionRun()
        settings = self.settings
        before = self._clock() - settings.period
        try:
            while True:
                started = time.perf_counter()
                folded = store.summarize_decisions(settings.decisions_per_sim, settings.batch_rows)
                run.timed(time.perf_counter() - started)
                if folded is None:
                    break
                run.summarized += folded
                await asyncio.sleep(0)  # a poll or a delivery waiting to commit goes first
            while True:
                started = time.perf_counter()
                pruned = store.prune_older_than(before, settings.batch_rows)
                run.timed(time.perf_counter() - started)
                if not pruned:
                    break
                run.pruned += pruned
                await asyncio.sleep(0)
        except StoreError as error:
            _log.warning("store retention stopped; it runs again later", error=str(error))
        if run.summarized or run.pruned:
            _log.info(
                "store retention",
                summarized=run.summarized,
                pruned=run.pruned,
                older_than=before.isoformat(),
                batches=run.batches,
                longest_batch_ms=round(run.longest_batch * 1000, 1),
            )
        return run
