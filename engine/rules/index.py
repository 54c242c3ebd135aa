"""Which rules can match an event, found by lookup instead of by trying every rule.

First level, (type, source, severity): each dimension maps a value to a bit mask of the
rules that accept it; a rule without a constraint on a dimension sits in that dimension's
wildcard mask. A rule's constraints come from its `when` and from what its JsonLogic
condition requires of those ids (`Condition.implied_ids`), so a rule written in JsonLogic
alone is kept away from events it cannot match too. The candidates for a key are the AND
of three masks, in rule-file order. Each key is worked out once and cached; events fall
into few keys (a few dozen types × 3 sources × 3 severities), so this costs one dict lookup
per event however many rules there are.

Second level, only in buckets that need it: rules pinned to an `iccid` or `endpoint_name`
(a rule per device is the common way to get to a thousand rules) are narrowed by dict
lookup on the event's value, so a device's event does not meet the other devices' rules.
In the other buckets, the candidates are narrowed by the event's alert flag and endpoint
tags instead: a fleet has few distinct tag sets, so the candidates for each (alert, tags)
are worked out once, and an untagged event does not meet the rules for tagged devices.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from engine.events import Event
from engine.rules.condition import Condition
from engine.rules.model import Rule
from engine.rules.when import When

_MAX_CACHED_KEYS = 4096  # bounds memory if events carry ever-new type ids
_MAX_DETAIL_KEYS = 256  # (alert, tags) pairs kept per bucket

# What the matcher needs per candidate, as a tuple for fast unpacking in the hot loop:
# (rule, its when, whether `when` has non-indexed parts to test, its condition or None).
Entry = tuple[Rule, When, bool, Condition | None]


def _masks(values: Sequence[Iterable[int] | Iterable[str] | None]) -> tuple[dict[object, int], int]:
    """value → mask of the positions accepting it, and the mask of positions accepting any."""
    by_value: dict[object, int] = {}
    wildcard = 0
    for position, accepted in enumerate(values):
        bit = 1 << position
        if accepted is None:
            wildcard |= bit
            continue
        for value in accepted:
            by_value[value] = by_value.get(value, 0) | bit
    return by_value, wildcard


def _pick(entries: Sequence[Entry], mask: int) -> list[Entry]:
    chosen: list[Entry] = []
    while mask:
        lowest = mask & -mask
        chosen.append(entries[lowest.bit_length() - 1])
        mask ^= lowest
    return chosen


class Bucket:
    """The candidates for one (type, source, severity) key."""

    __slots__ = (
        "_by_details",
        "_by_iccid",
        "_by_name",
        "conditions",
        "entries",
        "fields",
        "narrows",
        "repeats",
        "rules",
    )

    def __init__(self, entries: Sequence[Entry]):
        self.entries: tuple[Entry, ...] = tuple(entries)
        self.rules: tuple[Rule, ...] = tuple(entry[0] for entry in entries)
        conditions = [entry[3] for entry in entries if entry[3] is not None]
        self.conditions = len(conditions)
        # Rules repeating an expression: evaluate it once per event, not once per rule.
        self.repeats = len({c.compiled for c in conditions}) < len(conditions)
        # The event keys any of these conditions reads (None: possibly all of them).
        self.fields: tuple[str, ...] | None = ()
        for condition in conditions:
            if condition.fields is None:
                self.fields = None
                break
            self.fields = tuple(sorted({*self.fields, *condition.fields}))
        self.narrows = any(
            entry[1].iccids is not None or entry[1].endpoint_names is not None for entry in entries
        )
        self._by_iccid = _masks([entry[1].iccids for entry in entries])
        self._by_name = _masks([entry[1].endpoint_names for entry in entries])
        self._by_details: dict[tuple[bool, frozenset[str]], tuple[Entry, ...]] = {}

    def by_details(self, event: Event) -> tuple[Entry, ...]:
        """The entries whose `alert` and `tags` the event meets, for a bucket that does not
        narrow by iccid or endpoint name. No rule of such a bucket pins an iccid or a name,
        so that is the whole of `when`'s details but for `not`: the entries without one come
        marked as having nothing left to test (`details_hold` would only repeat it)."""
        key = (event.alert, event.tags)
        found = self._by_details.get(key)
        if found is None:
            alert, tags = key
            found = tuple(
                (rule, when, when.exclude is not None, condition)
                for rule, when, _, condition in self.entries
                if (when.alert is None or when.alert is alert)
                and (when.tags is None or when.tags <= tags)
            )
            if len(self._by_details) >= _MAX_DETAIL_KEYS:
                self._by_details.clear()
            self._by_details[key] = found
        return found

    def select(self, event: Event) -> Sequence[Entry]:
        """The entries that can match `event`, once narrowed by iccid and endpoint name."""
        if not self.narrows:
            return self.entries
        by_iccid, any_iccid = self._by_iccid
        by_name, any_name = self._by_name
        mask = (by_iccid.get(event.iccid, 0) | any_iccid) & (
            by_name.get(event.endpoint_name, 0) | any_name
        )
        return _pick(self.entries, mask)


def _accepted(rule: Rule, by_when: frozenset[int] | None, name: str) -> frozenset[int] | None:
    """The ids of one dimension the rule accepts (None: any), by `when` and condition."""
    by_condition = rule.condition.implied_ids.get(name) if rule.condition else None
    if by_condition is None:
        return by_when
    return by_condition if by_when is None else by_when & by_condition


def _effective_when(rule: Rule) -> When:
    """The rule's `when`, plus the alert flag its condition requires: testing the flag
    first is far cheaper than evaluating the condition on an event without it."""
    alert = rule.condition.implied_alert if rule.condition else None
    if alert is None or rule.when.alert is not None:
        return rule.when
    return replace(rule.when, alert=alert)


class RuleIndex:
    """Enabled rules by the event keys they can match. Disabled rules are left out."""

    __slots__ = ("_cache", "_entries", "_severity", "_source", "_type")

    def __init__(self, rules: Sequence[Rule]):
        enabled = [rule for rule in rules if rule.enabled]
        self._entries: tuple[Entry, ...] = tuple(
            (rule, when, when.checks_details, rule.condition)
            for rule, when in ((rule, _effective_when(rule)) for rule in enabled)
        )
        self._type = _masks([_accepted(rule, rule.when.type_ids, "type") for rule in enabled])
        self._source = _masks([_accepted(rule, rule.when.source_ids, "source") for rule in enabled])
        self._severity = _masks(
            [_accepted(rule, rule.when.severity_ids, "severity") for rule in enabled]
        )
        self._cache: dict[tuple[int | None, int | None, int | None], Bucket] = {}

    def bucket(self, type_id: int | None, source_id: int | None, severity_id: int | None) -> Bucket:
        key = (type_id, source_id, severity_id)
        found = self._cache.get(key)
        if found is None:
            found = Bucket(_pick(self._entries, self._mask(type_id, source_id, severity_id)))
            if len(self._cache) >= _MAX_CACHED_KEYS:
                self._cache.clear()
            self._cache[key] = found
        return found

    def _mask(self, type_id: int | None, source_id: int | None, severity_id: int | None) -> int:
        mask = -1
        for (by_value, wildcard), value in (
            (self._type, type_id),
            (self._source, source_id),
            (self._severity, severity_id),
        ):
            mask &= (by_value.get(value, 0) if value is not None else 0) | wildcard
        return mask
