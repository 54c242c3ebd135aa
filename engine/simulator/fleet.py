"""The simulated organisation: endpoints (devices), each with one SIM, and their statuses.

The fleet is built deterministically from a seed. Endpoint `k` (0-based) has id 18345221+k and
SIM id 9123344+k, so tests can name devices without looking them up.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from engine.events import format_timestamp
from engine.simulator.catalog import ENDPOINT_STATUSES, SIM_STATUSES
from engine.simulator.config import ORGANISATION_ID, ORGANISATION_NAME
from engine.simulator.profiles import DEFAULT_SERVICE_PROFILE, DEFAULT_TARIFF_PROFILE, profile_ref

FIRST_ENDPOINT_ID = 18345221
FIRST_SIM_ID = 9123344
FIRST_IMSI_ID = 20553871

ISSUED, ACTIVATED, SUSPENDED, DELETED, FACTORY_TEST = 0, 1, 2, 3, 4
ENABLED, DISABLED = 0, 1

# SIM status changes a customer may make through PATCH (emnify-api.md §6.1).
SIM_TRANSITIONS: dict[int, frozenset[int]] = {
    ISSUED: frozenset({ACTIVATED, FACTORY_TEST}),
    ACTIVATED: frozenset({SUSPENDED}),
    SUSPENDED: frozenset({ACTIVATED}),
    FACTORY_TEST: frozenset({ACTIVATED}),
}
ENDPOINT_TRANSITIONS: dict[int, frozenset[int]] = {
    ENABLED: frozenset({DISABLED}),
    DISABLED: frozenset({ENABLED}),
}

_KINDS = ("truck", "meter", "tracker")
# A fixed pattern, not the RNG, so every seed has "vip" and "fleet" devices for rules to find.
_TAGS: tuple[str | None, ...] = (
    "fleet,berlin",
    None,
    "vip",
    "fleet,hamburg",
    None,
    "fleet,berlin,vip",
    "meter",
    None,
)
_PRODUCED = datetime(2024, 6, 12, 9, 14, 2, tzinfo=UTC)
_ACTIVATED = datetime(2024, 7, 1, 8, 0, 0, tzinfo=UTC)


def luhn_digit(digits: str) -> str:
    """The Luhn check digit emnify appends to an ICCID or IMEI."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 0:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return str((10 - total % 10) % 10)


