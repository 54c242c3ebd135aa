"""What `change_service_profile` and `change_tariff_profile` share: ensure the endpoint's
profile, named by id or by name, then optionally reset its connectivity.

`PATCH /api/v1/endpoint/{id}` `{"service_profile": {"id": N}}` (or `tariff_profile`), 204
(emnify-api.md §6.2, §13 [OAS]). A name is resolved through `GET /api/v1/service_profile`
(or `tariff_profile`) once and kept by the client. A new policy reaches a device only when it
attaches again, up to a day later (§13, [PD] reset-connectivity warning), so
`reset_connectivity: true` resets it right after the change (`PATCH .../connectivity`). A
profile already in place on the first attempt is left alone, without a reset; on a later
attempt the earlier one may have made the change and failed before the reset, so the reset
is made then (resetting twice only makes the device attach again). A profile change is no
status change: the loop breaker does not count it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from engine.actions.base import Action, ActionContext, ActionParams, Lane, Parameter
from engine.errors import ActionError, ApiError, ConfigError, Location


@dataclass(slots=True)  # read-only by convention: one is built per planned action
class ProfileParams(ActionParams):
    id: int | None = None
    name: str | None = None
    reset_connectivity: bool = False


def endpoint_of(kind: str, ctx: ActionContext) -> int:
    if ctx.target.endpoint_id is None:
        raise ActionError(f"{kind}: no endpoint_id in the target")
    return ctx.target.endpoint_id


@dataclass(frozen=True)
class ChangeProfile(Action):
    profile_kind: ClassVar[str]  # "service_profile" or "tariff_profile"
    parameters = (
        Parameter("id", "profile id"),
        Parameter("name", "profile name, resolved once"),
        Parameter("reset_connectivity", "true: the device attaches again at once"),
    )
    params_type = ProfileParams
    needs = "endpoint"
    lane = Lane.ENDPOINT
    looks_first = True

    profile_id: int | None
    name: str | None
    reset_connectivity: bool

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: Location) -> Self:
        profile_id, name = params.get("id"), params.get("name")
        if (profile_id is None) == (name is None):
            raise ConfigError(f"`{cls.kind}` needs either `id` or `name` (one of them)", where)
        if profile_id is not None and (
            isinstance(profile_id, bool) or not isinstance(profile_id, int)
        ):
            raise ConfigError(f"`{cls.kind}.id` must be a whole number", where)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigError(f"`{cls.kind}.name` must be a profile's name", where)
        reset = params.get("reset_connectivity", False)
        if not isinstance(reset, bool):
            raise ConfigError(f"`{cls.kind}.reset_connectivity` must be true or false", where)
        return cls(profile_id, name, reset)

    def params_for(self, template_context: Mapping[str, Any]) -> ProfileParams:
        return ProfileParams(self.profile_id, self.name, self.reset_connectivity)

    @classmethod
    async def wanted_id(cls, params: ProfileParams, ctx: ActionContext) -> int:
        if params.id is not None:
            return params.id
        if params.name is None:
            raise ActionError(f"{cls.kind}: neither id nor name in the parameters")
        found = await ctx.emnify.profile_id(cls.profile_kind, params.name)
        if found is None:
            raise ActionError(f"{cls.kind}: no {_title(cls.profile_kind)} named {params.name!r}")
        return found

    @classmethod
    async def in_place(cls, params: ProfileParams, ctx: ActionContext) -> bool:
        endpoint = await ctx.emnify.get_endpoint(endpoint_of(cls.kind, ctx))
        current = endpoint.get(cls.profile_kind)
        current_id = current.get("id") if isinstance(current, dict) else None
        return current_id == await cls.wanted_id(params, ctx)

    @classmethod
    async def effect(cls, params: ProfileParams, ctx: ActionContext) -> str | None:
        if params.reset_connectivity and ctx.attempt > 1:
            return None  # the change may be in place without its reset: `run` sees to both
        return "already" if await cls.in_place(params, ctx) else None

    @classmethod
    async def run(cls, params: ProfileParams, ctx: ActionContext) -> str:
        endpoint_id = endpoint_of(cls.kind, ctx)
        wanted = await cls.wanted_id(params, ctx)
        changed = not (ctx.attempt > 1 and await cls.in_place(params, ctx))
        if changed:
            try:
                await ctx.emnify.update_endpoint(endpoint_id, {cls.profile_kind: {"id": wanted}})
            except ApiError as error:
                if not params.reset_connectivity:
                    raise  # the dispatcher reads the profile back when the answer was unclear
                # The reset must follow even if the change went through unanswered: the
                # next attempt looks at the profile, changes it if needed, then resets.
                raise ActionError(f"{cls.kind}: {error}", retryable=error.retryable) from None
        if not params.reset_connectivity:
            return f"set {wanted}"
        await ctx.emnify.reset_connectivity(endpoint_id, location=True, pdp_context=True)
        return f"set {wanted}, connectivity reset" if changed else "connectivity reset"


def _title(kind: str) -> str:
    return kind.replace("_", " ")
