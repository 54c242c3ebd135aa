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

from engine import absence as absences
from engine import secrets
from engine.actions import PlannedAction
from engine.clock import Clock, system_clock
from engine.digest import collect_for_digest
from engine.echoes import (
    DEFAULT_ECHOES,
    DEFAULT_LOOP_BREAKER,
    Echoes,
    LoopBreaker,
    describe,
    echo_kinds,
    echo_targets,
    nearest,
    status_target,
)
from engine.engine_events import EngineEventDraft
from engine.errors import ActionError, EventFormatError, StaleRuleState, StoreError
from engine.events import ENGINE_SOURCE_ID, ORGANISATION_KEY, Event, normalize
from engine.jsontext import Unreadable
from engine.lookups import LookupTable, endpoint_of, facts_for, wanted
from engine.model import (
    GLOBAL_GUARD,
    HOLD,
    AuditRow,
    Batch,
    Fence,
    FollowUpCancel,
    FollowUpKey,
    Intent,
    IntentStatus,
    OwnStatusAction,
    RuleOverride,
)
from engine.rules.condition import ConditionError, is_rule_failure, truthy
from engine.rules.trace import condition_values, shown, when_values
from engine.silencing import Quiet, QuietSource
from engine.state import (
    DEFAULT_PER,
    RuleMemory,
    count_destructive,
    count_event,
    format_duration,
    format_moment,
    key_of,
    sum_usage,
)
from engine.usage import is_usage_event_id, is_usage_record, read_usage, record_id_of

