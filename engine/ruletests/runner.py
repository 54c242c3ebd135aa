"""Running rule tests: each test feeds its events, one at a time and in the order written,
through the same pipeline as `run` and `replay` (an in-memory store, the events' own
timestamps as the clock), optionally runs the digests at `digest_at`, and compares what
the rules planned with what the test expects.

A failed expectation says why: for an action that did not come, per event which part of
the rule did not hold (`when`, `condition`, `threshold`, `throttle`, the guard, a template
that failed), or how the closest planned action differs; for an action that came but
should not have, which event caused it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from engine import secrets
from engine.digest import digest_key
from engine.digest_schedule import run_if_due
from engine.errors import ConfigError, EventFormatError, RuleSetError
from engine.events import ORGANISATION_KEY, Event, normalize
from engine.lookups import LookupTable
from engine.model import IntentStatus
from engine.pipeline import BatchResult, Decision, Pipeline
from engine.rules import Rule, RuleSet, load_rules
from engine.ruletests.spec import Expectation, RuleTestCase, RuleTestFile, TestEvent
from engine.silencing import Quiet
from engine.state import format_duration
from engine.store import SqliteStore
from engine.usage import is_usage_event_id, is_usage_record, read_usage, record_id_of

# How the pipeline's decision outcomes read in an explanation: the part of the rule that
# decided.
_DECISION_PARTS = {
    "below_threshold": "`threshold` not reached",
    "throttled": "`throttle` held it back",
    "held": "held",  # the reason names the blast-radius guard or the loop breaker
    "shadow": "shadow mode: recorded, not acted on",
    "own_echo": "not judged (add `on_own_actions: true` to judge it)",
    "seen": "a sighting for `absence`, which fires on a silence judged up to the test's"
    " `until` (default: its newest event)",
    "silenced": "a silence covered it: recorded, not acted on",
    "lookup_unavailable": "`lookup` unavailable (see `on_lookup_error`)",
    "condition_false": "`condition` false on the looked-up facts",
}
_MAX_LISTED = 8  # events listed per failed expectation; the rest are counted


@dataclass(frozen=True, slots=True)
class Outcome:
    """One action the rules planned during a test."""

    rule: str
    action: str
    event_id: int | None  # None for a digest run
    event_time: datetime | None
    target: dict[str, Any]
    params: dict[str, Any]
    due: datetime | None
    status: str
    key: str

    def describe(self) -> str:
        if self.event_id is not None:
            source = f"event {self.event_id}"
        elif self.key.startswith("absence-") and self.event_time is not None:
            source = f"the silence that reached its span at {_iso(self.event_time)}"
        else:
            source = "the digest run"
        text = f"`{self.action}` from `{self.rule}` for {source}"
        if self.due is not None:
            text += f", due {_iso(self.due)}"
        if self.status not in (IntentStatus.PENDING.value, IntentStatus.DONE.value):
            text += f" [{self.status}]"
        return text

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "rule": self.rule,
            "action": self.action,
            "target": self.target,
            "params": self.params,
            "status": self.status,
        }
        if self.due is not None:
            out["due"] = _iso(self.due)
        return out


@dataclass(frozen=True, slots=True)
class Failure:
    """One expectation that did not hold, with the reasons found."""

    message: str
    where: str | None = None
    details: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"message": self.message, "where": self.where, "details": list(self.details)}


@dataclass(slots=True)
class CaseResult:
    name: str
    where: str
    outcomes: list[Outcome] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(slots=True)
class FileResult:
    path: Path
    cases: list[CaseResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the file or its rules could not be used
    rule_ids: tuple[str, ...] = ()
    tested_rule_ids: set[str] = field(default_factory=set)  # named by a passing `expect`

    @property
    def passed(self) -> bool:
        return not self.errors and all(case.passed for case in self.cases)


@dataclass(slots=True)
class _Fed:
    """What became of one test event in the pipeline."""

    given: TestEvent
    event: Event | None = None
    rejected: str | None = None
    duplicate: bool = False
    decisions: list[Decision] = field(default_factory=list)


def run_test_file(spec: RuleTestFile, load: Callable[[Path], RuleSet] = load_rules) -> FileResult:
    """Run every test of a parsed rule test file."""
    result = FileResult(spec.path)
    try:
        rules = load(spec.rules)
    except RuleSetError as error:
        result.errors = [f"the rules under test do not load: {e}" for e in error.errors]
        return result
    except ConfigError as error:
        result.errors = [str(error)]
        return result
    if spec.only is not None:
        unknown = [rule_id for rule_id in spec.only if rules.get(rule_id) is None]
        if unknown:
            known = [r.id for r in rules]
            result.errors = [
                f"{spec.only_where}: `only` names no rule `{rule_id}` in {spec.rules}"
                + _did_you_mean(rule_id, known)
                for rule_id in unknown
            ]
            return result
        rules = RuleSet([r for r in rules if r.id in spec.only])
    result.rule_ids = tuple(r.id for r in rules)
    for case in spec.cases:
        outcome = run_case(case, rules, spec.env, rules_path=spec.rules, lookups=spec.lookups)
        result.cases.append(outcome)
        if outcome.passed:
            result.tested_rule_ids.update(e.rule for e in case.expect if e.rule)
    return result


def run_case(
    case: RuleTestCase,
    rules: RuleSet,
    env: Mapping[str, str],
    *,
    rules_path: Path,
    lookups: LookupTable | None = None,
) -> CaseResult:
    """Run one test on a fresh in-memory store."""
    result = CaseResult(case.name, str(case.where))
    store = SqliteStore(":memory:")
    try:
        fed = _feed(case, rules, store, env, result.outcomes, lookups)
        if case.digest_at is not None:
            _run_digests(case, rules, store, fed, env, result.outcomes)
        _apply_statuses(store, result.outcomes)
        _Judge(case, rules, fed, result, store, rules_path).judge()
    except Exception as error:  # one test's events must not end the whole run
        reason = f"{type(error).__name__}: {error}"[:300]
        result.failures.append(Failure(f"the engine failed on this test's events: {reason}"))
    finally:
        store.close()
    return result


def _organisation_of(record: object) -> str:
    """The organisation a test event is of: its `org` (`organisations:`), else none."""
    value = record.get(ORGANISATION_KEY) if isinstance(record, dict) else None
    return value if isinstance(value, str) else ""


def _feed(
    case: RuleTestCase,
    rules: RuleSet,
    store: SqliteStore,
    env: Mapping[str, str],
    outcomes: list[Outcome],
    lookups: LookupTable | None = None,
) -> list[_Fed]:
    # Nothing runs a test's actions: a status action counts as done when planned, so the
    # events it causes (given later in the test) are recognized as its echoes. Silences hold
    # by the events' own time: the test's virtual clock.
    silences = case.silences
    quiet = (lambda _now: Quiet(silences, None)) if silences else None
    pipeline = Pipeline(rules, store, planned_is_done=True, quiet=quiet)
    fed: list[_Fed] = []
    for given in case.events:
        item = _Fed(given)
        try:
            read = read_usage if is_usage_record(given.record) else normalize
            item.event = read(given.record)
        except EventFormatError as error:
            item.rejected = str(error)
        # One event per batch: what each event caused is then plain to see, and the
        # pipeline's state moves on exactly as it does between polls.
        # The input is complete up to its newest event: absence rules judge silences as
        # the virtual clock moves.
        batch = pipeline.process(
            [given.record],
            source="test",
            in_given_order=True,
            complete_to_newest=True,
            lookups=lookups,
            organisation=_organisation_of(given.record),
        )
        item.duplicate = batch.duplicates > 0
        item.decisions = list(batch.decisions)
        _add_outcomes(batch, env, outcomes)
        fed.append(item)
    # The virtual clock advances to the end of the input (or the test's `until`).
    newest = max((item.event.timestamp for item in fed if item.event is not None), default=None)
    end = case.until or newest
    if end is not None and rules.has_absence:
        _add_outcomes(pipeline.judge_absences(end), env, outcomes)
    return fed


def _add_outcomes(batch: BatchResult, env: Mapping[str, str], outcomes: list[Outcome]) -> None:
    for planned in batch.planned:
        outcomes.append(
            Outcome(
                rule=planned.rule.id,
                action=planned.action.kind,
                event_id=given_id(planned.event) if planned.absence is None else None,
                event_time=planned.event.timestamp,
                target=dict(planned.action.target),
                params=_with_secrets(planned.action.params, env),
                due=planned.due,
                status="silenced" if planned.silenced else IntentStatus.PENDING.value,
                key=planned.key,
            )
        )


def _run_digests(
    case: RuleTestCase,
    rules: RuleSet,
    store: SqliteStore,
    fed: list[_Fed],
    env: Mapping[str, str],
    outcomes: list[Outcome],
) -> None:
    assert case.digest_at is not None
    # The digests start counting at the test's start (or its first event, if earlier).
    since = min([case.start, *(item.event.timestamp for item in fed if item.event is not None)])
    for rule in rules:
        if rule.digest is None or not rule.enabled:
            continue
        store.start_digest(rule.id, since)
        for run in run_if_due(store, rule, case.digest_at):
            for action in run.planned:
                outcomes.append(
                    Outcome(
                        rule=rule.id,
                        action=action.kind,
                        event_id=None,
                        event_time=run.fire_time,
                        target={},
                        params=_with_secrets(action.params, env),
                        due=None,
                        status=IntentStatus.PENDING.value,
                        key=digest_key(rule.id, run.fire_time, action.action_index),
                    )
                )


def _apply_statuses(store: SqliteStore, outcomes: list[Outcome]) -> None:
    """Each outcome's status as the outbox ends the test with it (shadow, held, cancelled)."""
    statuses = {i.idempotency_key: i.status.value for i in store.intents(limit=1_000_000)}
    for index, outcome in enumerate(outcomes):
        status = statuses.get(outcome.key)
        if outcome.status == "silenced":
            continue  # kept as a shadow intent: "silenced" says why
        if status is not None and status != outcome.status:
            outcomes[index] = replace(outcome, status=status)


