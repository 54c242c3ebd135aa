"""What every action kind shares: its config check, its plan (pure) and its run (I/O)."""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Self

from engine.errors import ActionError, ApiError, ConfigError, Location
from engine.events import Event

if TYPE_CHECKING:
    import httpx

    from engine.emnify import EmnifyClient


@dataclass(slots=True)  # read-only by convention: frozen triples the cost of building one
class PlannedAction:
    """An action with its parameters rendered for one event: what the outbox stores."""

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
    """

    client: EmnifyClient
    http: httpx.AsyncClient
    idempotency_key: str
    attempt: int
    created_at: datetime
    first_attempt_at: datetime | None = None
    sibling_outcomes: tuple[str, ...] = ()


class Action(ABC):
    """One action kind. Subclasses set `kind`, parse their params, and implement `run`."""

    kind: ClassVar[str]
    destructive: ClassVar[bool] = False
    # False when running it twice would do it twice (an SMS): the dispatcher then waits
    # `settle_time` after an attempt before the next one, which must look before it acts.
    repeatable: ClassVar[bool] = True
    # "sim" or "endpoint" when the action needs that id from the event.
    needs: ClassVar[str | None] = None
    # True when the action calls a receiver outside emnify (a webhook): the dispatcher runs
    # such calls in their own slots, a few at a time per `destination`, so a slow receiver
    # never holds the slots that SIM and endpoint actions need.
    calls_out: ClassVar[bool] = False

    @classmethod
    def destination(cls, planned: PlannedAction) -> str:
        """Whom an action that calls out calls (e.g. scheme, host and port): calls to one
        destination share its cap. Never a secret's value."""
        return cls.kind

    @classmethod
    @abstractmethod
    def from_params(cls, params: Mapping[str, Any], where: Location) -> Self:
        """Check the rule's parameters; raise ConfigError naming the field and the fix."""

    def plan(self, event: Event, template_context: Mapping[str, Any]) -> PlannedAction:
        """Render this action for `event`; raise ActionError when the event cannot carry it."""
        if self.needs == "sim" and event.sim_id is None:
            raise ActionError(f"{self.kind}: the event has no sim.id to act on")
        if self.needs == "endpoint" and event.endpoint_id is None:
            raise ActionError(f"{self.kind}: the event has no endpoint.id to act on")
        return PlannedAction(self.kind, self.render(template_context), event.target())

    def render(self, template_context: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters as they will be used; static actions have none."""
        return {}

    @classmethod
    @abstractmethod
    async def run(cls, planned: PlannedAction, ctx: ActionContext) -> str:
        """Carry the action out; return the outcome ("done", "already", ...) or raise
        ActionError (retryable or not) / ApiError."""


def check_params(
    kind: str,
    params: Mapping[str, Any],
    where: Location,
    *,
    allowed: Collection[str],
    required: Collection[str] = (),
) -> None:
    """Reject unknown and missing parameter names, with a did-you-mean hint."""
    if not isinstance(params, Mapping):
        raise ConfigError(
            f"`{kind}` takes a mapping of parameters, got {type(params).__name__}", where
        )
    for name in params:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), list(allowed), n=1)
            hint = f"did you mean `{close[0]}`?" if close else _allowed_hint(allowed)
            raise ConfigError(f"`{kind}` has no parameter `{name}`", where, hint)
    for name in required:
        if name not in params:
            raise ConfigError(f"`{kind}` needs the parameter `{name}`", where)


def _allowed_hint(allowed: Collection[str]) -> str:
    if not allowed:
        return "this action takes no parameters: write `{}`"
    return "allowed: " + ", ".join(f"`{a}`" for a in sorted(allowed))


def require_str(kind: str, params: Mapping[str, Any], name: str, where: Location) -> str | None:
    value = params.get(name)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"`{kind}.{name}` must be a string, got {type(value).__name__}", where)
    return value


def may_have_taken_effect(error: ApiError) -> bool:
    """Whether a failed call may still have done its work: no answer after the request went
    out (timeout, dropped connection) or a server-side failure. A 429, a 4xx or a connection
    that was never made mean it surely did not."""
    if error.status is None:
        # Imported here, not on top: the commands that only plan actions (`replay`,
        # `validate`, `test`) never load the client and httpx, a tenth of a second of a start.
        from engine.emnify.client import NOT_SENT

        return not isinstance(error.__cause__, NOT_SENT)
    return error.status >= 500
