"""Absence rules over the real path: the simulator's Event API on loopback, the poller, a
real SQLite store. Silence is judged on event time known to be complete, so an outage or an
API that answers `[]` for lack of access makes nothing look silent, and the catch-up fires
exactly what a poller that never stopped would have fired, each at its own event time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.daemon import Daemon
from engine.ports import Store
from engine.simulator import FaultRule, SimulatorServer
from engine.state import format_moment

from helpers import TOKEN, engine_config, poller_of, rules_from, with_poller

SILENT_FOR_2H = """
rules:
  - id: went-silent
    when: {type: 1}
    absence: {for: 2h, per: sim.id, forget_after: 2d}
    actions: [{log: {message: "{{ absence.key }} silent since {{ absence.since }}"}}]
"""

# The scenario, in hours after T0 (the poller starts at T0): two chatty devices report every
# ten minutes throughout; `early` stops at 1h, `during` at 5h, `back` at 2h and reports once
# more at 9h. The API is down from 6h to 9h of the poller's clock.
HOURS = 16
OUTAGE = (6.0, 9.0)


def _scenario(simulator: SimulatorServer, t0: datetime) -> dict[str, int]:
    sims = [sim["id"] for sim in simulator.state.sims()]
    devices = dict(zip(("chatty-1", "chatty-2", "early", "during", "back"), sims, strict=False))
    stamps: list[tuple[int, float]] = []
    for minute in range(0, HOURS * 60 + 1, 10):
        stamps += [(devices["chatty-1"], minute / 60), (devices["chatty-2"], minute / 60 + 0.05)]
    stamps += [(devices["early"], h / 6) for h in range(0, 7)]  # 0h .. 1h
    stamps += [(devices["during"], h / 2) for h in range(0, 11)]  # 0h .. 5h
    stamps += [(devices["back"], h / 2) for h in range(0, 5)] + [(devices["back"], 9.0)]
    simulator.state.store_events(
        {"event_type": 1, "sim_id": sim, "timestamp": (t0 + timedelta(hours=h)).isoformat()}
        for sim, h in sorted(stamps, key=lambda item: item[1])
    )
    return devices


def _firings(store: Store) -> list[tuple[str, str]]:
    """(sim id, the silence's end) of every absence firing in the outbox, read from its
    idempotency key: absence-{rule}-{key}-{end}-{action index}."""
    found = []
    for intent in store.intents(limit=10_000):
        if intent.rule_id == "went-silent":
            rest = intent.idempotency_key.removeprefix("absence-went-silent-")
            key, end_and_index = rest.split("-", 1)
            found.append((key, end_and_index.rsplit("-", 1)[0]))
    return sorted(found, key=lambda item: item[1])


def _at(t0: datetime, hours: float) -> str:
    return format_moment(t0 + timedelta(hours=hours))


@pytest.fixture
def t0() -> Iterator[datetime]:
    # A day ago, on a whole minute: the scenario runs on the poller's clock in the past.
    yield (datetime.now(UTC) - timedelta(hours=20)).replace(second=0, microsecond=0)


async def test_silent_devices_among_chatty_ones_fire_exactly_across_an_api_outage(
    tmp_path: Path, simulator: SimulatorServer, t0: datetime
) -> None:
    devices = _scenario(simulator, t0)
    config = with_poller(
        engine_config(tmp_path, simulator),
        initial_lookback=timedelta(minutes=5),
        max_window=timedelta(hours=1),
    )
    daemon = Daemon(config, rules_from(tmp_path, SILENT_FOR_2H), TOKEN)
    poller = poller_of(daemon)
    clock = t0 + timedelta(minutes=5)
    poller.clock = lambda: clock
    fired_before_outage: list[tuple[str, str]] = []
    try:
        await daemon.leadership.round()  # the poller's batches go under the leader lease
        while clock <= t0 + timedelta(hours=HOURS):
            hours = (clock - t0).total_seconds() / 3600
            down = OUTAGE[0] <= hours < OUTAGE[1]
            simulator.state.set_faults(
                [FaultRule.parse({"path": "^/api/v1/event$", "kind": "503"})] if down else []
            )
            await poller.poll_once()
            assert (poller.last_error is not None) == down
            if hours < OUTAGE[0]:
                fired_before_outage = _firings(daemon.store)
            elif down:
                # Blind: nothing new looks silent, however long the outage lasts.
                assert _firings(daemon.store) == fired_before_outage
            clock += timedelta(minutes=30)
        fired = _firings(daemon.store)
        audit = [r for r in daemon.store.audit_rows() if r["outcome"] == "absent"]
    finally:
        await daemon.aclose()

    early, during, back = (str(devices[name]) for name in ("early", "during", "back"))
    # Before the outage: `early` (last seen 1h) at 3h and `back` (last seen 2h) at 4h.
    assert fired_before_outage == [(early, _at(t0, 3)), (back, _at(t0, 4))]
    # After it, at their own event times: `during` (last seen 5h) at 7h, inside the
    # outage; `back`, seen again at 9h, re-armed and silent again at 11h. The chatty
    # devices never fire, and nothing fires twice.
    assert fired == [
        (early, _at(t0, 3)),
        (back, _at(t0, 4)),
        (during, _at(t0, 7)),
        (back, _at(t0, 11)),
    ]
    assert sorted(row["detail"] for row in audit) == sorted(
        f"no matching event for 2h since {_at(t0, since)} (sim.id={key})"
        for key, since in ((early, 1), (back, 2), (during, 5), (back, 9))
    )


async def test_an_api_answering_empty_for_lack_of_access_makes_nothing_look_silent(
    tmp_path: Path, simulator: SimulatorServer, t0: datetime
) -> None:
    _scenario(simulator, t0)
    config = with_poller(engine_config(tmp_path, simulator), initial_lookback=timedelta(minutes=5))
    daemon = Daemon(config, rules_from(tmp_path, SILENT_FOR_2H), TOKEN)
    poller = poller_of(daemon)
    clock = t0 + timedelta(minutes=5)
    poller.clock = lambda: clock
    try:
        await daemon.leadership.round()
        await poller.poll_once()  # sees the first events: complete time starts moving
        simulator.state.set_faults(
            [FaultRule.parse({"path": "^/api/v1/event$", "kind": "no_access"})]
        )
        for _ in range(2 * HOURS):
            clock += timedelta(minutes=30)
            await poller.poll_once()
            assert poller.last_error is None  # every answer was a 200
        blind = _firings(daemon.store)
        cursor = daemon.store.get_cursor()
    finally:
        await daemon.aclose()
    assert cursor is not None and cursor >= t0 + timedelta(hours=HOURS)
    assert blind == []  # sixteen hours of `[]` prove nothing: no device looked silent


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_two_instances_on_one_store_judge_each_silence_once_under_the_leader_lease(
    tmp_path: Path,
    simulator: SimulatorServer,
    t0: datetime,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    devices = _scenario(simulator, t0)
    base = with_poller(
        engine_config(tmp_path, simulator),
        initial_lookback=timedelta(minutes=5),
        max_window=timedelta(hours=1),
    )
    if backend == "postgres":
        base = replace(base, store_postgres=request.getfixturevalue("postgres_settings"))
    rules = rules_from(tmp_path, SILENT_FOR_2H)

    def instance(name: str) -> Daemon:
        config = replace(base, cluster=replace(base.cluster, instance_id=name))
        return Daemon(config, rules, TOKEN)

    first, second = instance("first"), instance("second")
    clock = t0 + timedelta(minutes=5)
    for daemon in (first, second):
        poller_of(daemon).clock = lambda: clock
    try:
        await first.leadership.round()
        await second.leadership.round()
        assert first.leadership.leading and not second.leadership.leading
        while clock <= t0 + timedelta(hours=5):  # the first leads until 5h
            await poller_of(first).poll_once()
            clock += timedelta(minutes=30)
        await first.leadership.stop()  # it gives the lease up; the second takes over
        await second.leadership.round()
        assert second.leadership.leading
        await poller_of(first).poll_once()  # a stale leader: its batch is refused
        assert poller_of(first).last_error is not None
        while clock <= t0 + timedelta(hours=HOURS):
            await poller_of(second).poll_once()
            clock += timedelta(minutes=30)
        fired = _firings(second.store)
    finally:
        await first.aclose()
        await second.aclose()
    early, during, back = (str(devices[name]) for name in ("early", "during", "back"))
    assert fired == [
        (early, _at(t0, 3)),
        (back, _at(t0, 4)),
        (during, _at(t0, 7)),
        (back, _at(t0, 11)),
    ]
