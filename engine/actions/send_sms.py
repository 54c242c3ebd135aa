"""`send_sms`: send an MT-SMS to the event's endpoint, with a templated payload.

An SMS cannot be taken back, so a retry never resends blindly: from the second attempt on,
the endpoint's SMS list is searched for the message an earlier attempt may have sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Self

from engine.actions.base import Action, ActionContext, PlannedAction, check_params
from engine.errors import ActionError, ConfigError, EventFormatError, Location
from engine.events import parse_timestamp
from engine.templates import TemplateValue

_MAX_PAYLOAD = 1600  # ten concatenated parts; the API takes one call per 160 characters


class SendSms(Action):
    kind = "send_sms"
    needs = "endpoint"

    def __init__(self, payload: TemplateValue, extra: dict[str, Any]):
        self._payload = payload
        self._extra = extra

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: Location) -> Self:
        check_params(
            cls.kind,
            params,
            where,
            allowed=("payload", "source_address", "source_address_type", "dcs", "expiry_date"),
            required=("payload",),
        )
        payload = params["payload"]
        if not isinstance(payload, str) or not payload:
            raise ConfigError("`send_sms.payload` must be a non-empty string", where)
        if len(payload) > _MAX_PAYLOAD:
            raise ConfigError(f"`send_sms.payload` is longer than {_MAX_PAYLOAD} characters", where)
        extra = {k: v for k, v in params.items() if k != "payload"}
        if "source_address_type" in extra and isinstance(extra["source_address_type"], int):
            extra["source_address_type"] = {"id": extra["source_address_type"]}
        return cls(TemplateValue(payload, where, "send_sms.payload"), extra)

    def render(self, template_context: Mapping[str, Any]) -> dict[str, Any]:
        return {"payload": str(self._payload.render(template_context)), **self._extra}

    @classmethod
    async def run(cls, planned: PlannedAction, ctx: ActionContext) -> str:
        endpoint_id = planned.target.get("endpoint_id")
        if not isinstance(endpoint_id, int):
            raise ActionError("send_sms: no endpoint_id in the target")
        if ctx.attempt > 1 and await cls._already_sent(endpoint_id, planned, ctx):
            return "already"
        sms_id = await ctx.client.send_sms(endpoint_id, planned.params)
        return f"sent sms {sms_id}" if sms_id is not None else "sent"

    @staticmethod
    async def _already_sent(endpoint_id: int, planned: PlannedAction, ctx: ActionContext) -> bool:
        # Same payload, submitted after this intent was created (minus clock skew).
        since = ctx.created_at - timedelta(seconds=60)
        for sms in await ctx.client.list_sms(endpoint_id):
            if sms.get("payload") != planned.params.get("payload"):
                continue
            submitted = sms.get("submit_date") or sms.get("submitted")
            try:
                if submitted is None or parse_timestamp(submitted) >= since:
                    return True
            except EventFormatError:
                return True
        return False
