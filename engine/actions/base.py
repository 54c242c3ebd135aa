"""What every action kind is: its parameters, its plan (pure), its effect check and its run.

An action kind is one module holding one `Action` subclass:

- the rule's parameters, checked once at load: the class is a frozen dataclass of them,
  built by `parse` (names are checked against `parameters` first, with a did-you-mean);
- `params_for`: those parameters rendered for one event, as an `ActionParams`
  dataclass that goes to the outbox as JSON (`to_json`) and comes back as the same type
  (`from_json`) for `run`;
- `lane`: which target's actions run one after another (the SIM, the endpoint, or none);
- `secret_names`: the `${NAME}`s its parameters reference, checked at start-up;
- `effect`: whether what it does is in place already, asked before an attempt that may
  follow one that took effect, and right after an emnify call that got no clear answer;
- `run`: the call itself, through the ports in `engine.ports` (no HTTP library here).

The registry (`engine.actions.ACTIONS`) finds the class by itself; nothing else names it.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Self, TypeVar

from engine.errors import ActionError, ConfigError, Location
from engine.events import Event
from engine.ports import EmnifyCalls, Receivers


class Lane(enum.Enum):
    """Which target's intents run one after another, in their planned order, so a
    follow-up "activate again" never overtakes the "suspend" it follows."""

    SIM = "sim"  # per SIM (per endpoint when the target has no SIM)
    ENDPOINT = "endpoint"  # per endpoint
    OWN = "own"  # each intent alone: it changes nothing a sibling reads


@dataclass(frozen=True, slots=True)
class Parameter:
    """One parameter a rule may give an action; the docs table shows `note` in brackets."""

    name: str
    note: str = ""
    required: bool = False


class ActionParams:
    """Base of an action's planned parameters: a dataclass of JSON values (read-only by
    convention: one is built for every action planned, and a frozen dataclass costs several
    times as much to build).

    The outbox keeps `to_json()` (the fields in order, None left out) and the dispatcher
    reads it back with `from_json` (unknown keys ignored, missing ones take their default),
    so a row written by an earlier version still loads. Override both when the JSON shape
    differs from the fields."""

    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        return {
            name: value
            for name in _field_names(type(self))
            if (value := getattr(self, name)) is not None
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """Raises TypeError or ValueError when `data` cannot be these parameters."""
        return fields_from_json(cls, data)


P = TypeVar("P", bound=ActionParams)


def fields_from_json(cls: type[P], data: Mapping[str, Any]) -> P:
    """`cls` from the JSON object `data`, field by field: what `ActionParams.from_json`
    does, for overrides to call (`super()` fails in a slotted dataclass)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"expected an object, got {type(data).__name__}")
    return cls(**{name: data[name] for name in _field_names(cls) if name in data})


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


@dataclass(slots=True)  # read-only by convention: one is built per planned action
class NoParams(ActionParams):
    """For actions whose target says everything (`suspend_sim`)."""


@dataclass(frozen=True, slots=True)
class Target:
    """What an intent aims at, from the event that planned it (none for a digest)."""

    sim_id: int | None = None
    endpoint_id: int | None = None
    iccid: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Target:
        sim_id, endpoint_id, iccid = data.get("sim_id"), data.get("endpoint_id"), data.get("iccid")
        return cls(
            sim_id if isinstance(sim_id, int) else None,
            endpoint_id if isinstance(endpoint_id, int) else None,
            iccid if isinstance(iccid, str) else None,
        )


@dataclass(slots=True)  # read-only by convention: frozen triples the cost of building one
class PlannedAction:
    """An action with its parameters rendered for one event, as the outbox stores it."""

    kind: str
    params: dict[str, Any]
    target: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ActionContext:
    """What a running action may use.

    `attempt` counts every attempt ever started for this intent, from 1, across crashes and
    `dead-letters retry`: above 1 the action may already have taken effect. For actions that
    cannot be repeated, `first_attempt_at` is when the first of them started, and
    `sibling_outcomes` the outcomes other intents of the same kind recorded on the same
    target since then (so an effect one of them caused is not mistaken for this one's).
    `last_error` is what the previous attempt recorded: an action may write there what it
    was about to do (`top_up_data_quota` keeps the volume it set, so a retry never adds
    twice).
    """

    emnify: EmnifyCalls
    receivers: Receivers
    target: Target
    idempotency_key: str
    attempt: int
    created_at: datetime
    first_attempt_at: datetime | None = None
    sibling_outcomes: tuple[str, ...] = ()
    last_error: str | None = None


