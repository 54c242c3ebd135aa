"""The pipeline: raw records → normalized events → dedup → rules → planned intents → store.

Every source (poller, Data Streamer ingress, replay) hands its records to `Pipeline.process`,
so an event is judged the same way whichever door it came through. Rules that count, wait
and remember (threshold windows, throttles, the blast-radius guard, cancellable follow-ups)
keep their state in `engine.state.RuleMemory`; their changes go into the batch, so the only
I/O here is the one store transaction per batch (plus lazy loads of state not yet cached).
"""

from __future__ import annotations

import json
import re
import reprlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
import structlog

from engine import secrets
from engine.actions import PlannedAction
from engine.clock import Clock, system_clock
from engine.digest import collect_for_digest
from engine.engine_events import EngineEventDraft
from engine.errors import ActionError, EventFormatError, StaleRuleState, StoreError
from engine.events import ENGINE_SOURCE_ID, Event, normalize
from engine.jsontext import Unreadable
from engine.model import (
    GLOBAL_GUARD,
    AuditRow,
    Batch,
    Fence,
    FollowUpCancel,
    FollowUpKey,
    Intent,
    IntentStatus,
    RuleOverride,
)
from engine.rules.condition import ConditionError, is_rule_failure
from engine.silencing import Quiet, QuietSource
from engine.state import (
    DEFAULT_PER,
    RuleMemory,
    count_destructive,
    count_event,
    format_duration,
    format_moment,
    key_of,
)

if TYPE_CHECKING:
    from engine.ports import PipelineStore
    from engine.rules import ActionStep, MaxActions, Rule, RuleSet

_log = structlog.get_logger(__name__)


class Judged(NamedTuple):
    """An event already normalized, and matched against the pipeline's rules elsewhere (a
    parallel replay's worker process): `rules` are those it matched, or None to match it
    here. It is judged like any other event from there on: dedup, thresholds, throttles,
    the guard, follow-up cancellation, planning (`Pipeline.process_judged`).

    An event no rule and no `cancel_if` can match may come with an empty `raw`: nothing
    reads it."""

    event: Event
    rules: Sequence[Rule] | None


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
    silenced: str | None = None  # the silence or mute window that kept it from running

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
        if self.silenced is not None:
            out["silenced"] = self.silenced
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


class Failure(NamedTuple):
    """A rule that failed on one event, at `stage`: `match`, `cancel_if`, `judge` (the rule
    as a whole) or `plan` (one of its actions, named by `action`)."""

    event_id: int
    rule_id: str
    stage: str
    reason: str
    action: str | None = None


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
    # Rules that failed on an event, or actions that could not be planned.
    failures: list[Failure] = field(default_factory=list)
    # Events read but quarantined while judged (nested too deeply to handle): (id, reason).
    poisoned: list[tuple[int, str]] = field(default_factory=list)
    # What the engine has to say about this batch (a guard tripped), once it is committed:
    # the daemon emits these (`engine.engine_events`); a batch that failed says nothing.
    engine_events: list[EngineEventDraft] = field(default_factory=list)

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
# How often a batch is judged again when what it was judged on keeps changing under it.
_JUDGED_AGAIN = 5


