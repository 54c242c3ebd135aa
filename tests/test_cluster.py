"""Instances sharing one store: one leader polls (and loses the right to commit the moment
its lease moves on), every instance dispatches without running an intent twice or out of
order, batches judged side by side reach the decisions one instance would, an event
delivered twice is judged once, and `status` lists the members.

Each runs on both shared stores: one SQLite file opened by several engines (as processes
on one machine would share it) and one PostgreSQL database (as instances on several
machines do)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.clock import FixedClock
from engine.commands.status import collect, render
from engine.daemon import Daemon
from engine.errors import LeaseLost
from engine.leadership import LEASE, ClusterSettings
from engine.model import IntentStatus
from engine.pipeline import Pipeline
from engine.ports import Store
from engine.store import StoreSettings, open_store

from helpers import TOKEN, engine_config, eventually, poller_of, rules_from

T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
TTL = timedelta(seconds=3)

SUSPEND = """
rules:
  - id: suspend-on-quota
    when: {type: 19}
    actions: [{suspend_sim: {}}]
"""
TWO_IN_TEN = """
rules:
  - id: two-in-ten
    when: {type: 19}
    threshold: {count: 2, within: 10m, per: sim.id}
    actions: [{suspend_sim: {}}]
"""


def _event(event_id: int, minutes: float, sim: int = 1) -> dict[str, Any]:
    return {
        "id": event_id,
        "timestamp": (T0 + timedelta(minutes=minutes)).isoformat(),
        "event_type": {"id": 19},
        "event_source": {"id": 1},
        "event_severity": {"id": 1},
        "sim": {"id": sim, "iccid": f"89883030000000000{sim:02d}"},
        "endpoint": {"id": 500 + sim},
    }


@dataclass(frozen=True)
class Shared:
    """The store the instances of a test share; what `open` opened is closed after it."""

    settings: StoreSettings
    opened: list[Store] = field(default_factory=list)

    def open(self) -> Store:
        store = open_store(self.settings)
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "postgres"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Shared]:
    if request.param == "sqlite":
        found = Shared(StoreSettings(tmp_path / "state" / "engine.sqlite3"))
    else:
        found = Shared(StoreSettings(postgres=request.getfixturevalue("postgres_settings")))
    yield found
    for store in found.opened:
        store.close()


def _instance(
    tmp_path: Path, simulator: Any, shared: Shared, name: str, rules: str = SUSPEND
) -> Daemon:
    config = replace(
        engine_config(tmp_path, simulator),
        store_path=shared.settings.path,
        store_postgres=shared.settings.postgres,
        cluster=ClusterSettings(instance_id=name, lease_ttl=TTL),
    )
    return Daemon(config, rules_from(tmp_path, rules), TOKEN)


def _interleaved(first: Pipeline, second: Pipeline, records: list[dict[str, Any]]) -> None:
    """Let `second` judge and commit `records` after `first` judged its batch and before
    `first` commits it: what two instances running side by side may do."""
    store = first.store
    commit = store.commit_batch
    done = []

    def commit_after_the_other(batch: Any, now: datetime) -> int:
        if not done:
            done.append(second.process(records, source="data_streamer"))
        return commit(batch, now)

    store.commit_batch = commit_after_the_other  # type: ignore[method-assign]


# -- the leader lease ---------------------------------------------------------------------


async def test_one_instance_polls_and_another_takes_over_within_the_lease_when_it_dies(
    tmp_path, simulator, shared, monkeypatch
):
    first = _instance(tmp_path, simulator, shared, "first")
    second = _instance(tmp_path, simulator, shared, "second")
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    running_first = asyncio.create_task(first.run(stop_first))
    await eventually(lambda: first.leading)
    running_second = asyncio.create_task(second.run(stop_second))
    try:
        await asyncio.sleep(TTL.total_seconds() / 2)
        assert first.leading and not second.leading
        assert poller_of(second).last_success is None  # the standby does not poll
        # The leader dies without a word: its lease is not given up, it runs out.
        monkeypatch.setattr(first.store, "release_lease", lambda *args: None)
        stop_first.set()
        await running_first
        died = asyncio.get_running_loop().time()
        await eventually(lambda: second.leading, timeout=TTL.total_seconds() * 3)
        took = asyncio.get_running_loop().time() - died
        await eventually(lambda: poller_of(second).last_success is not None)
    finally:
        stop_first.set()
        stop_second.set()
        await asyncio.gather(running_first, running_second)
    assert took <= TTL.total_seconds() * 4 / 3 + 1.0  # the lease's run, then one round


async def test_a_leader_paused_past_its_lease_can_neither_move_the_cursor_nor_plan_actions(
    tmp_path, simulator, shared
):
    paused = _instance(tmp_path, simulator, shared, "paused")
    try:
        await paused.leadership.round()
        assert paused.leading
        (event,) = simulator.state.store_events(
            [{"event_type": {"id": 19}, "sim_id": simulator.state.sims()[0]["id"]}]
        )
        # While it sleeps its lease runs out and another instance takes it.
        later = datetime.now(UTC) + TTL * 2
        other = shared.open()
        assert other.acquire_lease(LEASE, "other", TTL, later) is not None
        before = paused.store.get_cursor()
        result = await poller_of(paused).poll_once()  # wakes up and polls as if it led
        assert "lease moved on" in (poller_of(paused).last_error or "")
        assert result.new_events == 0
        assert paused.store.get_cursor() == before
        assert paused.store.unseen([event["id"]]) == {event["id"]}
        assert paused.store.intents() == []
        await paused.leadership.round()
        assert not paused.leading
    finally:
        await paused.aclose()


# -- judging side by side -------------------------------------------------------------------


def test_batches_judged_side_by_side_reach_the_decisions_one_instance_would(tmp_path, shared):
    rules = rules_from(tmp_path, TWO_IN_TEN)
    first, second = Pipeline(rules, shared.open()), Pipeline(rules, shared.open())
    # Each instance gets one of two quota events for the same SIM within ten minutes:
    # together they reach the threshold once. Judged on one stale window, neither would.
    _interleaved(first, second, [_event(1, 0)])
    result = first.process([_event(2, 1)], source="data_streamer")
    intents = first.store.intents()  # type: ignore[attr-defined]
    assert [(i.event_id, i.kind) for i in intents] == [(2, "suspend_sim")]
    assert result.new_events == 1 and first.store.unseen([1, 2]) == set()
    # And the next event of that SIM starts a new count on either instance.
    assert second.process([_event(3, 2)], source="data_streamer").planned == []


def test_an_event_delivered_to_two_instances_at_once_is_judged_once(tmp_path, shared):
    rules = rules_from(tmp_path, SUSPEND)
    first, second = Pipeline(rules, shared.open()), Pipeline(rules, shared.open())
    same = _event(7, 0)
    _interleaved(first, second, [same])  # pushed to one, polled by the other
    result = first.process([same], source="poller")
    assert (result.new_events, result.duplicates, result.planned) == (0, 1, [])
    store = first.store
    assert [i.event_id for i in store.intents()] == [7]  # type: ignore[attr-defined]
    matched = [r for r in store.audit_rows(event_id=7) if r["outcome"] == "matched"]  # type: ignore[attr-defined]
    assert len(matched) == 1


# -- dispatching side by side -------------------------------------------------------------


async def test_two_dispatchers_never_run_one_intent_twice_and_keep_each_sims_order(
    tmp_path, simulator, shared
):
    rules = rules_from(tmp_path, SUSPEND)
    sims = simulator.state.sims()[:3]
    planner = Pipeline(rules, shared.open())
    events = [{"event_type": {"id": 19}, "sim_id": sim["id"]} for sim in sims for _ in range(2)]
    planner.process(simulator.state.store_events(events), source="poller")
    first = _instance(tmp_path, simulator, shared, "first")
    second = _instance(tmp_path, simulator, shared, "second")
    try:
        await asyncio.gather(first.dispatcher.run_due(), second.dispatcher.run_due())
        while await first.dispatcher.run_due() + await second.dispatcher.run_due():
            pass
        intents = first.store.intents()
    finally:
        await first.aclose()
        await second.aclose()
    assert [i.status for i in intents] == [IntentStatus.DONE] * 6
    assert all(i.attempts == 1 for i in intents)
    suspends = [r for r in simulator.state.requests() if r.method == "PATCH" and "/sim/" in r.path]
    assert len(suspends) == 3  # once per SIM; the second intent of each found it done


# -- status -------------------------------------------------------------------------------


async def test_status_lists_the_members_the_leader_first_and_warns_of_other_rules(
    tmp_path, simulator, shared
):
    first = _instance(tmp_path, simulator, shared, "b-first")
    second = _instance(tmp_path, simulator, shared, "a-second", rules=TWO_IN_TEN)
    try:
        await first.leadership.round()
        await second.leadership.round()
        data = collect(first.store, "shared", now=datetime.now(UTC))
    finally:
        await first.aclose()
        await second.aclose()
    members = data["members"]
    assert [(m["instance"], m["leader"]) for m in members] == [
        ("b-first", True),
        ("a-second", False),
    ]
    text = render(data)
    assert "b-first (leader)" in text
    assert "different rule sets" in text


def test_a_clock_that_stands_still_keeps_a_lease_without_renewal(shared):
    # A lease is judged on the time its caller gives: renewal keeps the same token.
    store = shared.open()
    clock = FixedClock(T0)
    token = store.acquire_lease(LEASE, "a", TTL, clock())
    clock.advance(TTL / 2)
    assert store.acquire_lease(LEASE, "a", TTL, clock()) == token
    assert store.acquire_lease(LEASE, "b", TTL, clock()) is None


@pytest.mark.parametrize("holder", ["a", "b"])
def test_a_fenced_commit_names_the_lease_that_moved_on(shared, holder):
    from engine.model import Batch, Fence

    store = shared.open()
    token = store.acquire_lease(LEASE, "a", TTL, T0)
    assert token is not None
    with pytest.raises(LeaseLost, match="leader lease moved on"):
        store.commit_batch(Batch(fence=Fence(LEASE, holder, token + 1)), T0)
