"""Scheduled digests: rules with `schedule` and `digest` act once per fire time on a list.

Such a rule does not act per event. The pipeline hands each event the rule matches to
`collect_for_digest`, which adds it to the batch (kept with the batch's commit, or not at
all). At every fire time of the rule's crontab `schedule` (when is `engine.digest_schedule`'s
to say), `run_digest` takes the events collected since the last run and plans the rule's
actions once, with the list in the template context:

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
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from engine.errors import ActionError
from engine.events import Event
from engine.model import AuditRow, Batch, DigestEvent, Intent, IntentStatus

if TYPE_CHECKING:
    from engine.ports import DigestStore
    from engine.rules import Rule

_log = structlog.get_logger(__name__)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def digest_key(rule_id: str, fire_time: datetime, action_index: int) -> str:
    """The idempotency key of one digest action: the same for the same run, always."""
    return f"digest-{rule_id}-{_iso(fire_time)}-{action_index}"


def collect_for_digest(batch: Batch, event: Event, rule: Rule) -> bool:
    """The pipeline's hook for a rule that matched `event`: for a digest rule, keep the event
    for the rule's next run, note it in the audit log and return True (the rule does not
    act on the event itself); for any other rule return False and do nothing.

    The event is kept with the batch's commit (keyed by rule and event, so a batch judged
    again after a crash collects nothing twice)."""
    digest = rule.digest
    if digest is None:
        return False
    payload = event.raw if digest.include is None else project(event.raw, digest.include)
    # Written out here, in the rule's judging: an event too odd for JSON fails this rule,
    # not the batch's commit.
    text = orjson.dumps(payload, default=str).decode()
    batch.digest_events.append(DigestEvent(rule.id, event.id, event.timestamp, text))
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
    store: DigestStore,
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
