"""A loaded rule, as the rest of the engine sees it: typed, frozen, checked.

Everything here comes out of the loader already validated; nothing downstream reads the
YAML again. `when` lives in `when.py` (it also knows how to test an event), the condition
in `condition.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from engine.actions import Action
from engine.errors import Location
from engine.rules.condition import Condition
from engine.rules.when import When
from engine.usage import UsageLimit

Mode = Literal["live", "shadow"]
MODES: tuple[Mode, ...] = ("live", "shadow")


@dataclass(frozen=True, slots=True)
class CancelIf:
    """On a follow-up step: drop the step if a later event matches this before it is due."""

    when: When
    condition: Condition | None
    where: Location


@dataclass(frozen=True, slots=True)
class ActionStep:
    """One entry of a rule's `actions` list. `after` is set for a delayed follow-up."""

    kind: str
    action: Action
    index: int
    after: timedelta | None
    cancel_if: CancelIf | None
    where: Location


@dataclass(frozen=True, slots=True)
class Threshold:
    """Fire only when `count` matching events arrive within `within` (per `per`, if set)."""

    count: int
    within: timedelta
    per: str | None


@dataclass(frozen=True, slots=True)
class Throttle:
    """After firing, stay quiet for `period` (per `per`, if set). YAML: `for: 1h`."""

    period: timedelta
    per: str | None


@dataclass(frozen=True, slots=True)
class Absence:
    """Fire once when a key that was seen has had no matching event for `period` (YAML:
    `for`), judged on event time known to be complete; re-arm when it is seen again; forget
    keys silent for `forget_after`. `keys` are keys watched from the start, so a device
    that never reported is caught too."""

    period: timedelta
    per: str
    forget_after: timedelta
    keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MaxActions:
    """A guard: at most `count` actions of this rule within `within`."""

    count: int
    within: timedelta


@dataclass(frozen=True, slots=True)
class Digest:
    """A scheduled digest: the rule collects its matching events instead of acting on each,
    and at every fire time of the rule's `schedule` hands the list to its actions.

    `max_events` caps the list the templates see (`count` still tells the whole number);
    `include` keeps only those fields of each event (dotted paths, shape preserved);
    `send_empty` runs the actions even when nothing was collected; `timezone` is the zone
    the cron expression is read in."""

    max_events: int = 100
    include: tuple[str, ...] | None = None
    send_empty: bool = False
    timezone: str = "UTC"


@dataclass(frozen=True, slots=True, eq=False)
class Rule:
    """One operator rule. Rules compare by identity; state is keyed on `id`."""

    id: str
    description: str
    enabled: bool
    mode: Mode
    when: When
    condition: Condition | None
    condition_source: Any
    actions: tuple[ActionStep, ...]
    where: Location
    threshold: Threshold | None = None
    throttle: Throttle | None = None
    schedule: str | None = None  # a crontab expression; set together with `digest`
    digest: Digest | None = None
    max_actions: MaxActions | None = None
    on_guard_trip: tuple[ActionStep, ...] = ()
    # Whether the rule judges the engine's own echoes (events its status actions caused).
    on_own_actions: bool = False
    absence: Absence | None = None
    # Facts fetched for the event's endpoint before `lookup_condition` is judged
    # (`engine.lookups`); a rule with `lookup` matches on `when` alone and its condition
    # is judged by the pipeline, on the event with the facts under `lookup`.
    lookup: tuple[str, ...] = ()
    lookup_condition: Condition | None = None
    on_lookup_error: Literal["act", "skip"] = "skip"
    # Set on a rule fed by usage records instead of events (`engine.usage`): it judges
    # those only, its `condition` on the record, and fires when their sum crosses the limit.
    usage: UsageLimit | None = None
    # The organisation (`organisations:` in the config) whose events alone it judges; None:
    # every organisation's. Set by `organisation:` or by the organisation's rule folder.
    organisation: str | None = None
    # The rule as written (plain data), so a reload can tell a changed rule from an
    # unchanged one without comparing compiled objects.
    definition: Mapping[str, Any] | None = None
