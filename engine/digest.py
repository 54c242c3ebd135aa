"""Scheduled digests: rules with `schedule` and `digest` act once per fire time on a list.

Such a rule does not act per event. The pipeline hands each event the rule matches to
`collect_for_digest`, which keeps it in the store. At every fire time of the rule's crontab
`schedule` (an APScheduler `CronTrigger` on the daemon's scheduler), `run_digest` takes the
events collected since the last run and plans the rule's actions once, with the list in the
template context:

- `events`: the collected events (raw, or only the `include`d fields), at most `max_events`
- `count`: how many were collected; `omitted`: how many of them the list leaves out
- `since` / `until`: the previous run and this fire time (ISO 8601, UTC)
- `rule`: `rule.id`, `rule.description`

The intents go through the outbox like any other, keyed `digest-{rule}-{fire time}-{index}`,
so a run repeated after a crash sends nothing twice. The last run is kept in the store; a
fire time missed while the daemon was down runs once at start-up (the latest one missed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from engine.clock import Clock, system_clock
from engine.errors import ActionError, StoreError
from engine.events import Event
from engine.model import AuditRow, Batch, Intent, IntentStatus
from engine.rules.schedule import cron_trigger, parse_timezone
from engine.store import SqliteStore

if TYPE_CHECKING:
    from apscheduler.triggers.cron import CronTrigger

    from engine.daemon import Daemon
    from engine.rules import Rule, RuleSet

_log = structlog.get_logger(__name__)

# A crontab firing every minute, missed over a month, is 43 200 fire times to step over;
# past this many the latest missed one is looked for from "now - one day" instead.
_MAX_STEPS = 5000


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def digest_key(rule_id: str, fire_time: datetime, action_index: int) -> str:
    """The idempotency key of one digest action: the same for the same run, always."""
    return f"digest-{rule_id}-{_iso(fire_time)}-{action_index}"


def collect_for_digest(store: SqliteStore, batch: Batch, event: Event, rule: Rule) -> bool:
    """The pipeline's hook for a rule that matched `event`: for a digest rule, keep the event
    for the rule's next run, note it in the audit log and return True (the rule does not
    act on the event itself); for any other rule return False and do nothing.

    Collecting writes at once rather than with the batch: it is keyed by (rule, event), so
    a batch evaluated again after a crash collects nothing twice."""
    digest = rule.digest
    if digest is None:
        return False
    payload = event.raw if digest.include is None else project(event.raw, digest.include)
    store.collect_digest_event(rule.id, event.id, event.timestamp, payload)
    batch.audit.append(
        AuditRow(
            event_id=event.id,
            rule_id=rule.id,
            action=None,
            outcome="collected for digest",
            detail=f"schedule {rule.schedule}",
            sim_id=event.sim_id,
            endpoint_id=event.endpoint_id,
            iccid=event.iccid,
        )
    )
    return True


def project(raw: Mapping[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    """Only the fields at `paths` (dotted), nested as in the event; absent ones are left out."""
    out: dict[str, Any] = {}
    for path in paths:
        parts = path.split(".")
        value: Any = raw
        for part in parts:
            if not isinstance(value, Mapping) or part not in value:
                break
            value = value[part]
        else:
            into = out
            for part in parts[:-1]:
                into = into.setdefault(part, {})
            into[parts[-1]] = value
    return out


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


@dataclass(frozen=True, slots=True)
class DigestAction:
    """One action a digest run planned (what rule tests compare against)."""

    kind: str
    action_index: int
    params: dict[str, Any]
    shadow: bool


@dataclass(slots=True)
class DigestRun:
    rule_id: str
    fire_time: datetime
    count: int
    planned: list[DigestAction] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (action kind, reason)
    intents_created: int = 0


def run_digest(
    store: SqliteStore,
    rule: Rule,
    fire_time: datetime,
    *,
    now: datetime,
    since: datetime | None = None,
    dry_run: bool = False,
) -> DigestRun:
    """Plan the rule's actions for the events collected up to `fire_time` and record them
    (intents, audit rows, at `now`), then mark the run done. Safe to repeat for the same
    fire time."""
    digest = rule.digest
    assert digest is not None, f"rule {rule.id} has no digest"
    count, events = store.claim_digest(rule.id, fire_time, digest.max_events)
    run = DigestRun(rule.id, fire_time, count)
    if count == 0 and not digest.send_empty:
        store.finish_digest(rule.id, fire_time)
        _log.info("digest: nothing collected, nothing sent", rule_id=rule.id)
        return run
    shadow = dry_run or rule.mode == "shadow"
    context = {
        "events": events,
        "count": count,
        "omitted": count - len(events),
        "since": _iso(since),
        "until": _iso(fire_time),
        "rule": {"id": rule.id, "description": rule.description},
    }
    batch = Batch()
    for step in rule.actions:
        try:
            params = step.action.render(context)
        except Exception as error:
            # Whatever it is, the run is finished without this action: a run that raised
            # would be claimed again at every start and fail the same way each time.
            reason = (
                str(error) if isinstance(error, ActionError) else f"{type(error).__name__}: {error}"
            )
            run.failures.append((step.kind, reason))
            batch.audit.append(_audit(rule.id, step.kind, "failed", reason))
            _log.error("digest action not planned", rule=rule.id, action=step.kind, reason=reason)
            continue
        batch.intents.append(
            Intent(
                idempotency_key=digest_key(rule.id, fire_time, step.index),
                event_id=None,
                rule_id=rule.id,
                action_index=step.index,
                kind=step.kind,
                params=params,
                target={},
                status=IntentStatus.SHADOW if shadow else IntentStatus.PENDING,
            )
        )
        outcome = "would have acted" if shadow else "planned"
        detail = f"digest of {count} events, run {_iso(fire_time)}"
        batch.audit.append(_audit(rule.id, step.kind, outcome, detail))
        run.planned.append(DigestAction(step.kind, step.index, params, shadow))
    run.intents_created = store.commit_batch(batch, now)
    store.finish_digest(rule.id, fire_time)
    _log.info(
        "digest run",
        rule_id=rule.id,
        events=count,
        actions=len(run.planned),
        run_at=_iso(fire_time),
    )
    return run


def _audit(rule_id: str, action: str, outcome: str, detail: str) -> AuditRow:
    return AuditRow(event_id=None, rule_id=rule_id, action=action, outcome=outcome, detail=detail)


def run_if_due(
    store: SqliteStore, rule: Rule, now: datetime, *, dry_run: bool = False
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

    def __init__(self, *, clock: Clock = system_clock):
        self._clock = clock
        self._daemon: Daemon | None = None
        self._jobs: dict[str, str] = {}  # rule id -> schedule the job was made for

    async def start(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.rules_changed(daemon.pipeline.rules)

    async def stop(self) -> None:
        if self._daemon is not None:
            for rule_id in list(self._jobs):
                self._remove(rule_id)
        self._daemon = None

    def rules_changed(self, rules: RuleSet) -> None:
        """Schedule the digest rules of `rules` (catching up missed runs of new ones), and
        drop the jobs of rules that are gone or no longer digests."""
        if self._daemon is None:
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
            self._daemon.scheduler.add_job(
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
        daemon = self._daemon
        rule = daemon.pipeline.rules.get(rule_id) if daemon is not None else None
        if daemon is None or rule is None or rule.digest is None or not rule.enabled:
            return []
        runs = run_if_due(daemon.store, rule, self._clock(), dry_run=daemon.config.dry_run)
        if any(run.intents_created for run in runs):
            daemon.dispatcher.wake()
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
        if self._daemon is not None:
            job = self._daemon.scheduler.get_job(f"digest:{rule_id}")
            if job is not None:
                job.remove()
