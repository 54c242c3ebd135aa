"""Everything one simulator knows: fleet, stored events, SMS, tokens, faults, request log.

One `threading.Lock` guards it all, because the server runs in its own thread while tests
inspect and change the state from theirs. Every public method takes the lock; the records
handed out are snapshots, or shared read-only event records.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from engine.simulator.catalog import API, INFO, WARN
from engine.simulator.config import FIRST_EVENT_ID, SimulatorConfig
from engine.simulator.data_streams import DataStreams
from engine.simulator.event_query import EventQuery
from engine.simulator.event_store import EventIdSequence, EventStore, epoch_ms
from engine.simulator.fault_rules import FaultPlan, FaultRule
from engine.simulator.fleet import Endpoint, Fleet, build_fleet, endpoint_resource, sim_resource
from engine.simulator.generator import EventGenerator
from engine.simulator.lifecycle import (
    StatusChange,
    change_endpoint,
    change_sim_status,
    find_endpoint,
    find_sim,
)
from engine.simulator.quotas import Quotas
from engine.simulator.records import complete_record, event_record
from engine.simulator.sms import SmsCenter
from engine.simulator.tokens import TokenCheck, TokenIssuer

_REQUEST_LOG_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request the API answered (or failed to answer: `status` None means dropped)."""

    method: str
    path: str
    query: str
    status: int | None
    fault: str | None
    wall_time: float
    monotonic_time: float
    duration: float
    # Behind `engine.simulator.organisations`: the organisation whose token the call carried
    # (its application token at login, a bearer token it issued otherwise); None: no such.
    organisation: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **({"organisation": self.organisation} if self.organisation else {}),
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "status": self.status,
            "fault": self.fault,
            "wall_time": self.wall_time,
            "monotonic_time": self.monotonic_time,
            "duration": self.duration,
        }


@dataclass(frozen=True, slots=True)
class _QueryResult:
    key: tuple[object, ...]
    valid_until_ms: int
    records: list[dict[str, Any]]


