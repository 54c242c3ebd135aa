"""`send_sms`: send an MT-SMS to the event's endpoint, with a templated payload.

An SMS cannot be taken back, so a retry never resends blindly: from the second attempt on,
the endpoint's SMS list is searched for the message an earlier attempt may have sent (same
payload, submitted since the first attempt, not one another intent already accounted for).
The dispatcher lets `settle_time` pass after an attempt before the next one looks, so a
request emnify was still working on when the answer timed out has landed by then.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Self

from engine.actions.base import (
    Action,
    ActionContext,
    PlannedAction,
    check_params,
    may_have_taken_effect,
)
from engine.errors import ActionError, ApiError, ConfigError, EventFormatError, Location
from engine.events import parse_timestamp
from engine.templates import TemplateValue

_MAX_PAYLOAD = 1600  # ten concatenated parts; the API takes one call per 160 characters
_CLOCK_SKEW = timedelta(seconds=60)  # between our clock and emnify's `submit_date`
_SMS_ID = re.compile(r"\bsms (\d+)")  # in outcomes: "sent sms 17", "already sms 17"


class SendSms(Action):
    kind = "send_sms"
    needs = "endpoint"
    repeatable = False

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
        if ctx.attempt > 1:
            found = await cls._already_sent(endpoint_id, planned, ctx)
            if found is not None:
                return f"already sms {found}" if found else "already"
        try:
            sms_id = await ctx.client.send_sms(endpoint_id, planned.params)
        except ApiError as error:
            if may_have_taken_effect(error):
                raise ActionError(
                    f"send_sms: {error}; the SMS may have gone out, so it will be looked for"
                    " before any resend",
                    retryable=True,
                ) from None
            raise
        return f"sent sms {sms_id}" if sms_id is not None else "sent"

    @staticmethod
    async def _already_sent(
        endpoint_id: int, planned: PlannedAction, ctx: ActionContext
    ) -> int | None:
        """The id of the SMS an earlier attempt sent (0 if it has none), or None."""
        since = (ctx.first_attempt_at or ctx.created_at) - _CLOCK_SKEW
        taken = {int(m.group(1)) for text in ctx.sibling_outcomes if (m := _SMS_ID.search(text))}
        for sms in await ctx.client.list_sms(endpoint_id):
            if sms.get("payload") != planned.params.get("payload"):
                continue
            sms_id = sms.get("id")
            if isinstance(sms_id, int) and sms_id in taken:
                continue  # another intent with the same text sent (or found) this one
            submitted = sms.get("submit_date") or sms.get("submitted")
            try:
                # Unreadable dates count as a match: a lost SMS beats a doubled one here.
                if submitted is not None and parse_timestamp(submitted) < since:
                    continue
            except EventFormatError:
                pass
            return sms_id if isinstance(sms_id, int) else 0
        return None