class Pipeline:
    """Judges batches of raw event records against a rule set and records the outcome.

    `max_actions` is the global blast-radius guard (config `guard.max_actions`): destructive
    actions of all rules together, on top of each rule's own `max_actions`."""

    def __init__(
        self,
        rules: RuleSet,
        store: PipelineStore,
        *,
        dry_run: bool = False,
        max_actions: MaxActions | None = None,
        audit: bool = True,
        clock: Clock = system_clock,
        quiet: QuietSource | None = None,
    ):
        """`audit=False` keeps no audit log: for replay, whose store is thrown away.
        `quiet`: the silences and mute windows in force, asked once a batch."""
        self.rules = rules
        self.store = store
        self.dry_run = dry_run
        self.audit = audit
        self.max_actions = max_actions
        self.clock = clock
        self._rule_context: dict[str, dict[str, Any]] = {}
        self._memory = RuleMemory(store)
        self._failure_log = _FailureLog()
        self.quiet = quiet
        self._quiet: Quiet | None = None

    def set_rules(self, rules: RuleSet) -> None:
        self.rules = rules
        self._rule_context.clear()
        self._failure_log = _FailureLog()  # an edited rule that still fails says so again

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
        fence: Fence | None = None,
    ) -> BatchResult:
        """Evaluate raw event `records` and commit the batch (with `cursor`, if given)
        atomically, under `fence` if given (the store refuses the batch with LeaseLost once
        that lease has moved on). A record that is not a readable event is quarantined.

        Events are judged in (timestamp, id) order unless `in_given_order` (replay keeps
        the file's order). If the commit fails, nothing of the batch counts: the rules'
        memory is reloaded from the store and the same records may be given again."""
        return self._committed(
            lambda result, batch: self._normalize(records, source, batch, result),
            len(records),
            cursor,
            in_given_order,
            fence,
        )

    def process_judged(self, items: Sequence[Judged]) -> BatchResult:
        """Like `process`, for events read and matched elsewhere (replay's second process),
        in the order given; an item whose `rules` is None is matched here."""
        return self._committed(lambda result, batch: items, len(items), None, True)

    def _committed(
        self,
        events: Callable[[BatchResult, Batch], Sequence[tuple[Event, Sequence[Rule] | None]]],
        received: int,
        cursor: datetime | None,
        in_given_order: bool,
        fence: Fence | None = None,
    ) -> BatchResult:
        for attempt in range(1, _JUDGED_AGAIN + 1):
            try:
                return self._process(events, received, cursor, in_given_order, fence)
            except StaleRuleState as stale:
                # What the batch was judged on changed (another batch, of this or another
                # instance, changed the rules' state or recorded one of its events; `rules
                # resume` ran): judge it again on what the store holds now.
                self._memory.forget()
                if attempt == _JUDGED_AGAIN:
                    raise StoreError(
                        f"the batch was judged {attempt} times and each time the rules' state"
                        f" changed before it could be recorded ({stale}); it is tried again"
                        " later"
                    ) from None
                _log.info("rule state changed during the batch; evaluating it again")
            except BaseException:
                self._memory.forget()
                raise
        raise AssertionError("unreachable")

    def _process(
        self,
        read: Callable[[BatchResult, Batch], Sequence[tuple[Event, Sequence[Rule] | None]]],
        received: int,
        cursor: datetime | None,
        in_given_order: bool,
        fence: Fence | None,
    ) -> BatchResult:
        result = BatchResult(received=received)
        batch = Batch(cursor=cursor, fence=fence)
        self._quiet = None if self.quiet is None else self.quiet(self.clock())
        self._memory.begin(batch.state)
        events = read(result, batch)
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
            if event.source_id == ENGINE_SOURCE_ID and self.audit:
                # The engine's own events are kept in the audit log whether or not a rule
                # matches them: what the engine said about itself, and when.
                batch.audit.append(_audit(event, None, None, "engine_event", event.description))
            # A judged event no rule matched has nothing to do unless it may cancel a
            # follow-up: in a replay on two cores, such events are most of a file.
            if matched is None or matched or memory.has_follow_ups:
                self._evaluate(event, matched, batch, result)
        if fresh:
            last = fresh[-1][0].timestamp
            result.newest = last
            newest = max(e.timestamp for e, _ in fresh) if in_given_order else last
            self._memory.advance(newest.timestamp())
        result.intents_created = self.store.commit_batch(batch, self.clock())
        self._memory.committed(batch.state)
        result.engine_events = batch.engine_events
        return result

    def _normalize(
        self, records: Sequence[object], source: str, batch: Batch, result: BatchResult
    ) -> list[tuple[Event, Sequence[Rule] | None]]:
        """Each record's event, to be matched here; the others are quarantined."""
        events: list[tuple[Event, Sequence[Rule] | None]] = []
        tag_list = self.rules.reads_tag_list
        for index, record in enumerate(records):
            try:
                events.append((normalize(record, tag_list=tag_list), None))
            except Exception as error:  # a malformed record, or a reader's bug: the same here
                reason = malformed(record, error)
                result.quarantined += 1
                result.rejected.append((index, reason))
                batch.quarantine.append((source, reason, _raw_text(record)))
        if result.rejected:
            _log_quarantined(source, [reason for _, reason in result.rejected])
        return events

    def _evaluate(
        self, event: Event, matched: Sequence[Rule] | None, batch: Batch, result: BatchResult
    ) -> None:
        """Judge one event. Whatever goes wrong for one rule fails that rule for this event
        only: its changes are taken back and the failure is recorded; the other rules go on.
        An event nested too deeply to be handled at all is taken back whole and quarantined."""
        memory = self._memory
        memory.begin_event()
        start = _savepoint(memory, batch, result)
        # What one rule may add to; its marks are taken inline (this runs for every rule
        # an event matches), and taken back to if the rule fails.
        journal, intents, audit = memory.journal, batch.intents, batch.audit
        planned, decisions, failures = result.planned, result.decisions, result.failures
        judged = 0
        try:
            if memory.has_follow_ups:
                self._cancel_follow_ups(event, batch, result)
            if matched is None:
                matched = self._match(event, batch, result)
            for rule in matched:
                judged += 1
                marks = (
                    len(journal),
                    len(intents),
                    len(audit),
                    len(planned),
                    len(decisions),
                    len(failures),
                    len(batch.engine_events),
                )
                try:
                    self._judge(event, rule, batch, result)
                except StoreError:
                    raise  # the store failed, not the rule: the batch fails as a whole
                except BaseException as error:
                    if not is_rule_failure(error) or _too_deep(error):
                        raise
                    memory.undo(marks[0])
                    del intents[marks[1] :]
                    del audit[marks[2] :]
                    del planned[marks[3] :]
                    del decisions[marks[4] :]
                    del failures[marks[5] :]
                    del batch.engine_events[marks[6] :]
                    self._failed(event, rule.id, "judge", _reason(error), batch, result)
        except StoreError:
            raise
        except Exception as error:
            if not _too_deep(error):
                raise  # a bug outside any one rule's judging: let the batch fail loudly
            _restore(start, memory, batch, result)
            taken_back = [rule.id for rule in (matched or ())[:judged]]
            result.matches -= len(taken_back)
            result.matched_rules.subtract(taken_back)
            reason = "nested too deeply to be judged"
            result.new_events -= 1
            result.quarantined += 1
            result.poisoned.append((event.id, reason))
            batch.quarantine.append(("judging", reason, _raw_text(event.raw)))
            _log_quarantined("judging", [reason], event_id=event.id)
        else:
            if len(failures) > start[8]:
                self._log_failures(failures[start[8] :])

    def _match(self, event: Event, batch: Batch, result: BatchResult) -> Sequence[Rule]:
        try:
            return self.rules.match(event)
        except BaseException as error:
            if not is_rule_failure(error) or _too_deep(error):
                raise
        # Rule by rule, so that the one that failed is known and the others still match.
        matched, failed = self.rules.match_each(event)
        for rule, failure in failed:
            self._failed(event, rule.id, "match", _reason(failure), batch, result)
        return matched

    def _judge(self, event: Event, rule: Rule, batch: Batch, result: BatchResult) -> None:
        result.matches += 1
        result.matched_rules[rule.id] += 1
        shadow = self._shadow_reason(rule)
        silenced = None
        if shadow is None and self._quiet is not None:
            silenced = shadow = self._quiet.reason(event, rule.id)
        if self.audit:
            self._note(batch, event, rule.id, None, "matched", shadow)
        if rule.digest is not None and collect_for_digest(batch, event, rule):
            return  # a digest rule acts on its schedule, not per event
        reason = _FIRED
        if rule.threshold is not None or rule.throttle is not None:
            outcome, reason = self._gate(event, rule)
            if outcome != "fired":
                result.decisions.append(Decision(event.id, rule.id, outcome, reason))
                self._note(batch, event, rule.id, None, outcome, reason)
                return
            self._note(batch, event, rule.id, None, "fired", reason)
        self._fire(event, rule, shadow, reason, batch, result, silenced=silenced is not None)

    def _failed(
        self,
        event: Event,
        rule_id: str,
        stage: str,
        reason: str,
        batch: Batch,
        result: BatchResult,
        *,
        action: str | None = None,
    ) -> None:
        """Record that `rule_id` failed on `event` (or, with `action`, could not plan that
        action): in the audit log, the batch's failure counts, and the log, once per rule
        and reason."""
        result.failures.append(Failure(event.id, rule_id, stage, reason, action))
        if action is None:
            result.decisions.append(Decision(event.id, rule_id, "failed", reason))
        elif event.source_id != ENGINE_SOURCE_ID:  # (one for an engine event would loop)
            # An action that cannot be planned for this event fails for good: said as an
            # engine event, which rules may route like any other.
            batch.engine_events.append(
                EngineEventDraft(
                    "action_failed",
                    {
                        "rule": rule_id,
                        "action": action,
                        "event_id": event.id,
                        "reason": reason,
                        "stage": "plan",
                    },
                    sim={"id": event.sim_id, "iccid": event.iccid} if event.sim_id else None,
                    endpoint={"id": event.endpoint_id} if event.endpoint_id else None,
                )
            )
        self._note(batch, event, rule_id, action, "failed", reason)

    def _log_failures(self, failures: Sequence[Failure]) -> None:
        """Log an event's failures (once it is judged: one taken back logs nothing), each
        rule's first few reasons only."""
        for failure in failures:
            rule_id, stage, action = failure.rule_id, failure.stage, failure.action
            if not self._failure_log.first(rule_id, f"{stage} {action} {failure.reason}"):
                continue
            what = "action not planned" if action else "rule failed on an event"
            _log.error(
                f"{what} (logged once per rule and reason; the audit log has every one)",
                rule=rule_id,
                **({"action": action} if action else {"stage": stage}),
                event_id=failure.event_id,
                reason=failure.reason,
            )

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
        *,
        silenced: bool = False,
    ) -> None:
        """Plan the rule's actions; with `shadow` (a reason) they are recorded, not run:
        the rule is in shadow mode, or, when `silenced`, a silence covers the match."""
        quiet = "silenced" if silenced else "shadow"
        outcome = "fired" if shadow is None else quiet
        decided = reason if shadow is None else shadow
        context = {"event": event.raw, "rule": self._context_of(rule)}
        guarded = rule.max_actions is not None or self.max_actions is not None
        for step in rule.actions:
            planned = self._plan(event, rule, step, context, batch, result)
            if planned is None:
                continue
            action, due = planned
            status = IntentStatus.PENDING if shadow is None else IntentStatus.SHADOW
            held = None
            if shadow is None and guarded and step.action.destructive:
                held = self._guard(event, rule)
                if held is not None:
                    status = IntentStatus.HELD
                    outcome, decided = "held", held
            self._record(
                event,
                rule,
                step,
                action,
                due,
                status,
                held,
                batch,
                result,
                silenced=shadow if silenced else None,
            )
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
    ) -> tuple[PlannedAction, datetime | None] | None:
        """The action rendered for the event and when it is due (None: at once), or None
        when it cannot be planned for this event (recorded as a failure)."""
        try:
            planned = step.action.plan(event, context)
            return planned, _due(event, step)
        except ActionError as error:
            self._failed(event, rule.id, "plan", str(error), batch, result, action=step.kind)
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
        batch.engine_events.append(
            EngineEventDraft(
                "guard_tripped",
                {"rule": rule.id, "reason": held, "event_id": event.id},
                sim={"id": event.sim_id, "iccid": event.iccid} if event.sim_id else None,
                endpoint={"id": event.endpoint_id} if event.endpoint_id else None,
            )
        )
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
                    *planned,
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
        due: datetime | None,
        status: IntentStatus,
        held: str | None,
        batch: Batch,
        result: BatchResult,
        *,
        on_guard_trip: bool = False,
        silenced: str | None = None,
    ) -> None:
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
            elif silenced is not None:
                outcome, detail = "silenced", silenced
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
                silenced=silenced,
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
            try:
                why = self._cancels(event, follow_up)
            except BaseException as error:
                if not is_rule_failure(error) or _too_deep(error):
                    raise
                reason = f"cancel_if of {follow_up.idempotency_key}: {_reason(error)}"
                self._failed(event, follow_up.rule_id, "cancel_if", reason, batch, result)
                continue
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