class Action(ABC):
    """One action kind; an instance is one rule's use of it, its parameters checked.

    Subclasses set the class attributes below and implement `parse`, `params_for` and
    `run` (and `effect` when what they do can be looked up). Their methods take their own
    `ActionParams` subclass where this base says `Any`.
    """

    kind: ClassVar[str]
    summary: ClassVar[str]  # one line for the README's table: what it does
    parameters: ClassVar[tuple[Parameter, ...]] = ()
    params_type: ClassVar[type[ActionParams]] = NoParams
    lane: ClassVar[Lane] = Lane.OWN
    # "sim" or "endpoint" when the action needs that id from the event.
    needs: ClassVar[str | None] = None
    # Counted by the blast-radius guard.
    destructive: ClassVar[bool] = False
    # The event types emnify logs once this action changed something (a "SIM suspension"
    # after `suspend_sim`): the engine's own echoes, recognized by `engine.echoes`. An action
    # that causes any is a status change, counted by the loop breaker on its target.
    causes: ClassVar[frozenset[int]] = frozenset()
    # False when running it twice would do it twice (an SMS): the dispatcher then waits
    # `settle_time` after an attempt before the next one, which looks (`effect`) first.
    repeatable: ClassVar[bool] = True
    # True when what it does may be in place before any attempt (a SIM someone else
    # suspended): `effect` is then asked before the first attempt too.
    looks_first: ClassVar[bool] = False
    # For an action that cannot be repeated, what an unclear failure means, for its error.
    unclear: ClassVar[str] = "it may have taken effect"
    # True when the action calls a receiver outside emnify (a webhook): the dispatcher runs
    # such calls in their own slots, a few at a time per `destination`, so a slow receiver
    # never holds the slots that SIM and endpoint actions need.
    calls_out: ClassVar[bool] = False

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: Location) -> Self:
        """The rule's parameters, checked: names against `parameters`, the rest by `parse`;
        ConfigError naming the field and the fix."""
        params = {} if params is None else params
        _check_names(cls, params, where)
        action = cls.parse(params, where)
        for name in action.secret_names():
            if not name.isupper():
                raise ConfigError(
                    f"`${{{name}}}`: secret names are upper-case environment variables", where
                )
        return action

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: Location) -> Self:
        """Build the action from parameters whose names are known; raise ConfigError."""
        return cls()

    def secret_names(self) -> tuple[str, ...]:
        """The `${NAME}` secrets the parameters reference, read when the action runs: the
        daemon refuses to start while one is unset."""
        return ()

    def plan(self, event: Event, template_context: Mapping[str, Any]) -> PlannedAction:
        """Render this action for `event`; raise ActionError when the event cannot carry it."""
        if self.needs == "sim" and event.sim_id is None:
            raise ActionError(f"{self.kind}: the event has no sim.id to act on")
        if self.needs == "endpoint" and event.endpoint_id is None:
            raise ActionError(f"{self.kind}: the event has no endpoint.id to act on")
        return PlannedAction(self.kind, self.render(template_context), event.target())

    def render(self, template_context: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters for this context as the outbox stores them."""
        return self.params_for(template_context).to_json()

    def params_for(self, template_context: Mapping[str, Any]) -> ActionParams:
        """The parameters rendered for one event (or a digest's events); ActionError when
        a template fails."""
        return NoParams()

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> Any:
        """The outbox's JSON back as this kind's `params_type`; TypeError or ValueError
        when it cannot be."""
        return cls.params_type.from_json(data)

    @classmethod
    def destination(cls, params: Any) -> str:
        """Whom an action that calls out calls (e.g. scheme, host and port): calls to one
        destination share its cap. Never a secret's value."""
        return cls.kind

    @classmethod
    async def effect(cls, params: Any, ctx: ActionContext) -> str | None:
        """The outcome to record when what the action does is in place already ("already"),
        else None. Raise ApiError/ActionError when it cannot be told."""
        return None

    @classmethod
    @abstractmethod
    async def run(cls, params: Any, ctx: ActionContext) -> str:
        """Carry the action out; return the outcome ("done", "sent sms 17", ...) or raise
        ActionError (retryable or not) / ApiError."""


def _check_names(cls: type[Action], params: Mapping[str, Any], where: Location) -> None:
    """Reject unknown and missing parameter names, with a did-you-mean hint."""
    if not isinstance(params, Mapping):
        raise ConfigError(
            f"`{cls.kind}` takes a mapping of parameters, got {type(params).__name__}", where
        )
    allowed = [p.name for p in cls.parameters]
    for name in params:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), allowed, n=1)
            hint = f"did you mean `{close[0]}`?" if close else _allowed_hint(allowed)
            raise ConfigError(f"`{cls.kind}` has no parameter `{name}`", where, hint)
    for parameter in cls.parameters:
        if parameter.required and parameter.name not in params:
            raise ConfigError(f"`{cls.kind}` needs the parameter `{parameter.name}`", where)


def _allowed_hint(allowed: list[str]) -> str:
    if not allowed:
        return "this action takes no parameters: write `{}`"
    return "allowed: " + ", ".join(f"`{a}`" for a in sorted(allowed))


def require_str(kind: str, params: Mapping[str, Any], name: str, where: Location) -> str | None:
    value = params.get(name)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"`{kind}.{name}` must be a string, got {type(value).__name__}", where)
    return value
