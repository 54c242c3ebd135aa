"""`top_up_data_quota`: add a volume to the endpoint's data quota, once per intent.

emnify has no "add" call: a top-up reads the quota and POSTs the sum as the new quota
(emnify-api.md §6.4). Read-add-write is not safe to repeat: an attempt whose POST got no
clear answer, retried blindly, would add the volume twice. So the top-up is keyed on its
intent: the first attempt fixes the volume it sets (what was left plus the top-up) and
writes it at the head of the error it records when anything goes wrong after that
("top_up_data_quota: setting the data quota to 620 MB: ..."). A later attempt of the same
intent reads that volume back instead of adding again: it counts as done when the quota
holds at least that much, and otherwise sets that same volume (a set, not an add: a late
first POST and this one land on the same quota). An attempt after one that left no such
record (a crash mid-call) does not guess: it fails for a person to look, since adding
again could double the top-up (a top-up missed beats one doubled, as for an SMS).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from engine.actions._quota import (
    ACTIVE,
    BLOCK,
    api_timestamp,
    endpoint_id,
    expiry_date,
    field,
    id_of,
    parse_expiry,
    parse_volume,
    read_number,
    wire_volume,
)
from engine.actions.base import Action, ActionContext, ActionParams, Lane, Parameter
from engine.errors import ActionError, ApiError, ConfigError, Location

_KIND = "top_up_data_quota"
_SETTING = f"{_KIND}: setting the data quota to "
_TARGET = re.compile(rf"^{re.escape(_SETTING)}(\d+(?:\.\d+)?) MB\b")
_NOTHING_SENT = f"{_KIND}: nothing sent yet: "


@dataclass(slots=True)  # read-only by convention: one is built per planned action
class TopUp(ActionParams):
    volume: float  # MB to add
    expiry: str | None = None  # a new expiry (duration from the intent's creation, or a date)


@dataclass(frozen=True)
class TopUpDataQuota(Action):
    kind = _KIND
    summary = (
        "adds a volume (MB) to the endpoint's data quota, once per event: a retry never adds twice"
    )
    parameters = (
        Parameter("volume", "MB to add", required=True),
        Parameter("expiry", "duration from the event, or a timestamp"),
    )
    params_type = TopUp
    needs = "endpoint"
    lane = Lane.ENDPOINT

    volume: float
    expiry: str | None

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: Location) -> Self:
        volume = parse_volume(cls.kind, params, where)
        if volume <= 0:
            raise ConfigError(f"`{cls.kind}.volume` must be more than 0", where)
        return cls(volume, parse_expiry(cls.kind, params.get("expiry"), where))

    def params_for(self, template_context: Mapping[str, Any]) -> TopUp:
        return TopUp(self.volume, self.expiry)

    @classmethod
    async def effect(cls, params: TopUp, ctx: ActionContext) -> str | None:
        """Done already when an earlier attempt fixed a volume and the quota holds it."""
        target = recorded_target(ctx.last_error)
        if target is None:
            return None
        try:
            current = await ctx.emnify.get_quota(endpoint_id(cls.kind, ctx), "data")
        except ApiError as error:
            raise _keeping(target, "reading it back", error) from None
        if current is None or id_of(current.get("status")) != ACTIVE:
            return None
        left = read_number(current.get("volume"))
        if left is not None and left >= target:
            return f"already topped up to {_mb(target)} MB"
        return None

    @classmethod
    async def run(cls, params: TopUp, ctx: ActionContext) -> str:
        target = recorded_target(ctx.last_error)
        if target is None and ctx.attempt > 1 and not _nothing_sent(ctx.last_error):
            raise ActionError(
                f"{cls.kind}: an earlier attempt may have topped the quota up and left no"
                " record of the volume it set; not added again (check the quota)",
                retryable=False,
            )
        where = endpoint_id(cls.kind, ctx)
        try:
            current = await ctx.emnify.get_quota(where, "data")
        except ApiError as error:
            if target is not None:
                raise _keeping(target, "reading the quota", error) from None
            raise ActionError(f"{_NOTHING_SENT}{error}", retryable=error.retryable) from None
        if target is None:
            left = None if current is None else read_number(current.get("volume"))
            target = round((left or 0.0) + params.volume, 6)
        body = _body(current, target, params, ctx)
        try:
            await ctx.emnify.set_quota(where, "data", body)
        except ApiError as error:
            raise _keeping(target, "", error) from None
        return f"topped up to {_mb(target)} MB"


def recorded_target(last_error: str | None) -> float | None:
    """The volume an earlier attempt of this intent set, from the error it recorded."""
    found = _TARGET.match(last_error) if last_error else None
    return float(found.group(1)) if found else None


def _nothing_sent(last_error: str | None) -> bool:
    return last_error is not None and last_error.startswith(_NOTHING_SENT)


def _keeping(target: float, doing: str, error: ApiError) -> ActionError:
    """An error that records `target`, so the next attempt sets it and never adds again.
    Retryable unless emnify surely refused (a 4xx other than 429)."""
    step = f" ({doing})" if doing else ""
    refused = error.status is not None and 400 <= error.status < 500 and error.status != 429
    return ActionError(f"{_SETTING}{_mb(target)} MB{step}: {error}", retryable=not refused)


def _body(
    current: Mapping[str, Any] | None, target: float, params: TopUp, ctx: ActionContext
) -> dict[str, Any]:
    """The whole quota to POST: `target` MB, ACTIVE, the rest as it was (or the rule's
    expiry)."""
    body: dict[str, Any] = {"status": {"id": ACTIVE}, "volume": wire_volume(target)}
    current = current or {}
    expiry = expiry_date(params.expiry, ctx.created_at)
    kept_expiry = field(current, "expiry_date", "expiryDate")
    if expiry is not None:
        body["expiry_date"] = api_timestamp(expiry)
    elif kept_expiry is not None:
        body["expiry_date"] = kept_expiry
    auto_refill = field(current, "auto_refill", "autoRefill")
    if auto_refill is not None:
        body["auto_refill"] = int(bool(auto_refill))
    threshold = field(current, "threshold_percentage", "thresholdPercentage")
    if isinstance(threshold, int | float) and not isinstance(threshold, bool):
        body["threshold_percentage"] = int(threshold)
    action = id_of(field(current, "action_on_exhaustion", "actionOnExhaustion"))
    body["action_on_exhaustion"] = {"id": action if isinstance(action, int) else BLOCK}
    return body


def _mb(volume: float) -> str:
    """`620`, `620.5`: never an exponent, which `recorded_target` would not read back."""
    return f"{volume:.6f}".rstrip("0").rstrip(".")