class SimulatorState:
    def __init__(
        self, config: SimulatorConfig | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config or SimulatorConfig()
        self.lock = threading.Lock()
        self._clock = clock
        seed = self.config.seed
        self._rng = random.Random(f"state:{seed}")
        organisation = (self.config.organisation_id, self.config.organisation_name)
        self._fleet = build_fleet(
            self.config.endpoints,
            seed,
            id_offset=self.config.id_offset,
            organisation=organisation,
        )
        self._generator = EventGenerator(self._fleet, seed)
        self._events = EventStore()
        self._ids = EventIdSequence(FIRST_EVENT_ID, seed)
        self._tokens = TokenIssuer(self.config.token_ttl, organisation)
        self._faults = FaultPlan(seed, (FaultRule.parse(r) for r in self.config.faults))
        self._requests: deque[RequestRecord] = deque(maxlen=_REQUEST_LOG_SIZE)
        self._sms = SmsCenter()
        self._rate = self.config.event_rate
        self._last_query: _QueryResult | None = None
        self.data_streams = DataStreams()
        self.quotas = Quotas()
        self._extensions: dict[int, dict[str, Any]] = {}
        # While true, every login is refused with 401 (a revoked application token).
        self.logins_refused = False

    # -- time -----------------------------------------------------------------------------

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    # -- auth -----------------------------------------------------------------------------

    def authenticate(self, application_token: object) -> str | None:
        """An auth token for the right application token; None (and an event 7) otherwise."""
        with self.lock:
            now = self.now()
            if application_token == self.config.application_token and not self.logins_refused:
                return self._tokens.issue(now.timestamp()).token
            if isinstance(application_token, str) and application_token:
                self._emit(7, None, "Application token authentication failed.", now, WARN)
            return None

    def check_token(self, token: str | None) -> TokenCheck:
        with self.lock:
            return self._tokens.check(token, self._clock())

    def issued_tokens(self) -> list[str]:
        with self.lock:
            return [t.token for t in self._tokens.issued()]

    def revoke_tokens(self) -> int:
        with self.lock:
            return self._tokens.revoke_all()

    # -- events ---------------------------------------------------------------------------

    def _emit(
        self,
        type_id: int,
        endpoint: Endpoint | None,
        description: str,
        moment: datetime,
        severity: int = INFO,
        detail: Any = None,
    ) -> dict[str, Any]:
        # Platform-side events of API actions: source API, no `user` for application tokens.
        record = event_record(
            self._fleet,
            self._ids.next(),
            moment,
            type_id,
            endpoint,
            description=description,
            source=API,
            severity=severity,
            alert=False,
            detail=detail,
        )
        self._events.add(record)
        return record

    def store_events(self, partials: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Complete and store injected records (see `records.complete_record`); all or none.

        A record with an explicit `id` is kept as given, even when that id is already stored:
        that is how tests simulate a re-delivery. Later generated ids stay above it.
        """
        with self.lock:
            now = self.now()
            completed: list[dict[str, Any]] = []
            for partial in partials:
                given_id = "id" in partial
                event_id = -1 if given_id else self._ids.next()
                record = complete_record(self._fleet, dict(partial), event_id, now)
                if given_id:
                    self._ids.observe(record["id"])
                completed.append(record)
            for record in completed:
                self._events.add(record)
            return completed

    def generate(self, count: int = 1, *, spread_seconds: float = 0.0) -> list[dict[str, Any]]:
        """Generate and store `count` events, evenly spread over the last `spread_seconds`."""
        with self.lock:
            now = self.now()
            produced: list[dict[str, Any]] = []
            for index in range(count):
                back = spread_seconds * (count - 1 - index) / max(count - 1, 1)
                record = self._generator.next_event(now - timedelta(seconds=back), self._ids.next())
                if record is not None:
                    self._events.add(record)
                    produced.append(record)
            return produced

    def generate_live(self, count: int) -> int:
        """Background generation: timestamped now, except a `late_fraction` stored late."""
        with self.lock:
            now = self.now()
            produced = 0
            for _ in range(count):
                moment = now
                if self._rng.random() < self.config.late_fraction:
                    moment = now - timedelta(seconds=self._rng.uniform(1.0, self.config.late_by))
                record = self._generator.next_event(moment, self._ids.next())
                if record is not None:
                    self._events.add(record)
                    produced += 1
            return produced

    def query_events(
        self,
        query: EventQuery,
        *,
        endpoint_id: int | None = None,
        sim_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """The Event API's result set, before paging: visible, filtered, sorted.

        A client walks pages of one query; the last result is kept until the store changes
        or a stored event's time comes, so each page costs a slice, not a scan.
        """
        with self.lock:
            now_ms = epoch_ms(self.now())
            key = (query, endpoint_id, sim_id, self._events.version)
            cached = self._last_query
            if cached is not None and cached.key == key and cached.valid_until_ms > now_ms:
                return cached.records
            # Up to the window's end, not to now: a poller catching up on a long backlog
            # asks for many early windows, and each must not cost a scan of all that follows.
            end_ms = now_ms if query.end_ms is None else min(query.end_ms, now_ms)
            candidates = self._events.between(query.start_ms, end_ms)
            if endpoint_id is not None or sim_id is not None:
                candidates = [
                    e
                    for e in candidates
                    if (endpoint_id is None or _ref_id(e.record, "endpoint") == endpoint_id)
                    and (sim_id is None or _ref_id(e.record, "sim") == sim_id)
                ]
            records = [e.record for e in query.select(candidates, now_ms)]
            next_visible = self._events.first_after(now_ms)
            valid_until = next_visible if next_visible is not None else 2**63
            self._last_query = _QueryResult(key, valid_until, records)
            return records

    def events(self) -> list[dict[str, Any]]:
        """Every stored event, visible yet or not, sorted by id."""
        with self.lock:
            return [e.record for e in self._events.all_by_id()]

    def events_since(self, position: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """Events stored from store position `position` on, and the position after them."""
        with self.lock:
            entries = self._events.since(position, limit)
            after = entries[-1].seq + 1 if entries else max(position, self._events.next_seq)
            return [e.record for e in entries], after

    def store_position(self) -> int:
        with self.lock:
            return self._events.next_seq

    def clear_events(self) -> None:
        with self.lock:
            self._events.clear()

    # -- generator rate -------------------------------------------------------------------

    @property
    def event_rate(self) -> float:
        with self.lock:
            return self._rate

    def set_event_rate(self, rate: float) -> None:
        if rate < 0:
            raise ValueError("rate must not be negative")
        with self.lock:
            self._rate = rate

    # -- fleet ----------------------------------------------------------------------------

    @property
    def fleet(self) -> Fleet:
        """The live fleet; read it under `lock`, change it through the methods below."""
        return self._fleet

    def sims(self) -> list[dict[str, Any]]:
        with self.lock:
            return [sim_resource(self._fleet, sim) for sim in self._fleet.sims.values()]

    def sim(self, sim_id: int) -> dict[str, Any]:
        with self.lock:
            return sim_resource(self._fleet, find_sim(self._fleet, sim_id))

    def endpoints(self) -> list[dict[str, Any]]:
        with self.lock:
            return [endpoint_resource(self._fleet, e) for e in self._fleet.endpoints.values()]

    def endpoint(self, endpoint_id: int) -> dict[str, Any]:
        with self.lock:
            return endpoint_resource(self._fleet, find_endpoint(self._fleet, endpoint_id))

    def change_sim_status(self, sim_id: int, status_id: int, *, emit: bool = True) -> bool:
        """Apply a SIM status PATCH. True if it changed; the same status is a quiet no-op.

        `emit=False` (admin set-up) skips both the transition rules and the event.
        """
        with self.lock:
            now = self.now()
            change = change_sim_status(self._fleet, sim_id, status_id, now, enforce=emit)
            self._log_change(change, now, emit)
            return change is not None

    def change_endpoint(
        self,
        endpoint_id: int,
        *,
        status_id: int | None = None,
        name: str | None = None,
        tags: str | None = None,
        set_tags: bool = False,
        service_profile_id: int | None = None,
        tariff_profile_id: int | None = None,
        imei_lock: bool | None = None,
        emit: bool = True,
    ) -> bool:
        """Apply an endpoint PATCH (status, name, tags, profiles, IMEI lock). True if the
        status changed."""
        with self.lock:
            now = self.now()
            change = change_endpoint(
                self._fleet,
                endpoint_id,
                now,
                status_id=status_id,
                name=name,
                tags=tags,
                set_tags=set_tags,
                service_profile_id=service_profile_id,
                tariff_profile_id=tariff_profile_id,
                imei_lock=imei_lock,
            )
            self._log_change(change, now, emit)
            return change is not None

    def _log_change(self, change: StatusChange | None, now: datetime, emit: bool) -> None:
        if emit and change is not None and change.event_type is not None:
            self._emit(change.event_type, change.endpoint, change.description, now)

    # -- SMS ------------------------------------------------------------------------------

    def send_sms(self, endpoint_id: int, request: Mapping[str, Any]) -> dict[str, Any]:
        """Submit an MT-SMS (`request` is the API body, with a `payload`)."""
        with self.lock:
            endpoint = find_endpoint(self._fleet, endpoint_id)
            return self._sms.submit(self._fleet, endpoint, request, self.now())

    def sms(self, endpoint_id: int | None = None) -> list[dict[str, Any]]:
        """SMS sent, oldest first; all of them, or one endpoint's."""
        with self.lock:
            if endpoint_id is not None:
                find_endpoint(self._fleet, endpoint_id)
            return self._sms.messages(endpoint_id)

    # -- quotas ---------------------------------------------------------------------------

    def quota(self, endpoint_id: int, kind: str) -> dict[str, Any] | None:
        """The endpoint's data or SMS quota, None when it has none (NotFoundError: no such
        endpoint)."""
        with self.lock:
            find_endpoint(self._fleet, endpoint_id)
            return self.quotas.get(endpoint_id, kind)

    def set_quota(self, endpoint_id: int, kind: str, body: Mapping[str, Any]) -> None:
        """Replace the endpoint's quota (InvalidQuota: a body the API refuses)."""
        with self.lock:
            endpoint = find_endpoint(self._fleet, endpoint_id)
            now = self.now()
            self.quotas.set(endpoint_id, kind, body, now)
            quota = self.quotas.get(endpoint_id, kind)
            assert quota is not None
            # "Data/SMS quota assigned" (56/58), its detail in camelCase as the docs show it
            # (emnify-api.md §4.1 [PD]).
            type_id, text = (
                (56, "Data quota assigned") if kind == "data" else (58, "SMS quota assigned")
            )
            detail = {
                "quota": {
                    "status": quota["status"],
                    "action_on_exhaustion": quota["action_on_exhaustion"],
                    "volume": quota["volume"],
                    "expiryDate": quota["expiry_date"],
                    "lastVolumeAdded": quota["last_volume_added"],
                    "lastStatusChangeDate": quota["last_status_change_date"],
                    "autoRefill": quota["auto_refill"],
                    "thresholdPercentage": quota["threshold_percentage"],
                    "thresholdVolume": quota["threshold_volume"],
                }
            }
            self._emit(type_id, endpoint, text, now, detail=detail)

    def delete_quota(self, endpoint_id: int, kind: str) -> bool:
        with self.lock:
            find_endpoint(self._fleet, endpoint_id)
            return self.quotas.delete(endpoint_id, kind)

    def traffic_limit_extension(self, endpoint_id: int) -> dict[str, Any] | None:
        with self.lock:
            find_endpoint(self._fleet, endpoint_id)
            extension = self._extensions.get(endpoint_id)
            return dict(extension) if extension is not None else None

    def extend_traffic_limit(self, endpoint_id: int, volume: float) -> None:
        """Replace the endpoint's traffic-limit extension (a POST sets it, it does not add)."""
        with self.lock:
            find_endpoint(self._fleet, endpoint_id)
            self._extensions[endpoint_id] = {"volume": volume}

    def remove_traffic_limit_extension(self, endpoint_id: int) -> bool:
        with self.lock:
            find_endpoint(self._fleet, endpoint_id)
            return self._extensions.pop(endpoint_id, None) is not None

    # -- connectivity and the operator blacklist (emnify-api.md §6.5) ---------------------

    def reset_connectivity(self, endpoint_id: int, *, location: bool, pdp_context: bool) -> None:
        """Cancel the location and/or delete the PDP context: emnify logs event 68."""
        with self.lock:
            endpoint = find_endpoint(self._fleet, endpoint_id)
            parts = [p for p, on in (("location", location), ("PDP context", pdp_context)) if on]
            self._emit(68, endpoint, f"Reset connectivity: {' and '.join(parts)}", self.now())

    def operator_blacklist(self, endpoint_id: int) -> list[int]:
        with self.lock:
            return sorted(find_endpoint(self._fleet, endpoint_id).operator_blacklist)

    def blacklist_operator(self, endpoint_id: int, operator_id: int) -> bool:
        """Add the operator; False when it was there already (the API's 409)."""
        with self.lock:
            blacklist = find_endpoint(self._fleet, endpoint_id).operator_blacklist
            if operator_id in blacklist:
                return False
            blacklist.add(operator_id)
            return True

    def unblacklist_operator(self, endpoint_id: int, operator_id: int) -> bool:
        """Remove the operator; False when it was not there."""
        with self.lock:
            blacklist = find_endpoint(self._fleet, endpoint_id).operator_blacklist
            if operator_id not in blacklist:
                return False
            blacklist.discard(operator_id)
            return True

    # -- faults ---------------------------------------------------------------------------

    def set_faults(self, rules: Iterable[FaultRule]) -> None:
        with self.lock:
            self._faults.replace(rules)

    def clear_faults(self) -> None:
        self.set_faults(())

    def faults(self) -> list[dict[str, Any]]:
        with self.lock:
            return self._faults.describe()

    def draw_fault(self, method: str, path: str, kinds: frozenset[str]) -> FaultRule | None:
        with self.lock:
            return self._faults.draw(method, path, kinds)

    # -- request log ----------------------------------------------------------------------

    def log_request(self, record: RequestRecord) -> None:
        with self.lock:
            self._requests.append(record)

    def requests(self) -> list[RequestRecord]:
        with self.lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self.lock:
            self._requests.clear()

    # -- reset ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the configured start: fresh fleet, no events, SMS, requests or extra faults.

        Issued auth tokens stay valid, so a connected client carries on, and event ids keep
        growing, so a client that remembers seen ids never mistakes a new event for an old one.
        """
        with self.lock:
            seed = self.config.seed
            # Same Fleet object, fresh devices: callers holding `state.fleet` stay current.
            fresh = build_fleet(
                self.config.endpoints,
                seed,
                id_offset=self.config.id_offset,
                organisation=(self.config.organisation_id, self.config.organisation_name),
            )
            self._fleet.endpoints, self._fleet.sims = fresh.endpoints, fresh.sims
            self._generator = EventGenerator(self._fleet, seed)
            self._events.clear()
            self._sms.clear()
            self._requests.clear()
            self._faults.replace(FaultRule.parse(r) for r in self.config.faults)
            self._rate = self.config.event_rate
            self.data_streams.reset()
            self.quotas.reset()
            self._extensions.clear()
            self.logins_refused = False


def _ref_id(record: Mapping[str, Any], key: str) -> Any:
    ref = record.get(key)
    return ref.get("id") if isinstance(ref, Mapping) else None
