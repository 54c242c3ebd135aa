"""Realistic raw events for a fleet: network attaches, data sessions, quota and block alerts.

Pure and seeded: the same fleet, seed and timestamps give the same events. Records share their
unchanging parts (operator, event-type objects) instead of copying them, which keeps writing a
million events quick; treat generated records as read-only.
"""

from __future__ import annotations

import bisect
import itertools
import random
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from engine.events import format_timestamp
from engine.simulator.catalog import (
    CRITICAL,
    INFO,
    NETWORK,
    POLICY_CONTROL,
    WARN,
    event_severity,
    event_source,
    event_type,
)
from engine.simulator.config import FIRST_EVENT_ID
from engine.simulator.event_store import EventIdSequence
from engine.simulator.fleet import ACTIVATED, ENABLED, Endpoint, Fleet, build_fleet

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Operator:
    id: int
    name: str
    country: dict[str, Any]
    tapcode: str
    mnc: str

    def detail(self) -> dict[str, Any]:
        """The operator `detail` of location events."""
        return {
            "id": self.id,
            "name": self.name,
            "country": self.country,
            "tapcode": [{"id": self.id, "tapcode": self.tapcode}],
            "mnc": [{"id": self.id, "mnc": self.mnc}],
        }


def _country(ident: int, name: str, code: str, mcc: str, iso: str) -> dict[str, Any]:
    return {"id": ident, "name": name, "country_code": code, "mcc": mcc, "iso_code": iso}


_GERMANY = _country(74, "Germany", "49", "262", "de")
OPERATORS: tuple[Operator, ...] = (
    Operator(2, "Telekom", _GERMANY, "DEUD1", "01"),
    Operator(3, "Vodafone", _GERMANY, "DEUD2", "02"),
    Operator(4, "Telefonica O2", _GERMANY, "DEUE2", "03"),
    Operator(11, "Orange", _country(73, "France", "33", "208", "fr"), "FRAF1", "01"),
    Operator(17, "KPN", _country(151, "Netherlands", "31", "204", "nl"), "NLDPT", "08"),
    Operator(23, "Swisscom", _country(204, "Switzerland", "41", "228", "ch"), "CHEC1", "01"),
)

_REJECTIONS = (
    "PDP Context Request rejected, because endpoint has no quota.",
    "PDP Context Request rejected, because quota volume of endpoint is exhausted and defined"
    " action is to block data traffic.",
    "PDP Context Request rejected, because data service disabled in service profile.",
)
_DISCONNECTS = (
    "Disconnecting data access for endpoint to apply throttling action.",
    "Disconnecting data access for endpoint, because quota has been updated.",
)
_RAT_TYPES = (6, 6, 6, 6, 8, 9, 1, 2)

# (kind, weight): the mix of a busy IoT fleet, mostly signalling and sessions, few alerts.
_MIX: tuple[tuple[str, float], ...] = (
    ("update_location", 22.0),
    ("update_gprs_location", 22.0),
    ("create_pdp", 18.0),
    ("delete_pdp", 16.0),
    ("purge_location", 4.0),
    ("purge_gprs_location", 2.0),
    ("quota_threshold", 4.0),
    ("quota_used_up", 2.0),
    ("endpoint_blocked", 1.5),
    ("sms_quota_threshold", 1.5),
    ("sms_quota_used_up", 1.0),
    ("pdp_rejected", 2.0),
    ("disconnect", 2.0),
    ("organisation_blocked", 0.2),
)


@dataclass(slots=True)
class _Session:
    session_id: str
    operator: Operator
    pdp_context: dict[str, Any]


