"""Status ids of SIMs and endpoints, as the emnify API numbers them (API notes §6.1, §6.2)."""

from __future__ import annotations

from enum import IntEnum


class SimStatus(IntEnum):
    """`status.id` of a SIM (`PATCH /api/v1/sim/{id}`)."""

    ISSUED = 0
    ACTIVATED = 1
    SUSPENDED = 2
    DELETED = 3
    FACTORY_TEST = 4


class EndpointStatus(IntEnum):
    """`status.id` of an endpoint (`PATCH /api/v1/endpoint/{id}`)."""

    ENABLED = 0
    DISABLED = 1
    DELETED = 2
