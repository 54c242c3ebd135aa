"""The four status actions share one shape: read the status, change it only if needed.

A PATCH that got no clear answer (timeout, dropped connection, 5xx) may have been applied.
It is never sent again blindly: the status is read back at once, and if it is not yet the
wanted one the failure goes to the dispatcher, whose next attempt again reads first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

from engine.actions.base import (
    Action,
    ActionContext,
    PlannedAction,
    check_params,
    may_have_taken_effect,
)
from engine.errors import ActionError, ApiError, Location

CONFIRMED = "done (read back after an unclear answer)"


class StatusChange(Action):
    """Ensure a SIM or endpoint has a given status ("ensure suspended", not "suspend")."""

    status_id: ClassVar[int]

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: Location) -> Self:
        check_params(cls.kind, params or {}, where, allowed=())
        return cls()

    @classmethod
    async def run(cls, planned: PlannedAction, ctx: ActionContext) -> str:
        key = "sim_id" if cls.needs == "sim" else "endpoint_id"
        target_id = planned.target.get(key)
        if not isinstance(target_id, int):
            raise ActionError(f"{cls.kind}: no {key} in the target")
        if await cls._has_status(ctx, target_id):
            return "already"
        try:
            if cls.needs == "sim":
                await ctx.client.set_sim_status(target_id, cls.status_id)
            else:
                await ctx.client.set_endpoint_status(target_id, cls.status_id)
        except ApiError as error:
            if not may_have_taken_effect(error):
                raise
            try:
                applied = await cls._has_status(ctx, target_id)
            except ApiError:
                raise error from None  # still unclear: the next attempt reads first
            if applied:
                return CONFIRMED
            raise
        return "done"

    @classmethod
    async def _has_status(cls, ctx: ActionContext, target_id: int) -> bool:
        if cls.needs == "sim":
            current = await ctx.client.get_sim(target_id)
        else:
            current = await ctx.client.get_endpoint(target_id)
        status = current.get("status")
        return isinstance(status, dict) and status.get("id") == cls.status_id
