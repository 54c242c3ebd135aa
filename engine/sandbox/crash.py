"""What the two crash harnesses share (`scripts/crash-test`, one engine on SQLite, and
`scripts/cluster-crash-test`, a cluster on PostgreSQL): the rules they run, the planned
events whose effects are known in advance, the stream that stores them in the simulator, a
webhook receiver that answers late (so a fault lands between a call and its answer), and
the checks that nothing was evaluated twice or never, and no effect was lost or doubled.

The checks read what the simulator and the receiver recorded, and rows a harness read from
its store: they work the same on either store.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.events import format_timestamp
from engine.simulator import SimulatorState
from engine.simulator.server import LoopbackServer
from engine.simulator.webhook_sink import WebhookSink

TOKEN = "demo-application-token"  # the simulator's application token
HOOK_TOKEN = "crash-test-hook-token"
FOLLOW_UP = 5.0  # seconds: `after: 5s` in the rules below
SUSPENDED, ACTIVATED = 2, 1
ENABLED, DISABLED = 0, 1
SIM_SUSPENSION, SIM_ACTIVATION, ENDPOINT_DISABLED = 9, 8, 43  # event types of API changes
KINDS = ("cycle", "block", "notify")

RULES = """\
rules:
  - id: every-event            # matches everything: its audit rows prove "evaluated once"
    actions:
      - log: {level: debug}
  - id: quota-suspend-then-restore
    when: {source: policy_control, type: 19}     # Quota used up
    condition: {"==": [{"var": "detail.crash_test"}, "cycle"]}
    actions:
      - suspend_sim: {}
      - webhook:
          url: ${CRASH_HOOK_URL}
          headers: {Authorization: "Bearer ${CRASH_HOOK_TOKEN}"}
          body: {event: "{{ event.id }}", sim: "{{ event.sim.iccid }}", what: suspended}
      - after: 5s
        do: {activate_sim: {}}
  - id: block-device
    when: {type: 11}                             # Endpoint blocked
    condition: {"==": [{"var": "detail.crash_test"}, "block"]}
    actions:
      - suspend_sim: {}
      - disable_endpoint: {}
  - id: notify-device
    when: {source: policy_control, type: 18}     # Quota threshold reached
    condition: {"==": [{"var": "detail.crash_test"}, "notify"]}
    actions:
      - send_sms: {payload: "Quota notice {{ event.id }}"}
      - webhook:
          url: ${CRASH_HOOK_URL}
          headers: {Authorization: "Bearer ${CRASH_HOOK_TOKEN}"}
          body: {event: "{{ event.id }}", what: notified}
