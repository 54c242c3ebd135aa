"""SIM and endpoint status changes: which ones a PATCH may make, and what the platform logs.

Pure functions over the fleet; `SimulatorState` holds the lock and stores the event.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.simulator.catalog import ENDPOINT_STATUSES, SIM_STATUSES
from engine.simulator.fleet import (
    ACTIVATED,
    DISABLED,
    ENABLED,
    ENDPOINT_TRANSITIONS,
    SIM_TRANSITIONS,
    Endpoint,
    Fleet,
    Sim,
)
from engine.simulator.profiles import CATALOGS, TITLES

_SIM_EVENT_TYPES = {1: 8, 2: 9, 4: 45}  # new SIM status -> "SIM activation" etc.
_ENDPOINT_EVENT_TYPES = {ENABLED: 42, DISABLED: 43}


class NotFoundError(LookupError):
    """No such SIM or endpoint."""


class InvalidChangeError(ValueError):
    """A change the platform refuses; `errors` are the items of the 422 body's `errors`."""

    def __init__(self, message: str, errors: list[dict[str, Any]]):
        self.errors = errors
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class StatusChange:
    """A status that did change, and the event the platform logs for it (if any)."""

    endpoint: Endpoint
    event_type: int | None
    description: str


def find_sim(fleet: Fleet, sim_id: int) -> Sim:
    sim = fleet.sims.get(sim_id)
    if sim is None:
        raise NotFoundError(f"SIM with id {sim_id} not found")
    return sim


def find_endpoint(fleet: Fleet, endpoint_id: int) -> Endpoint:
    endpoint = fleet.endpoints.get(endpoint_id)
    if endpoint is None:
        raise NotFoundError(f"Endpoint with id {endpoint_id} not found")
    return endpoint


def _error(code: int, token: str, message: str) -> dict[str, Any]:
    return {"error_code": code, "error_token": token, "message": message}


def change_sim_status(
    fleet: Fleet, sim_id: int, status_id: int, now: datetime, *, enforce: bool = True
) -> StatusChange | None:
    """Set a SIM's status; None when it already had it (a quiet no-op, as on the platform).

    `enforce=False` (admin set-up) allows any change, e.g. back to Issued.
    """
    sim = find_sim(fleet, sim_id)
    if status_id not in SIM_STATUSES:
        message = f"SIM status with id '{status_id}' not found."
        raise InvalidChangeError(
            "Update SIM validation error", [_error(1401, "InvalidReference", message)]
        )
    old = sim.status
    if status_id == old:
        return None
    if enforce and status_id not in SIM_TRANSITIONS.get(old, frozenset()):
        message = (
            f"SIM status change from '{SIM_STATUSES[old]}' to "
            f"'{SIM_STATUSES[status_id]}' is not allowed."
        )
        raise InvalidChangeError(
            "Update SIM validation error", [_error(1406, "NotAllowed", message)]
        )
    sim.status = status_id
    if status_id == ACTIVATED:
        sim.activation_date = now
    return StatusChange(
        fleet.endpoint_of(sim),
        _SIM_EVENT_TYPES.get(status_id),
        f"Status of SIM changed from '{SIM_STATUSES[old]}' to '{SIM_STATUSES[status_id]}'",
    )


def change_endpoint(
    fleet: Fleet,
    endpoint_id: int,
    now: datetime,
    *,
    status_id: int | None = None,
    name: str | None = None,
    tags: str | None = None,
    set_tags: bool = False,
    service_profile_id: int | None = None,
    tariff_profile_id: int | None = None,
    imei_lock: bool | None = None,
) -> StatusChange | None:
    """Apply an endpoint PATCH (status, name, tags, profiles, IMEI lock); a `StatusChange`
    if the status changed."""
    endpoint = find_endpoint(fleet, endpoint_id)
    for kind, wanted in (
        ("service_profile", service_profile_id),
        ("tariff_profile", tariff_profile_id),
    ):
        if wanted is not None and wanted not in CATALOGS[kind]:
            message = f"{TITLES[kind]} with Id '{wanted}' not found."
            raise InvalidChangeError(
                "Update endpoint validation error", [_error(1401, "InvalidReference", message)]
            )
    others = (service_profile_id, tariff_profile_id, imei_lock)
    if service_profile_id is not None:
        endpoint.service_profile_id = service_profile_id
    if tariff_profile_id is not None:
        endpoint.tariff_profile_id = tariff_profile_id
    if imei_lock is not None:
        endpoint.imei_lock = imei_lock
    if any(value is not None for value in others):
        endpoint.last_updated = now
    if status_id is not None and status_id not in ENDPOINT_TRANSITIONS:
        message = "Endpoint status can only be set to 0 (Enabled) or 1 (Disabled)."
        raise InvalidChangeError(
            "Update endpoint validation error", [_error(1401, "InvalidReference", message)]
        )
    if name is not None:
        endpoint.name = name
    if set_tags:
        endpoint.tags = tags
    if name is not None or set_tags:
        endpoint.last_updated = now
    old = endpoint.status
    if status_id is None or status_id == old:
        return None
    endpoint.status = status_id
    endpoint.last_updated = now
    return StatusChange(
        endpoint,
        _ENDPOINT_EVENT_TYPES[status_id],
        f"Status of endpoint changed from '{ENDPOINT_STATUSES[old]}' "
        f"to '{ENDPOINT_STATUSES[status_id]}'",
    )
