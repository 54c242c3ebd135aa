"""`extend_traffic_limit`: ensure a traffic-limit extension of `volume` MB on the endpoint, a
temporary raise for a device blocked at its service profile's limit.

`POST /api/v1/endpoint/{id}/traffic_limit_extension` `{"volume": MB}`; `DELETE` reverts;
`GET` reads it (emnify-api.md §6.5, §13 [OAS; the api-evangelist Arazzo workflow
"extend-traffic-limit-when-blocked"]). The POST sets the extension, so it is read first
and written only when it differs: a retry or a replay sets the same extension again at most.
Not a status change: the loop breaker does not count it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from engine.actions._quota import parse_volume, read_number, same_volume
from engine.actions.base import Action, ActionContext, ActionParams, Lane, Parameter
from engine.errors import ActionError, ConfigError, Location


@dataclass(slots=True)  # read-only by convention: one is built per planned action
class Extension(ActionParams):
    volume: float


@dataclass(frozen=True)
class ExtendTrafficLimit(Action):
    kind = "extend_traffic_limit"
    summary = "ensures a traffic-limit extension of `volume` MB on the endpoint"
    parameters = (Parameter("volume", "MB", required=True),)
    params_type = Extension
    needs = "endpoint"
    lane = Lane.ENDPOINT
    looks_first = True

    volume: float

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: Location) -> Self:
        volume = parse_volume(cls.kind, params, where)
        if volume <= 0:
            raise ConfigError(f"`{cls.kind}.volume` must be more than 0", where)
        return cls(volume)

    def params_for(self, template_context: Mapping[str, Any]) -> Extension:
        return Extension(self.volume)

    @classmethod
    async def effect(cls, params: Extension, ctx: ActionContext) -> str | None:
        current = await ctx.emnify.traffic_limit_extension(_endpoint_id(ctx))
        volume = None if current is None else read_number(current.get("volume"))
        return "already" if same_volume(volume, params.volume) else None

    @classmethod
    async def run(cls, params: Extension, ctx: ActionContext) -> str:
        await ctx.emnify.extend_traffic_limit(_endpoint_id(ctx), params.volume)
        return "extended"


def _endpoint_id(ctx: ActionContext) -> int:
    if ctx.target.endpoint_id is None:
        raise ActionError("extend_traffic_limit: no endpoint_id in the target")
    return ctx.target.endpoint_id
