"""A loaded set of rules, and the question it answers: which rules does this event match?

Matching is a pure function of (event, rules), apart from one warning per rule whose
condition fails to evaluate: such a failure counts as "no match", and is logged the first
time only so a broken rule cannot flood the log at event rate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import structlog

from engine.errors import ConfigError
from engine.events import Event
from engine.rules.condition import (
    Condition,
    ConditionError,
    EventData,
    is_rule_failure,
    truthy,
)
from engine.rules.fastpath import Undecided
from engine.rules.index import RuleIndex
from engine.rules.model import Rule
from engine.usage import is_usage_event_id

_log = structlog.get_logger(__name__)

# A shared handle pays from two conditions on (`EventData`); after `when` has ruled out
# the rest, a single one is common.
_SHARED_HANDLE_FROM = 2
_UNSET = object()


class RuleSet:
    """Rules in file order, indexed for matching. Build with `load_rules`."""

    __slots__ = (
        "_by_id",
        "_failing",
        "_fingerprint",
        "_index",
        "absence_rules",
        "has_absence",
        "reads_tag_list",
        "rules",
        "usage_rules",
        "warnings",
    )

    def __init__(self, rules: Sequence[Rule], *, warnings: Sequence[ConfigError] = ()):
        """`warnings`: what the loader found that loads but is likely not what was meant
        (`validate` prints them, `run` logs them)."""
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.warnings: tuple[ConfigError, ...] = tuple(warnings)
        self._by_id = {rule.id: rule for rule in self.rules}
        if len(self._by_id) != len(self.rules):
            raise ValueError("rule ids must be unique within a rule set")
        # Rules fed by usage records (`usage:`) never meet an event: kept out of the index.
        self._index = RuleIndex([rule for rule in self.rules if rule.usage is None])
        self.usage_rules = tuple(
            rule for rule in self.rules if rule.usage is not None and rule.enabled
        )
        self._failing: set[str] = set()
        # Whether any rule may read `endpoint.tag_list` (in a condition, a template, a
        # `per:`): events are normalized without it otherwise (`normalize(tag_list=...)`).
        self.reads_tag_list = any(
            rule.definition is None or "tag_list" in repr(rule.definition) for rule in self.rules
        )
        self._fingerprint: str | None = None
        # Rules that fire on a silence rather than an event, judged as complete time moves.
        self.absence_rules = tuple(
            rule for rule in self.rules if rule.absence is not None and rule.enabled
        )
        self.has_absence = bool(self.absence_rules)

    @property
    def fingerprint(self) -> str:
        """A short hash of the rules as written: instances of a cluster running different
        rule sets show different ones in `event-engine status`."""
        if self._fingerprint is None:
            text = repr(sorted((rule.id, repr(rule.definition)) for rule in self.rules))
            self._fingerprint = hashlib.sha256(text.encode()).hexdigest()[:12]
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def get(self, rule_id: str) -> Rule | None:
        return self._by_id.get(rule_id)

    def candidates(self, event: Event) -> Sequence[Rule]:
        """Enabled rules the index admits for the event: its type, source and severity
        shorthand fits (and its iccid / endpoint_name, where a rule pins one)."""
        bucket = self._index.bucket(event.type_id, event.source_id, event.severity_id)
        if not bucket.narrows:
            return bucket.rules
        return [entry[0] for entry in bucket.select(event)]

    def match(self, event: Event) -> list[Rule]:
        """Rules that match the event (whole `when` and condition), in rule-file order."""
        # The hot path: one call per event per rule set. Kept flat on purpose.
        bucket = self._index.bucket(event.type_id, event.source_id, event.severity_id)
        entries = bucket.select(event) if bucket.narrows else bucket.by_details(event)
        matched: list[Rule] = []
        raw = event.raw
        data: EventData | None = None
        memo: dict[object, object] | None = {} if bucket.repeats else None
        for rule, when, check_details, condition in entries:
            if check_details and not when.details_hold(event):
                continue
            if condition is not None:
                compiled = condition.compiled
                value = _UNSET if memo is None else memo.get(compiled, _UNSET)
                if value is _UNSET:
                    # `condition.outcome(data)`, its first step inlined: the fast path decides
                    # most conditions, and this runs for every candidate of every event.
                    fast = condition.fast
                    if fast is not None:
                        try:  # noqa: SIM105 (contextlib.suppress costs a context manager here)
                            value = fast(raw)
                        except Undecided:
                            pass
                    if value is _UNSET:
                        if data is None:
                            share = bucket.conditions >= _SHARED_HANDLE_FROM
                            data = EventData(raw, bucket.fields, share)
                        value = condition.evaluated(data)
                    if memo is not None:
                        memo[compiled] = value
                if value is not True:
                    if isinstance(value, ConditionError):
                        self._condition_failed(rule, event, value)
                        continue
                    if value is False or not truthy(value):
                        continue
            matched.append(rule)
        return matched

    def match_usage(self, event: Event) -> list[Rule]:
        """The `usage` rules a usage record (read by `engine.usage.read_usage`) counts for:
        those of its traffic (data or SMS) whose condition, if any, holds on it; a condition
        that fails to evaluate counts as no match, as for events."""
        matched: list[Rule] = []
        traffic = event.raw["usage"]["traffic"]
        for rule in self.usage_rules:
            assert rule.usage is not None
            if rule.usage.traffic != traffic:
                continue
            if rule.condition is not None:
                try:
                    if not rule.condition.holds(event.raw):
                        continue
                except ConditionError as error:
                    self._condition_failed(rule, event, error)
                    continue
            matched.append(rule)
        return matched

    def match_each(self, event: Event) -> tuple[list[Rule], list[tuple[Rule, BaseException]]]:
        """What `match` answers, worked out rule by rule, with each rule that failed in an
        unexpected way (not a condition error, which counts as no match) beside its error:
        for an event on which `match` itself raised."""
        matched: list[Rule] = []
        failed: list[tuple[Rule, BaseException]] = []
        for rule in self.candidates(event):
            try:
                if rule.when.mismatch(event) is None and (
                    rule.condition is None or rule.condition.holds(event.raw)
                ):
                    matched.append(rule)
            except ConditionError as error:
                self._condition_failed(rule, event, error)
            except BaseException as error:
                if not is_rule_failure(error):
                    raise
                failed.append((rule, error))
        return matched, failed

    def explain(self, event: Event, rule: Rule) -> str | None:
        """None when `rule` matches `event`; otherwise the first reason it does not."""
        if not rule.enabled:
            return "rule is disabled"
        if (rule.usage is not None) != is_usage_event_id(event.id):
            if rule.usage is not None:
                return "a usage rule: it judges the Data Streamer's usage records, not events"
            return "a usage record: only rules with `usage:` judge it"
        reason = rule.when.mismatch(event)
        if reason is not None:
            return reason
        return _condition_mismatch(rule.condition, event)

    def _condition_failed(self, rule: Rule, event: Event, error: ConditionError) -> None:
        if rule.id in self._failing:
            return
        self._failing.add(rule.id)
        _log.warning(
            "rule condition failed (counted as no match; logged once per rule)",
            rule_id=rule.id,
            error=str(error),
            event_id=event.id,
            where=str(rule.where),
        )


def _condition_mismatch(condition: Condition | None, event: Event) -> str | None:
    if condition is None:
        return None
    try:
        holds = condition.holds(event.raw)
    except ConditionError as error:
        return f"condition error: {error}"
    return None if holds else "condition was false"
