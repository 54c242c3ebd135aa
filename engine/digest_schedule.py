"""When scheduled digests run: each digest rule's crontab as an APScheduler trigger, the
catch-up of runs missed while the daemon was down (at most the latest one), and the daemon
service that keeps one cron job per digest rule. What a run plans is `engine.digest`'s.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog
from apscheduler.triggers.cron import CronTrigger

from engine.clock import Clock, system_clock
from engine.cron import cron_trigger
from engine.digest import DigestRun, run_digest
from engine.errors import StoreError
from engine.rules.schedule import parse_timezone

if TYPE_CHECKING:
    from engine.ports import DigestStore
    from engine.rules import Rule, RuleSet
    from engine.services import ServiceContext

_log = structlog.get_logger(__name__)

# A crontab firing every minute, missed over a month, is 43 200 fire times to step over;
# past this many the latest missed one is looked for from "now - one day" instead.
_MAX_STEPS = 5000


def trigger_of(rule: Rule) -> CronTrigger:
    """The rule's schedule as a trigger (the loader has checked both parts)."""
    assert rule.schedule is not None and rule.digest is not None
    return cron_trigger(rule.schedule, parse_timezone(rule.digest.timezone))


def latest_fire_time(trigger: CronTrigger, after: datetime, now: datetime) -> datetime | None:
    """The last fire time in (`after`, `now`], or None when there is none."""
    start = after + timedelta(microseconds=1)
    if now - after > timedelta(days=1):
        # Stepping through a long gap fire by fire is slow for frequent schedules, and
        # only the last fire time matters: look for it in the last day first.
        found = _last_fire(trigger, max(start, now - timedelta(days=1)), now)
        if found is not None:
            return found
    return _last_fire(trigger, start, now)


def _last_fire(trigger: CronTrigger, start: datetime, now: datetime) -> datetime | None:
    latest: datetime | None = None
    fire: datetime | None = trigger.get_next_fire_time(None, start)
    steps = 0
    while fire is not None and fire <= now and steps < _MAX_STEPS:
        latest = fire
        fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
        steps += 1
    return latest


def run_if_due(
    store: DigestStore, rule: Rule, now: datetime, *, dry_run: bool = False
) -> list[DigestRun]:
    """Finish a run a crash interrupted, then run the latest fire time in (last run, now]
    if there is one: at most once however many were missed. The first call for a rule
    only records `now` as its starting point."""
    state = store.digest_run_state(rule.id)
    if state is None:
        store.start_digest(rule.id, now)
        return []
    last_run, claimed_for = state
    runs: list[DigestRun] = []
    if claimed_for is not None:
        _log.info("digest: finishing a run interrupted by a restart", rule_id=rule.id)
        runs.append(run_digest(store, rule, claimed_for, now=now, since=last_run, dry_run=dry_run))
        last_run = max(last_run, claimed_for)
    fire = latest_fire_time(trigger_of(rule), last_run, now)
    if fire is not None:
        runs.append(run_digest(store, rule, fire, now=now, since=last_run, dry_run=dry_run))
    return runs


class Digests:
    """The daemon service: one cron job per digest rule, missed runs caught up at start-up,
    jobs kept in step with the rules when they are reloaded (`rules_changed`)."""

    leader_only = True  # one run per fire time in a cluster: the leader's

    def __init__(self, *, clock: Clock = system_clock):
        self._clock = clock
        self._context: ServiceContext | None = None
        self._jobs: dict[str, str] = {}  # rule id -> schedule the job was made for

    async def start(self, context: ServiceContext) -> None:
        self._context = context
        self.rules_changed(context.pipeline.rules)

    async def stop(self) -> None:
        if self._context is not None:
            for rule_id in list(self._jobs):
                self._remove(rule_id)
        self._context = None

    def rules_changed(self, rules: RuleSet) -> None:
        """Schedule the digest rules of `rules` (catching up missed runs of new ones), and
        drop the jobs of rules that are gone or no longer digests."""
        if self._context is None:
            return
        wanted = {r.id: r for r in rules if r.enabled and r.digest is not None}
        for rule_id in [r for r in self._jobs if r not in wanted]:
            self._remove(rule_id)
            _log.info("digest unscheduled", rule_id=rule_id)
        for rule in wanted.values():
            key = f"{rule.schedule} {rule.digest.timezone if rule.digest else ''}"
            if self._jobs.get(rule.id) == key:
                continue
            self.run_due(rule.id)
            self._context.scheduler.add_job(
                self._fire,
                trigger_of(rule),
                args=[rule.id],
                id=f"digest:{rule.id}",
                replace_existing=True,
                coalesce=True,
                max_instances=1,
                misfire_grace_time=None,
            )
            self._jobs[rule.id] = key
            _log.info("digest scheduled", rule_id=rule.id, schedule=rule.schedule)

    def run_due(self, rule_id: str) -> list[DigestRun]:
        """Run the rule's digest if a fire time has passed since its last run."""
        context = self._context
        rule = context.pipeline.rules.get(rule_id) if context is not None else None
        if context is None or rule is None or rule.digest is None or not rule.enabled:
            return []
        runs = run_if_due(context.store, rule, self._clock(), dry_run=context.dry_run)
        if any(run.intents_created for run in runs):
            context.wake_dispatcher()
        return runs

    async def _fire(self, rule_id: str) -> None:
        # A coroutine, so APScheduler runs it on the event loop beside the poller rather
        # than in a worker thread that would share the store's connection.
        try:
            self.run_due(rule_id)
        except StoreError as error:
            # What was collected stays in the store for the next run.
            _log.error(
                "digest not run: the state store failed; it runs at the next fire time",
                rule_id=rule_id,
                error=str(error),
            )

    def _remove(self, rule_id: str) -> None:
        self._jobs.pop(rule_id, None)
        if self._context is not None:
            job = self._context.scheduler.get_job(f"digest:{rule_id}")
            if job is not None:
                job.remove()