# A quarantined record is kept for an operator to read, not without bound.
_QUARANTINE_TEXT_LIMIT = 1024 * 1024
_REASON_LIMIT = 300
_DIGITS = re.compile(r"\d+")
# Shows a record too deep for JSON text as far as a person would read it.
_SHALLOW = reprlib.Repr()
_SHALLOW.maxlevel, _SHALLOW.maxstring, _SHALLOW.maxother = 8, 200, 200


def malformed(record: object, error: Exception) -> str:
    """Why `record` is not a readable event, as the quarantine and replay say it."""
    if isinstance(record, Unreadable):
        return record.reason
    if isinstance(error, EventFormatError):
        return str(error)
    return _reason(error)


def _log_quarantined(source: str, reasons: list[str], **fields: Any) -> None:
    """One line for the records a batch quarantined, however many (a delivery of thousands
    of bad records must not write thousands of lines): the count and the commonest reasons."""
    common = Counter(reasons).most_common(3)
    _log.warning(
        "event quarantined" if len(reasons) == 1 else f"{len(reasons)} records quarantined",
        source=source,
        reason=common[0][0],
        **({"reasons": dict(common)} if len(common) > 1 else {}),
        **fields,
    )


def _raw_text(record: object) -> str:
    """A quarantined record as JSON text, whatever it holds (orjson refuses integers beyond
    64 bits and nesting beyond 254 levels; the standard library writes what it can), cut
    short past a megabyte."""
    try:
        text = orjson.dumps(record, default=str).decode()
    except TypeError:
        try:
            text = json.dumps(record, default=str)
        except (RecursionError, ValueError, TypeError):
            text = "(nested too deeply for JSON) " + _SHALLOW.repr(record)
    if len(text) > _QUARANTINE_TEXT_LIMIT:
        text = text[:_QUARANTINE_TEXT_LIMIT] + f"... (cut short: {len(text)} characters)"
    return text


