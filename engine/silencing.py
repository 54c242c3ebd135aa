"""Silences and mute windows as the pipeline sees them: which matches run no action.

A silence (`event-engine silence add`) or a mute window (config `mute_windows`) names what
it covers with matchers (`iccid=…`, `endpoint=…`, `tag=…`, `rule=…`, all of which must
hold). A covered match is judged as usual (its threshold window counts, its throttle
marks) and recorded as "silenced by #ID (comment)", but its actions are recorded as shadow
ones, never run: what shadow mode does for a whole rule, a silence does for a slice of the
fleet for a while.

A match is silenced when a silence covers it at the event's time or at the moment it is
judged: an event from the maintenance that arrives late (after an API outage) stays quiet,
and so does an older event that arrives during it. In replay and `event-engine test` both
moments are the event's time, so they give the same answer on every run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from engine.events import Event
    from engine.model import Silence

MATCHER_FIELDS = ("iccid", "endpoint", "tag", "rule")


def parse_matcher(text: str) -> tuple[str, str]:
    """`iccid=8988…` as ("iccid", "8988…"); ValueError says what is wrong."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not value:
        raise ValueError(f"`{text}` is not FIELD=VALUE (e.g. iccid=8988303000000001234)")
    if name not in MATCHER_FIELDS:
        known = ", ".join(MATCHER_FIELDS)
        raise ValueError(f"`{name}` cannot be matched on; use one of {known}")
    return name, value


def describe_matchers(matchers: Sequence[tuple[str, str]]) -> str:
    return " ".join(f"{name}={value}" for name, value in matchers)


def covers(matchers: Sequence[tuple[str, str]], event: Event, rule_id: str) -> bool:
    """Whether every matcher holds for this rule's match of `event`."""
    return all(_holds(name, value, event, rule_id) for name, value in matchers)


def _holds(name: str, value: str, event: Event, rule_id: str) -> bool:
    if name == "rule":
        return rule_id == value
    if name == "iccid":
        return event.iccid == value
    if name == "tag":
        return value in event.tags
    # endpoint: its id, or its name when the value is not a number
    if value.isdigit():
        return event.endpoint_id == int(value)
    return event.endpoint_name == value


def silenced_by_store(silence: Silence) -> str:
    """How a match a silence covered is recorded."""
    return f"silenced by #{silence.id} ({silence.comment})"


@dataclass(frozen=True, slots=True)
class Quiet:
    """The silences in force for one batch: those from the store active at the time it is
    judged or later (`now`), and a check of the mute windows. `reason` says why a match is
    silenced, or None."""

    silences: tuple[Silence, ...]
    now: datetime | None  # None: the event's time only (replay, `event-engine test`)
    windows: Sequence[MuteCheck] = ()

    def reason(self, event: Event, rule_id: str) -> str | None:
        moments = (event.timestamp,) if self.now is None else (event.timestamp, self.now)
        for silence in self.silences:
            if any(silence.active_at(m) for m in moments) and covers(
                silence.matchers, event, rule_id
            ):
                return silenced_by_store(silence)
        for window in self.windows:
            if covers(window.matchers, event, rule_id) and any(window.open_at(m) for m in moments):
                return window.describe()
        return None


class MuteCheck(Protocol):
    """A recurring mute window as the core asks it: its matchers, whether it is open at a
    moment, and how a match it silenced is recorded (`engine.mute_windows` builds them)."""

    @property
    def matchers(self) -> tuple[tuple[str, str], ...]: ...

    def open_at(self, moment: datetime) -> bool: ...

    def describe(self) -> str: ...


# What the pipeline asks at the start of each batch: the silences in force at `now`.
QuietSource = Callable[[datetime], Quiet]
