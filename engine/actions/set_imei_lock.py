"""`set_imei_lock`: ensure the endpoint's IMEI lock is on (or off), so its SIM works only in
the device it is locked to.

`PATCH /api/v1/endpoint/{id}` `{"imei_lock": true}`, 204; `GET` shows `imei_lock`
(emnify-api.md §6.2, §13 [OAS, DOCS reference/endpoint]). Read first, written only when it
differs. Not a status change: the loop breaker does not count it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from engine.actions.base import Action, ActionContext, ActionParams, Lane, Parameter
from engine.errors import ActionError, ConfigError, Location


@dataclass(slots=True)  # read-only by convention: one is built per planned action
class ImeiLock(ActionParams):
    locked: bool = True


@dataclass(frozen=True)
class SetImeiLock(Action):
    kind = "set_imei_lock"
    summary = "ensures the endpoint's IMEI lock is on (or off with `locked: false`)"
    parameters = (Parameter("locked", "default true"),)
    params_type = ImeiLock
    needs = "endpoint"
    lane = Lane.ENDPOINT
    looks_first = True

    locked: bool

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: Location) -> Self:
        locked = params.get("locked", True)
        if not isinstance(locked, bool):
            raise ConfigError(f"`{cls.kind}.locked` must be true or false", where)
        return cls(locked)

    def params_for(self, template_context: Mapping[str, Any]) -> ImeiLock:
        return ImeiLock(self.locked)

    @classmethod
    async def effect(cls, params: ImeiLock, ctx: ActionContext) -> str | None:
        endpoint = await ctx.emnify.get_endpoint(_endpoint_id(ctx))
        return "already" if endpoint.get("imei_lock") is params.locked else None

    @classmethod
    async def run(cls, params: ImeiLock, ctx: ActionContext) -> str:
        await ctx.emnify.update_endpoint(_endpoint_id(ctx), {"imei_lock": params.locked})
        return "locked" if params.locked else "unlocked"


def _endpoint_id(ctx: ActionContext) -> int:
    if ctx.target.endpoint_id is None:
        raise ActionError("set_imei_lock: no endpoint_id in the target")
    return ctx.target.endpoint_id