class _Judge:
    """Compares one test's outcomes with its expectations and explains each miss."""

    def __init__(
        self,
        case: RuleTestCase,
        rules: RuleSet,
        fed: list[_Fed],
        result: CaseResult,
        store: SqliteStore,
        rules_path: Path,
    ):
        self.case = case
        self.rules = rules
        self.fed = fed
        self.result = result
        self.store = store
        self.rules_path = rules_path
        # Outcomes already shown as the near miss of an expectation: reported once, there.
        self._shown: set[int] = set()

    def judge(self) -> None:
        outcomes = self.result.outcomes
        consumed = self._match_expected(outcomes)
        case = self.case
        if case.expect_none and outcomes:
            self.result.failures.append(
                Failure(
                    f"expected no actions, but the rules planned {len(outcomes)}",
                    str(case.where),
                    tuple(self._caused(o) for o in outcomes),
                )
            )
        elif case.strict and case.expect:
            for index, outcome in enumerate(outcomes):
                if index not in consumed and index not in self._shown:
                    shown = [f"params: {_short_json(outcome.params)}"] if outcome.params else []
                    self.result.failures.append(
                        Failure(
                            f"unexpected action: {outcome.describe()}",
                            str(case.where),
                            (
                                *shown,
                                "list it under `expect`, or set `strict: false` to allow "
                                "actions the test does not name",
                            ),
                        )
                    )
        for expectation in case.expect_absent:
            hits = [o for o in outcomes if not _differences(expectation, o, self.case.start)]
            if hits:
                self.result.failures.append(
                    Failure(
                        f"expected no {expectation.describe()}, but the rules planned it",
                        str(expectation.where),
                        tuple(self._caused(o) for o in hits),
                    )
                )

    def _match_expected(self, outcomes: list[Outcome]) -> set[int]:
        consumed: set[int] = set()
        expectations = list(self.case.expect)
        if not self.case.ordered:
            # Most specific first, so a loose expectation does not take the action a
            # precise one needs.
            expectations.sort(key=lambda e: -_specificity(e))
        position = 0
        for expectation in expectations:
            start = position if self.case.ordered else 0
            found = next(
                (
                    index
                    for index in range(start, len(outcomes))
                    if index not in consumed
                    and not _differences(expectation, outcomes[index], self.case.start)
                ),
                None,
            )
            if found is None:
                self.result.failures.append(self._missing(expectation, outcomes, consumed))
                continue
            consumed.add(found)
            position = found + 1
        return consumed

    # -- explaining ----------------------------------------------------------------------

    def _missing(
        self, expectation: Expectation, outcomes: list[Outcome], consumed: set[int]
    ) -> Failure:
        message = f"expected {expectation.describe()}, but it was not planned"
        where = str(expectation.where)
        rule = self.rules.get(expectation.rule) if expectation.rule else None
        if expectation.rule and rule is None:
            known = [r.id for r in self.rules]
            return Failure(
                message,
                where,
                (
                    f"there is no rule `{expectation.rule}` among the rules under test "
                    f"({self.rules_path})" + _did_you_mean(expectation.rule, known),
                ),
            )
        details: list[str] = []
        near = [
            (index, outcome)
            for index, outcome in enumerate(outcomes)
            if (expectation.rule is None or outcome.rule == expectation.rule)
            and (expectation.action is None or outcome.action == expectation.action)
        ]
        for index, outcome in near[:3]:
            differences = _differences(expectation, outcome, self.case.start)
            if not differences and index in consumed:
                details.append(f"{outcome.describe()} came, but another expectation took it")
            elif differences:
                details.append(f"{outcome.describe()} came, but {'; '.join(differences)}")
                self._shown.add(index)
        if len(near) > 3:
            details.append(f"... and {len(near) - 3} more such actions")
        details.extend(self._why_not(expectation, rule, outcomes))
        return Failure(message, where, tuple(details))

    def _why_not(
        self, expectation: Expectation, rule: Rule | None, outcomes: list[Outcome]
    ) -> list[str]:
        """Per event, why the rule did not plan the action (events that did plan it are
        covered by the near misses above)."""
        candidates = [rule] if rule is not None else self._rules_with(expectation.action)
        if not candidates:
            return [f"no rule under test has a `{expectation.action}` action"]
        details: list[str] = []
        for candidate in candidates:
            if expectation.action and expectation.action not in _kinds(candidate):
                have = ", ".join(f"`{k}`" for k in _kinds(candidate))
                details.append(
                    f"rule `{candidate.id}` has no `{expectation.action}` action (it has {have})"
                )
                continue
            reasons: dict[str, list[str]] = {}
            fed = [
                f
                for f in self.fed
                if expectation.event is None
                or (f.event is not None and given_id(f.event) == expectation.event)
            ]
            if not fed:
                which = f"event {expectation.event}" if expectation.event is not None else "events"
                details.append(f"the test has no {which}")
            acted = {
                o.event_id
                for o in outcomes
                if o.rule == candidate.id
                and (expectation.action is None or o.action == expectation.action)
            }
            for item in fed:
                if not item.duplicate and item.event is not None and given_id(item.event) in acted:
                    continue
                reason = self._reason(item, candidate, expectation)
                reasons.setdefault(reason, []).append(_label(item))
            prefix = f"rule `{candidate.id}`: " if len(candidates) > 1 else ""
            for reason, labels in list(reasons.items())[:_MAX_LISTED]:
                details.append(f"{prefix}{_joined(labels)}: {reason}")
            if len(reasons) > _MAX_LISTED:
                details.append(f"... and {len(reasons) - _MAX_LISTED} more reasons")
        return details

    def _reason(self, item: _Fed, rule: Rule, expectation: Expectation) -> str:
        """Why `rule` did not plan the expected action for this event."""
        if item.rejected is not None:
            return f"rejected as malformed ({item.rejected})"
        event = item.event
        assert event is not None
        if item.duplicate:
            return "dropped: its id repeats an earlier event's"
        if not rule.enabled:
            return "the rule is disabled (`enabled: false`)"
        mismatch = rule.when.mismatch(event)
        if mismatch is not None:
            return f"`when` does not hold: {mismatch}"
        explained = self.rules.explain(event, rule)
        if explained is not None:
            if explained == "condition was false":
                return f"`condition` is false: {_short_json(rule.condition_source)}"
            return f"`condition`: {explained}"
        decisions = [d for d in item.decisions if d.rule_id == rule.id]
        for decision in decisions:
            part = _DECISION_PARTS.get(decision.outcome)
            if decision.outcome == "below_threshold" and rule.usage is not None:
                part = "`usage` limit not crossed"
            if part is not None:
                return f"{part}: {decision.reason}"
        if rule.digest is not None:
            if self.case.digest_at is None:
                return (
                    "collected for the rule's digest, which acts at its schedule "
                    "(add `digest_at:` to run it)"
                )
            return f"collected for the digest; no fire time of `{rule.schedule}` came by digest_at"
        failed = [
            row
            for row in self.store.audit_rows(event_id=event.id)
            if row["rule_id"] == rule.id
            and row["outcome"] == "failed"
            and (expectation.action is None or row["action"] == expectation.action)
        ]
        if failed:
            return f"`{failed[0]['action']}` could not be planned: {failed[0]['detail']}"
        return "the rule matched, but planned no such action"

    def _rules_with(self, kind: str | None) -> list[Rule]:
        if kind is None:
            return list(self.rules)
        return [r for r in self.rules if kind in _kinds(r)]

    def _caused(self, outcome: Outcome) -> str:
        return f"{outcome.describe()}: params {_short_json(outcome.params)}"