def _reason(error: BaseException) -> str:
    """An unexpected error, as a reason an operator reads in the audit log."""
    message = str(error)
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    if len(text) > _REASON_LIMIT:
        text = text[: _REASON_LIMIT - 1] + "…"
    return secrets.redact(text)


def _too_deep(error: BaseException) -> bool:
    """Whether judging failed because the event is nested too deeply to handle: Python's
    recursion limit, or orjson's own limit on nesting when it writes a value out."""
    if isinstance(error, RecursionError):
        return True
    return isinstance(error, TypeError) and "Recursion limit" in str(error)


def _due(event: Event, step: ActionStep) -> datetime | None:
    if not step.after:
        return None
    try:
        return event.timestamp + step.after
    except OverflowError:
        raise ActionError(
            f"follow-up due {format_duration(step.after)} after {format_moment(event.timestamp)}"
            " falls past the year 9999"
        ) from None


# How far a batch had got (see `_savepoint`), to take back what one rule or event added.
_Savepoint = tuple[int, int, int, int, int, int, int, int, int, int]


def _savepoint(memory: RuleMemory, batch: Batch, result: BatchResult) -> _Savepoint:
    # A plain tuple: this is taken for every rule that matches an event.
    return (
        len(memory.journal),
        len(batch.intents),
        len(batch.audit),
        len(batch.quarantine),
        len(batch.state.cancels),
        len(result.planned),
        len(result.decisions),
        len(result.cancelled),
        len(result.failures),
        len(batch.engine_events),
    )


def _restore(point: _Savepoint, memory: RuleMemory, batch: Batch, result: BatchResult) -> None:
    memory.undo(point[0])
    del batch.intents[point[1] :]
    del batch.audit[point[2] :]
    del batch.quarantine[point[3] :]
    del batch.state.cancels[point[4] :]
    del result.planned[point[5] :]
    del result.decisions[point[6] :]
    del result.cancelled[point[7] :]
    del result.failures[point[8] :]
    del batch.engine_events[point[9] :]


class _FailureLog:
    """Which failures were logged: each rule's first few distinct reasons, so that a rule
    failing on every event cannot flood the log (the audit log and the metric keep all).
    Reasons that differ only in their numbers (ids, times) are the same reason."""

    PER_RULE = 5

    def __init__(self) -> None:
        self._seen: dict[str, set[str]] = {}

    def first(self, rule_id: str, reason: str) -> bool:
        reason = _DIGITS.sub("#", reason)
        reasons = self._seen.setdefault(rule_id, set())
        if reason in reasons or len(reasons) >= self.PER_RULE:
            return False
        reasons.add(reason)
        return True
