"""The four status actions share one shape: ensure a status ("ensure suspended", not
"suspend"), so a SIM or endpoint already in it counts as done.

The status is read before every attempt (`looks_first`), and a PATCH that got no clear
answer (timeout, dropped connection, 5xx) is never sent again blindly: the dispatcher reads
the status back at once, and if it is not yet the wanted one the next attempt reads first.
"""

from __future__ import annotations

from typing import ClassVar

from engine.actions.base import Action, ActionContext, NoParams
from engine.errors import ActionError


class StatusChange(Action):
    """A SIM's (`needs = "sim"`) or an endpoint's status, set to `status_id`."""

    status_id: ClassVar[int]
    looks_first = True

    @classmethod
    async def effect(cls, params: NoParams, ctx: ActionContext) -> str | None:
        target_id = cls._target_id(ctx)
        if cls.needs == "sim":
            current = await ctx.emnify.get_sim(target_id)
        else:
            current = await ctx.emnify.get_endpoint(target_id)
        status = current.get("status")
        has_it = isinstance(status, dict) and status.get("id") == cls.status_id
        return "already" if has_it else None

    @classmethod
    async def run(cls, params: NoParams, ctx: ActionContext) -> str:
        target_id = cls._target_id(ctx)
        if cls.needs == "sim":
            await ctx.emnify.set_sim_status(target_id, cls.status_id)
        else:
            await ctx.emnify.set_endpoint_status(target_id, cls.status_id)
        return "done"

    @classmethod
    def _target_id(cls, ctx: ActionContext) -> int:
        if cls.needs == "sim":
            target_id, name = ctx.target.sim_id, "sim_id"
        else:
            target_id, name = ctx.target.endpoint_id, "endpoint_id"
        if target_id is None:
            raise ActionError(f"{cls.kind}: no {name} in the target")
        return target_id
