"""Absence rules: fire when a key that was seen has gone quiet.

`absence: {for: 6h, per: endpoint.id, forget_after: 7d, keys: [...]}` watches every key
(the `per` field's value) of the events the rule's `when` and `condition` admit. A key that
has had no such event for `for` fires the rule's actions once; the key seen again re-arms
it; a key silent for `forget_after` is forgotten (the `keys:` listed in the rule are never
forgotten, and are watched from the rule's first judgement even if they never report).

Silence is judged on **event time known to be complete**, never on the wall clock: the
point up to which every event that exists has been read (the poller's committed cursor
minus its overlap, the end of a replay's input). A source that cannot see (an API outage, a
list answered with `[]` for lack of access) does not move that point, so nothing looks
silent meanwhile; once it sees again, the catch-up is judged window by window as if it had
never stopped. So an event read before time is complete up to it is not applied at once:
its time waits in the key's `pending` until the complete time passes it, and only then is
the gap before it judged. That keeps firings exact whatever order events arrive in.

A firing's event time is the moment the silence reached `for` (last seen + `for`). Its
template context has `event` (the identity of the last matching event: id, timestamp,
event_type, sim, endpoint; only the key's field for a listed key never seen; its
`description` says the silence) and
`absence` (`key`, `per`, `for`, `since`, `at`, `seen`).

The functions here are pure: (mark, times, setting) → mark after, and the firings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from engine.events import Event
from engine.model import AbsenceMark
from engine.rules.model import Absence
from engine.state import format_duration, format_moment

# Past this many pending times a key keeps only those that bound a gap worth judging.
_PENDING_LIMIT = 32
# The fields of a matching event a firing keeps (for its target and its templates).
_IDENTITY = ("id", "timestamp", "event_type", "sim", "endpoint", "organisation")


@dataclass(frozen=True, slots=True)
class Silence:
    """One firing: `key` had no matching event from `since` to `at` (= since + for)."""

    rule_id: str
    key: str
    since: float
    at: float
    seen: bool  # False: a listed key that never reported since the rule started
    last_event: str | None

    def reason(self, absence: Absence) -> str:
        """What the audit log and `why` say about it."""
        what = "no matching event" if self.seen else "never seen"
        return (
            f"{what} for {format_duration(absence.period)} since {format_moment(self.since)}"
            f" ({absence.per}={self.key})"
        )


def identity(raw: Mapping[str, Any]) -> str:
    """The part of a matching event a later firing needs, as JSON text."""
    kept = {name: raw[name] for name in _IDENTITY if raw.get(name) is not None}
    return orjson.dumps(kept, default=str).decode()


def observe(mark: AbsenceMark, at: float, event: str, absence: Absence) -> AbsenceMark | None:
    """The key was seen at `at` by a matching event (`event`: its identity): its time waits
    in `pending` until time is known to be complete up to it. None: nothing changes (an
    event no newer than what is known already)."""
    if (at <= mark.last_seen and mark.seen) or at in mark.pending:
        return None
    pending = tuple(sorted((*mark.pending, at)))
    if len(pending) > _PENDING_LIMIT:
        pending = _gaps_only(pending, absence.period.total_seconds())
    newest = not mark.pending or at >= mark.pending[-1]
    return replace(mark, pending=pending, last_event=event if newest else mark.last_event)


def new_mark(rule_id: str, key: str, at: float, event: str) -> AbsenceMark:
    """A key seen for the first time, at `at`: it counts from there once time is complete."""
    return AbsenceMark(rule_id, key, last_seen=at, pending=(at,), last_event=event, seen=False)


def listed_mark(rule_id: str, key: str, start: float) -> AbsenceMark:
    """A key of the rule's `keys:` list, watched from `start` though never seen."""
    return AbsenceMark(rule_id, key, last_seen=start, seen=False)


