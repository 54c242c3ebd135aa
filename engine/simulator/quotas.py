"""Per-endpoint data and SMS quotas: `GET|POST|DELETE /api/v1/endpoint/{id}/quota/data|sms`.

As emnify-api.md §6.4 has them [OAS]: a POST sets the whole quota (it does not add to it)
and answers 201 with no body; statuses 1 ACTIVE, 2 EXHAUSTED, 3 EXPIRED; `volume` in MB
(messages for SMS); `action_on_exhaustion` 1 Block (2 Throttle was decommissioned in
December 2024, so it is refused here). A GET with no quota answers 404: what the real API
answers then is not recorded, and 404 is its answer for a missing sub-resource.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from engine.simulator.fleet import resource_timestamp

KINDS = ("data", "sms")
STATUSES = {1: "ACTIVE", 2: "EXHAUSTED", 3: "EXPIRED"}
ACTIONS_ON_EXHAUSTION = {1: "Block"}


class InvalidQuota(ValueError):
    """A POST body the API would refuse with 422; the message names the field."""


class Quotas:
    """The quotas of every endpoint, by kind ("data" or "sms")."""

    def __init__(self) -> None:
        self._quotas: dict[tuple[int, str], dict[str, Any]] = {}

    def get(self, endpoint_id: int, kind: str) -> dict[str, Any] | None:
        quota = self._quotas.get((endpoint_id, kind))
        return dict(quota) if quota is not None else None

    def set(self, endpoint_id: int, kind: str, body: Mapping[str, Any], now: datetime) -> None:
        """Replace the endpoint's quota with the one `body` describes."""
        volume = body.get("volume")
        if isinstance(volume, bool) or not isinstance(volume, int | float) or volume < 0:
            raise InvalidQuota("volume: a number of MB (messages for SMS), 0 or more")
        status_id = _id_of(body.get("status"), default=1)
        if status_id not in STATUSES:
            raise InvalidQuota(f"status: unknown id {status_id}")
        action_id = _id_of(body.get("action_on_exhaustion"), default=1)
        if action_id not in ACTIONS_ON_EXHAUSTION:
            raise InvalidQuota(f"action_on_exhaustion: unknown id {action_id}")
        threshold = body.get("threshold_percentage")
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, int)
            or not 0 <= threshold <= 100
        ):
            raise InvalidQuota("threshold_percentage: an integer from 0 to 100")
        expiry = body.get("expiry_date")
        if expiry is not None and not isinstance(expiry, str):
            raise InvalidQuota("expiry_date: an ISO 8601 timestamp")
        auto_refill = body.get("auto_refill", 0)
        previous = self._quotas.get((endpoint_id, kind))
        self._quotas[(endpoint_id, kind)] = {
            "status": {"id": status_id, "description": STATUSES[status_id]},
            "volume": volume,
            "expiry_date": expiry,
            "auto_refill": auto_refill,
            "threshold_percentage": threshold,
            "threshold_volume": None if threshold is None else volume * threshold / 100,
            "action_on_exhaustion": {
                "id": action_id,
                "description": ACTIONS_ON_EXHAUSTION[action_id],
            },
            "last_volume_added": volume - (previous["volume"] if previous else 0),
            "last_status_change_date": resource_timestamp(now),
        }

    def delete(self, endpoint_id: int, kind: str) -> bool:
        return self._quotas.pop((endpoint_id, kind), None) is not None

    def use(self, endpoint_id: int, kind: str, amount: float) -> None:
        """Count usage against a quota (tests and the admin API play the device)."""
        quota = self._quotas.get((endpoint_id, kind))
        if quota is not None:
            quota["volume"] = max(0, quota["volume"] - amount)

    def put(self, endpoint_id: int, kind: str, quota: Mapping[str, Any] | None) -> None:
        """A quota exactly as a test gives it (None: none), as `GET` will answer it."""
        if quota is None:
            self._quotas.pop((endpoint_id, kind), None)
        else:
            self._quotas[(endpoint_id, kind)] = dict(quota)

    def reset(self) -> None:
        self._quotas.clear()


def _id_of(value: Any, *, default: int) -> int:
    if value is None:
        return default
    ident = value.get("id") if isinstance(value, dict) else None
    if isinstance(ident, bool) or not isinstance(ident, int):
        raise InvalidQuota("an object with an integer id is expected")
    return ident
