"""emnify's lookup tables as the simulator serves them: event types, sources, severities, statuses.

Event-type names come from the package's `engine/data/event-types.json`, the same table the engine
ships, so the simulator and the engine never disagree about an id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

from engine.events import SEVERITIES, SOURCES

NETWORK, POLICY_CONTROL, API = 0, 1, 2
INFO, WARN, CRITICAL = 0, 1, 2

SIM_STATUSES: dict[int, str] = {
    0: "Issued",
    1: "Activated",
    2: "Suspended",
    3: "Deleted",
    4: "Factory Test",
}
ENDPOINT_STATUSES: dict[int, str] = {0: "Enabled", 1: "Disabled", 2: "Deleted"}
SMS_STATUSES: dict[int, str] = {
    1: "Delivery attempt pending",
    2: "In progress",
    3: "Buffered",
    4: "Delivered",
    5: "Failed",
    6: "Expired",
    7: "Canceled",
}


@dataclass(frozen=True, slots=True)
class TypeProfile:
    """What an event of one type usually looks like, used when a caller leaves fields out."""

    source: int
    severity: int
    alert: bool
    description: str


# Types the simulator knows how to fill in; any other type falls back to API/Info/no alert
# with its name as description, which is what the platform's own API events look like.
_PROFILES: dict[int, TypeProfile] = {
    0: TypeProfile(POLICY_CONTROL, INFO, False, "Disconnecting data access for endpoint."),
    1: TypeProfile(NETWORK, INFO, False, "New location received from VLR."),
    2: TypeProfile(NETWORK, INFO, False, "New location received from SGSN."),
    3: TypeProfile(NETWORK, INFO, False, "New PDP context created."),
    4: TypeProfile(NETWORK, INFO, False, "PDP Context updated."),
    5: TypeProfile(NETWORK, INFO, False, "PDP Context deleted."),
    6: TypeProfile(API, WARN, False, "User authentication failed."),
    7: TypeProfile(API, WARN, False, "Application token authentication failed."),
    11: TypeProfile(
        POLICY_CONTROL, WARN, True, "Blocking data access for endpoint, traffic limit exceeded."
    ),
    12: TypeProfile(
        POLICY_CONTROL, CRITICAL, True, "Organisation blocked, monthly cost limit exceeded."
    ),
    15: TypeProfile(NETWORK, INFO, False, "Location purged by the network."),
    16: TypeProfile(NETWORK, INFO, False, "GPRS location purged by the network."),
    18: TypeProfile(POLICY_CONTROL, WARN, True, "Quota threshold reached for endpoint."),
    19: TypeProfile(
        POLICY_CONTROL,
        WARN,
        True,
        "Quota volume is completely used up and data access denied for endpoint.",
    ),
    20: TypeProfile(POLICY_CONTROL, WARN, True, "SMS quota threshold reached for endpoint."),
    21: TypeProfile(
        POLICY_CONTROL,
        WARN,
        True,
        "SMS quota is completely used up and SMS service denied for endpoint.",
    ),
}


@cache
def event_type_names() -> dict[int, str]:
    """Event-type id to name, from the table shipped in the package."""
    text = resources.files("engine").joinpath("data/event-types.json").read_text("utf-8")
    return {int(item["id"]): str(item["name"]) for item in json.loads(text)}


def event_type_name(type_id: int) -> str:
    return event_type_names().get(type_id, f"Event type {type_id}")


def type_profile(type_id: int) -> TypeProfile:
    return _PROFILES.get(type_id) or TypeProfile(API, INFO, False, event_type_name(type_id))


def event_type(type_id: int) -> dict[str, object]:
    return {"id": type_id, "description": event_type_name(type_id)}


def event_source(source_id: int) -> dict[str, object]:
    return {"id": source_id, "description": SOURCES.get(source_id, "Unknown")}


def event_severity(severity_id: int) -> dict[str, object]:
    return {"id": severity_id, "description": SEVERITIES.get(severity_id, "Unknown")}