# -- comparing -------------------------------------------------------------------------------


def _differences(expectation: Expectation, outcome: Outcome, start: datetime) -> list[str]:
    """How `outcome` falls short of `expectation`; empty when it matches."""
    found: list[str] = []
    if expectation.rule is not None and outcome.rule != expectation.rule:
        found.append(f"rule is `{outcome.rule}`, not `{expectation.rule}`")
    if expectation.action is not None and outcome.action != expectation.action:
        found.append(f"action is `{outcome.action}`, not `{expectation.action}`")
    if expectation.event is not None and outcome.event_id != expectation.event:
        found.append(f"event is {outcome.event_id}, not {expectation.event}")
    if expectation.target is not None:
        found.extend(_subset("target", expectation.target, outcome.target))
    if expectation.params is not None:
        found.extend(_subset("params", expectation.params, outcome.params))
    if expectation.due is not None:
        found.extend(_due(expectation.due, outcome))
    if expectation.status is not None and outcome.status != expectation.status:
        found.append(f"status is {outcome.status}, not {expectation.status}")
    if expectation.at is not None:
        found.extend(_at(expectation.at, outcome, start))
    return found


def _at(expected: datetime | timedelta, outcome: Outcome, start: datetime) -> list[str]:
    moment = start + expected if isinstance(expected, timedelta) else expected
    if outcome.event_time is None or outcome.event_time != moment:
        shown = _iso(outcome.event_time) if outcome.event_time else "no time"
        return [f"at {shown}, not {_iso(moment)}"]
    return []


