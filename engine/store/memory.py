"""Replay's store: the pipeline's ports (`engine.ports.PipelineStore`) in plain Python, for
a replay that is thrown away when it ends.

It answers the pipeline exactly as the SQLite store does: which events were seen, what the
rules remember (threshold windows, throttle marks, guard entries, overrides, the follow-ups
a later event may cancel, pruned as a batch says), whether a batch was judged on the
current rule-state version, and whether an intent's idempotency key was planned before.
What only the daemon reads it does not keep: audit rows, quarantined records, digest
events, the cursor, and every intent but the follow-ups a later event may still cancel
(nothing dispatches them; replay reports what was planned from the batch itself). So it
stays small however long the file: a seen id takes 8 bytes, an intent's key about as much.

Nor does it know when an event was seen: a replay keeps every id to its end, so it has no
dedup horizon (`engine.ports.DedupHorizon`) to implement.
The contract tests (`tests/test_store_contract.py`) run this store and SQLite side by side.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from itertools import islice
from operator import eq, lt
from typing import TYPE_CHECKING

from engine.errors import StaleRuleState
from engine.model import (
    AbsenceMark,
    Batch,
    FollowUpKey,
    Intent,
    IntentStatus,
    OwnStatusAction,
    RuleOverride,
)

if TYPE_CHECKING:
    from engine.ports import PipelineStore

# An intent with one of these statuses is a follow-up that may still be cancelled.
_CANCELLABLE = (IntentStatus.PENDING, IntentStatus.SHADOW)


class IdSet:
    """A compact set of 64-bit integers that mostly arrive in ascending order (event ids).

    A million ids in a Python set take about 70 MB (the table and an int object per id);
    here they take 8 MB, as a sorted array of 64-bit integers. Event ids grow with time, so
    nearly every new id lands at the end of the array; the few that arrive out of order are
    kept in a small set beside it. Looking an id up costs a binary search in the array."""

    __slots__ = ("_ascending", "_stragglers")

    def __init__(self) -> None:
        self._ascending = array("q")
        self._stragglers: set[int] = set()

    def __len__(self) -> int:
        return len(self._ascending) + len(self._stragglers)

    def __contains__(self, event_id: int) -> bool:
        ascending = self._ascending
        if ascending and event_id <= ascending[-1]:
            at = bisect_left(ascending, event_id)
            if ascending[at] == event_id:
                return True
        return event_id in self._stragglers

    def missing(self, event_ids: Iterable[int]) -> set[int]:
        """The ids among `event_ids` that are not in the set. An id above the array's last
        is not: every straggler was at most the last when it came."""
        ascending = self._ascending
        if not ascending:  # then there are no stragglers either
            return set(event_ids)
        top = ascending[-1]
        return {event_id for event_id in event_ids if event_id > top or event_id not in self}

    def add_sorted(self, ids: list[int]) -> int:
        """Add ids given in ascending order (repeats allowed); returns how many distinct
        ones were not there before."""
        ascending = self._ascending
        newer = not ascending or ids[0] > ascending[-1]
        if newer and not any(map(eq, ids, islice(ids, 1, None))):
            ascending.extend(ids)  # the common batch: all newer, no repeats
            return len(ids)
        added = 0
        for number in ids:
            if not ascending or number > ascending[-1]:
                ascending.append(number)
            elif number not in self:
                self._stragglers.add(number)
            else:
                continue
            added += 1
        return added

    def add_all(self, event_ids: Iterable[int]) -> None:
        ascending = self._ascending
        ids = event_ids if type(event_ids) is list else list(event_ids)
        newer = ids and (not ascending or ids[0] > ascending[-1])
        if newer and all(map(lt, ids, islice(ids, 1, None))):
            ascending.extend(ids)  # the common batch: ascending, all newer (no loop in Python)
            return
        for event_id in ids:
            if not ascending or event_id > ascending[-1]:
                ascending.append(event_id)
            elif event_id not in self:
                self._stragglers.add(event_id)


class IntentKeys:
    """The idempotency key of every intent planned, exactly, in about 8 bytes a key.

    The pipeline's keys start with the id of the event that planned them
    (`{event_id}-{rule}-{step}`), and a rule set has few distinct rests. So a key of that
    shape is kept as one number in an `IdSet`: the event id times `_RESTS` plus the rest's
    code (event ids grow with time, so these mostly arrive in ascending order). Any other
    key, or one whose number would not fit in 64 bits, is kept as it is."""

    __slots__ = ("_codes", "_numbered", "_others")

    def __init__(self) -> None:
        self._codes: dict[str, int] = {}  # rest → its code, in the order they came
        self._numbered = IdSet()
        self._others: set[str] = set()

    def __contains__(self, key: str) -> bool:
        head, dash, rest = key.partition("-")
        code = self._codes.get(rest)
        if code is not None and dash and _plain_number(head):
            return int(head) * _RESTS + code in self._numbered
        return key in self._others

    def add_new(self, keys: Iterable[str]) -> int:
        """Add `keys`; returns how many distinct ones were not there before."""
        codes = self._codes
        numbers: list[int] = []
        others = self._others
        known_others = len(others)
        # An event's keys come together: its id is read once for all of them.
        last_head: str | None = None
        base = 0
        for key in keys:
            head, dash, rest = key.partition("-")
            if not dash:
                others.add(key)
                continue
            if head != last_head:
                if not _plain_number(head):
                    others.add(key)
                    continue
                last_head, base = head, int(head) * _RESTS
            code = codes.get(rest)
            if code is None:
                if len(codes) == _RESTS:
                    others.add(key)
                    continue
                code = codes[rest] = len(codes)
            numbers.append(base + code)
        added = len(others) - known_others
        if numbers:
            numbers.sort()
            added += self._numbered.add_sorted(numbers)
        return added


# How many distinct rests of keys `IntentKeys` numbers: with event ids of up to 15 digits,
# id * _RESTS + code stays within a signed 64-bit integer.
_RESTS = 1 << 13


def _plain_number(text: str) -> bool:
    """Whether `text` is a whole number of up to 15 digits written as `str(int)` writes it,
    so that it and the number give back each other."""
    return (
        0 < len(text) <= 15
        and text.isascii()
        and text.isdigit()
        and (text[0] != "0" or len(text) == 1)
    )


@dataclass(frozen=True, slots=True)
class _Waiting:
    """A follow-up a later event may cancel: its key as the pipeline reads it back, and when
    its intent falls due (epoch seconds, for pruning)."""

    follow_up: FollowUpKey
    due: float


class MemoryStore:
    """The pipeline's state for one replay, in memory (see the module docstring)."""

    def __init__(self) -> None:
        self._seen = IdSet()
        # The seen ids of each organisation named under `organisations:` (a replay of one
        # organisation's file has none).
        self._seen_by_organisation: dict[str, IdSet] = {}
        self._keys = IntentKeys()
        self._waiting: dict[str, _Waiting] = {}  # by idempotency key, in planning order
        self._windows: dict[tuple[str, str], tuple[tuple[float, ...], float]] = {}
        self._throttles: dict[tuple[str, str], float] = {}
        self._guards: dict[str, tuple[float, ...]] = {}
        self._overrides: dict[str, RuleOverride] = {}
        self._absences: dict[tuple[str, str], AbsenceMark] = {}
        self._version = 0

    # -- seen events -------------------------------------------------------------------

    def unseen(self, event_ids: Sequence[int], organisation: str = "") -> set[int]:
        return self._seen_of(organisation).missing(event_ids) if event_ids else set()

    def seen_count(self) -> int:
        return len(self._seen) + sum(len(ids) for ids in self._seen_by_organisation.values())

    def _seen_of(self, organisation: str) -> IdSet:
        if not organisation:
            return self._seen
        return self._seen_by_organisation.setdefault(organisation, IdSet())

    # -- the batch ---------------------------------------------------------------------

    def commit_batch(self, batch: Batch, now: datetime) -> int:
        """Record a batch: all of it, or (on a stale rule-state version) nothing. Returns how
        many intents it created; one whose key was planned before creates none."""
        state = batch.state
        if state.version is not None and state.version != self._version:
            raise StaleRuleState("rule state changed while the batch was judged")
        seen = [event_id for event_id, _ in batch.seen]
        seen_ids = self._seen_of(batch.organisation)
        if seen and len(seen_ids.missing(seen)) != len(seen):
            raise StaleRuleState("events of the batch were recorded meanwhile")
        intents = batch.intents
        waiting = self._follow_ups_planned(intents, state.follow_ups, now) if intents else []
        created = self._keys.add_new([intent.idempotency_key for intent in intents])
        for key, follow_up in waiting:
            self._waiting[key] = follow_up
        if seen:
            seen_ids.add_all(seen)
        if state.version is not None and state.changes_state():
            self._version += 1  # what is judged next is judged on this batch's state
            state.version = self._version
        self._apply_counters(batch)
        if state.overrides:
            for override in state.overrides:
                self._overrides[override.rule_id] = override
        for cancel in state.cancels:  # after the batch's follow-ups: it may cancel its own
            self._waiting.pop(cancel.idempotency_key, None)
        if state.prune_before is not None:
            self._prune(state.prune_before)
        return created

    def _follow_ups_planned(
        self, intents: Sequence[Intent], follow_ups: Sequence[FollowUpKey], now: datetime
    ) -> list[tuple[str, _Waiting]]:
        """The follow-ups of the batch to keep: those whose intent it creates (the key is
        new) and that may be cancelled, each as the store reads it back (the intent's
        rule, step, event and due time)."""
        if not follow_ups:
            return []
        planned = {follow_up.idempotency_key: follow_up for follow_up in reversed(follow_ups)}
        kept: dict[str, _Waiting] = {}
        for intent in intents:
            key = intent.idempotency_key
            follow_up = planned.get(key)
            if follow_up is None or key in kept or key in self._keys:
                continue  # a key planned before keeps what it had
            if intent.status not in _CANCELLABLE:
                continue
            due = intent.due_at or now
            kept[key] = _Waiting(
                replace(
                    follow_up,
                    rule_id=intent.rule_id,
                    action_index=intent.action_index,
                    event_id=follow_up.event_id if intent.event_id is None else intent.event_id,
                    due_at=due,
                ),
                due.timestamp(),
            )
        return list(kept.items())

    def _apply_counters(self, batch: Batch) -> None:
        """Threshold windows (an empty one is deleted), throttle marks and guard entries
        after the batch, copied: the batch's lists stay the caller's."""
        state = batch.state
        if state.windows:
            windows = self._windows
            for slot, (entries, expires) in state.windows.items():
                if entries:
                    windows[slot] = (tuple(entries), expires)
                else:
                    windows.pop(slot, None)
        if state.throttles:
            self._throttles.update(state.throttles)
        if state.guards:
            for scope, entries in state.guards.items():
                self._guards[scope] = tuple(entries)
        for slot, mark in state.absences.items():
            if mark is None:
                self._absences.pop(slot, None)
            else:
                self._absences[slot] = mark

    def _prune(self, before: float) -> None:
        """Forget windows and throttle marks that ended before `before` (event time), and
        follow-ups due before it."""
        self._windows = {slot: kept for slot, kept in self._windows.items() if kept[1] >= before}
        self._throttles = {slot: t for slot, t in self._throttles.items() if t >= before}
        if self._waiting:
            self._waiting = {k: w for k, w in self._waiting.items() if w.due >= before}

    # -- what the rules remember --------------------------------------------------------

    def window(self, rule_id: str, key: str) -> list[float]:
        found = self._windows.get((rule_id, key))
        return list(found[0]) if found else []

    def has_windows_or_throttles(self) -> bool:
        return bool(self._windows) or bool(self._throttles)

    def throttle_until(self, rule_id: str, key: str) -> float | None:
        return self._throttles.get((rule_id, key))

    def guard_entries(self, scope: str) -> list[float]:
        return list(self._guards.get(scope, ()))

    def status_actions(
        self, target: str, kinds: Sequence[str], since: float, until: float
    ) -> list[OwnStatusAction]:
        """None: nothing runs in a replay (its pipeline counts the status actions it
        planned as done, `Pipeline(planned_is_done=True)`)."""
        return []

    def rule_overrides(self) -> dict[str, RuleOverride]:
        return {rule_id: self._overrides[rule_id] for rule_id in sorted(self._overrides)}

    def rule_state_version(self) -> int:
        return self._version

    def cancellable_follow_ups(self) -> list[FollowUpKey]:
        return [waiting.follow_up for waiting in self._waiting.values()]

    def absence_marks(self) -> list[AbsenceMark]:
        return [self._absences[slot] for slot in sorted(self._absences)]

    def reset_rule_windows(self, rule_id: str) -> int:
        """Forget a rule's threshold windows; a batch judged on them is refused."""
        dropped = [slot for slot in self._windows if slot[0] == rule_id]
        for slot in dropped:
            del self._windows[slot]
        watched = [slot for slot in self._absences if slot[0] == rule_id]
        for slot in watched:
            del self._absences[slot]
        dropped += watched
        self._version += 1
        return len(dropped)


if TYPE_CHECKING:  # mypy checks here that the memory store implements the pipeline's ports

    def _implements_the_pipelines_ports(store: MemoryStore) -> PipelineStore:
        return store
