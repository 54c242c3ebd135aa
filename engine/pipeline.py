"""The pipeline: raw records → normalized events → dedup → rules → planned intents → store.

Every source (poller, Data Streamer ingress, replay) hands its records to `Pipeline.process`,
so an event is judged the same way whichever door it came through. Rules that count, wait
and remember (threshold windows, throttles, the blast-radius guard, cancellable follow-ups)
keep their state in `engine.state.RuleMemory`; their changes go into the batch, so the only
I/O here is the one store transaction per batch (plus lazy loads of state not yet cached).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
import structlog

from engine.actions import PlannedAction
from engine.digest import collect_for_digest
from engine.errors import ActionError, EventFormatError
from engine.events import Event, normalize
from engine.rules.condition import ConditionError
from engine.state import (
    DEFAULT_PER,
    RuleMemory,
    count_destructive,
    count_event,
    format_duration,
    format_moment,
    key_of,
)
from engine.store import (
    GLOBAL_GUARD,
    AuditRow,
    Batch,
    FollowUpCancel,
    FollowUpKey,
    Intent,
    IntentStatus,
    RuleOverride,
    SqliteStore,
    StaleRuleState,
)

if TYPE_CHECKING:
    from engine.rules import ActionStep, MaxActions, Rule, RuleSet

_log = structlog.get_logger(__name__)


class Judged(NamedTuple):
    """An event already normalized and matched against the pipeline's rules elsewhere (a
    parallel replay's worker process). It is judged like any other record from there on:
    dedup, thresholds, throttles, the guard, follow-up cancellation, planning.

    An event no rule and no `cancel_if` can match may come with an empty `raw`: nothing
    reads it."""

    event: Event
    rules: Sequence[Rule]


@dataclass(slots=True)  # read-only by convention: frozen triples the cost of building one
class Planned:
    """One action planned for one event by one rule (what `replay` prints)."""

    event: Event
    rule: Rule
    step: ActionStep
    action: PlannedAction
    due: datetime | None
    shadow: bool
    held: bool = False  # stopped by the blast-radius guard
    on_guard_trip: bool = False  # planned because this event tripped the guard
    key: str = ""  # the intent's idempotency key

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event_id": self.event.id,
            "rule": self.rule.id,
            "action": self.action.kind,
            "target": self.action.target,
            "params": self.action.params,
        }
        if self.due is not None:
            out["due"] = format_moment(self.due)
        if self.shadow:
            out["shadow"] = True
        if self.held:
            out["held"] = True
        if self.on_guard_trip:
            out["on_guard_trip"] = True
        return out


@dataclass(frozen=True, slots=True)
class Cancelled:
    """A waiting follow-up that a later event cancelled by meeting its `cancel_if`."""

    event: Event
    follow_up: FollowUpKey

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event_id": self.event.id,
            "rule": self.follow_up.rule_id,
            "action": "cancel",
            "cancels": self.follow_up.idempotency_key,
        }
        if self.follow_up.shadow:
            out["shadow"] = True
        return out


@dataclass(slots=True)  # read-only by convention: frozen triples the cost of building one
class Decision:
    """What one rule made of one event whose `when` and `condition` held.

    `outcome` is `fired` (it acted), `below_threshold` (its window is not full yet, or the
    event lacks the `per` field), `throttled`, `held` (the blast-radius guard stopped a
    destructive action) or `shadow` (it would have acted)."""

    event_id: int
    rule_id: str
    outcome: str
    reason: str


@dataclass(slots=True)
class BatchResult:
    received: int = 0
    new_events: int = 0
    duplicates: int = 0
    quarantined: int = 0
    matches: int = 0
    matched_rules: Counter[str] = field(default_factory=Counter)
    planned: list[Planned] = field(default_factory=list)
    intents_created: int = 0
    newest: datetime | None = None
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (index in records, reason)
    decisions: list[Decision] = field(default_factory=list)
    # Each with the number of `planned` entries before it, to tell them in event order.
    cancelled: list[tuple[int, Cancelled]] = field(default_factory=list)

    def in_order(self) -> Iterator[Planned | Cancelled]:
        """Planned actions and cancellations in the order the events caused them."""
        done = 0
        for position, cancelled in self.cancelled:
            yield from self.planned[done:position]
            done = position
            yield cancelled
        yield from self.planned[done:]


def idempotency_key(event_id: int, rule_id: str, action_index: int) -> str:
    """Stable across retries and restarts: the same decision always gets the same key."""
    return f"{event_id}-{rule_id}-{action_index}"


def guard_trip_key(event_id: int, rule_id: str, action_index: int) -> str:
    """The key of an `on_guard_trip` action (its own series, apart from the rule's actions)."""
    return f"{event_id}-{rule_id}-on_guard_trip-{action_index}"


_FIRED = "when and condition held"


class Pipeline:
    """Judges batches of raw event records against a rule set and records the outcome.

    `max_actions` is the global blast-radius guard (config `guard.max_actions`): destructive
    actions of all rules together, on top of each rule's own `max_actions`."""

    def __init__(
        self,
        rules: RuleSet,
        store: SqliteStore,
        *,
        dry_run: bool = False,
        max_actions: MaxActions | None = None,
        audit: bool = True,
    ):
        """`audit=False` keeps no audit log: for replay, whose store is thrown away."""
        self.rules = rules
        self.store = store
        self.dry_run = dry_run
        self.audit = audit
        self.max_actions = max_actions
        self._rule_context: dict[str, dict[str, Any]] = {}
        self._memory = RuleMemory(store)

    def set_rules(self, rules: RuleSet) -> None:
        self.rules = rules
        self._rule_context.clear()

    def reset_rule_windows(self, rule_id: str) -> None:
        """Forget what a rule's threshold windows counted (its `when`/`condition`/`threshold`
        changed, so the old counts no longer mean the same)."""
        self.store.reset_rule_windows(rule_id)
        self._memory.forget()  # the cache reloads lazily from the store

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
        the file's order). If the commit fails, nothing of the batch counts: the rules'
        memory is reloaded from the store and the same records may be given again."""
        try:
            return self._process(records, source, cursor, in_given_order)
        except StaleRuleState:
            # `rules resume` changed the state this batch was judged on: judge it again.
            self._memory.forget()
            _log.info("rule state changed during the batch; evaluating it again")
        except BaseException:
            self._memory.forget()
            raise
        try:
            return self._process(records, source, cursor, in_given_order)
        except BaseException:
            self._memory.forget()
            raise

    def _process(
        self,
        records: Sequence[object],
        source: str,
        cursor: datetime | None,
        in_given_order: bool,
    ) -> BatchResult:
        result = BatchResult(received=len(records))
        batch = Batch(cursor=cursor)
        self._memory.begin(batch.state)
        events = self._normalize(records, source, batch, result)
        fresh_ids = self.store.unseen([e.id for e, _ in events])
        taken: set[int] = set()
        fresh: list[tuple[Event, Sequence[Rule] | None]] = []
        for item in events:
            event_id = item[0].id
            if event_id in fresh_ids and event_id not in taken:
                taken.add(event_id)
                fresh.append(item)
        result.duplicates = len(events) - len(fresh)
        result.new_events = len(fresh)
        if not in_given_order:
            fresh.sort(key=lambda item: item[0].sort_key())
        memory = self._memory
        for event, matched in fresh:
            batch.seen.append((event.id, event.timestamp))
            # A judged event no rule matched has nothing to do unless it may cancel a
            # follow-up; in a replay on two cores, that is half of them.
            if matched is None or matched or memory.has_follow_ups:
                self._evaluate(event, matched, batch, result)
        if fresh:
            last = fresh[-1][0].timestamp
            result.newest = last
            newest = max(e.timestamp for e, _ in fresh) if in_given_order else last
            self._memory.advance(newest.timestamp())
        result.intents_created = self.store.commit_batch(batch)
        return result

    def _normalize(
        self, records: Sequence[object], source: str, batch: Batch, result: BatchResult
    ) -> list[tuple[Event, Sequence[Rule] | None]]:
        """Each record's event, with the rules it matches where a `Judged` says so already."""
        events: list[tuple[Event, Sequence[Rule] | None]] = []
        for index, record in enumerate(records):
            if type(record) is Judged:
                events.append(record)
                continue
            try:
                events.append((normalize(record), None))
            except EventFormatError as error:
                result.quarantined += 1
                result.rejected.append((index, str(error)))
                payload = _raw_text(record)
                batch.quarantine.append((source, str(error), payload))
                _log.warning("event quarantined", source=source, reason=str(error))
        return events

    def _evaluate(
        self, event: Event, matched: Sequence[Rule] | None, batch: Batch, result: BatchResult
    ) -> None:
        if self._memory.has_follow_ups:
            self._cancel_follow_ups(event, batch, result)
        for rule in self.rules.match(event) if matched is None else matched:
            result.matches += 1
            result.matched_rules[rule.id] += 1
            shadow = self._shadow_reason(rule)
            if self.audit:
                self._note(batch, event, rule.id, None, "matched", shadow)
            if rule.digest is not None and collect_for_digest(self.store, batch, event, rule):
                continue  # a digest rule acts on its schedule, not per event
            reason = _FIRED
            if rule.threshold is not None or rule.throttle is not None:
                outcome, reason = self._gate(event, rule)
                if outcome != "fired":
                    result.decisions.append(Decision(event.id, rule.id, outcome, reason))
                    self._note(batch, event, rule.id, None, outcome, reason)
                    continue
                self._note(batch, event, rule.id, None, "fired", reason)
            self._fire(event, rule, shadow, reason, batch, result)

    def _note(
        self,
        batch: Batch,
        event: Event,
        rule_id: str,
        action: str | None,
        outcome: str,
        detail: str | None,
    ) -> None:
        """Add an audit row to the batch, unless this pipeline keeps no audit log (replay
        would otherwise build rows for every match only to drop them)."""
        if self.audit:
            batch.audit.append(_audit(event, rule_id, action, outcome, detail))

    def _shadow_reason(self, rule: Rule) -> str | None:
        """Why the rule only records what it would do, or None when it acts."""
        if self.dry_run:
            return "dry run: would have acted"
        if rule.mode == "shadow":
            return "rule in shadow mode: would have acted"
        override = self._memory.override(rule.id)
        return override.reason if override is not None else None

    def _gate(self, event: Event, rule: Rule) -> tuple[str, str]:
        """Threshold window, then throttle: whether the rule fires for this event, and why."""
        at = event.timestamp.timestamp()
        memory = self._memory
        reason = _FIRED
        threshold = rule.threshold
        if threshold is not None:
            path = threshold.per or DEFAULT_PER
            key = key_of(event.raw, path)
            within = threshold.within.total_seconds()
            span = format_duration(threshold.within)
            if key is None:
                return "below_threshold", f"{path} is missing: the event is not counted"
            verdict = count_event(memory.window(rule.id, key, within), at, within, threshold.count)
            memory.set_window(rule.id, key, verdict.entries, within)
            counted = f"{verdict.count} of {threshold.count} events for {path}={key} within {span}"
            if not verdict.fired:
                return "below_threshold", counted
            reason = counted
        throttle = rule.throttle
        if throttle is not None:
            path = throttle.per or DEFAULT_PER
            # Events without the field share one mark: a flood of them stays throttled.
            key = key_of(event.raw, path) or ""
            until = memory.throttle(rule.id, key)
            if until is not None and at < until:
                shown = key or "(missing)"
                return "throttled", f"throttled for {path}={shown} until {format_moment(until)}"
            memory.set_throttle(rule.id, key, at + throttle.period.total_seconds())
        return "fired", reason

    def _fire(
        self,
        event: Event,
        rule: Rule,
        shadow: str | None,
        reason: str,
        batch: Batch,
        result: BatchResult,
    ) -> None:
        outcome = "fired" if shadow is None else "shadow"
        decided = reason if shadow is None else shadow
        context = {"event": event.raw, "rule": self._context_of(rule)}
        guarded = rule.max_actions is not None or self.max_actions is not None
        for step in rule.actions:
            planned = self._plan(event, rule, step, context, batch, result)
            if planned is None:
                continue
            status = IntentStatus.PENDING if shadow is None else IntentStatus.SHADOW
            held = None
            if shadow is None and guarded and step.action.destructive:
                held = self._guard(event, rule)
                if held is not None:
                    status = IntentStatus.HELD
                    outcome, decided = "held", held
            self._record(event, rule, step, planned, status, held, batch, result)
            if held is not None:
                shadow = self._trip(event, rule, held, batch, result)
        result.decisions.append(Decision(event.id, rule.id, outcome, decided))

    def _plan(
        self,
        event: Event,
        rule: Rule,
        step: ActionStep,
        context: dict[str, Any],
        batch: Batch,
        result: BatchResult,
    ) -> PlannedAction | None:
        try:
            return step.action.plan(event, context)
        except ActionError as error:
            self._note(batch, event, rule.id, step.kind, "failed", str(error))
            _log.warning(
                "action not planned",
                rule=rule.id,
                action=step.kind,
                event_id=event.id,
                reason=str(error),
            )
            return None

    def _guard(self, event: Event, rule: Rule) -> str | None:
        """Count a destructive action against the rule's and the global guard; the reason
        it is held when either would be exceeded."""
        at = event.timestamp.timestamp()
        allowed: list[tuple[str, list[float]]] = []
        for scope, limit, label in (
            (rule.id, rule.max_actions, ""),
            (GLOBAL_GUARD, self.max_actions, " (global)"),
        ):
            if limit is None:
                continue
            within = limit.within.total_seconds()
            verdict = count_destructive(self._memory.guard(scope), at, within, limit.count)
            if not verdict.allowed:
                span = format_duration(limit.within)
                return (
                    f"blast-radius guard{label}: {verdict.count} destructive actions within "
                    f"{span} > {limit.count}"
                )
            allowed.append((scope, verdict.entries))
        for scope, entries in allowed:
            self._memory.set_guard(scope, entries)
        return None

    def _trip(self, event: Event, rule: Rule, held: str, batch: Batch, result: BatchResult) -> str:
        """Switch the rule to shadow (durably) and plan its `on_guard_trip` actions, which
        run live. Returns the rule's new shadow reason."""
        reason = (
            f"switched to shadow by the blast-radius guard at {format_moment(event.timestamp)}"
            f" ({held}); resume with `event-engine rules resume {rule.id}`"
        )
        self._memory.set_override(
            RuleOverride(rule.id, "shadow", reason, event.timestamp, event.id)
        )
        self._note(batch, event, rule.id, None, "guard_tripped", reason)
        _log.error(
            "blast-radius guard tripped: rule switched to shadow",
            rule=rule.id,
            event_id=event.id,
            reason=held,
        )
        context = {
            "event": event.raw,
            "rule": self._context_of(rule),
            "guard": {"reason": held, "rule_id": rule.id},
        }
        for step in rule.on_guard_trip:
            planned = self._plan(event, rule, step, context, batch, result)
            if planned is not None:
                self._record(
                    event,
                    rule,
                    step,
                    planned,
                    IntentStatus.PENDING,
                    None,
                    batch,
                    result,
                    on_guard_trip=True,
                )
        return reason

    def _record(
        self,
        event: Event,
        rule: Rule,
        step: ActionStep,
        planned: PlannedAction,
        status: IntentStatus,
        held: str | None,
        batch: Batch,
        result: BatchResult,
        *,
        on_guard_trip: bool = False,
    ) -> None:
        due = event.timestamp + step.after if step.after else None
        if on_guard_trip:
            key = guard_trip_key(event.id, rule.id, step.index)
        else:
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
                status=status,
                due_at=due,
            )
        )
        shadow = status is IntentStatus.SHADOW
        if self.audit:
            detail: str | None = f"due {due.isoformat()}" if due else None
            if held is not None:
                outcome, detail = "held", held
            elif shadow:
                outcome = "would have acted"
            else:
                outcome = "scheduled" if due else "planned"
            self._note(batch, event, rule.id, planned.kind, outcome, detail)
        # Cancellation looks the step up in `rule.actions`; guard notices are not cancelled.
        if due is not None and step.cancel_if is not None and held is None and not on_guard_trip:
            self._remember_follow_up(event, rule, step, key, due, shadow)
        result.planned.append(
            Planned(
                event,
                rule,
                step,
                planned,
                due,
                shadow,
                held=held is not None,
                on_guard_trip=on_guard_trip,
                key=key,
            )
        )

    def _remember_follow_up(
        self, event: Event, rule: Rule, step: ActionStep, key: str, due: datetime, shadow: bool
    ) -> None:
        path = _cancel_path(rule)
        value = key_of(event.raw, path)
        if value is None:
            # Nothing to recognise a later event by: the follow-up cannot be cancelled.
            _log.warning(
                "follow-up cannot be cancelled: the event has no key",
                rule=rule.id,
                event_id=event.id,
                path=path,
            )
            return
        self._memory.add_follow_up(
            FollowUpKey(
                idempotency_key=key,
                rule_id=rule.id,
                action_index=step.index,
                event_id=event.id,
                key_path=path,
                key=value,
                planned_at=event.timestamp,
                due_at=due,
                shadow=shadow,
            )
        )

    def _cancel_follow_ups(self, event: Event, batch: Batch, result: BatchResult) -> None:
        """Cancel waiting follow-ups of the same key whose `cancel_if` this event meets."""
        for follow_up in self._memory.follow_ups_for(event.raw):
            if follow_up.event_id == event.id:
                continue
            if not follow_up.planned_at <= event.timestamp < follow_up.due_at:
                continue
            why = self._cancels(event, follow_up)
            if why is None:
                continue
            self._memory.drop_follow_up(follow_up)
            due = format_moment(follow_up.due_at)
            detail = f"{follow_up.idempotency_key} (due {due}) cancelled by event {event.id}: {why}"
            late = (
                f"event {event.id} met cancel_if of {follow_up.idempotency_key}, but it had "
                "already been taken by the dispatcher"
            )
            batch.state.cancels.append(
                FollowUpCancel(
                    idempotency_key=follow_up.idempotency_key,
                    audit=_audit(
                        event,
                        follow_up.rule_id,
                        None,
                        "would have cancelled" if follow_up.shadow else "cancelled",
                        detail,
                    ),
                    too_late=_audit(event, follow_up.rule_id, None, "cancel too late", late),
                    shadow=follow_up.shadow,
                )
            )
            result.cancelled.append((len(result.planned), Cancelled(event, follow_up)))

    def _cancels(self, event: Event, follow_up: FollowUpKey) -> str | None:
        """Why `event` cancels the follow-up, or None when it does not."""
        rule = self.rules.get(follow_up.rule_id)
        if rule is None or follow_up.action_index >= len(rule.actions):
            return None  # the rule changed since: keep the follow-up
        cancel_if = rule.actions[follow_up.action_index].cancel_if
        if cancel_if is None or cancel_if.when.mismatch(event) is not None:
            return None
        if cancel_if.condition is not None:
            try:
                if not cancel_if.condition.holds(event.raw):
                    return None
            except ConditionError:
                return None
        return f"cancel_if of {follow_up.rule_id} matched ({follow_up.key_path}={follow_up.key})"

    def _context_of(self, rule: Rule) -> dict[str, Any]:
        context = self._rule_context.get(rule.id)
        if context is None:
            context = {"id": rule.id, "description": rule.description}
            self._rule_context[rule.id] = context
        return context


def _cancel_path(rule: Rule) -> str:
    """The event path whose value a cancelling event must share with the planning one."""
    if rule.threshold is not None and rule.threshold.per:
        return rule.threshold.per
    if rule.throttle is not None and rule.throttle.per:
        return rule.throttle.per
    return DEFAULT_PER


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
        event_ts=event.timestamp.timestamp(),
    )


def dedup_horizon(overlap: timedelta) -> timedelta:
    """How long seen ids are kept: the poll overlap plus a generous margin for late events
    and for the Data Streamer re-delivering what the poller already took."""
    return overlap + timedelta(hours=24)


def _raw_text(record: object) -> str:
    """A quarantined record as JSON text, whatever it holds (orjson refuses integers beyond
    64 bits; the standard library writes them)."""
    try:
        return orjson.dumps(record, default=str).decode()
    except TypeError:
        return json.dumps(record, default=str)