def judge(
    mark: AbsenceMark, complete: float, absence: Absence, *, listed: bool
) -> tuple[AbsenceMark | None, list[Silence]]:
    """Bring a key up to `complete` (every event up to it is known): apply its pending
    times in order, firing for each silence of `for` or more before one; then fire if it
    has been silent for `for` up to `complete`. Returns the mark after (None: forget the
    key) and the firings, oldest first."""
    period = absence.period.total_seconds()
    last, fired, seen = mark.last_seen, mark.fired, mark.seen
    silences: list[Silence] = []
    later: list[float] = []
    for at in mark.pending:
        if at > complete:
            later.append(at)
            continue
        if seen and at <= last:
            continue
        if not fired and at - last >= period:
            silences.append(Silence(mark.rule_id, mark.key, last, last + period, seen, None))
        last, fired, seen = (at if seen else max(at, last)), False, True
    if not fired and last + period <= complete:
        silences.append(Silence(mark.rule_id, mark.key, last, last + period, seen, None))
        fired = True
    silences = [replace(s, last_event=mark.last_event) for s in silences]
    if not listed and not later and last + absence.forget_after.total_seconds() <= complete:
        return None, silences
    after = AbsenceMark(mark.rule_id, mark.key, last, fired, seen, tuple(later), mark.last_event)
    return after, silences


def firing_event(silence: Silence, absence: Absence) -> Event:
    """The event a firing's actions are planned for: the last matching event's identity at
    the silence's time (for a listed key never seen, only the key's own field)."""
    raw: dict[str, Any] = orjson.loads(silence.last_event) if silence.last_event else {}
    if not silence.last_event:
        _set_path(raw, absence.per, silence.key)
    # What a `log` action or a template reading `event.description` shows: the silence.
    raw["description"] = silence.reason(absence)
    sim = _object(raw, "sim")
    endpoint = _object(raw, "endpoint")
    event_id = raw.get("id")
    name = endpoint.get("name")
    return Event(
        id=event_id if isinstance(event_id, int) else 0,
        timestamp=datetime.fromtimestamp(silence.at, UTC),
        type_id=None,
        source_id=None,
        severity_id=None,
        alert=False,
        description=silence.reason(absence),
        sim_id=_int(sim.get("id")),
        iccid=str(sim["iccid"]) if sim.get("iccid") else None,
        endpoint_id=_int(endpoint.get("id")),
        endpoint_name=None if name is None else str(name),  # as `normalize` reads it
        tags=frozenset(),
        raw=raw,
    )


def context_of(silence: Silence, absence: Absence) -> dict[str, Any]:
    """`absence` as the firing's templates see it."""
    return {
        "key": silence.key,
        "per": absence.per,
        "for": format_duration(absence.period),
        "since": format_moment(silence.since),
        "at": format_moment(silence.at),
        "seen": silence.seen,
    }


def firing_key(rule_id: str, key: str, at: str, action_index: int) -> str:
    """The idempotency key of one action of one firing (`at`: the silence's end, as
    `context_of` writes it): the same for the same silence."""
    return f"absence-{rule_id}-{key}-{at}-{action_index}"


def _gaps_only(pending: tuple[float, ...], period: float) -> tuple[float, ...]:
    """Drop pending times whose dropping joins no gap into one of `period` or more (many
    events of one key read ahead of complete time, e.g. a Data Streamer with no poller
    moving it): every silence of `period` between them stays exactly as it was."""
    kept = [pending[0]]
    for index in range(1, len(pending) - 1):
        if pending[index + 1] - kept[-1] >= period:
            kept.append(pending[index])
    kept.append(pending[-1])
    return tuple(kept)


def _set_path(raw: dict[str, Any], path: str, value: str) -> None:
    parts = path.split(".")
    into = raw
    for part in parts[:-1]:
        into = into.setdefault(part, {})
    into[parts[-1]] = int(value) if value.isdigit() and parts[-1] == "id" else value


def _object(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name)
    return value if isinstance(value, dict) else {}


def _int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None
