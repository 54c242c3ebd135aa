"""`send_sms`: send an MT-SMS to the event's endpoint, with a templated payload.

An SMS cannot be taken back, so a retry never resends blindly: from the second attempt on,
`effect` searches the endpoint's SMS list for the message an earlier attempt may have sent
(same payload, submitted since the first attempt, not one another intent already accounted
for). The dispatcher lets `settle_time` pass after an attempt before the next one looks, so
a request emnify was still working on when the answer timed out has landed by then.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Self

from engine.actions.base import (
    Action,
    ActionContext,
    ActionParams,
    Lane,
    Parameter,
    fields_from_json,
)
from engine.errors import ActionError, ConfigError, EventFormatError, Location
from engine.events import parse_timestamp
from engine.templates import TemplateValue

_MAX_PAYLOAD = 1600  # ten concatenated parts; the API takes one call per 160 characters
_CLOCK_SKEW = timedelta(seconds=60)  # between our clock and emnify's `submit_date`
_SMS_ID = re.compile(r"\bsms (\d+)")  # in outcomes: "sent sms 17", "already sms 17"


@dataclass(slots=True)  # read-only by convention: one is built per planned action
class Sms(ActionParams):
    """The message as emnify's `POST /endpoint/{id}/sms` takes it."""

    payload: str
    source_address: str | int | None = None
    source_address_type: int | None = None  # sent as {"id": N}
    dcs: int | None = None
    expiry_date: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = ActionParams.to_json(self)
        if self.source_address_type is not None:
            out["source_address_type"] = {"id": self.source_address_type}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        kind = data.get("source_address_type") if isinstance(data, Mapping) else None
        if isinstance(kind, Mapping):
            data = {**data, "source_address_type": kind.get("id")}
        return fields_from_json(cls, data)


@dataclass(frozen=True)
class SendSms(Action):
    kind = "send_sms"
    summary = (
        "sends an MT-SMS to the endpoint; a retry first looks for the SMS an earlier attempt"
        " may have sent"
    )
    parameters = (
        Parameter("payload", "template", required=True),
        Parameter("source_address"),
        Parameter("source_address_type"),
        Parameter("dcs"),
        Parameter("expiry_date"),
    )
    params_type = Sms
    needs = "endpoint"
    lane = Lane.ENDPOINT
    repeatable = False
    unclear = "the SMS may have gone out"

    payload: TemplateValue
    source_address: str | int | None
    source_address_type: int | None
    dcs: int | None
    expiry_date: str | None

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: Location) -> Self:
        payload = params["payload"]
        if not isinstance(payload, str) or not payload:
            raise ConfigError("`send_sms.payload` must be a non-empty string", where)
        if len(payload) > _MAX_PAYLOAD:
            raise ConfigError(f"`send_sms.payload` is longer than {_MAX_PAYLOAD} characters", where)
        return cls(
            TemplateValue(payload, where, "send_sms.payload"),
            _typed(params, "source_address", (str, int), "a string or a number", where),
            _source_address_type(params.get("source_address_type"), where),
            _typed(params, "dcs", (int,), "a number (0 GSM-7, 8 UCS2)", where),
            _typed(params, "expiry_date", (str,), "an ISO 8601 timestamp", where),
        )

    def params_for(self, template_context: Mapping[str, Any]) -> Sms:
        return Sms(
            str(self.payload.render(template_context)),
            self.source_address,
            self.source_address_type,
            self.dcs,
            self.expiry_date,
        )

    @classmethod
    async def effect(cls, params: Sms, ctx: ActionContext) -> str | None:
        """The SMS an earlier attempt sent, if one is found."""
        found = await _already_sent(_endpoint_id(ctx), params, ctx)
        if found is None:
            return None
        return f"already sms {found}" if found else "already"

    @classmethod
    async def run(cls, params: Sms, ctx: ActionContext) -> str:
        sms_id = await ctx.emnify.send_sms(_endpoint_id(ctx), params.to_json())
        return f"sent sms {sms_id}" if sms_id is not None else "sent"


def _endpoint_id(ctx: ActionContext) -> int:
    if ctx.target.endpoint_id is None:
        raise ActionError("send_sms: no endpoint_id in the target")
    return ctx.target.endpoint_id


async def _already_sent(endpoint_id: int, params: Sms, ctx: ActionContext) -> int | None:
    """The id of the SMS an earlier attempt sent (0 if it has none), or None."""
    since = (ctx.first_attempt_at or ctx.created_at) - _CLOCK_SKEW
    taken = {int(m.group(1)) for text in ctx.sibling_outcomes if (m := _SMS_ID.search(text))}
    for sms in await ctx.emnify.list_sms(endpoint_id):
        if sms.get("payload") != params.payload:
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


def _typed(
    params: Mapping[str, Any], name: str, types: tuple[type, ...], what: str, where: Location
) -> Any:
    value = params.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
        raise ConfigError(f"`send_sms.{name}` must be {what}, got {value!r:.60}", where)
    return value


def _source_address_type(value: Any, where: Location) -> int | None:
    """`145`, or as the API writes it, `{id: 145}`."""
    if value is None:
        return None
    if isinstance(value, Mapping) and set(value) == {"id"}:
        value = value["id"]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            "`send_sms.source_address_type` must be a type id: 145 international, 161"
            " national, 208 alphanumeric",
            where,
        )
    return value
