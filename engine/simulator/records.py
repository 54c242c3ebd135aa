"""Whole event records in the Event API's shape (emnify-api.md §4.4), built from fleet objects."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from engine.errors import EventFormatError
from engine.events import format_timestamp, parse_timestamp
from engine.simulator.catalog import event_severity, event_source, event_type, type_profile
from engine.simulator.fleet import Endpoint, Fleet


class RecordError(ValueError):
    """A record given to the admin API that cannot be completed; the message says which field."""


def event_record(
    fleet: Fleet,
    event_id: int,
    moment: datetime,
    type_id: int,
    endpoint: Endpoint | None,
    *,
    description: str | None = None,
    source: int | None = None,
    severity: int | None = None,
    alert: bool | None = None,
    detail: Any = None,
) -> dict[str, Any]:
    """One event; fields left out take the usual values for the type."""
    profile = type_profile(type_id)
    record: dict[str, Any] = {
        "id": event_id,
        "timestamp": format_timestamp(moment),
        "alert": profile.alert if alert is None else alert,
        "description": profile.description if description is None else description,
        "event_type": event_type(type_id),
        "event_source": event_source(profile.source if source is None else source),
        "event_severity": event_severity(profile.severity if severity is None else severity),
        "organisation": fleet.organisation,
    }
    if endpoint is not None:
        record.update(fleet.targets(endpoint))
    else:
        record.update(endpoint=None, sim=None, imsi=None)
    if detail is not None:
        record["detail"] = detail
    return record


def _lookup(value: Any, make: Callable[[int], dict[str, Any]], field: str) -> dict[str, Any]:
    """Accept `N` or `{"id": N, ...}` and fill the description the platform would send."""
    ident = value.get("id") if isinstance(value, dict) else value
    if not isinstance(ident, int) or isinstance(ident, bool):
        raise RecordError(f"{field}: expected an id or an object with an integer id")
    filled = make(ident)
    if isinstance(value, dict):
        filled.update(value)
    return filled


def complete_record(
    fleet: Fleet, partial: dict[str, Any], event_id: int, moment: datetime
) -> dict[str, Any]:
    """Fill what an injected record leaves out, keeping everything it gives.

    Shortcuts: `"sim_id": N` or `"endpoint_id": N` fill `endpoint`, `sim` and `imsi` from the
    fleet. `event_type` (required), `event_source` and `event_severity` may be bare ids.
    """
    record = dict(partial)
    sim_id = record.pop("sim_id", None)
    endpoint_id = record.pop("endpoint_id", None)
    endpoint: Endpoint | None = None
    if sim_id is not None:
        sim = fleet.sims.get(sim_id) if isinstance(sim_id, int) else None
        if sim is None:
            raise RecordError(f"sim_id: no SIM {sim_id!r} in the fleet")
        endpoint = fleet.endpoint_of(sim)
    if endpoint_id is not None:
        found = fleet.endpoints.get(endpoint_id) if isinstance(endpoint_id, int) else None
        if found is None:
            raise RecordError(f"endpoint_id: no endpoint {endpoint_id!r} in the fleet")
        if endpoint is not None and endpoint is not found:
            raise RecordError("sim_id and endpoint_id name different devices")
        endpoint = found
    if "event_type" not in record:
        raise RecordError('event_type: required, e.g. {"id": 19}')
    kind = _lookup(record["event_type"], event_type, "event_type")
    profile = type_profile(int(kind["id"]))
    record["event_type"] = kind
    record["event_source"] = _lookup(
        record.get("event_source", profile.source), event_source, "event_source"
    )
    record["event_severity"] = _lookup(
        record.get("event_severity", profile.severity), event_severity, "event_severity"
    )
    record.setdefault("alert", profile.alert)
    record.setdefault("description", profile.description)
    record.setdefault("organisation", fleet.organisation)
    if endpoint is not None:
        for key, value in fleet.targets(endpoint).items():
            record.setdefault(key, value)
    record.setdefault("id", event_id)
    if not isinstance(record["id"], int) or isinstance(record["id"], bool):
        raise RecordError("id: must be an integer")
    record.setdefault("timestamp", format_timestamp(moment))
    try:
        parse_timestamp(record["timestamp"])
    except EventFormatError as exc:
        raise RecordError(f"timestamp: {exc}") from None
    # Put the fields in the Event API's order; extras (e.g. `user`, `detail`) keep theirs after.
    order = ("id", "timestamp", "alert", "description", "event_type", "event_source")
    return {key: record[key] for key in order} | record