def _due(expected: datetime | timedelta, outcome: Outcome) -> list[str]:
    if outcome.due is None:
        return ["it runs at once, not as a follow-up"]
    if isinstance(expected, timedelta):
        if outcome.event_time is None:
            return [f"due {_iso(outcome.due)}, not {_span(expected)} after an event"]
        if outcome.due - outcome.event_time != expected:
            after = outcome.due - outcome.event_time
            return [f"due {_span(after)} after the event, not {_span(expected)}"]
        return []
    if outcome.due != expected:
        return [f"due {_iso(outcome.due)}, not {_iso(expected)}"]
    return []


def _subset(path: str, expected: object, actual: object) -> list[str]:
    """Where `actual` differs from `expected`, reading mappings in `expected` as subsets."""
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            return [f"{path}: expected a mapping, got {_shown(actual)}"]
        found: list[str] = []
        for key, value in expected.items():
            if key not in actual:
                found.append(f"{path}.{key}: missing (expected {_shown(value)})")
            else:
                found.extend(_subset(f"{path}.{key}", value, actual[key]))
        return found
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: expected {_shown(expected)}, got {_shown(actual)}"]
        found = []
        for index, (want, have) in enumerate(zip(expected, actual, strict=True)):
            found.extend(_subset(f"{path}[{index}]", want, have))
        return found
    if expected == actual and type(expected) is type(actual):
        return []
    if expected == actual or str(expected) == str(actual):
        # Templates render text: `1` and `"1"` differ, and that is worth saying plainly.
        return [f"{path}: expected {_shown(expected)}, got {_shown(actual)} (a different type)"]
    return [f"{path}: expected {_shown(expected)}, got {_shown(actual)}"]


