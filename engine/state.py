"""What rules remember between events: threshold windows, throttle marks, the blast-radius
guard, rules the guard switched to shadow, and which pending follow-ups a later event cancels.

The judging functions at the top are pure: (current entries, event time, rule setting) →
verdict and the entries after it. `RuleMemory` holds the hot state in memory, loads it from
the store lazily per (rule, key), and writes every change into the batch's
`RuleStateChanges`, so it is committed in the batch's own transaction or not at all. All
times are event times (epoch seconds), in `run` and `replay` alike.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import orjson

from engine.model import AbsenceMark, FollowUpKey, RuleOverride, RuleStateChanges
from engine.ports import RuleStateSource

DEFAULT_PER = "sim.id"
# State is kept this long past its end, for events that arrive late (the poller's overlap
# re-reads two minutes by default; the Data Streamer may deliver later still).
PRUNE_MARGIN = timedelta(hours=1)
_PRUNE_EVERY = 15 * 60.0  # seconds of event time between two prunes

_MISSING = object()
_ABSENT = object()  # in the undo journal: the key was not there before
# What an undo-journal entry restores: a dict entry, a list's length, a follow-up's index.
_DICT, _LIST, _INDEXED, _UNINDEXED = range(4)
_PATHS: dict[str, tuple[str, ...]] = {}


def key_of(raw: Mapping[str, Any], path: str) -> str | None:
    """The value at a dotted `path` of the event as a key string; None when it is missing,
    null or empty. Numbers read as written (`9`), booleans as `true`/`false`."""
    parts = _PATHS.get(path)
    if parts is None:
        parts = _PATHS[path] = tuple(path.split("."))
    value: Any = raw
    for part in parts:
        if type(value) is dict or isinstance(value, Mapping):  # a plain dict checked first
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
        if value is None:
            return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True, slots=True)
class WindowCount:
    """A threshold's verdict on one event. `entries` is the window after it: empty once the
    rule fired, so the next firing needs `count` fresh events."""

    fired: bool
    count: int
    entries: list[float]


def count_event(entries: Sequence[float], at: float, within: float, needed: int) -> WindowCount:
    """Add an event at `at` to a sorted window; it fires when the events in
    [at − within, at] reach `needed`. Older entries are dropped; newer ones (from events that
    arrived before a late one) are kept but not counted for it."""
    start = at - within
    kept = [moment for moment in entries if moment >= start]
    insort(kept, at)
    count = bisect_right(kept, at)
    if count >= needed:
        return WindowCount(True, count, [])
    return WindowCount(False, count, kept)


@dataclass(frozen=True, slots=True)
class UsageSum:
    """A usage limit's verdict on one usage record. `entries` is the window after it, as
    `(at, amount)` pairs laid flat (`[at, amount, at, amount, ...]`, the shape every window
    is stored in: a list of numbers); empty once the rule fired, so the next firing needs the
    limit used up afresh."""

    fired: bool
    total: float
    entries: list[float]


def sum_usage(
    entries: Sequence[float],
    at: float,
    amount: float,
    within: float,
    fires: Callable[[float], bool],
) -> UsageSum:
    """Add a usage record's `amount` at `at` to a window of flat `(at, amount)` pairs sorted
    by time; it fires when `fires` holds for the sum of the amounts in [at − within, at].
    Older pairs are dropped; newer ones (from records that arrived before a late one) are
    kept but not summed for it."""
    start = at - within
    pairs = [(entries[i], entries[i + 1]) for i in range(0, len(entries) - 1, 2)]
    kept = [pair for pair in pairs if pair[0] >= start]
    insort(kept, (at, amount))
    total = sum(used for moment, used in kept if moment <= at)
    if fires(total):
        return UsageSum(True, total, [])
    return UsageSum(False, total, [number for pair in _sliced(kept, within) for number in pair])


# A usage window holds one pair per record until it has this many, then one per slice of
# `within / USAGE_SLICES`: a device reporting every 45 s would otherwise write thousands of
# numbers with every record. A slice keeps its newest record's time, so its records leave
# the window together, up to one slice late.
USAGE_SLICES = 96


def _sliced(pairs: list[tuple[float, float]], within: float) -> list[tuple[float, float]]:
    if len(pairs) <= USAGE_SLICES:
        return pairs
    width = within / USAGE_SLICES
    merged: list[tuple[float, float]] = []
    for moment, used in pairs:
        if merged and moment // width == merged[-1][0] // width:
            merged[-1] = (moment, merged[-1][1] + used)
        else:
            merged.append((moment, used))
    return merged


@dataclass(frozen=True, slots=True)
class GuardCount:
    """The blast-radius guard's verdict on one destructive action: `count` includes it."""

    allowed: bool
    count: int
    entries: list[float]


