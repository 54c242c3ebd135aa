"""The four status actions share one shape: read the status, change it only if needed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

from engine.actions.base import Action, ActionContext, PlannedAction, check_params
from engine.errors import ActionError, Location


class StatusChange(Action):
    """Ensure a SIM or endpoint has a given status ("ensure suspended", not "suspend")."""

    status_id: ClassVar[int]
    status_name: ClassVar[str]

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
        if cls.needs == "sim":
            current = await ctx.client.get_sim(target_id)
        else:
            current = await ctx.client.get_endpoint(target_id)
        status = current.get("status")
        if isinstance(status, dict) and status.get("id") == cls.status_id:
            return "already"
        if cls.needs == "sim":
            await ctx.client.set_sim_status(target_id, cls.status_id)
        else:
            await ctx.client.set_endpoint_status(target_id, cls.status_id)
        return "done"