def _specificity(expectation: Expectation) -> int:
    return sum(
        value is not None
        for value in (
            expectation.rule,
            expectation.action,
            expectation.event,
            expectation.target,
            expectation.params,
            expectation.due,
            expectation.status,
        )
    )


# -- small helpers ---------------------------------------------------------------------------


_MAX_EXPANDED = 1 << 20


def _with_secrets(value: Any, env: Mapping[str, str]) -> Any:
    """`${NAME}` references filled in from the test's `env` (the others stay as written,
    and so does a text the values would grow past `_MAX_EXPANDED` characters: a short
    reference repeated in a long text, with a long value, would multiply)."""
    if isinstance(value, str):
        for name in dict.fromkeys(secrets.references(value)):
            if name in env:
                reference = f"${{{name}}}"
                grown = value.count(reference) * (len(env[name]) - len(reference))
                if len(value) + grown <= _MAX_EXPANDED:
                    value = value.replace(reference, env[name])
        return value
    if isinstance(value, Mapping):
        return {k: _with_secrets(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_secrets(v, env) for v in value]
    return value


def _kinds(rule: Rule) -> list[str]:
    return list(dict.fromkeys(step.kind for step in (*rule.actions, *rule.on_guard_trip)))


def given_id(event: Event) -> int:
    """The id the test gave the event or usage record (a usage record is judged under an
    id of its own, `engine.usage.usage_event_id`)."""
    return record_id_of(event.id) if is_usage_event_id(event.id) else event.id


def _label(item: _Fed) -> str:
    if item.event is not None and is_usage_event_id(item.event.id):
        return f"usage record {given_id(item.event)}"
    if item.event is not None:
        return f"event {item.event.id}"
    return f"the event at {item.given.where}"


def _joined(labels: Sequence[str]) -> str:
    if len(labels) <= _MAX_LISTED:
        return ", ".join(labels)
    return ", ".join(labels[:_MAX_LISTED]) + f" and {len(labels) - _MAX_LISTED} more"


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _shown(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    return _short_json(value)


def _short_json(value: object, limit: int = 160) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _span(span: timedelta) -> str:
    """A duration as a rule file writes a follow-up's `after`: `24h`, `90m`, `1h30m`."""
    if span < timedelta(0):
        return "-" + format_duration(-span, days=False)
    return format_duration(span, days=False)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
