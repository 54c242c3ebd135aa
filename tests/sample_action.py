"""A throw-away action kind, written as a module in `engine/actions/` would be: the proof in
`tests/test_action_registry.py` that adding a kind takes this one file.

`tag_device` adds a tag to the event's endpoint in a device registry reached over HTTP
(in the tests, the simulator's admin API). The registry's address is a secret, so the
daemon refuses to start without it; the tag is a template; the current tags are read
first (`looks_first`), so a device tagged already counts as done, and tags of one endpoint
are changed one after another (`Lane.ENDPOINT`), never read and written crosswise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import orjson

from engine import secrets
from engine.actions.base import Action, ActionContext, ActionParams, Lane, Parameter, require_str
from engine.errors import ActionError, ConfigError, Location
from engine.ports import ReceiverError
from engine.templates import TemplateValue

_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Tagging(ActionParams):
    registry: str  # `${NAME}`, expanded only when the call is made
    tag: str


@dataclass(frozen=True)
class TagDevice(Action):
    kind = "tag_device"
    summary = "adds a tag to the endpoint in the device registry"
    parameters = (
        Parameter("registry", "`${NAME}` of the registry's URL", required=True),
        Parameter("tag", "template", required=True),
    )
    params_type = Tagging
    needs = "endpoint"
    lane = Lane.ENDPOINT
    looks_first = True

    registry: str
    tag: TemplateValue

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: Location) -> Self:
        registry = require_str(cls.kind, params, "registry", where) or ""
        if not secrets.is_reference_only(registry):
            raise ConfigError(
                "`tag_device.registry` must be a secret, e.g. ${DEVICE_REGISTRY}", where
            )
        tag = require_str(cls.kind, params, "tag", where)
        if not tag or "," in tag:
            raise ConfigError("`tag_device.tag` must be one tag (no commas)", where)
        return cls(registry, TemplateValue(tag, where, "tag_device.tag"))

    def secret_names(self) -> tuple[str, ...]:
        return tuple(secrets.references(self.registry))

    def params_for(self, template_context: Mapping[str, Any]) -> Tagging:
        return Tagging(self.registry, str(self.tag.render(template_context)))

    @classmethod
    async def effect(cls, params: Tagging, ctx: ActionContext) -> str | None:
        return "already tagged" if params.tag in await _tags(params, ctx) else None

    @classmethod
    async def run(cls, params: Tagging, ctx: ActionContext) -> str:
        tags = [*await _tags(params, ctx), params.tag]
        await _call(params, ctx, "PUT", {"tags": ",".join(tags)})
        return f"tagged {params.tag}"


async def _tags(params: Tagging, ctx: ActionContext) -> list[str]:
    device = orjson.loads(await _call(params, ctx, "GET", None) or b"{}")
    return [t for t in str(device.get("tags") or "").split(",") if t]


async def _call(params: Tagging, ctx: ActionContext, method: str, body: Any) -> bytes | None:
    if ctx.target.endpoint_id is None:
        raise ActionError("tag_device: no endpoint_id in the target")
    try:
        url = f"{secrets.expand(params.registry)}/{ctx.target.endpoint_id}"
        answer = await ctx.receivers.call(method, url, headers={}, body=body, timeout=_TIMEOUT)
    except secrets.MissingSecretError as error:
        raise ActionError(f"tag_device: {error}") from None
    except ReceiverError as error:
        raise ActionError(f"tag_device: {error.reason}", retryable=error.retryable) from None
    if not 200 <= answer.status < 300:
        retryable = answer.status == 429 or answer.status >= 500
        raise ActionError(f"tag_device: HTTP {answer.status}", retryable=retryable)
    return answer.body