if TYPE_CHECKING:
    from engine.ports import PipelineStore
    from engine.rules import ActionStep, MaxActions, Rule, RuleSet
    from engine.rules.model import Absence
    from engine.usage import UsageLimit

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
    held: bool = False  # stopped by the blast-radius guard or the loop breaker
    on_guard_trip: bool = False  # planned because this event tripped the guard
    key: str = ""  # the intent's idempotency key
    absence: dict[str, Any] | None = None  # set when an absence rule fired for a silence
    silenced: str | None = None  # the silence or mute window that kept it from running

    def as_json(self) -> dict[str, Any]:
        event_id = self.event.id
        out: dict[str, Any] = {
            # A usage record by its own id (it is judged under one below zero).
            **(
                {"usage_record_id": record_id_of(event_id)}
                if is_usage_event_id(event_id)
                else {"event_id": event_id}
            ),
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
        if self.absence is not None:
            out["at"] = self.absence["at"]  # the firing's event time: the silence's end
            out["absence"] = self.absence
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
    destructive action, or the loop breaker a status change), `shadow` (it would have
    acted) or `own_echo` (the event echoes the engine's own action and the rule does not
    judge those)."""

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
    # Usage records (`engine.usage`) judged by `usage` rules, and those passed over because
    # no rule uses them (neither seen, nor quarantined).
    usage_used: int = 0
    usage_ignored: int = 0

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


class _Completeness(NamedTuple):
    """How far a batch moves complete time: to `until`, or to its newest event."""

    until: datetime | None
    to_newest: bool


_FIRED = "when and condition held"
# How often a batch is judged again when what it was judged on keeps changing under it.
_JUDGED_AGAIN = 5


class Pipeline:
    """Judges batches of raw event records against a rule set and records the outcome.

    `max_actions` is the global blast-radius guard (config `guard.max_actions`): destructive
    actions of all rules together, on top of each rule's own `max_actions`. `echoes` and
    `loop_breaker` keep the engine from fighting itself (`engine.echoes`; None: no loop
    breaker). `planned_is_done`: nothing runs the intents (a replay, a rule test), so a
    status action counts as done at its planning event's time when echoes are looked for."""

    def __init__(
        self,
        rules: RuleSet,
        store: PipelineStore,
        *,
        dry_run: bool = False,
        max_actions: MaxActions | None = None,
        audit: bool = True,
        clock: Clock = system_clock,
        echoes: Echoes = DEFAULT_ECHOES,
        loop_breaker: LoopBreaker | None = DEFAULT_LOOP_BREAKER,
        planned_is_done: bool = False,
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
        self.echoes = echoes
        self.loop_breaker = loop_breaker
        self._echo_kinds = echo_kinds()
        self._planned_is_done = planned_is_done
        # With `planned_is_done`: the status actions planned by committed batches, per
        # target, and those of the current batch with their place in `batch.intents` (an
        # entry whose place holds another intent was taken back with a failed rule).
        self._planned_status: dict[str, list[OwnStatusAction]] = {}
        self._planned_now: dict[str, list[tuple[int, OwnStatusAction]]] = {}
        self._rule_context: dict[str, dict[str, Any]] = {}
        self._memory = RuleMemory(store)
        self._failure_log = _FailureLog()
        # Event time up to which every event is known (epoch seconds): absence rules judge
        # silences up to here, never up to the wall clock.
        self._complete: float | None = None
        self.quiet = quiet
        self._quiet: Quiet | None = None
        # The facts fetched for the batch being judged (`process(lookups=...)`).
        self._lookups: LookupTable | None = None
        # The organisation whose batch is being judged (`process(organisation=...)`).
        self._organisation = ""
        self._scoped = _has_scoped_rules(rules)

    def set_rules(self, rules: RuleSet) -> None:
        self.rules = rules
        self._scoped = _has_scoped_rules(rules)
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
        complete: datetime | None = None,
        complete_to_newest: bool = False,
        lookups: LookupTable | None = None,
        organisation: str = "",
    ) -> BatchResult:
        """Evaluate raw event `records` and commit the batch (with `cursor`, if given)
        atomically, under `fence` if given (the store refuses the batch with LeaseLost once
        that lease has moved on). A record that is not a readable event is quarantined.

        `complete`: every event up to this time is now known (the poller's cursor minus its
        overlap), so absence rules judge their silences up to it, after the batch's events;
        `complete_to_newest`: the input is complete up to its newest event so far (replay,
        rule tests). Complete time never moves back.

        Events are judged in (timestamp, id) order unless `in_given_order` (replay keeps
        the file's order). If the commit fails, nothing of the batch counts: the rules'
        memory is reloaded from the store and the same records may be given again.

        `lookups`: the facts fetched for the batch's endpoints (see `wanted_lookups`); a
        rule with `lookup` whose facts are not there records `lookup unavailable`.

        `organisation`: whose events these are (`organisations:` in the config; "" for the
        single organisation): each event carries it as `org`, it has its own seen ids and
        cursor, its actions go out with its token, and rules scoped to another skip it."""
        self._lookups = lookups
        self._organisation = organisation
        try:
            return self._committed(
                lambda result, batch: self._normalize(records, source, batch, result),
                len(records),
                cursor,
                in_given_order,
                fence,
                _Completeness(complete, complete_to_newest),
            )
        finally:
            self._lookups = None
            self._organisation = ""

    def wanted_lookups(self, records: Sequence[object]) -> dict[int, set[str]]:
        """Which facts the rules' `lookup` lists need for these records, per endpoint id:
        what an adapter fetches before handing the batch to `process`. Empty at once when
        no rule looks anything up."""
        if not any(rule.lookup for rule in self.rules):
            return {}
        events: list[Event] = []
        for record in records:
            try:
                events.append(normalize(record, tag_list=self.rules.reads_tag_list))
            except Exception:
                continue
        return wanted(events, self.rules)

    def process_judged(
        self, items: Sequence[Judged], *, lookups: LookupTable | None = None
    ) -> BatchResult:
        """Like `process`, for events read and matched elsewhere (replay's second process),
        in the order given, on input complete up to its newest event; an item whose `rules`
        is None is matched here."""
        self._lookups = lookups
        try:
            return self._committed(
                lambda result, batch: items, len(items), None, True, None, _Completeness(None, True)
            )
        finally:
            self._lookups = None

    def judge_absences(self, complete: datetime, *, fence: Fence | None = None) -> BatchResult:
        """Move complete time to `complete` with no events (a replay's or a rule test's
        virtual clock reaching the end of its input) and commit what absence rules fire."""
        return self._committed(
            lambda result, batch: [], 0, None, True, fence, _Completeness(complete, False)
        )

    def _committed(
        self,
        events: Callable[[BatchResult, Batch], Sequence[tuple[Event, Sequence[Rule] | None]]],
        received: int,
        cursor: datetime | None,
        in_given_order: bool,
        fence: Fence | None = None,
        completeness: _Completeness | None = None,
    ) -> BatchResult:
        for attempt in range(1, _JUDGED_AGAIN + 1):
            try:
                return self._process(events, received, cursor, in_given_order, fence, completeness)
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
        completeness: _Completeness | None = None,
    ) -> BatchResult:
        result = BatchResult(received=received)
        batch = Batch(cursor=cursor, fence=fence, organisation=self._organisation)
        self._planned_now.clear()
        self._quiet = None if self.quiet is None else self.quiet(self.clock())
        self._memory.begin(batch.state)
        events = read(result, batch)
        fresh_ids = self.store.unseen([e.id for e, _ in events], self._organisation)
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
        complete = self._complete_after(completeness, events)
        if complete is not None and self.rules.has_absence:
            self._judge_absences(complete, events, batch, result)
        result.intents_created = self.store.commit_batch(batch, self.clock())
        self._memory.committed(batch.state)
        if self._planned_now:
            self._keep_planned_status(batch)
        result.engine_events = batch.engine_events
        if complete is not None:
            self._complete = complete
        return result

    def _complete_after(
        self,
        completeness: _Completeness | None,
        events: Sequence[tuple[Event, Sequence[Rule] | None]],
    ) -> float | None:
        """Complete time after this batch, or None when it does not move."""
        if completeness is None:
            return None
        moved: float | None = None
        if completeness.until is not None:
            moved = completeness.until.timestamp()
        elif completeness.to_newest and events:
            moved = max(e.timestamp for e, _ in events).timestamp()
        if moved is None or (self._complete is not None and moved <= self._complete):
            return None
        return moved

    def _normalize(
        self, records: Sequence[object], source: str, batch: Batch, result: BatchResult
    ) -> list[tuple[Event, Sequence[Rule] | None]]:
        """Each record's event, to be matched here; the others are quarantined. A usage
        record is read as one when a rule uses usage records, and passed over otherwise."""
        events: list[tuple[Event, Sequence[Rule] | None]] = []
        tag_list = self.rules.reads_tag_list
        uses_usage = bool(self.rules.usage_rules)
        organisation = self._organisation
        for index, record in enumerate(records):
            # An event record, the common case, is told by its `event_type` at once.
            plain_event = type(record) is dict and "event_type" in record
            usage = not plain_event and is_usage_record(record)
            if usage and not uses_usage:
                result.usage_ignored += 1
                continue
            try:
                read = read_usage if usage else normalize
                event = read(record, tag_list=tag_list)
                # Set here, never taken from the record: a pushed record naming another
                # organisation must not borrow its token.
                if organisation:
                    event.raw[ORGANISATION_KEY] = organisation
                elif ORGANISATION_KEY in event.raw:
                    del event.raw[ORGANISATION_KEY]
                events.append((event, None))
                result.usage_used += usage
            except Exception as error:  # a malformed record, or a reader's bug: the same here
                reason = malformed(record, error)
                if usage:
                    reason = f"usage record {reason}"
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
            if memory.has_follow_ups and not is_usage_event_id(event.id):
                self._cancel_follow_ups(event, batch, result)
            echo = None
            if event.type_id in self._echo_kinds:
                echo = self._echo_of(event, batch)
            if matched is None:
                matched = self._match(event, batch, result)
            if self._scoped:
                matched = [r for r in matched if r.organisation in (None, self._organisation)]
            if echo is not None:
                matched = self._without_echo_deaf(event, echo, matched, batch, result)
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
        if is_usage_event_id(event.id):
            return self.rules.match_usage(event)
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
        steps = None
        if self.audit:
            steps = _steps_of(event, rule, shadow, silenced)
            batch.audit.append(_audit(event, rule.id, None, "matched", shadow, steps))
        if rule.lookup and not self._looked_up(event, rule, batch, result, steps):
            return
        if rule.digest is not None and collect_for_digest(batch, event, rule):
            return  # a digest rule acts on its schedule, not per event
        if rule.absence is not None:
            self._seen(event, rule, rule.absence, batch, result)
            return  # an absence rule acts on a silence, not on the event
        reason = _FIRED
        if rule.threshold is not None or rule.throttle is not None or rule.usage is not None:
            outcome, reason = self._gate(event, rule, steps)
            if outcome != "fired":
                result.decisions.append(Decision(event.id, rule.id, outcome, reason))
                self._note(batch, event, rule.id, None, outcome, reason)
                return
            self._note(batch, event, rule.id, None, "fired", reason)
        self._fire(
            event, rule, shadow, reason, batch, result, silenced=silenced is not None, steps=steps
        )

    def _seen(
        self, event: Event, rule: Rule, absence: Absence, batch: Batch, result: BatchResult
    ) -> None:
        """An absence rule's key was seen: its time waits until time is complete up to it.
        Audited as `seen` (a decision that did nothing, which retention summarizes)."""
        key = key_of(event.raw, absence.per)
        if key is None:
            reason = f"{absence.per} is missing: the event does not count for any key"
            result.decisions.append(Decision(event.id, rule.id, "seen", reason))
            self._note(batch, event, rule.id, None, "seen", reason)
            return
        at = event.timestamp.timestamp()
        memory = self._memory
        mark = memory.absence_marks(rule.id).get(key)
        after = (
            absences.new_mark(rule.id, key, at, absences.identity(event.raw))
            if mark is None
            else absences.observe(mark, at, absences.identity(event.raw), absence)
        )
        if after is not None:
            memory.set_absence(rule.id, key, after)
        span = format_duration(absence.period)
        reason = f"{absence.per}={key} seen: fires after {span} without a matching event"
        result.decisions.append(Decision(event.id, rule.id, "seen", reason))
        self._note(batch, event, rule.id, None, "seen", reason)

    def _judge_absences(
        self,
        complete: float,
        events: Sequence[tuple[Event, Sequence[Rule] | None]],
        batch: Batch,
        result: BatchResult,
    ) -> None:
        """Bring every absence rule's keys up to `complete` and fire for each silence found,
        in the order of their event times. A rule that fails here fails alone."""
        memory = self._memory
        start = min((e.timestamp for e, _ in events), default=None)
        start_at = complete if start is None else min(start.timestamp(), complete)
        for rule in self.rules.absence_rules:
            absence = rule.absence
            assert absence is not None
            mark_before = len(memory.journal)
            point = _savepoint(memory, batch, result)
            try:
                found = self._silences(rule, absence, complete, start_at)
                found.sort(key=lambda silence: (silence.at, silence.key))
                for silence in found:
                    self._fire_absence(rule, absence, silence, batch, result)
            except StoreError:
                raise
            except Exception as error:
                if not is_rule_failure(error):
                    raise
                memory.undo(mark_before)
                _restore(point, memory, batch, result)
                result.failures.append(Failure(0, rule.id, "absence", _reason(error)))
                _log.error("absence rule failed", rule=rule.id, reason=_reason(error))

    def _silences(
        self, rule: Rule, absence: Absence, complete: float, start_at: float
    ) -> list[absences.Silence]:
        memory = self._memory
        listed = frozenset(absence.keys)
        known = memory.absence_marks(rule.id)
        for key in absence.keys:
            if key not in known:
                memory.set_absence(rule.id, key, absences.listed_mark(rule.id, key, start_at))
        marks = memory.absence_marks(rule.id)  # the listed keys just added among them
        period = absence.period.total_seconds()
        forget = absence.forget_after.total_seconds()
        found: list[absences.Silence] = []
        for key, mark in list(marks.items()):
            quiet = mark.fired or mark.last_seen + period > complete
            kept = key in listed or mark.last_seen + forget > complete
            if not mark.pending and quiet and kept:
                continue  # nothing to apply, nothing to fire, nothing to forget
            after, silences = absences.judge(mark, complete, absence, listed=key in listed)
            if after != mark:
                memory.set_absence(rule.id, key, after)
            found.extend(silences)
        return found

    def _fire_absence(
        self,
        rule: Rule,
        absence: Absence,
        silence: absences.Silence,
        batch: Batch,
        result: BatchResult,
    ) -> None:
        event = absences.firing_event(silence, absence)
        reason = silence.reason(absence)
        result.matches += 1
        result.matched_rules[rule.id] += 1
        self._note(batch, event, rule.id, None, "absent", reason)
        shadow = self._shadow_reason(rule)
        quieted = None
        if shadow is None and self._quiet is not None:  # a maintenance silence on its key
            quieted = shadow = self._quiet.reason(event, rule.id)
        context = absences.context_of(silence, absence)
        self._fire(
            event,
            rule,
            shadow,
            reason,
            batch,
            result,
            silence=context,
            silenced=quieted is not None,
        )

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

    def _looked_up(
        self,
        event: Event,
        rule: Rule,
        batch: Batch,
        result: BatchResult,
        steps: dict[str, Any] | None = None,
    ) -> bool:
        """Judge a rule with `lookup` on its facts: whether it goes on to act. A missing
        fact is `lookup unavailable`: the rule stops there (`on_lookup_error: skip`) or acts
        without judging its condition (`act`); both are recorded."""
        facts, missing = facts_for(self._lookups, endpoint_of(event), rule.lookup)
        if missing is not None:
            if rule.on_lookup_error == "act":
                self._note(batch, event, rule.id, None, "lookup_unavailable", f"{missing}; acting")
                return True
            result.decisions.append(Decision(event.id, rule.id, "lookup_unavailable", missing))
            self._note(batch, event, rule.id, None, "lookup_unavailable", missing)
            return False
        condition = rule.lookup_condition
        if condition is None:
            return True
        data = {**event.raw, "lookup": facts}
        if steps is not None:
            steps["condition"] = condition_values(condition.reads, data)
        value = condition.evaluate(data)
        if value is True or (value is not False and truthy(value)):
            return True
        reason = "condition was false on the looked-up facts"
        result.decisions.append(Decision(event.id, rule.id, "condition_false", reason))
        self._note(batch, event, rule.id, None, "condition_false", reason)
        return False

    def _shadow_reason(self, rule: Rule) -> str | None:
        """Why the rule only records what it would do, or None when it acts."""
        if self.dry_run:
            return "dry run: would have acted"
        if rule.mode == "shadow":
            return "rule in shadow mode: would have acted"
        override = self._memory.override(rule.id)
        return override.reason if override is not None else None

    def _gate(self, event: Event, rule: Rule, steps: dict[str, Any] | None) -> tuple[str, str]:
        """Threshold window, then throttle: whether the rule fires for this event, and why
        (with `steps`, the count and the throttle's mark are traced there too)."""
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
                if steps is not None:
                    steps["threshold"] = {"per": path, "key": None, "needed": threshold.count}
                return "below_threshold", f"{path} is missing: the event is not counted"
            verdict = count_event(memory.window(rule.id, key, within), at, within, threshold.count)
            memory.set_window(rule.id, key, verdict.entries, within)
            if steps is not None:
                steps["threshold"] = {
                    "count": verdict.count,
                    "needed": threshold.count,
                    "within": span,
                    "per": path,
                    "key": shown(key),
                }
            counted = f"{verdict.count} of {threshold.count} events for {path}={key} within {span}"
            if not verdict.fired:
                return "below_threshold", counted
            reason = counted
        if rule.usage is not None:
            fired, reason = self._sum_usage(event, rule, rule.usage, at)
            if steps is not None:
                steps["usage"] = reason
            if not fired:
                return "below_threshold", reason
        throttle = rule.throttle
        if throttle is not None:
            path = throttle.per or DEFAULT_PER
            # Events without the field share one mark: a flood of them stays throttled.
            key = key_of(event.raw, path) or ""
            until = memory.throttle(rule.id, key)
            if until is not None and at < until:
                if steps is not None:
                    steps["throttle"] = _throttle_step(path, key, until, throttled=True)
                named = key or "(missing)"
                return "throttled", f"throttled for {path}={named} until {format_moment(until)}"
            until = at + throttle.period.total_seconds()
            memory.set_throttle(rule.id, key, until)
            if steps is not None:
                steps["throttle"] = _throttle_step(path, key, until, throttled=False)
        return "fired", reason

    def _sum_usage(
        self, event: Event, rule: Rule, usage: UsageLimit, at: float
    ) -> tuple[bool, str]:
        """Add a usage record to its key's window: whether the sum crossed the limit, and
        the sum as the audit log says it (`usage 212 MB in 24h > 200 MB for ...`)."""
        key = key_of(event.raw, usage.per)
        if key is None:
            return False, f"{usage.per} is missing: the usage record is not counted"
        within = usage.within.total_seconds()
        memory = self._memory
        entries = memory.window(rule.id, key, within, stride=2)
        amount = event.raw["usage"]["amount"]
        verdict = sum_usage(entries, at, amount, within, usage.crossed)
        memory.set_window(rule.id, key, verdict.entries, within, stride=2)
        span = format_duration(usage.within, days=False)
        total = f"usage {usage.shown(verdict.total)} in {span}"
        limit = f"{usage.comparison} {usage.shown(usage.above)} for {usage.per}={key}"
        if verdict.fired:
            return True, f"{total} {limit}"
        return False, f"{total}, not {limit}"

    def _fire(
        self,
        event: Event,
        rule: Rule,
        shadow: str | None,
        reason: str,
        batch: Batch,
        result: BatchResult,
        silence: dict[str, Any] | None = None,
        *,
        silenced: bool = False,
        steps: dict[str, Any] | None = None,
    ) -> None:
        """Plan the rule's actions for `event`; with `shadow` (a reason) they are recorded,
        not run: the rule is in shadow mode, or, when `silenced`, a silence covers the match.
        `silence`: for the silence an absence rule fired on (`event` then stands for the
        key's last matching event). `steps`: the trace of the rule's matched row, where the
        guard's counts go."""
        quiet = "silenced" if silenced else "shadow"
        outcome = "fired" if shadow is None else quiet
        decided = reason if shadow is None else shadow
        context = {"event": event.raw, "rule": self._context_of(rule)}
        if rule.lookup:
            context["lookup"] = facts_for(self._lookups, endpoint_of(event), rule.lookup)[0]
        if silence is not None:
            context["absence"] = silence
        guarded = rule.max_actions is not None or self.max_actions is not None
        for step in rule.actions:
            planned = self._plan(event, rule, step, context, batch, result)
            if planned is None:
                continue
            action, due = planned
            status = IntentStatus.PENDING if shadow is None else IntentStatus.SHADOW
            held = guard_held = None
            if shadow is None and guarded and step.action.destructive:
                held = guard_held = self._guard(event, rule, steps)
            if held is None and shadow is None and step.action.causes:
                held = self._break_loop(event, rule, action, due, batch)
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
                silence=silence,
                silenced=shadow if silenced else None,
            )
            if guard_held is not None:
                shadow = self._trip(event, rule, guard_held, batch, result)
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

    def _guard(self, event: Event, rule: Rule, steps: dict[str, Any] | None) -> str | None:
        """Count a destructive action against the rule's and the global guard; the reason
        it is held when either would be exceeded (with `steps`, each count is traced)."""
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
            span = format_duration(limit.within)
            if steps is not None:
                counted = {"count": verdict.count, "max": limit.count, "within": span}
                guard = steps.setdefault("guard", {})
                guard["global" if label else "rule"] = {**counted, "held": not verdict.allowed}
            if not verdict.allowed:
                return (
                    f"blast-radius guard{label}: {verdict.count} destructive actions within "
                    f"{span} > {limit.count}"
                )
            allowed.append((scope, verdict.entries))
        for scope, entries in allowed:
            self._memory.set_guard(scope, entries)
        return None

    def _echo_of(self, event: Event, batch: Batch) -> OwnStatusAction | None:
        """The engine's own status change this event echoes, if any; marks the event
        `caused_by` and records it in the audit log."""
        at = event.timestamp.timestamp()
        within = self.echoes.within.total_seconds()
        targets = echo_targets(event, self._echo_kinds[event.type_id])  # type: ignore[index]
        found: list[OwnStatusAction] = []
        for target, kinds in targets.items():
            found.extend(self.store.status_actions(target, kinds, at - within, at + within))
            if self._planned_is_done:
                found.extend(self._planned_on(target, kinds, batch))
        echo = nearest(found, at, within)
        if echo is None:
            return None
        intent = echo.intent_id if echo.intent_id is not None else echo.idempotency_key
        event.raw["caused_by"] = {"rule": echo.rule_id, "intent": intent}
        self._note(batch, event, echo.rule_id, echo.kind, "echo", f"echo of {describe(echo)}")
        return echo

    def _without_echo_deaf(
        self,
        event: Event,
        echo: OwnStatusAction,
        matched: Sequence[Rule],
        batch: Batch,
        result: BatchResult,
    ) -> Sequence[Rule]:
        """The matched rules that judge the engine's own echoes; the others are recorded
        as not acting on this one."""
        if all(rule.on_own_actions for rule in matched):
            return matched
        reason = f"echo of {describe(echo)}: the rule does not act on the engine's own actions"
        for rule in matched:
            if not rule.on_own_actions:
                result.decisions.append(Decision(event.id, rule.id, "own_echo", reason))
                self._note(batch, event, rule.id, None, "own echo", reason)
        return [rule for rule in matched if rule.on_own_actions]

    def _planned_on(self, target: str, kinds: Sequence[str], batch: Batch) -> list[OwnStatusAction]:
        """Status actions this pipeline planned on `target`, counted as done when planned
        (`planned_is_done`): of committed batches, and of this one so far."""
        found = [a for a in self._planned_status.get(target, ()) if a.kind in kinds]
        found.extend(a for a in self._still_planned(target, batch) if a.kind in kinds)
        return found

    def _still_planned(self, target: str, batch: Batch) -> Iterator[OwnStatusAction]:
        """The current batch's status actions on `target` that were not taken back."""
        intents = batch.intents
        for place, action in self._planned_now.get(target, ()):
            if place < len(intents) and intents[place].idempotency_key == action.idempotency_key:
                yield action

    def _keep_planned_status(self, batch: Batch) -> None:
        """Remember the status actions a committed batch planned (`planned_is_done`), and
        forget those too old to be echoed by any later event."""
        newest = 0.0
        for target in self._planned_now:
            for action in self._still_planned(target, batch):
                self._planned_status.setdefault(target, []).append(action)
                newest = max(newest, action.at)
        before = newest - 2 * self.echoes.within.total_seconds()
        for target in list(self._planned_status):
            kept = [a for a in self._planned_status[target] if a.at >= before]
            if kept:
                self._planned_status[target] = kept
            else:
                del self._planned_status[target]
        self._planned_now.clear()

    def _break_loop(
        self,
        event: Event,
        rule: Rule,
        action: PlannedAction,
        due: datetime | None,
        batch: Batch,
    ) -> str | None:
        """Count a status change against its target's window across all rules; the reason
        it is held when the target is held already, or when it is one change too many
        (the target is then held from here: `target_flapping`)."""
        breaker = self.loop_breaker
        target = status_target(action.kind, action.target)
        if breaker is None or target is None:
            return None
        at = (due or event.timestamp).timestamp()
        resume = f"resume with `event-engine rules resume {target}`"
        hold = self._memory.override(target)
        if hold is not None and hold.mode == HOLD:
            until = hold.since + breaker.hold_for
            if at < until.timestamp():
                return (
                    f"target flapping: {target} held since {format_moment(hold.since)} until "
                    f"{format_moment(until)}; {resume}"
                )
        within = breaker.within.total_seconds()
        entries = self._memory.guard(target)
        verdict = count_destructive(entries, at, within, breaker.max_changes)
        if verdict.allowed:
            kept = verdict.entries
            if due is not None:
                # A follow-up counts at its due time, ahead of the events still to come: the
                # changes those will count (from this event's time on) stay in the window.
                since = event.timestamp.timestamp() - within
                kept = [moment for moment in entries if since <= moment < at - within] + kept
            self._memory.set_guard(target, kept)
            return None
        span = format_duration(breaker.within)
        counted = (
            f"{verdict.count} status changes on {target} within {span} > {breaker.max_changes}"
        )
        reason = f"target flapping: {counted}; held for {format_duration(breaker.hold_for)}"
        self._memory.set_override(
            RuleOverride(target, HOLD, f"{reason} or until resumed", event.timestamp, event.id)
        )
        self._note(batch, event, rule.id, None, "target flapping", f"{counted}; {resume}")
        kind, _, target_id = target.partition(":")
        batch.engine_events.append(
            EngineEventDraft(
                "target_flapping",
                {
                    "target": target,
                    "rule": rule.id,
                    "event_id": event.id,
                    "reason": counted,
                    "held_until": format_moment(event.timestamp + breaker.hold_for),
                    "resume": f"event-engine rules resume {target}",
                },
                sim={"id": int(target_id), "iccid": event.iccid} if kind == "sim" else None,
                endpoint={"id": event.endpoint_id} if event.endpoint_id else None,
                at=event.timestamp,
            )
        )
        _log.error(
            "loop breaker: status actions on the target held",
            target=target,
            rule=rule.id,
            event_id=event.id,
            reason=counted,
        )
        return f"{reason}; {resume}"

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
        silence: dict[str, Any] | None = None,
        silenced: str | None = None,
    ) -> None:
        if on_guard_trip:
            key = guard_trip_key(event.id, rule.id, step.index)
        elif silence is not None:
            key = absences.firing_key(rule.id, silence["key"], silence["at"], step.index)
        else:
            key = idempotency_key(event.id, rule.id, step.index)
        if self._organisation:  # two organisations may reuse an event id
            key = f"{self._organisation}:{key}"
        if self._planned_is_done and status is IntentStatus.PENDING:
            target = status_target(planned.kind, planned.target)
            if target is not None:
                at = (due or event.timestamp).timestamp()
                action = OwnStatusAction(target, planned.kind, rule.id, key, at)
                self._planned_now.setdefault(target, []).append((len(batch.intents), action))
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
                absence=silence,
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
    if rule.usage is not None:
        return rule.usage.per
    if rule.throttle is not None and rule.throttle.per:
        return rule.throttle.per
    return DEFAULT_PER


def _steps_of(event: Event, rule: Rule, shadow: str | None, silenced: str | None) -> dict[str, Any]:
    """The trace of a rule's match as far as `_judge` knows it: the event's `when` values,
    the values its condition read, and what keeps it from acting (a silence, shadow mode).
    `_gate`, `_guard` and `_looked_up` add their own steps as they go."""
    steps: dict[str, Any] = {"when": when_values(rule.when, event)}
    if rule.condition is not None:
        steps["condition"] = condition_values(rule.condition.reads, event.raw)
    if silenced is not None:
        steps["silence"] = silenced
    elif shadow is not None:
        steps["shadow"] = shadow
    return steps


def _throttle_step(path: str, key: str, until: float, *, throttled: bool) -> dict[str, Any]:
    moment = format_moment(until)
    return {"per": path, "key": shown(key) or None, "until": moment, "throttled": throttled}


def _audit(
    event: Event,
    rule_id: str | None,
    action: str | None,
    outcome: str,
    detail: str | None,
    steps: dict[str, Any] | None = None,
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
        steps=steps,
        organisation=event.organisation,
    )


def _has_scoped_rules(rules: RuleSet) -> bool:
    return any(rule.organisation is not None for rule in rules.rules)


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
