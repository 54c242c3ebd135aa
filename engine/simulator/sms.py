"""MT-SMS sent through the API: accepted at once, then delivered, or failed when the device
is cut off (SIM not activated or endpoint disabled)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from engine.simulator.catalog import SMS_STATUSES
from engine.simulator.fleet import ACTIVATED, ENABLED, Endpoint, Fleet, resource_timestamp

_FIRST_SMS_ID = 7_001_000_001
_DELIVERED, _FAILED = 4, 5


class SmsCenter:
    """Not thread-safe on its own; `SimulatorState` holds the lock."""

    def __init__(self) -> None:
        self._messages: list[dict[str, Any]] = []
        self._next_id = _FIRST_SMS_ID

    def submit(
        self, fleet: Fleet, endpoint: Endpoint, request: Mapping[str, Any], now: datetime
    ) -> dict[str, Any]:
        sim = fleet.sim_of(endpoint)
        stamp = resource_timestamp(now)
        reachable = endpoint.status == ENABLED and sim.status == ACTIVATED
        status_id = _DELIVERED if reachable else _FAILED
        sms = {
            "id": self._next_id,
            "submit_date": stamp,
            "delivery_date": stamp if reachable else None,
            "final_date": stamp,
            "expiry_date": request.get("expiry_date"),
            "payload": request["payload"],
            "source_address": request.get("source_address", "4915112345678"),
            "source_address_type": request.get("source_address_type", {"id": 145}),
            "dest_address": sim.msisdn,
            "udh": request.get("udh", ""),
            "dcs": request.get("dcs", 0),
            "status": {"id": status_id, "description": SMS_STATUSES[status_id]},
            "sms_type": {"id": 1, "description": "MT"},
            "endpoint": {"id": endpoint.id, "name": endpoint.name},
            "sim": {"id": sim.id, "iccid": sim.iccid},
        }
        self._next_id += 1
        self._messages.append(sms)
        return dict(sms)

    def messages(self, endpoint_id: int | None = None) -> list[dict[str, Any]]:
        """Oldest first; all of them, or one endpoint's."""
        return [
            dict(s)
            for s in self._messages
            if endpoint_id is None or s["endpoint"]["id"] == endpoint_id
        ]

    def clear(self) -> None:
        self._messages.clear()
