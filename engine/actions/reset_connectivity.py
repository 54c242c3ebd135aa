"""`reset_connectivity`: make the endpoint's device attach again, so a changed policy (a
profile, a quota) takes effect now rather than at its next attach, up to a day later.

`PATCH /api/v1/endpoint/{id}/connectivity` with `{"location": null}` (cancel the location)
and/or `{"pdp_context": null}` (delete the PDP context); 204, asynchronous; emnify logs
event 68 (emnify-api.md §6.5 [OAS, CASS]). There is no state to read back: a reset done
twice only makes the device attach twice, so a retry simply resets again. Not a status
change: the loop breaker does not count it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from engine.actions.base import Action, ActionContext, ActionParams, Lane, Parameter
from engine.errors import ActionError, ConfigError, Location


@dataclass(slots=True)  # read-only by convention: one is built per planned action
class Reset(ActionParams):
    location: bool = True
    pdp_context: bool = True


@dataclass(frozen=True)
class ResetConnectivity(Action):
    kind = "reset_connectivity"
    summary = (
        "makes the device attach again (location and/or PDP context) so a new policy applies now"
    )
    parameters = (
        Parameter("location", "default true"),
        Parameter("pdp_context", "default true"),
    )
    params_type = Reset
    needs = "endpoint"
    lane = Lane.ENDPOINT

    location: bool
    pdp_context: bool

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: Location) -> Self:
        location, pdp_context = params.get("location", True), params.get("pdp_context", True)
        if not isinstance(location, bool) or not isinstance(pdp_context, bool):
            raise ConfigError(f"`{cls.kind}.location` and `.pdp_context` are true or false", where)
        if not (location or pdp_context):
            raise ConfigError(f"`{cls.kind}` resets nothing with both set to false", where)
        return cls(location, pdp_context)

    def params_for(self, template_context: Mapping[str, Any]) -> Reset:
        return Reset(self.location, self.pdp_context)

    @classmethod
    async def run(cls, params: Reset, ctx: ActionContext) -> str:
        if ctx.target.endpoint_id is None:
            raise ActionError(f"{cls.kind}: no endpoint_id in the target")
        await ctx.emnify.reset_connectivity(
            ctx.target.endpoint_id, location=params.location, pdp_context=params.pdp_context
        )
        return "reset"
