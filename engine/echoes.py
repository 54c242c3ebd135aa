"""Never fight yourself: the engine's own echoes, and the loop breaker's settings.

emnify logs an event for every status change, the engine's own too: after a `suspend_sim`
comes a "SIM suspension" from source API (an application token's changes carry no user).
A rule that reacts to it reacts to the engine itself, and two such rules can toggle a SIM
for ever. So an event of a type one of our status actions causes, on a target one of them
changed within `Echoes.within` of the event's time, is that action's echo: the pipeline
marks it `caused_by: {rule, intent}` and only rules with `on_own_actions: true` judge it.

Which event types an action causes is the action's own `causes`; the status changes done are
read from the store (every instance of a cluster sees them), or in a replay, where nothing
runs, taken from what the replay planned.

The loop breaker counts the status changes planned on one SIM or endpoint across all rules;
past `max_changes` within `within` it holds the target's status actions until an operator
runs `event-engine rules resume sim:ID` or `hold_for` has passed (event time).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta

from engine.actions import ACTIONS, lane_of
from engine.events import SOURCES, Event
from engine.model import OwnStatusAction

_API_SOURCE = next(source for source, name in SOURCES.items() if name == "API")


@dataclass(frozen=True, slots=True)
class Echoes:
    """How far apart in time an event and the status change it echoes may be (either way:
    the platform's clock and ours may differ by a little)."""

    within: timedelta = timedelta(minutes=10)


@dataclass(frozen=True, slots=True)
class LoopBreaker:
    """More than `max_changes` status changes on one target within `within` hold its
    further status actions, for `hold_for` or until resumed."""

    max_changes: int = 4
    within: timedelta = timedelta(minutes=10)
    hold_for: timedelta = timedelta(hours=1)


DEFAULT_ECHOES = Echoes()
DEFAULT_LOOP_BREAKER = LoopBreaker()


def echo_kinds() -> dict[int, tuple[str, ...]]:
    """Per event type, the action kinds whose status change emnify logs as it."""
    kinds: dict[int, list[str]] = {}
    for kind, action in ACTIONS.items():
        for type_id in action.causes:
            kinds.setdefault(type_id, []).append(kind)
    return {type_id: tuple(found) for type_id, found in kinds.items()}


def status_target(kind: str, target: Mapping[str, object]) -> str | None:
    """The SIM or endpoint whose status an action of `kind` changes (`sim:ID`,
    `endpoint:ID`), or None when the action changes no status."""
    action = ACTIONS.get(kind)
    if action is None or not action.causes:
        return None
    return lane_of(kind, target)


def echo_targets(event: Event, kinds: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Which targets the event would be an echo on, with the kinds that would have caused
    it there; empty for an event from another source than the API (a Policy Control
    suspension is not ours)."""
    if event.source_id not in (None, _API_SOURCE):
        return {}
    targets: dict[str, list[str]] = {}
    for kind in kinds:
        target = lane_of(kind, event.target())
        if target is not None:
            targets.setdefault(target, []).append(kind)
    return {target: tuple(found) for target, found in targets.items()}


def nearest(actions: Iterable[OwnStatusAction], at: float, within: float) -> OwnStatusAction | None:
    """The status change closest in time to `at`, if one is within `within` seconds (on a
    tie, the later planned one)."""
    best: OwnStatusAction | None = None
    for action in actions:
        distance = abs(action.at - at)
        if distance <= within and (best is None or distance <= abs(best.at - at)):
            best = action
    return best


def describe(action: OwnStatusAction) -> str:
    """`intent 17 (rule R)`, as `why` shows an echo's cause."""
    intent = action.intent_id if action.intent_id is not None else action.idempotency_key
    return f"intent {intent} (rule {action.rule_id})"
