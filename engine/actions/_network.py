"""What `block_current_network` and `unblock_network` share: the endpoint's operator
blacklist, `PUT|DELETE /api/v1/endpoint/{id}/operator_blacklist/{operator_id}` (204; a PUT
of an operator there already answers 409 `Duplicated`, emnify-api.md §6.5 [CASS]).

The operator is the event's own network, as emnify's "block current network" no-code
action takes it (§13 [PD no-code.md]): the `detail` of a location update (types 1, 2) or a
data session (3, 5) is the operator `{id, name, country, ...}`; a PDP context's
`operator_id` (a string on Create) is the fallback. It is read when the action is planned,
so a follow-up (`after: 24h, do: {unblock_network: {}}`) unblocks the network the same event
named. Read first, changed only when needed. Not a status change: the loop breaker does not
count it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import orjson

from engine.actions.base import Action, ActionContext, ActionParams, Lane, Parameter
from engine.errors import ActionError, ConfigError, Location


@dataclass(slots=True)  # read-only by convention: one is built per planned action
class NetworkParams(ActionParams):
    operator_id: int
    operator: str | None = None  # its name, for the outcome and the audit log


def operator_of(event: Any) -> tuple[int, str | None] | None:
    """The operator (id, name) an event's `detail` names, or None."""
    detail = event.get("detail") if isinstance(event, Mapping) else None
    if isinstance(detail, str):
        try:
            detail = orjson.loads(detail)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(detail, Mapping):
        return None
    name = detail.get("name") if isinstance(detail.get("name"), str) else None
    ident = detail.get("id")
    if (
        isinstance(ident, int)
        and not isinstance(ident, bool)
        and ("name" in detail or "mnc" in detail)
    ):
        return ident, name
    context = detail.get("pdp_context")
    found = context.get("operator_id") if isinstance(context, Mapping) else None
    if isinstance(found, str) and found.isdigit():
        return int(found), name
    if isinstance(found, int) and not isinstance(found, bool):
        return found, name
    return None


@dataclass(frozen=True)
class ChangeBlacklist(Action):
    blocked: ClassVar[bool]
    parameters = (Parameter("operator_id", "default: the event's network"),)
    params_type = NetworkParams
    needs = "endpoint"
    lane = Lane.ENDPOINT
    looks_first = True

    operator_id: int | None

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: Location) -> Self:
        operator_id = params.get("operator_id")
        if operator_id is not None and (
            isinstance(operator_id, bool) or not isinstance(operator_id, int)
        ):
            raise ConfigError(f"`{cls.kind}.operator_id` must be a whole number", where)
        return cls(operator_id)

    def params_for(self, template_context: Mapping[str, Any]) -> NetworkParams:
        if self.operator_id is not None:
            return NetworkParams(self.operator_id)
        found = operator_of(template_context.get("event"))
        if found is None:
            raise ActionError(f"{self.kind}: the event names no network (no operator in detail)")
        return NetworkParams(*found)

    @classmethod
    def _endpoint_id(cls, ctx: ActionContext) -> int:
        if ctx.target.endpoint_id is None:
            raise ActionError(f"{cls.kind}: no endpoint_id in the target")
        return ctx.target.endpoint_id

    @classmethod
    async def effect(cls, params: NetworkParams, ctx: ActionContext) -> str | None:
        listed = params.operator_id in await ctx.emnify.operator_blacklist(cls._endpoint_id(ctx))
        return "already" if listed is cls.blocked else None

    @classmethod
    async def run(cls, params: NetworkParams, ctx: ActionContext) -> str:
        await ctx.emnify.set_operator_blacklisted(
            cls._endpoint_id(ctx), params.operator_id, cls.blocked
        )
        name = f" ({params.operator})" if params.operator else ""
        return f"{'blocked' if cls.blocked else 'unblocked'} operator {params.operator_id}{name}"