def resource_timestamp(moment: datetime) -> str:
    """Resource objects (SIMs, endpoints, SMS) use `+0000`, not the Event API's `Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000")


@dataclass(slots=True)
class Sim:
    id: int
    iccid: str
    msisdn: str
    imsi: str
    imsi_id: int
    production_date: datetime
    activation_date: datetime
    endpoint_id: int
    status: int = ACTIVATED

    @property
    def iccid_with_luhn(self) -> str:
        return self.iccid + luhn_digit(self.iccid)

    def event_ref(self) -> dict[str, Any]:
        """The `sim` object inside an event."""
        return {
            "id": self.id,
            "iccid": self.iccid,
            "production_date": format_timestamp(self.production_date),
        }

    def imsi_ref(self) -> dict[str, Any]:
        """The `imsi` object inside an event."""
        return {
            "id": self.imsi_id,
            "imsi": self.imsi,
            "import_date": format_timestamp(self.production_date),
        }


@dataclass(slots=True)
class Endpoint:
    id: int
    name: str
    ip_address: str
    tags: str | None
    imei: str
    sim_id: int
    created: datetime
    status: int = ENABLED
    last_updated: datetime = field(default=_ACTIVATED)
    service_profile_id: int = DEFAULT_SERVICE_PROFILE
    tariff_profile_id: int = DEFAULT_TARIFF_PROFILE
    imei_lock: bool = False
    operator_blacklist: set[int] = field(default_factory=set)

    def event_ref(self) -> dict[str, Any]:
        """The `endpoint` object inside an event."""
        return {
            "id": self.id,
            "name": self.name,
            "ip_address": self.ip_address,
            "tags": self.tags,
            "imei": self.imei,
        }


@dataclass(slots=True)
class Fleet:
    organisation: dict[str, Any]
    endpoints: dict[int, Endpoint]
    sims: dict[int, Sim]

    def sim_of(self, endpoint: Endpoint) -> Sim:
        return self.sims[endpoint.sim_id]

    def endpoint_of(self, sim: Sim) -> Endpoint:
        return self.endpoints[sim.endpoint_id]

    def targets(self, endpoint: Endpoint) -> dict[str, Any]:
        """The endpoint, sim and imsi objects an event about this endpoint carries."""
        sim = self.sim_of(endpoint)
        return {"endpoint": endpoint.event_ref(), "sim": sim.event_ref(), "imsi": sim.imsi_ref()}


def build_fleet(
    count: int,
    seed: int,
    *,
    id_offset: int = 0,
    organisation: tuple[int, str] = (ORGANISATION_ID, ORGANISATION_NAME),
) -> Fleet:
    """`count` enabled endpoints, each with an activated SIM, reproducible from `seed`; ids
    (and ICCIDs) moved by `id_offset`, for another organisation's fleet."""
    rng = random.Random(f"fleet:{seed}")
    iccid_base = 12345678 + rng.randrange(10_000) * 1000 + id_offset
    msisdn_base = 423663900000 + rng.randrange(10_000) * 10
    imsi_base = 295050901234567 + rng.randrange(10_000) * 100
    endpoints: dict[int, Endpoint] = {}
    sims: dict[int, Sim] = {}
    for k in range(count):
        endpoint_id, sim_id = FIRST_ENDPOINT_ID + id_offset + k, FIRST_SIM_ID + id_offset + k
        tac = rng.choice(("35678912", "86512304", "35332211", "49015420"))
        imei14 = tac + f"{rng.randrange(1_000_000):06d}"
        sims[sim_id] = Sim(
            id=sim_id,
            iccid=f"8988303{iccid_base + k:012d}",
            msisdn=str(msisdn_base + k),
            imsi=str(imsi_base + k),
            imsi_id=FIRST_IMSI_ID + id_offset + k,
            production_date=_PRODUCED + timedelta(minutes=k),
            activation_date=_ACTIVATED + timedelta(minutes=k),
            endpoint_id=endpoint_id,
        )
        endpoints[endpoint_id] = Endpoint(
            id=endpoint_id,
            name=f"{_KINDS[k % len(_KINDS)]}-{k + 1:04d}",
            ip_address=f"10.196.{4 + k // 250}.{2 + k % 250}",
            tags=_TAGS[k % len(_TAGS)],
            imei=imei14 + luhn_digit(imei14),
            sim_id=sim_id,
            created=_ACTIVATED + timedelta(minutes=k),
        )
    organisation_id, organisation_name = organisation
    return Fleet(
        organisation={"id": organisation_id, "name": organisation_name},
        endpoints=endpoints,
        sims=sims,
    )


def _status(table: dict[int, str], status_id: int) -> dict[str, Any]:
    return {"id": status_id, "description": table[status_id]}


def sim_resource(fleet: Fleet, sim: Sim) -> dict[str, Any]:
    """`GET /api/v1/sim/{id}`, shaped like the recorded SIM list items."""
    endpoint = fleet.endpoint_of(sim)
    return {
        "id": sim.id,
        "iccid": sim.iccid,
        "iccid_with_luhn": sim.iccid_with_luhn,
        "production_date": resource_timestamp(sim.production_date),
        "activation_date": resource_timestamp(sim.activation_date),
        "status": _status(SIM_STATUSES, sim.status),
        "customer_org": dict(fleet.organisation),
        "issuer_org": {"id": 2, "name": "emnify GmbH"},
        "endpoint": {"id": endpoint.id, "name": endpoint.name},
        "imsi": sim.imsi,
        "msisdn": sim.msisdn,
        "model": {"id": 1, "description": "Standard SIM"},
    }


def endpoint_resource(fleet: Fleet, endpoint: Endpoint) -> dict[str, Any]:
    """`GET /api/v1/endpoint/{id}`, with the fields the endpoint reference lists."""
    sim = fleet.sim_of(endpoint)
    return {
        "id": endpoint.id,
        "name": endpoint.name,
        "tags": endpoint.tags,
        "created": resource_timestamp(endpoint.created),
        "last_updated": resource_timestamp(endpoint.last_updated),
        "status": _status(ENDPOINT_STATUSES, endpoint.status),
        "service_profile": profile_ref("service_profile", endpoint.service_profile_id),
        "tariff_profile": profile_ref("tariff_profile", endpoint.tariff_profile_id),
        "sim": {
            "id": sim.id,
            "iccid": sim.iccid,
            "iccid_with_luhn": sim.iccid_with_luhn,
            "imsi": sim.imsi,
            "msisdn": sim.msisdn,
            "status": _status(SIM_STATUSES, sim.status),
        },
        "imei": endpoint.imei,
        "imei_with_luhn": endpoint.imei,
        "imei_lock": endpoint.imei_lock,
        "ip_address": endpoint.ip_address,
        "ip_address_space": {"id": 3},
        "runtime_data": None,
    }
