"""What the quota actions share: the quota as `POST /api/v1/endpoint/{id}/quota/data|sms`
takes it, read back leniently, and `SetQuota`, which ensures a whole quota.

The API (emnify-api.md §6.4 [OAS]): a POST replaces the endpoint's quota (volume in MB, or
messages for SMS) and answers 201; `GET` reads it. Statuses 1 ACTIVE, 2 EXHAUSTED,
3 EXPIRED; `action_on_exhaustion` 1 Block is the only one left (2 Throttle was
decommissioned on 9 December 2024, so it is refused at load). Volumes may come back as
strings (`"1.000000"`) and the quota events spell the fields in camelCase, so reads accept
both spellings. A quota change causes "quota assigned" events (56, 58), which are not
status changes: the loop breaker does not count them (`causes` stays empty).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Self

from engine.actions.base import Action, ActionContext, ActionParams, Lane, Parameter
from engine.durations import parse_duration
from engine.errors import ActionError, ConfigError, EventFormatError, Location
from engine.events import parse_timestamp

ACTIVE = 1
BLOCK = 1
# Volumes are compared to this many decimal places: the API writes them as "1.000000".
_PLACES = 6


@dataclass(slots=True)  # read-only by convention: one is built per planned action
class QuotaParams(ActionParams):
    """A quota as a rule asks for it; `expiry` is a duration from the intent's creation
    (so every attempt and every replay of it asks for the same date) or a timestamp."""

    volume: float
    expiry: str | None = None
    auto_refill: bool | None = None
    threshold_percentage: int | None = None
    action_on_exhaustion: int | None = None


def parse_volume(kind: str, params: Mapping[str, Any], where: Location) -> float:
    volume = params.get("volume")
    if isinstance(volume, bool) or not isinstance(volume, int | float) or volume < 0:
        raise ConfigError(
            f"`{kind}.volume` must be a number, 0 or more (MB for data, messages for SMS)",
            where,
        )
    return volume  # as written: 500 stays 500 in the outbox, the audit log and rule tests


def parse_expiry(kind: str, value: Any, where: Location) -> str | None:
    """A duration (`30d`) or an ISO 8601 timestamp, checked; None when not given."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"`{kind}.expiry` must be a duration like `30d` or a timestamp", where)
    try:
        if parse_duration(value) <= timedelta(0):
            raise ConfigError(f"`{kind}.expiry` must be longer than 0s", where)
    except ValueError:
        try:
            parse_timestamp(value, "expiry")
        except EventFormatError:
            raise ConfigError(
                f"`{kind}.expiry` must be a duration like `30d` or an ISO 8601 timestamp, "
                f"got {value!r}",
                where,
            ) from None
    return value


def expiry_date(expiry: str | None, created_at: datetime) -> datetime | None:
    """The expiry a quota gets: a duration counts from `created_at` (the intent's)."""
    if expiry is None:
        return None
    try:
        return (created_at + parse_duration(expiry)).replace(microsecond=0)
    except ValueError:
        return parse_timestamp(expiry, "expiry")


def api_timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def read_number(value: Any) -> float | None:
    """A volume as the API writes it (a number or a string like "1.000000"), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def field(quota: Mapping[str, Any], snake: str, camel: str) -> Any:
    return quota[snake] if snake in quota else quota.get(camel)


def id_of(value: Any) -> Any:
    return value.get("id") if isinstance(value, Mapping) else value


def same_volume(a: float | None, b: float) -> bool:
    return a is not None and round(a, _PLACES) == round(b, _PLACES)


def wire_volume(volume: float) -> int | float:
    """`500.0` goes out as `500`: the API's examples write whole MB as integers."""
    return int(volume) if float(volume).is_integer() else volume


def endpoint_id(kind: str, ctx: ActionContext) -> int:
    if ctx.target.endpoint_id is None:
        raise ActionError(f"{kind}: no endpoint_id in the target")
    return ctx.target.endpoint_id