"""


@dataclass(frozen=True, slots=True)
class Planned:
    kind: str  # one of KINDS
    record: dict[str, Any]
    sim_id: int
    endpoint_id: int
    late: bool
    redelivered: bool

    @property
    def event_id(self) -> int:
        return int(self.record["id"])


@dataclass(slots=True)
class Check:
    name: str
    ok: bool
    text: str


@dataclass(slots=True)
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, ok: bool, text: str) -> None:
        self.checks.append(Check(name, ok, text))

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def say(text: str) -> None:
    print(text, flush=True)


# -- the event stream ----------------------------------------------------------------------


def plan_events(state: SimulatorState, count: int, rng: random.Random) -> list[Planned]:
    """`count` events, each kind on devices of its own so the final states are known."""
    sims = state.sims()
    planned: list[Planned] = []
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        sim = sims[index]
        endpoint_id = int(sim["endpoint"]["id"])
        type_id = {"cycle": 19, "block": 11, "notify": 18}[kind]
        record: dict[str, Any] = {
            "event_type": type_id,
            "event_source": 1 if kind != "block" else 0,
            "sim_id": sim["id"],
            "detail": {"crash_test": kind},
        }
        planned.append(
            Planned(
                kind,
                record,
                int(sim["id"]),
                endpoint_id,
                late=rng.random() < 0.15,
                redelivered=rng.random() < 0.15,
            )
        )
    return planned


class EventStream(threading.Thread):
    """Stores the planned events at random instants over `duration` seconds; late ones get a
    timestamp up to 12 s in the past (inside the poll overlap), and some are stored twice."""

    def __init__(
        self,
        state: SimulatorState,
        planned: list[Planned],
        duration: float,
        rate: float,
        rng: random.Random,
    ) -> None:
        super().__init__(name="event-stream", daemon=True)
        self.state = state
        self.duration = duration
        self.rate = rate
        self.stored: list[Planned] = []
        self.redeliveries = 0
        offsets = sorted(rng.uniform(0.0, duration) for _ in planned)
        self._schedule: list[tuple[float, str, Planned]] = [
            (at, "store", p) for at, p in zip(offsets, planned, strict=True)
        ]
        for at, item in zip(offsets, planned, strict=True):
            if item.redelivered:
                self._schedule.append((min(at + rng.uniform(0.5, 4.0), duration), "again", item))
        self._schedule.sort(key=lambda entry: entry[0])
        self._late = {id(p): rng.uniform(2.0, 12.0) for p in planned if p.late}
        self.finished = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        self.state.set_event_rate(self.rate)
        stored: dict[int, dict[str, Any]] = {}
        for at, what, item in self._schedule:
            time.sleep(max(0.0, start + at - time.monotonic()))
            if what == "store":
                record = dict(item.record)
                if id(item) in self._late:
                    moment = datetime.now(UTC) - timedelta(seconds=self._late[id(item)])
                    record["timestamp"] = format_timestamp(moment)
                (full,) = self.state.store_events([record])
                stored[id(item)] = full
                self.stored.append(
                    Planned(item.kind, full, item.sim_id, item.endpoint_id, item.late, False)
                )
            else:  # the same event (same id) delivered a second time
                self.state.store_events([stored[id(item)]])
                self.redeliveries += 1
        time.sleep(max(0.0, start + self.duration - time.monotonic()))
        self.state.set_event_rate(0.0)
        self.finished.set()


class LateAnswers:
    """ASGI middleware: the receiver records a call at once but answers `delay` seconds
    later, the window in which a kill leaves a delivered webhook unrecorded."""

    def __init__(self, app: ASGIApp, delay: float) -> None:
        self.app = app
        self.delay = delay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def late(message: Message) -> None:
            if message["type"] == "http.response.start":
                await asyncio.sleep(self.delay)
            await send(message)

        await self.app(scope, receive, late if scope["type"] == "http" else send)


def webhook_receiver(sink: WebhookSink, delay: float) -> LoopbackServer:
    app = Starlette(routes=sink.app.routes, middleware=[Middleware(LateAnswers, delay=delay)])
    return LoopbackServer(app)


def set_up_fleet(state: SimulatorState) -> None:
    for sim in state.sims():
        state.change_sim_status(int(sim["id"]), ACTIVATED, emit=False)
    for endpoint in state.endpoints():
        state.change_endpoint(int(endpoint["id"]), status_id=ENABLED, emit=False)


def not_a_gone_client(record: logging.LogRecord) -> bool:
    """Hide the simulator's complaint about a request whose sender timed out or was killed
    before the answer: that is what the faults and kills are for."""
    return not (record.exc_info and isinstance(record.exc_info[1], ClientDisconnect))


# -- checks --------------------------------------------------------------------------------


# Runs one SELECT on the store the harness ran on and gives its rows: the checks' SQL reads
# the same on SQLite and PostgreSQL.
Rows = Callable[[str], list[tuple[Any, ...]]]


def check_evaluations(report: Report, rows: Rows, state: SimulatorState) -> None:
    """Every event the simulator holds was judged once: one match of `every-event` each."""
    stored = {int(e["id"]) for e in state.events()}
    matched = Counter(
        int(row[0])
        for row in rows(
            "SELECT event_id FROM audit WHERE rule_id = 'every-event' AND outcome = 'matched'"
        )
    )
    twice = sorted(i for i, n in matched.items() if n > 1)
    never = sorted(stored - set(matched))
    unknown = sorted(set(matched) - stored)
    report.add(
        "events evaluated exactly once",
        not twice and not never and not unknown,
        f"{len(stored) - len(never)}/{len(stored)} once, {len(twice)} twice, {len(never)} never"
        + (f" (twice: {twice[:5]})" if twice else "")
        + (f" (never: {never[:5]})" if never else ""),
    )


EXPECTED_KINDS = {
    "cycle": ("suspend_sim", "webhook", "activate_sim"),
    "block": ("suspend_sim", "disable_endpoint"),
    "notify": ("send_sms", "webhook"),
}


def check_intents(report: Report, rows: Rows, planned: list[Planned]) -> None:
    """Every planned action done, none pending, running or dead, none unplanned."""
    by_status = {
        str(s): int(n) for s, n in rows("SELECT status, COUNT(*) FROM outbox GROUP BY status")
    }
    intents = rows(
        "SELECT event_id, rule_id, kind, status FROM outbox WHERE rule_id != 'every-event'"
    )
    done = Counter(kind for _, _, kind, status in intents if status == "done")
    expected = Counter(kind for p in planned for kind in EXPECTED_KINDS[p.kind])
    planned_ids = {p.event_id for p in planned}
    stray = [r for r in intents if r[0] not in planned_ids]
    not_done = {k: v for k, v in by_status.items() if k != "done"}
    report.add(
        "every action executed",
        done == expected and not not_done and not stray,
        ", ".join(f"{kind} {done[kind]}/{expected[kind]}" for kind in sorted(expected))
        + f"; outbox {dict(sorted(by_status.items()))}"
        + (f"; {len(stray)} unplanned" if stray else ""),
    )


def check_states(report: Report, state: SimulatorState, planned: list[Planned]) -> None:
    """Each planned device ends as its rule dictates, and each status change the rules ask
    for was made exactly once (the simulator logs an event per change)."""
    wrong: list[str] = []
    for item in planned:
        sim = state.sim(item.sim_id)["status"]["id"]
        endpoint = state.endpoint(item.endpoint_id)["status"]["id"]
        want_sim = ACTIVATED if item.kind in ("cycle", "notify") else SUSPENDED
        want_endpoint = DISABLED if item.kind == "block" else ENABLED
        if (sim, endpoint) != (want_sim, want_endpoint):
            wrong.append(f"sim {item.sim_id}: {sim}/{endpoint}, want {want_sim}/{want_endpoint}")
    report.add(
        "SIM and endpoint states as the rules dictate",
        not wrong,
        f"{len(planned) - len(wrong)}/{len(planned)} devices right"
        + (f" ({'; '.join(wrong[:3])})" if wrong else ""),
    )
    changes: Counter[tuple[int, int]] = Counter()
    for event in state.events():
        if event["event_source"]["id"] != 2:
            continue
        type_id = event["event_type"]["id"]
        if type_id in (SIM_SUSPENSION, SIM_ACTIVATION, ENDPOINT_DISABLED):
            changes[(type_id, int(event["endpoint"]["id"]))] += 1
    expected: Counter[tuple[int, int]] = Counter()
    for item in planned:
        if item.kind == "cycle":
            expected[(SIM_SUSPENSION, item.endpoint_id)] += 1
            expected[(SIM_ACTIVATION, item.endpoint_id)] += 1
        elif item.kind == "block":
            expected[(SIM_SUSPENSION, item.endpoint_id)] += 1
            expected[(ENDPOINT_DISABLED, item.endpoint_id)] += 1
    doubled = sum(1 for key, n in changes.items() if n > expected.get(key, 0))
    missing = sum(1 for key, n in expected.items() if changes.get(key, 0) < n)
    names = {
        SIM_SUSPENSION: "suspended",
        SIM_ACTIVATION: "activated",
        ENDPOINT_DISABLED: "disabled",
    }
    tally = Counter(names[type_id] for (type_id, _), n in changes.items() for _ in range(n))
    report.add(
        "each status change made once",
        changes == expected,
        ", ".join(f"{name} {tally[name]}" for name in names.values())
        + f" ({doubled} doubled, {missing} missing)",
    )


def check_webhooks(report: Report, sink: WebhookSink, planned: list[Planned]) -> None:
    """The receiver saw exactly the planned `Idempotency-Key`s, each call authorised (a
    redelivery after a kill carries the same key: counted, not failed)."""
    keys = sink.idempotency_keys()
    expected = set()
    for item in planned:
        if item.kind == "cycle":
            expected.add(f"{item.event_id}-quota-suspend-then-restore-1")
        elif item.kind == "notify":
            expected.add(f"{item.event_id}-notify-device-1")
    duplicates = sum(n - 1 for n in keys.values())
    authorised = all(c.headers.get("authorization") == f"Bearer {HOOK_TOKEN}" for c in sink.calls())
    report.add(
        "webhook Idempotency-Keys",
        set(keys) == expected and authorised,
        f"{len(keys)} distinct for {len(expected)} planned, {duplicates} redelivered with the"
        " same key" + ("" if authorised else "; a call lacked the Authorization header"),
    )


def check_sms(report: Report, state: SimulatorState, planned: list[Planned]) -> None:
    """Each planned SMS sent once: an SMS cannot be taken back."""
    sent = Counter(sms["payload"] for sms in state.sms())
    expected = {f"Quota notice {p.event_id}" for p in planned if p.kind == "notify"}
    twice = sum(1 for n in sent.values() if n > 1)
    report.add(
        "SMS sent once each",
        set(sent) == expected and twice == 0,
        f"{sum(sent.values())} sent for {len(expected)} planned, {twice} sent twice",
    )
