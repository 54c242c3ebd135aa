"""The organisation's service and tariff profiles (`GET /api/v1/service_profile`,
`GET /api/v1/tariff_profile`, emnify-api.md §13): a small fixed catalog, so rules can
name a profile and tests can move a device to a throttled one and back."""

from __future__ import annotations

from typing import Any

DEFAULT_SERVICE_PROFILE = 101
DEFAULT_TARIFF_PROFILE = 202

SERVICE_PROFILES: dict[int, str] = {
    DEFAULT_SERVICE_PROFILE: "Default Service Profile",
    102: "Throttled 64 kbps",
    103: "Data blocked",
}
TARIFF_PROFILES: dict[int, str] = {
    DEFAULT_TARIFF_PROFILE: "Default Tariff Profile",
    203: "Europe only",
}
CATALOGS = {"service_profile": SERVICE_PROFILES, "tariff_profile": TARIFF_PROFILES}
# How the 422 for an unknown id names the kind, as in the recorded "Service profile with Id
# '-1' not found." (emnify-api.md §6.2 [CASS]).
TITLES = {"service_profile": "Service profile", "tariff_profile": "Tariff profile"}


def profile_list(kind: str) -> list[dict[str, Any]]:
    """The list call's answer: a bare array, as every emnify collection."""
    return [{"id": i, "name": name, "description": name} for i, name in CATALOGS[kind].items()]


def profile_ref(kind: str, profile_id: int) -> dict[str, Any]:
    """The profile inside an endpoint resource."""
    return {"id": profile_id, "name": CATALOGS[kind].get(profile_id, "")}