@dataclass(frozen=True)
class SetQuota(Action):
    """Ensure the endpoint's quota of `quota_kind` is the one the rule gives: read first
    (`looks_first`), POST only when something differs, so a retry or a replay sets the same
    quota again at most."""

    quota_kind: ClassVar[str]
    parameters = (
        Parameter("volume", "MB, or messages for SMS", required=True),
        Parameter("expiry", "duration from the event, or a timestamp"),
        Parameter("auto_refill"),
        Parameter("threshold_percentage"),
        Parameter("action_on_exhaustion", "block"),
    )
    params_type = QuotaParams
    needs = "endpoint"
    lane = Lane.ENDPOINT
    looks_first = True

    volume: float
    expiry: str | None
    auto_refill: bool | None
    threshold_percentage: int | None
    action_on_exhaustion: int | None

    @classmethod
    def parse(cls, params: Mapping[str, Any], where: Location) -> Self:
        auto_refill = params.get("auto_refill")
        if auto_refill is not None and not isinstance(auto_refill, bool):
            raise ConfigError(f"`{cls.kind}.auto_refill` must be true or false", where)
        threshold = params.get("threshold_percentage")
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, int)
            or not 0 <= threshold <= 100
        ):
            raise ConfigError(
                f"`{cls.kind}.threshold_percentage` must be a whole number from 0 to 100", where
            )
        action = params.get("action_on_exhaustion")
        if action is not None and action not in ("block", BLOCK):
            raise ConfigError(
                f"`{cls.kind}.action_on_exhaustion` can only be `block`",
                where,
                "emnify decommissioned throttling on exhaustion in December 2024",
            )
        return cls(
            parse_volume(cls.kind, params, where),
            parse_expiry(cls.kind, params.get("expiry"), where),
            auto_refill,
            threshold,
            None if action is None else BLOCK,
        )

    def params_for(self, template_context: Mapping[str, Any]) -> QuotaParams:
        return QuotaParams(
            self.volume,
            self.expiry,
            self.auto_refill,
            self.threshold_percentage,
            self.action_on_exhaustion,
        )

    @classmethod
    def wanted(cls, params: QuotaParams, ctx: ActionContext) -> dict[str, Any]:
        """The POST body for `params`: only what the rule gives, status ACTIVE."""
        body: dict[str, Any] = {"status": {"id": ACTIVE}, "volume": wire_volume(params.volume)}
        expiry = expiry_date(params.expiry, ctx.created_at)
        if expiry is not None:
            body["expiry_date"] = api_timestamp(expiry)
        if params.auto_refill is not None:
            body["auto_refill"] = int(params.auto_refill)
        if params.threshold_percentage is not None:
            body["threshold_percentage"] = params.threshold_percentage
        body["action_on_exhaustion"] = {"id": params.action_on_exhaustion or BLOCK}
        return body

    @classmethod
    async def effect(cls, params: QuotaParams, ctx: ActionContext) -> str | None:
        current = await ctx.emnify.get_quota(endpoint_id(cls.kind, ctx), cls.quota_kind)
        if current is None:
            return None
        return "already" if matches(current, cls.wanted(params, ctx)) else None

    @classmethod
    async def run(cls, params: QuotaParams, ctx: ActionContext) -> str:
        body = cls.wanted(params, ctx)
        await ctx.emnify.set_quota(endpoint_id(cls.kind, ctx), cls.quota_kind, body)
        return f"set {body['volume']}"


def matches(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether the quota read back is the one `wanted` (a POST body) describes, in every
    field `wanted` names."""
    if id_of(current.get("status")) != ACTIVE:
        return False
    if not same_volume(read_number(current.get("volume")), float(wanted["volume"])):
        return False
    if "expiry_date" in wanted:
        written = field(current, "expiry_date", "expiryDate")
        try:
            if written is None or parse_timestamp(written, "expiry_date") != parse_timestamp(
                wanted["expiry_date"], "expiry_date"
            ):
                return False
        except EventFormatError:
            return False
    if "auto_refill" in wanted and int(bool(field(current, "auto_refill", "autoRefill"))) != int(
        wanted["auto_refill"]
    ):
        return False
    if "threshold_percentage" in wanted and read_number(
        field(current, "threshold_percentage", "thresholdPercentage")
    ) != float(wanted["threshold_percentage"]):
        return False
    action = id_of(field(current, "action_on_exhaustion", "actionOnExhaustion"))
    return action is None or action == id_of(wanted["action_on_exhaustion"])