def count_destructive(entries: Sequence[float], at: float, within: float, limit: int) -> GuardCount:
    """Allow a destructive action at `at` when no more than `limit` (it included) fall in
    [at − within, at]; an action refused is not entered in the window."""
    start = at - within
    kept = [moment for moment in entries if moment >= start]
    count = bisect_right(kept, at) + 1
    if count > limit:
        return GuardCount(False, count, kept)
    insort(kept, at)
    return GuardCount(True, count, kept)


@lru_cache(maxsize=256)  # a rule's window and throttle spans, shown in every decision
def format_duration(span: timedelta, *, days: bool = True) -> str:
    """`10m`, `1h30m`, `2d`: how durations are written in rule files (`days=False`: in hours
    at most, `24h`, as a follow-up's `after` usually is)."""
    seconds = int(span.total_seconds())
    if seconds <= 0:
        return "0s"
    parts = []
    units = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))
    for unit, size in units if days else units[1:]:
        amount, seconds = divmod(seconds, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)


def format_moment(moment: datetime | float) -> str:
    """ISO 8601 in UTC with `Z`: seconds, or milliseconds when there are any."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    moment = moment.astimezone(UTC)
    spec = "milliseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


class RuleMemory:
    """The rules' state for the pipeline: cached, loaded lazily, changed through the batch.

    Call `begin` at the start of every batch; if the batch is not committed, call `forget`
    so the next one reloads from what the store really holds."""

    def __init__(self, source: RuleStateSource):
        self._source = source
        self._changes = RuleStateChanges()
        self._windows: dict[tuple[str, str], tuple[list[float], float]] = {}
        self._throttles: dict[tuple[str, str], float | None] = {}
        self._guards: dict[str, list[float]] = {}
        self._overrides: dict[str, RuleOverride] | None = None
        self._version: int | None = None
        # key path → key → follow-ups that an event with that key may cancel
        self._follow_ups: dict[str, dict[str, list[FollowUpKey]]] | None = None
        # rule id → key → what an absence rule knows of it (all loaded at once: a silence
        # is found by looking at every key)
        self._absences: dict[str, dict[str, AbsenceMark]] | None = None
        self._pruned_at: float | None = None
        # True once the store was seen without any window or throttle: from then on every
        # one exists in this cache (the pipeline is their only writer), so a key not cached
        # has none and needs no query. A fresh store (replay, tests, first start) saves a
        # query per key this way.
        self._complete = False
        # Undo entries for the changes made since `begin_event`, so that the work of one rule
        # (or one event) that failed half-way can be taken back: (what, container, key, old).
        # Its length is a mark to `undo` back to (read-only outside this class).
        self.journal: list[tuple[int, Any, Any, Any]] = []

    def begin(self, changes: RuleStateChanges) -> None:
        """Start a batch whose changes go into `changes`."""
        version = self._source.rule_state_version()
        if version != self._version:
            # Someone else changed the rules' state (another instance's batch, `rules
            # resume`): nothing cached can be trusted; it reloads lazily.
            self.forget()
            self._version = version
        changes.version = version
        self._changes = changes
        if not self._complete and not self._source.has_windows_or_throttles():
            self._complete = True
        if self._follow_ups is None:
            self._follow_ups = {}
            for follow_up in self._source.cancellable_follow_ups():
                self._index(follow_up)
        if self._absences is None:
            self._absences = {}
            for mark in self._source.absence_marks():
                self._absences.setdefault(mark.rule_id, {})[mark.key] = mark

    def committed(self, changes: RuleStateChanges) -> None:
        """The batch whose changes these are was committed, as rule-state version
        `changes.version`: what this memory holds is that version."""
        self._version = changes.version

    def begin_event(self) -> None:
        """Start judging one event: `undo` reaches back no further than this."""
        if self.journal:
            self.journal.clear()

    def undo(self, mark: int) -> None:
        """Take back every change made since the journal was `mark` long, in the cache and
        in the batch."""
        journal = self.journal
        while len(journal) > mark:
            what, container, key, old = journal.pop()
            if what == _DICT:
                if old is _ABSENT:
                    container.pop(key, None)
                else:
                    container[key] = old
            elif what == _LIST:
                del container[key:]
            elif what == _INDEXED:
                self._unindex(key)
            else:
                self._index(key)

    def _note(self, container: dict[Any, Any], key: Any) -> None:
        self.journal.append((_DICT, container, key, container.get(key, _ABSENT)))

    def forget(self) -> None:
        """Drop everything cached: the batch that changed it was not committed."""
        self._windows.clear()
        self._throttles.clear()
        self._guards.clear()
        self._overrides = None
        self._version = None
        self._follow_ups = None
        self._absences = None
        self._changes = RuleStateChanges()
        self._complete = False
        self.journal.clear()

    # -- windows, throttles, guards -----------------------------------------------------

    def window(self, rule_id: str, key: str, within: float, *, stride: int = 1) -> list[float]:
        """A window's entries: event times, or with `stride=2` flat `(at, amount)` pairs
        (a usage limit's window, `sum_usage`)."""
        cached = self._windows.get((rule_id, key))
        if cached is None:
            entries = [] if self._complete else self._source.window(rule_id, key)
            cached = (entries, _expiry(entries, within, stride))
            self._windows[(rule_id, key)] = cached
        return cached[0]

    def set_window(
        self, rule_id: str, key: str, entries: list[float], within: float, *, stride: int = 1
    ) -> None:
        value = (entries, _expiry(entries, within, stride))
        slot = (rule_id, key)
        self._note(self._windows, slot)
        self._note(self._changes.windows, slot)
        self._windows[slot] = value
        self._changes.windows[slot] = value

    def throttle(self, rule_id: str, key: str) -> float | None:
        cached = self._throttles.get((rule_id, key), _MISSING)
        if cached is _MISSING:
            if self._complete:
                return None  # complete: a mark not cached does not exist (nothing to cache)
            until = self._source.throttle_until(rule_id, key)
            self._throttles[(rule_id, key)] = until
            return until
        return cached  # type: ignore[return-value]

    def set_throttle(self, rule_id: str, key: str, until: float) -> None:
        slot = (rule_id, key)
        self._note(self._throttles, slot)
        self._note(self._changes.throttles, slot)
        self._throttles[slot] = until
        self._changes.throttles[slot] = until

    def guard(self, scope: str) -> list[float]:
        entries = self._guards.get(scope)
        if entries is None:
            entries = self._guards[scope] = self._source.guard_entries(scope)
        return entries

    def set_guard(self, scope: str, entries: list[float]) -> None:
        self._note(self._guards, scope)
        self._note(self._changes.guards, scope)
        self._guards[scope] = entries
        self._changes.guards[scope] = entries

    # -- rules switched to shadow by the guard ------------------------------------------

    def override(self, rule_id: str) -> RuleOverride | None:
        if self._overrides is None:
            self._overrides = self._source.rule_overrides()
        return self._overrides.get(rule_id) if self._overrides else None

    def set_override(self, override: RuleOverride) -> None:
        if self._overrides is None:
            self._overrides = self._source.rule_overrides()
        self._note(self._overrides, override.rule_id)
        self.journal.append((_LIST, self._changes.overrides, len(self._changes.overrides), None))
        self._overrides[override.rule_id] = override
        self._changes.overrides.append(override)

    # -- follow-ups a later event may cancel --------------------------------------------

    @property
    def has_follow_ups(self) -> bool:
        return bool(self._follow_ups)

    def add_follow_up(self, follow_up: FollowUpKey) -> None:
        self.journal.append((_INDEXED, None, follow_up, None))
        self.journal.append((_LIST, self._changes.follow_ups, len(self._changes.follow_ups), None))
        self._index(follow_up)
        self._changes.follow_ups.append(follow_up)

    def follow_ups_for(self, raw: Mapping[str, Any]) -> list[FollowUpKey]:
        """Waiting follow-ups planned for the same key as this event has."""
        found: list[FollowUpKey] = []
        for path, by_key in (self._follow_ups or {}).items():
            key = key_of(raw, path)
            if key is not None:
                found.extend(by_key.get(key, ()))
        return found

    def drop_follow_up(self, follow_up: FollowUpKey) -> None:
        self.journal.append((_UNINDEXED, None, follow_up, None))
        self._unindex(follow_up)

    def _unindex(self, follow_up: FollowUpKey) -> None:
        by_key = (self._follow_ups or {}).get(follow_up.key_path, {})
        waiting = by_key.get(follow_up.key, [])
        if follow_up in waiting:
            waiting.remove(follow_up)
        if not waiting:
            by_key.pop(follow_up.key, None)
        if not by_key and self._follow_ups:
            self._follow_ups.pop(follow_up.key_path, None)

    def _index(self, follow_up: FollowUpKey) -> None:
        assert self._follow_ups is not None
        by_key = self._follow_ups.setdefault(follow_up.key_path, {})
        by_key.setdefault(follow_up.key, []).append(follow_up)

    # -- absence rules' keys -------------------------------------------------------------

    def absence_marks(self, rule_id: str) -> dict[str, AbsenceMark]:
        """The keys an absence rule knows (read-only: change them with `set_absence`)."""
        assert self._absences is not None, "begin() loads them"
        return self._absences.get(rule_id) or {}

    def set_absence(self, rule_id: str, key: str, mark: AbsenceMark | None) -> None:
        """Record what the rule knows of `key` after this event or batch (None: forget it)."""
        assert self._absences is not None, "begin() loads them"
        marks = self._absences.setdefault(rule_id, {})
        slot = (rule_id, key)
        self._note(marks, key)
        self._note(self._changes.absences, slot)
        if mark is None:
            marks.pop(key, None)
        else:
            marks[key] = mark
        self._changes.absences[slot] = mark

    # -- pruning ------------------------------------------------------------------------

    def advance(self, newest: float) -> None:
        """The batch reached event time `newest`: now and then, forget state that ended
        more than PRUNE_MARGIN before it, here and (with the batch) in the store."""
        if self._pruned_at is not None and newest - self._pruned_at < _PRUNE_EVERY:
            return
        self._pruned_at = newest
        before = newest - PRUNE_MARGIN.total_seconds()
        self._changes.prune_before = before
        self._windows = {k: v for k, v in self._windows.items() if v[1] >= before}
        self._throttles = {
            k: until
            for k, until in self._throttles.items()
            if until is not None and until >= before
        }
        for by_key in (self._follow_ups or {}).values():
            for key in list(by_key):
                waiting = [f for f in by_key[key] if f.due_at.timestamp() >= before]
                if waiting:
                    by_key[key] = waiting
                else:
                    del by_key[key]


def _expiry(entries: Sequence[float], within: float, stride: int) -> float:
    """When a window ends: `within` after its newest time (the last entry's first number)."""
    return entries[-stride] + within if len(entries) >= stride else 0.0
