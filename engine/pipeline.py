"""The pipeline: raw records → normalized events → dedup → rules → planned intents → store.

Every source (poller, Data Streamer ingress, replay) hands its records to `Pipeline.process`,
so an event is judged the same way whichever door it came through. The only I/O here is the
one store transaction per batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from engine.actions import PlannedAction
from engine.errors import ActionError, EventFormatError
from engine.events import Event, normalize
from engine.store import AuditRow, Batch, Intent, IntentStatus, SqliteStore

if TYPE_CHECKING:
    from engine.rules import ActionStep, Rule, RuleSet

_log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Planned:
    """One action planned for one event by one rule (what `replay` prints)."""

    event: Event
    rule: Rule
    step: ActionStep
    action: PlannedAction
    due: datetime | None
    shadow: bool

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event_id": self.event.id,
            "rule": self.rule.id,
            "action": self.action.kind,
            "target": self.action.target,
            "params": self.action.params,
        }
        if self.due is not None:
            out["due"] = self.due.isoformat().replace("+00:00", "Z")
        if self.shadow:
            out["shadow"] = True
        return out


@dataclass(slots=True)
class BatchResult:
    received: int = 0
    new_events: int = 0
    duplicates: int = 0
    quarantined: int = 0
    matches: int = 0
    matched_rules: Counter[str] = field(default_factory=Counter)
    planned: list[Planned] = field(default_factory=list)
    plan_failures: int = 0
    intent_ids: list[int] = field(default_factory=list)
    newest: datetime | None = None
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (index in records, reason)


def idempotency_key(event_id: int, rule_id: str, action_index: int) -> str:
    """Stable across retries and restarts: the same decision always gets the same key."""
    return f"{event_id}-{rule_id}-{action_index}"


class Pipeline:
    """Judges batches of raw event records against a rule set and records the outcome."""

    def __init__(self, rules: RuleSet, store: SqliteStore, *, dry_run: bool = False):
        self.rules = rules
        self.store = store
        self.dry_run = dry_run
        self._rule_context: dict[str, dict[str, Any]] = {}

    def set_rules(self, rules: RuleSet) -> None:
        self.rules = rules
        self._rule_context.clear()

    def process(
        self,
        records: Sequence[object],
        *,
        source: str,
        cursor: datetime | None = None,
        in_given_order: bool = False,
    ) -> BatchResult:
        """Evaluate `records` and commit the batch (with `cursor`, if given) atomically.

        Events are judged in (timestamp, id) order unless `in_given_order` (replay keeps
        the file's order)."""
        result = BatchResult(received=len(records))
        batch = Batch(cursor=cursor)
        events = self._normalize(records, source, batch, result)
        fresh_ids = self.store.unseen([e.id for e in events])
        taken: set[int] = set()
        fresh: list[Event] = []
        for event in events:
            if event.id in fresh_ids and event.id not in taken:
                taken.add(event.id)
                fresh.append(event)
        result.duplicates = len(events) - len(fresh)
        result.new_events = len(fresh)
        if not in_given_order:
            fresh.sort(key=Event.sort_key)
        for event in fresh:
            batch.seen.append((event.id, event.timestamp))
            self._evaluate(event, batch, result)
        if fresh:
            result.newest = fresh[-1].timestamp
        result.intent_ids = self.store.commit_batch(batch)
        return result

    def _normalize(
        self, records: Sequence[object], source: str, batch: Batch, result: BatchResult
    ) -> list[Event]:
        events: list[Event] = []
        for index, record in enumerate(records):
            try:
                events.append(normalize(record))
            except EventFormatError as error:
                result.quarantined += 1
                result.rejected.append((index, str(error)))
                payload = orjson.dumps(record, default=str).decode()
                batch.quarantine.append((source, str(error), payload))
                _log.warning("event quarantined", source=source, reason=str(error))
        return events

    def _evaluate(self, event: Event, batch: Batch, result: BatchResult) -> None:
        for rule in self.rules.match(event):
            result.matches += 1
            result.matched_rules[rule.id] += 1
            shadow = self.dry_run or rule.mode == "shadow"
            batch.audit.append(
                _audit(event, rule.id, None, "matched", "shadow mode" if shadow else None)
            )
            context = {"event": event.raw, "rule": self._context_of(rule)}
            for step in rule.actions:
                try:
                    planned = step.action.plan(event, context)
                except ActionError as error:
                    result.plan_failures += 1
                    batch.audit.append(_audit(event, rule.id, step.kind, "failed", str(error)))
                    _log.warning(
                        "action not planned",
                        rule=rule.id,
                        action=step.kind,
                        event_id=event.id,
                        reason=str(error),
                    )
                    continue
                due = event.timestamp + step.after if step.after else None
                self._record(event, rule, step, planned, due, shadow, batch, result)

    def _record(
        self,
        event: Event,
        rule: Rule,
        step: ActionStep,
        planned: PlannedAction,
        due: datetime | None,
        shadow: bool,
        batch: Batch,
        result: BatchResult,
    ) -> None:
        key = idempotency_key(event.id, rule.id, step.index)
        batch.intents.append(
            Intent(
                idempotency_key=key,
                event_id=event.id,
                rule_id=rule.id,
                action_index=step.index,
                kind=planned.kind,
                params=planned.params,
                target=planned.target,
                status=IntentStatus.SHADOW if shadow else IntentStatus.PENDING,
                due_at=due,
            )
        )
        outcome = "would have acted" if shadow else ("scheduled" if due else "planned")
        detail = f"due {due.isoformat()}" if due else None
        batch.audit.append(_audit(event, rule.id, planned.kind, outcome, detail))
        result.planned.append(Planned(event, rule, step, planned, due, shadow))

    def _context_of(self, rule: Rule) -> dict[str, Any]:
        context = self._rule_context.get(rule.id)
        if context is None:
            context = {"id": rule.id, "description": rule.description}
            self._rule_context[rule.id] = context
        return context


def _audit(
    event: Event, rule_id: str | None, action: str | None, outcome: str, detail: str | None
) -> AuditRow:
    return AuditRow(
        event_id=event.id,
        rule_id=rule_id,
        action=action,
        outcome=outcome,
        detail=detail,
        sim_id=event.sim_id,
        endpoint_id=event.endpoint_id,
        iccid=event.iccid,
    )


def dedup_horizon(overlap: timedelta) -> timedelta:
    """How long seen ids are kept: the poll overlap plus a generous margin for late events
    and for the Data Streamer re-delivering what the poller already took."""
    return overlap + timedelta(hours=24)