class EventGenerator:
    """Produces the next raw event for a fleet, tracking open data sessions per endpoint."""

    def __init__(self, fleet: Fleet, seed: int) -> None:
        self._fleet = fleet
        self._rng = random.Random(f"events:{seed}")
        self._endpoint_ids = sorted(fleet.endpoints)
        self._home = {
            endpoint_id: OPERATORS[self._rng.randrange(3)] for endpoint_id in self._endpoint_ids
        }
        self._sessions: dict[int, _Session] = {}
        self._moment = datetime(2025, 5, 1, tzinfo=UTC)
        self._kinds = [kind for kind, _ in _MIX]
        self._cumulative = list(itertools.accumulate(weight for _, weight in _MIX))
        self._types = {t: event_type(t) for t in (0, 1, 2, 3, 5, 11, 12, 15, 16, 18, 19, 20, 21)}
        self._sources = {s: event_source(s) for s in (NETWORK, POLICY_CONTROL)}
        self._severities = {s: event_severity(s) for s in (INFO, WARN, CRITICAL)}
        self._operator_details = {op.id: op.detail() for op in OPERATORS}
        self._targets: dict[int, tuple[tuple[object, ...], dict[str, Any]]] = {}
        self._minute: tuple[tuple[int, ...], str] = ((), "")
        self._builders: dict[str, Callable[[Endpoint], _Draft]] = {
            "update_location": self._update_location,
            "update_gprs_location": self._update_gprs_location,
            "create_pdp": self._create_pdp,
            "delete_pdp": self._delete_pdp,
            "purge_location": lambda e: _Draft(15, e, "Location purged by the home network."),
            "purge_gprs_location": lambda e: _Draft(16, e, "GPRS location purged."),
            "quota_threshold": self._quota_threshold,
            "quota_used_up": self._quota_used_up,
            "endpoint_blocked": self._endpoint_blocked,
            "sms_quota_threshold": self._sms_quota_threshold,
            "sms_quota_used_up": self._sms_quota_used_up,
            "pdp_rejected": self._pdp_rejected,
            "disconnect": self._disconnect,
        }

    def next_event(self, moment: datetime, event_id: int) -> dict[str, Any] | None:
        """The next event at `moment`, or None when no device in the fleet can be online."""
        self._moment = moment
        kind = self._kinds[
            bisect.bisect(self._cumulative, self._rng.random() * self._cumulative[-1])
        ]
        if kind == "organisation_blocked":
            draft = _Draft(
                12,
                None,
                "Organisation blocked, monthly cost limit exceeded.",
                source=POLICY_CONTROL,
                severity=CRITICAL,
                alert=True,
            )
        else:
            endpoint = self._online_endpoint()
            if endpoint is None:
                return None
            draft = self._builders[kind](endpoint)
        return self._record(draft, moment, event_id)

    def _below(self, n: int) -> int:
        # `randrange` costs a microsecond a call; this is enough randomness for fake data.
        return int(self._rng.random() * n)

    def _pick(self, options: Sequence[T]) -> T:
        return options[self._below(len(options))]

    def _online_endpoint(self) -> Endpoint | None:
        # Suspended SIMs and disabled endpoints stay silent; a few tries find an online one.
        for _ in range(8):
            endpoint = self._fleet.endpoints[self._pick(self._endpoint_ids)]
            if endpoint.status == ENABLED and self._fleet.sim_of(endpoint).status == ACTIVATED:
                return endpoint
        return None

    def _record(self, draft: _Draft, moment: datetime, event_id: int) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": event_id,
            "timestamp": self._timestamp(moment),
            "alert": draft.alert,
            "description": draft.description,
            "event_type": self._types[draft.type_id],
            "event_source": self._sources[draft.source],
            "event_severity": self._severities[draft.severity],
            "organisation": self._fleet.organisation,
        }
        if draft.endpoint is not None:
            record.update(self._targets_of(draft.endpoint))
        else:
            record.update(endpoint=None, sim=None, imsi=None)
        if draft.detail is not None:
            record["detail"] = draft.detail
        return record

    def _timestamp(self, moment: datetime) -> str:
        # Same text as `format_timestamp`; formatting each minute once keeps bulk output fast.
        moment = moment.astimezone(UTC)
        minute = (moment.year, moment.month, moment.day, moment.hour, moment.minute)
        if self._minute[0] != minute:
            whole_minute = format_timestamp(moment.replace(second=0, microsecond=0))
            self._minute = (minute, whole_minute[: -len("00.000Z")])
        return f"{self._minute[1]}{moment.second:02d}.{moment.microsecond // 1000:03d}Z"

    def _targets_of(self, endpoint: Endpoint) -> dict[str, Any]:
        # Shared between events until the endpoint or its SIM changes (a PATCH of name/tags).
        sim = self._fleet.sim_of(endpoint)
        key = (endpoint.name, endpoint.tags, endpoint.ip_address, endpoint.imei, sim.iccid)
        cached = self._targets.get(endpoint.id)
        if cached is None or cached[0] != key:
            cached = (key, self._fleet.targets(endpoint))
            self._targets[endpoint.id] = cached
        return cached[1]

    def _imsi(self, endpoint: Endpoint) -> str:
        return self._fleet.sim_of(endpoint).imsi

    def _roaming_operator(self, endpoint: Endpoint) -> Operator:
        # Mostly the home network; trucks and trackers sometimes roam abroad.
        if self._rng.random() < 0.8:
            return self._home[endpoint.id]
        return self._pick(OPERATORS)

    def _update_location(self, endpoint: Endpoint) -> _Draft:
        operator = self._roaming_operator(endpoint)
        vlr = f"49177{self._below(10**7):07d}"
        text = (
            f"New location received from VLR for IMSI='{self._imsi(endpoint)}', "
            f"now attached to VLR='{vlr}'."
        )
        return _Draft(1, endpoint, text, detail=self._operator_details[operator.id])

    def _update_gprs_location(self, endpoint: Endpoint) -> _Draft:
        operator = self._roaming_operator(endpoint)
        sgsn = f"49177{self._below(10**7):07d}"
        text = (
            f"New location received from SGSN for IMSI='{self._imsi(endpoint)}', "
            f"now attached to SGSN='{sgsn}'."
        )
        return _Draft(2, endpoint, text, detail=self._operator_details[operator.id])

    def _pdp_context(self, endpoint: Endpoint, operator: Operator) -> dict[str, Any]:
        below = self._below
        return {
            "pdp_context_id": 80_000_000 + below(10**6),
            # Without a zone, as the platform sends it.
            "tunnel_created": self._moment.strftime("%Y-%m-%dT%H:%M:%S"),
            "gtp_version": 2,
            "apn": "em",
            "ue_ip_address": endpoint.ip_address,
            "breakout_ip": f"52.49.10.{2 + below(248)}",
            "region": "eu-west-1",
            "mcc": operator.country["mcc"],
            "mnc": operator.mnc,
            "lac": 1000 + below(64000),
            "ci": 1000 + below(64000),
            "rac": None,
            "sac": None,
            "rat_type": self._pick(_RAT_TYPES),
            "imsi": self._imsi(endpoint),
            "imeisv": endpoint.imei[:14] + f"{below(100):02d}",
            "nsapi": 5,
            "ggsn_control_plane_ip_address": "52.49.10.5",
            "sgsn_control_plane_ip_address": f"212.23.{below(256)}.{below(256)}",
        }

    def _create_pdp(self, endpoint: Endpoint) -> _Draft:
        operator = self._roaming_operator(endpoint)
        session = _Session(
            str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
            operator,
            self._pdp_context(endpoint, operator),
        )
        self._sessions[endpoint.id] = session
        context = dict(session.pdp_context)
        # On Create the platform sends these ids as strings (emnify-api.md §4.1).
        context.update(
            operator_id=str(operator.id),
            tariff_profile_id="202",
            ratezone_id=str(300 + operator.id),
            tariff_id="57",
        )
        detail = {
            "id": operator.id,
            "name": operator.name,
            "country": operator.country,
            "pdp_context": context,
            "session_id": session.session_id,
        }
        return _Draft(3, endpoint, "New PDP context created.", detail=detail)

    def _delete_pdp(self, endpoint: Endpoint) -> _Draft:
        session = self._sessions.pop(endpoint.id, None)
        if session is None:
            return self._create_pdp(endpoint)
        rx = round(self._rng.expovariate(1 / 3.0), 6)
        tx = round(self._rng.expovariate(1 / 0.8), 6)
        detail = {
            "id": session.operator.id,
            "name": session.operator.name,
            "country": session.operator.country,
            "session_id": session.session_id,
            "volume": {"rx": rx, "tx": tx, "total": round(rx + tx, 6)},
            "pdp_context": session.pdp_context,
        }
        return _Draft(5, endpoint, "PDP Context deleted.", detail=detail)

    def _volume(self, value: float) -> float | str:
        # The platform sometimes sends quota volumes as strings (emnify-api.md §4.1).
        return f"{value:.6f}" if self._rng.random() < 0.5 else value

    def _quota_threshold(self, endpoint: Endpoint) -> _Draft:
        left = float(self._rng.choice((1, 5, 10, 20)))
        quota = {"threshold_percentage": 20, "threshold_volume": 100, "volume": self._volume(left)}
        return _Draft(
            18,
            endpoint,
            "Quota threshold reached for endpoint.",
            source=POLICY_CONTROL,
            severity=WARN,
            alert=True,
            detail={"quota": quota},
        )

    def _quota_used_up(self, endpoint: Endpoint) -> _Draft:
        quota = {"threshold_percentage": 20, "threshold_volume": 10, "volume": self._volume(0.0)}
        return _Draft(
            19,
            endpoint,
            "Quota volume is completely used up and data access denied for endpoint.",
            source=POLICY_CONTROL,
            severity=WARN,
            alert=True,
            detail={"quota": quota},
        )

    def _endpoint_blocked(self, endpoint: Endpoint) -> _Draft:
        return _Draft(
            11,
            endpoint,
            "Blocking data access for endpoint, traffic limit exceeded.",
            source=POLICY_CONTROL,
            severity=WARN,
            alert=True,
        )

    def _sms_quota(self, type_id: int, endpoint: Endpoint, text: str, left: int) -> _Draft:
        detail = {
            "quota": {"threshold_percentage": 20, "threshold_volume": 10, "volume": left},
            "traffic_type": {"id": 6, "description": "SMS"},
        }
        return _Draft(
            type_id,
            endpoint,
            text,
            source=POLICY_CONTROL,
            severity=WARN,
            alert=True,
            detail=detail,
        )

    def _sms_quota_threshold(self, endpoint: Endpoint) -> _Draft:
        text = "SMS quota threshold reached for endpoint."
        return self._sms_quota(20, endpoint, text, self._rng.randrange(1, 10))

    def _sms_quota_used_up(self, endpoint: Endpoint) -> _Draft:
        text = "SMS quota is completely used up and SMS service denied for endpoint."
        return self._sms_quota(21, endpoint, text, 0)

    def _pdp_rejected(self, endpoint: Endpoint) -> _Draft:
        # Mostly the "no quota" case, the one rules are usually written for.
        text = _REJECTIONS[0] if self._rng.random() < 0.7 else self._rng.choice(_REJECTIONS[1:])
        return _Draft(3, endpoint, text, source=POLICY_CONTROL, severity=WARN, alert=True)

    def _disconnect(self, endpoint: Endpoint) -> _Draft:
        text = self._rng.choice(_DISCONNECTS)
        return _Draft(0, endpoint, text, source=POLICY_CONTROL, severity=INFO)


@dataclass(slots=True)
class _Draft:
    """An event before it gets its id and timestamp."""

    type_id: int
    endpoint: Endpoint | None
    description: str
    source: int = NETWORK
    severity: int = INFO
    alert: bool = False
    detail: dict[str, Any] | None = None


def generate_events(
    count: int,
    *,
    seed: int = 0,
    start: datetime | None = None,
    step_seconds: float = 1.0,
    endpoints: int = 20,
    first_id: int = FIRST_EVENT_ID,
) -> Iterator[dict[str, Any]]:
    """`count` events for a fresh fleet, `step_seconds` apart from `start` (default 2025-05-01)."""
    fleet = build_fleet(endpoints, seed)
    generator = EventGenerator(fleet, seed)
    ids = EventIdSequence(first_id, seed)
    moment = start or datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
    step = timedelta(seconds=step_seconds)
    produced = 0
    while produced < count:
        record = generator.next_event(moment, ids.next())
        if record is not None:
            yield record
            produced += 1
        moment += step
