"""The store contract: what every store backend promises through `engine.ports`, written
once and run against each backend.

Each class is one port's contract (its `port` names the Protocol in `engine.ports`). A
backend is one entry of BACKENDS: how to open a fresh, empty store, and the ports it does
not implement, each with the reason; that port's tests are not run on it.
SQLite runs on a real file, PostgreSQL on the session's server (engine/sandbox/postgres.py),
each test in a fresh schema.

Times the store is told (`now`) and event times are fixed: nothing here reads the clock.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.errors import LeaseLost, StaleRuleState
from engine.model import (
    AbsenceMark,
    AuditRow,
    Batch,
    DigestEvent,
    Fence,
    FollowUpCancel,
    FollowUpKey,
    Intent,
    IntentStatus,
    Member,
    RuleOverride,
    RuleStateChanges,
    Silence,
)
from engine.store import MemoryStore, SqliteStore

T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)  # event time
NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)  # when the store is told things happen
LATER = NOW + timedelta(hours=24)
SECOND = timedelta(seconds=1)


@dataclass(frozen=True)
class Backend:
    name: str
    # A fresh, empty store, given a folder of its own and the test's fixtures.
    open: Callable[[Path, pytest.FixtureRequest], Any]
    lacks: Mapping[str, str] = field(default_factory=dict)  # port → why it is not implemented


_REPLAY_KEEPS_NOTHING_ELSE = "replay's store keeps only what the pipeline reads back"


def _postgres(_folder: Path, request: pytest.FixtureRequest) -> Any:
    from engine.store.postgres import PostgresStore

    server = request.getfixturevalue("postgres_server")
    return PostgresStore(request.getfixturevalue("postgres_url"), password=server.password)


BACKENDS = [
    Backend("sqlite", lambda folder, _request: SqliteStore(folder / "state.sqlite3")),
    Backend("postgres", _postgres),
    Backend(
        "memory",
        lambda _folder, _request: MemoryStore(),
        lacks={
            "DedupHorizon": "a replay keeps every seen id to its end, not when it was seen",
            "Outbox": f"replay dispatches nothing: {_REPLAY_KEEPS_NOTHING_ELSE}",
            "RuleControl": "`rules resume` and the guard's summary work on the daemon's store",
            "OwnActions": "nothing runs in a replay: its pipeline counts what it planned as done",
            "DigestLedger": "a replay runs no digest",
            "AuditLog": f"a replay writes no audit log: {_REPLAY_KEEPS_NOTHING_ELSE}",
            "Meta": "a replay reads a file: it has no cursor",
            "Retainer": "a replay's store ends with the replay",
            "StoreHealth": "a replay's store lives in memory and ends with the replay",
            "Leases": "a replay is one process: nothing to share",
            "Members": "a replay is one process: nothing to share",
            "Silences": "a replay takes mute windows from the config; silences are the daemon's",
        },
    ),
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each port's tests run on every backend that implements the port (and only on those:
    what a backend lacks is declared, with the reason, in BACKENDS)."""
    if "backend" in metafunc.fixturenames:
        port = metafunc.cls.port if metafunc.cls is not None else None
        backends = [b for b in BACKENDS if port not in b.lacks]
        metafunc.parametrize("backend", backends, ids=[b.name for b in backends])


@pytest.fixture
def store(backend: Backend, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh store of the backend, for the port of the test's class."""
    opened = backend.open(tmp_path, request)
    yield opened
    close = getattr(opened, "close", None)
    if close is not None:
        close()


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The machine's local zone 14 hours ahead of UTC, for the length of a test."""
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _intent(key: str, event_id: int | None = 1, **extra: Any) -> Intent:
    values: dict[str, Any] = {
        "rule_id": "r",
        "action_index": 0,
        "kind": "suspend_sim",
        "params": {},
        "target": {"sim_id": 9, "endpoint_id": 5, "iccid": "8988"},
    }
    return Intent(idempotency_key=key, event_id=event_id, **(values | extra))


def _follow_up(
    idempotency_key: str, event_id: int = 1, *, shadow: bool = False, **extra: Any
) -> FollowUpKey:
    values: dict[str, Any] = {
        "rule_id": "r",
        "action_index": 1,
        "key_path": "sim.id",
        "key": "9",
        "planned_at": T0,
        "due_at": LATER,
    }
    return FollowUpKey(idempotency_key, event_id=event_id, shadow=shadow, **(values | extra))


def _planning(follow_up: FollowUpKey, status: IntentStatus = IntentStatus.PENDING) -> Batch:
    """The batch that plans a follow-up, as the pipeline writes it: its intent, due later,
    and the key that cancels it."""
    intent = _intent(
        follow_up.idempotency_key,
        follow_up.event_id,
        rule_id=follow_up.rule_id,
        action_index=follow_up.action_index,
        kind="activate_sim",
        status=status,
        due_at=follow_up.due_at,
    )
    return Batch(
        seen=[(follow_up.event_id, follow_up.planned_at)],
        intents=[intent],
        state=RuleStateChanges(follow_ups=[follow_up]),
    )


_CANCELLING_EVENTS = itertools.count(1000)


def _cancel(key: str, *, shadow: bool = False) -> Batch:
    """The batch of an event (each time another) that cancels the follow-up `key`."""
    event_id = next(_CANCELLING_EVENTS)
    row = AuditRow(event_id, "r", None, "cancelled")
    late = AuditRow(event_id, "r", None, "cancel too late")
    cancel = FollowUpCancel(key, audit=row, too_late=late, shadow=shadow)
    return Batch(
        seen=[(event_id, T0 + timedelta(hours=1))], state=RuleStateChanges(cancels=[cancel])
    )


def _state(**changes: Any) -> Batch:
    return Batch(state=RuleStateChanges(**changes))


class TestSeenEvents:
    port = "SeenEvents"

    def test_an_event_is_unseen_until_a_batch_records_it(self, store):
        assert store.unseen([1, 2]) == {1, 2}
        store.commit_batch(Batch(seen=[(1, T0)]), NOW)
        assert store.unseen([1, 2]) == {2}

    def test_asking_about_no_ids_finds_none_unseen(self, store):
        assert store.unseen([]) == set()

    def test_a_batch_recording_an_event_recorded_before_is_refused_whole(self, store):
        # The pipeline leaves out what `unseen` says was seen: such a batch means another
        # instance recorded the event meanwhile, and the batch must be judged again.
        store.commit_batch(Batch(seen=[(1, T0), (2, T0)]), NOW)
        with pytest.raises(StaleRuleState, match=r"^events of the batch were recorded meanwhile$"):
            store.commit_batch(Batch(seen=[(3, T0), (2, T0)], intents=[_intent("k3")]), NOW)
        assert store.seen_count() == 2 and store.unseen([3]) == {3}

    def test_ids_out_of_order_are_seen_as_well_as_ids_in_order(self, store):
        store.commit_batch(Batch(seen=[(10, T0), (20, T0), (30, T0)]), NOW)
        store.commit_batch(Batch(seen=[(25, T0), (5, T0), (40, T0)]), NOW)  # two late ones
        assert store.unseen([5, 10, 15, 25, 30, 35, 40, 45]) == {15, 35, 45}
        assert store.seen_count() == 6

    def test_each_organisation_has_its_own_seen_ids(self, store):
        # `organisations:`: two organisations may use one event id; each is judged once.
        store.commit_batch(Batch(seen=[(1, T0)], organisation="acme"), NOW)
        assert store.unseen([1], "acme") == set()
        assert store.unseen([1], "globex") == {1}
        assert store.unseen([1]) == {1}  # nor is it the single organisation's
        store.commit_batch(Batch(seen=[(1, T0)], organisation="globex"), NOW)
        store.commit_batch(Batch(seen=[(1, T0)]), NOW)
        assert store.seen_count() == 3
        with pytest.raises(StaleRuleState):
            store.commit_batch(Batch(seen=[(1, T0)], organisation="acme"), NOW)


class TestSeenEventsHorizon:
    """`DedupHorizon`: the dedup horizon of a store that runs for
    months, past which ids are forgotten."""

    port = "DedupHorizon"

    def test_ids_older_than_the_horizon_are_forgotten_and_newer_ones_kept(self, store):
        store.commit_batch(Batch(seen=[(1, T0), (2, T0 + timedelta(hours=2))]), NOW)
        assert store.prune_seen(T0 + timedelta(hours=1)) == 1
        assert store.unseen([1, 2]) == {1}
        assert store.seen_count() == 1

    def test_an_organisations_seen_ids_are_forgotten_by_its_own_horizon(self, store):
        store.commit_batch(Batch(seen=[(1, T0)], organisation="acme"), NOW)
        store.commit_batch(Batch(seen=[(1, T0)], organisation="globex"), NOW)
        assert store.seen_at(1, "acme") == T0
        assert store.prune_seen(T0 + SECOND, "acme") == 1
        assert store.unseen([1], "acme") == {1}
        assert store.unseen([1], "globex") == set()  # a paused one's ids wait for its poller

    def test_when_an_event_was_seen_is_known_until_it_is_forgotten(self, store):
        store.commit_batch(Batch(seen=[(1, T0)]), NOW)
        assert store.seen_at(1) == T0
        assert store.seen_at(2) is None
        store.prune_seen(T0 + SECOND)
        assert store.seen_at(1) is None


class TestUnitOfWork:
    port = "UnitOfWork"

    def test_a_batch_creates_its_intents_and_says_how_many(self, store):
        assert store.commit_batch(Batch(intents=[_intent("1-r-0"), _intent("1-r-1")]), NOW) == 2

    def test_a_repeated_idempotency_key_creates_no_second_intent(self, store):
        assert store.commit_batch(Batch(intents=[_intent("1-r-0")]), NOW) == 1
        assert store.commit_batch(Batch(intents=[_intent("1-r-0"), _intent("2-r-0")]), NOW) == 1
        assert store.commit_batch(Batch(intents=[_intent("1-r-0", event_id=7)]), NOW) == 0

    def test_a_key_repeated_within_one_batch_creates_one_intent(self, store):
        assert store.commit_batch(Batch(intents=[_intent("1-r-0"), _intent("1-r-0")]), NOW) == 1

    def test_keys_of_every_shape_are_told_apart(self, store):
        first = [_intent("-7-r-0"), _intent("0-7-r-0")]  # no event id, and event 0
        assert store.commit_batch(Batch(intents=first), NOW) == 2
        keys = [
            "7-r-0", "07-r-0", "7-r", "7", "7-", "-7-r", "0-r-0", "00-r-0", "+7-r-0",
            "\u0667-r-0",  # an Arabic-Indic seven
            "7-r-0 ", "1234567890123456-r-0", "123456789012345-r-0",
            "digest-r-2025-05-01T10:00:00Z-0", "412907744516221-r-on_guard_trip-0",
        ]  # fmt: skip
        assert store.commit_batch(Batch(intents=[_intent(k) for k in keys]), NOW) == len(keys)
        assert store.commit_batch(Batch(intents=[_intent(k) for k in keys]), NOW) == 0
        assert store.commit_batch(Batch(intents=[_intent("8-r-0"), _intent("7-s")]), NOW) == 2

    def test_a_batch_judged_on_an_old_rule_state_version_is_refused(self, store):
        judged_on = store.rule_state_version()
        store.reset_rule_windows("other")  # `rules resume` or a reload, while it was judged
        batch = Batch(
            seen=[(1, T0)],
            intents=[_intent("1-r-0")],
            state=RuleStateChanges(
                windows={("r", "9"): ([T0.timestamp()], T0.timestamp() + 600)},
                version=judged_on,
            ),
        )
        with pytest.raises(
            StaleRuleState, match=r"^rule state changed while the batch was judged$"
        ):
            store.commit_batch(batch, NOW)
        assert store.unseen([1]) == {1}
        assert store.window("r", "9") == []
        batch.state.version = store.rule_state_version()  # judged again
        assert store.commit_batch(batch, NOW) == 1
        assert store.unseen([1]) == set()

    def test_a_batch_judged_on_any_version_before_a_reset_is_refused(self, store):
        # A version is never made twice: not by a batch, not by a reset after batches.
        first = store.rule_state_version()
        store.commit_batch(_state(throttles={("r", "9"): 10.0}, version=first), NOW)
        second = store.rule_state_version()
        store.reset_rule_windows("r")
        for judged_on in (first, second):
            with pytest.raises(StaleRuleState):
                store.commit_batch(_state(throttles={("r", "8"): 20.0}, version=judged_on), NOW)
        assert store.throttle_until("r", "8") is None

    def test_a_batch_that_names_no_version_is_not_checked(self, store):
        store.reset_rule_windows("r")
        assert store.commit_batch(Batch(intents=[_intent("1-r-0")]), NOW) == 1


class TestRuleStateSource:
    port = "RuleStateSource"

    def test_a_fresh_store_remembers_nothing(self, store):
        assert not store.has_windows_or_throttles()
        assert store.window("r", "9") == []
        assert store.throttle_until("r", "9") is None
        assert store.guard_entries("r") == []
        assert store.rule_overrides() == {}
        assert store.cancellable_follow_ups() == []
        assert store.absence_marks() == []
        assert store.rule_state_version() == 0

    def test_absence_keys_are_read_back_whole_and_a_forgotten_one_is_gone(self, store):
        seen = AbsenceMark("r", "9", 100.5, True, True, (160.0, 220.25), '{"id": 4}')
        listed = AbsenceMark("r", "8988303000000000001", 50.0, seen=False)
        other = AbsenceMark("s", "9", 70.0)
        store.commit_batch(
            _state(absences={("r", "9"): seen, ("r", listed.key): listed, ("s", "9"): other}),
            NOW,
        )
        assert store.absence_marks() == [listed, seen, other]  # by rule, then key
        later = AbsenceMark("r", "9", 220.25, False, True, (), '{"id": 7}')
        store.commit_batch(_state(absences={("r", "9"): later, ("s", "9"): None}), NOW)
        assert store.absence_marks() == [listed, later]

    def test_forgetting_an_absence_key_never_kept_changes_nothing(self, store):
        store.commit_batch(_state(absences={("r", "9"): None}), NOW)
        assert store.absence_marks() == []

    def test_a_batch_that_changes_absence_keys_makes_a_new_rule_state_version(self, store):
        before = store.rule_state_version()
        batch = _state(absences={("r", "9"): AbsenceMark("r", "9", 1.0)})
        batch.state.version = before
        store.commit_batch(batch, NOW)
        assert store.rule_state_version() == before + 1

    def test_windows_throttles_and_guard_entries_of_a_batch_are_read_back(self, store):
        store.commit_batch(
            _state(
                windows={("r", "9"): ([100.0, 160.0], 760.0), ("r", "8"): ([120.0], 720.0)},
                throttles={("r", "9"): 3700.0},
                guards={"r": [100.0, 110.0], "*": [100.0]},
            ),
            NOW,
        )
        assert store.has_windows_or_throttles()
        assert store.window("r", "9") == [100.0, 160.0]
        assert store.window("r", "8") == [120.0]
        assert store.window("s", "9") == []
        assert store.throttle_until("r", "9") == 3700.0
        assert store.throttle_until("r", "8") is None
        assert store.guard_entries("r") == [100.0, 110.0]
        assert store.guard_entries("*") == [100.0]

    def test_a_later_batch_replaces_what_it_changed_and_an_emptied_window_is_gone(self, store):
        store.commit_batch(
            _state(windows={("r", "9"): ([100.0], 700.0)}, throttles={("r", "8"): 500.0}), NOW
        )
        store.commit_batch(
            _state(windows={("r", "9"): ([], 0.0)}, throttles={("r", "8"): 900.0}), NOW
        )
        assert store.window("r", "9") == []
        assert store.throttle_until("r", "8") == 900.0
        store.commit_batch(_state(windows={("r", "7"): ([], 0.0)}), NOW)  # empty, never stored
        assert store.window("r", "7") == []

    def test_a_store_with_only_a_throttle_mark_has_windows_or_throttles(self, store):
        store.commit_batch(_state(throttles={("r", "9"): 500.0}), NOW)
        assert store.has_windows_or_throttles()

    def test_windows_pruned_before_a_time_are_gone_and_live_ones_kept(self, store):
        store.commit_batch(
            _state(
                windows={("r", "old"): ([100.0], 700.0), ("r", "live"): ([900.0], 1500.0)}
                | {("r", "edge"): ([400.0], 1000.0)},
                throttles={("r", "old"): 999.0, ("r", "live"): 1000.0},
                guards={"r": [100.0]},
            ),
            NOW,
        )
        store.commit_batch(_state(prune_before=1000.0), NOW)
        assert store.window("r", "old") == []
        assert store.window("r", "live") == [900.0]
        assert store.window("r", "edge") == [400.0]  # ends at the prune time: kept
        assert store.throttle_until("r", "old") is None
        assert store.throttle_until("r", "live") == 1000.0  # ends at the prune time: kept
        assert store.guard_entries("r") == [100.0]  # guards are not pruned by time

    def test_a_window_written_by_the_pruning_batch_is_pruned_with_it(self, store):
        store.commit_batch(
            _state(windows={("r", "late"): ([100.0], 700.0)}, prune_before=1000.0), NOW
        )
        assert store.window("r", "late") == []

    def test_what_is_read_back_is_a_copy(self, store):
        entries = [100.0]
        store.commit_batch(
            _state(windows={("r", "9"): (entries, 700.0)}, guards={"r": entries}), NOW
        )
        entries.append(200.0)  # the caller's list is the caller's
        store.window("r", "9").append(300.0)
        store.guard_entries("r").append(300.0)
        assert store.window("r", "9") == [100.0]
        assert store.guard_entries("r") == [100.0]

    def test_overrides_are_read_back_by_rule_and_a_later_one_replaces_the_earlier(self, store):
        tripped = RuleOverride("b", "shadow", "5 actions in 1h", T0, 11)
        store.commit_batch(_state(overrides=[tripped, RuleOverride("a", "shadow", "x", T0)]), NOW)
        again = RuleOverride("b", "shadow", "6 actions in 1h", T0 + SECOND, 12)
        store.commit_batch(_state(overrides=[again]), NOW)
        overrides = store.rule_overrides()
        assert list(overrides) == ["a", "b"]
        assert overrides["b"] == again

    def test_resetting_a_rules_windows_forgets_only_its_windows_and_changes_the_version(
        self, store
    ):
        store.commit_batch(
            _state(
                windows={("r", "9"): ([100.0], 700.0), ("r", "8"): ([100.0], 700.0)}
                | {("s", "9"): ([100.0], 700.0)},
                throttles={("r", "9"): 900.0},
            ),
            NOW,
        )
        before = store.rule_state_version()
        assert store.reset_rule_windows("r") == 2
        assert store.window("r", "9") == [] and store.window("r", "8") == []
        assert store.window("s", "9") == [100.0]
        assert store.throttle_until("r", "9") == 900.0  # a throttle mark is not a count
        assert store.rule_state_version() != before
        assert store.reset_rule_windows("nothing-counted") == 0

    def test_resetting_a_rule_forgets_the_keys_its_absence_watched_and_only_its_own(self, store):
        kept = AbsenceMark("s", "9", 1.0)
        store.commit_batch(
            _state(absences={("r", "9"): AbsenceMark("r", "9", 1.0), ("s", "9"): kept}), NOW
        )
        assert store.reset_rule_windows("r") == 1
        assert store.absence_marks() == [kept]


class TestFollowUps:
    """The follow-ups a later event may cancel: planned, cancelled and pruned by batches
    (`UnitOfWork`), read back through `RuleStateSource.cancellable_follow_ups`."""

    port = "RuleStateSource"

    def test_a_follow_up_with_cancel_if_waits_to_be_cancelled(self, store):
        follow_up = _follow_up("1-r-1")
        assert store.commit_batch(_planning(follow_up), NOW) == 1
        assert store.cancellable_follow_ups() == [follow_up]

    def test_follow_ups_are_read_back_in_planning_order(self, store):
        first, second = _follow_up("5-r-1", 5), _follow_up("3-r-1", 3, key="8")
        store.commit_batch(_planning(first), NOW)
        store.commit_batch(_planning(second, IntentStatus.SHADOW), NOW)
        keys = [f.idempotency_key for f in store.cancellable_follow_ups()]
        assert keys == ["5-r-1", "3-r-1"]

    def test_a_follow_up_is_read_back_as_its_intent_was_planned(self, store):
        # The intent is what runs: its rule, step, event and due time are the follow-up's.
        follow_up = _follow_up("1-r-1")
        batch = _planning(follow_up)
        batch.state.follow_ups = [replace(follow_up, rule_id="q", action_index=4, event_id=2)]
        store.commit_batch(batch, NOW)
        assert store.cancellable_follow_ups() == [follow_up]

    def test_a_held_follow_up_is_not_cancellable_and_the_rest_of_its_batch_is(self, store):
        held, waiting = _follow_up("1-r-1"), _follow_up("1-r-2", action_index=2)
        batch = _planning(held, IntentStatus.HELD)
        batch.intents += _planning(waiting).intents
        batch.state.follow_ups.append(waiting)
        assert store.commit_batch(batch, NOW) == 2
        assert store.cancellable_follow_ups() == [waiting]

    def test_an_intent_planned_without_a_cancel_key_is_not_cancellable(self, store):
        store.commit_batch(Batch(intents=[_intent("1-r-1", due_at=LATER)]), NOW)
        assert store.cancellable_follow_ups() == []

    def test_a_follow_up_without_a_due_time_is_due_when_it_was_recorded(self, store):
        follow_up = _follow_up("1-r-1")
        batch = _planning(follow_up)
        batch.intents[0].due_at = None
        store.commit_batch(batch, NOW)
        (waiting,) = store.cancellable_follow_ups()
        assert waiting.due_at == NOW

    def test_a_cancel_of_a_follow_up_still_pending_succeeds(self, store):
        store.commit_batch(_planning(_follow_up("1-r-1")), NOW)
        store.commit_batch(_cancel("1-r-1"), NOW)
        assert store.cancellable_follow_ups() == []

    def test_a_cancel_of_a_shadow_follow_up_succeeds(self, store):
        store.commit_batch(_planning(_follow_up("1-r-1", shadow=True), IntentStatus.SHADOW), NOW)
        assert [f.shadow for f in store.cancellable_follow_ups()] == [True]
        store.commit_batch(_cancel("1-r-1", shadow=True), NOW)
        assert store.cancellable_follow_ups() == []

    def test_a_cancel_takes_only_its_own_follow_up(self, store):
        store.commit_batch(_planning(_follow_up("1-r-1")), NOW)
        store.commit_batch(_planning(_follow_up("3-r-1", 3)), NOW)
        store.commit_batch(_cancel("3-r-1"), NOW)
        store.commit_batch(_cancel("9-r-1"), NOW)  # nothing waits under that key
        assert [f.idempotency_key for f in store.cancellable_follow_ups()] == ["1-r-1"]

    def test_a_follow_up_cancelled_by_the_batch_that_planned_it_never_waits(self, store):
        batch = _planning(_follow_up("1-r-1"))
        batch.state.cancels = _cancel("1-r-1").state.cancels
        assert store.commit_batch(batch, NOW) == 1
        assert store.cancellable_follow_ups() == []

    def test_a_follow_up_planned_again_keeps_what_it_had(self, store):
        follow_up = _follow_up("1-r-1")
        store.commit_batch(_planning(follow_up), NOW)
        again = _planning(_follow_up("1-r-1", key="8", due_at=LATER + timedelta(hours=1)))
        again.seen = []  # the same decision again (its event is recorded already)
        assert store.commit_batch(again, NOW) == 0
        assert store.cancellable_follow_ups() == [follow_up]

    def test_follow_ups_due_before_the_prune_time_are_no_longer_cancellable(self, store):
        store.commit_batch(_planning(_follow_up("1-r-1", due_at=LATER)), NOW)
        store.commit_batch(_planning(_follow_up("2-r-1", 2, due_at=LATER + SECOND)), NOW)
        store.commit_batch(_state(prune_before=(LATER + SECOND).timestamp()), NOW)
        assert [f.idempotency_key for f in store.cancellable_follow_ups()] == ["2-r-1"]


class TestOutbox:
    port = "Outbox"

    def test_an_intent_falls_due_at_its_time_oldest_first(self, store):
        elsewhere = {"sim_id": 10, "endpoint_id": 6, "iccid": "8989"}  # not behind the first
        store.commit_batch(
            Batch(intents=[_intent("1-r-1", due_at=LATER), _intent("1-r-0", target=elsewhere)]),
            NOW,
        )
        assert [i.idempotency_key for i in store.due_intents(NOW)] == ["1-r-0"]
        due = store.due_intents(LATER)
        assert [i.idempotency_key for i in due] == ["1-r-1", "1-r-0"]
        assert store.due_intents(LATER, limit=1) == due[:1]

    def test_without_a_limit_100_intents_are_due_and_1000_listed_oldest_first(self, store):
        intents = [
            _intent(f"{n}-r-0", n, target={"sim_id": n, "endpoint_id": n, "iccid": f"89{n}"})
            for n in range(1, 1002)
        ]
        store.commit_batch(Batch(intents=intents), NOW)
        due = [i.event_id for i in store.due_intents(NOW)]
        assert due == list(range(1, 101))
        assert [i.event_id for i in store.intents()] == list(range(1, 1001))

    def test_an_intent_is_read_back_as_it_was_planned(self, store):
        planned = _intent("1-r-2", params={"text": "hi"}, due_at=LATER, action_index=2)
        store.commit_batch(Batch(intents=[planned]), NOW)
        (intent,) = store.intents()
        assert intent.id is not None and store.get_intent(intent.id) == intent
        assert (intent.idempotency_key, intent.event_id, intent.rule_id, intent.action_index) == (
            "1-r-2",
            1,
            "r",
            2,
        )
        assert intent.kind == "suspend_sim"
        assert (intent.params, intent.target, intent.due_at) == (
            planned.params,
            planned.target,
            LATER,
        )
        assert (intent.status, intent.attempts, intent.created_at) == (
            IntentStatus.PENDING,
            0,
            NOW,
        )

    def test_kinds_select_and_exclude_the_intents_due(self, store):
        intents = [_intent("1-r-0"), _intent("1-r-1", kind="webhook"), _intent("1-r-2", kind="sms")]
        store.commit_batch(Batch(intents=intents), NOW)

        def due(**kinds: Any) -> list[str]:
            return [i.kind for i in store.due_intents(NOW, **kinds)]

        assert due(kinds=["webhook", "sms"]) == ["webhook", "sms"]
        assert due(except_kinds=["webhook"]) == ["suspend_sim", "sms"]
        assert due(except_kinds=["webhook", "sms"]) == ["suspend_sim"]
        assert due(kinds=[]) == []

    def test_next_due_is_the_first_open_intent_due_after_a_time(self, store):
        store.commit_batch(Batch(intents=[_intent("1-r-0"), _intent("1-r-1", due_at=LATER)]), NOW)
        assert store.next_due(NOW) == LATER
        assert store.next_due(LATER) is None

    def test_an_attempt_counts_before_it_is_made_and_an_interrupted_one_is_due_again(self, store):
        store.commit_batch(Batch(intents=[_intent("1-r-0")]), NOW)
        (intent,) = store.intents()
        assert store.start_attempt(intent.id, NOW) == 1
        (due,) = store.due_intents(NOW)  # the process died mid-call
        assert (due.status, due.attempts) == (IntentStatus.RUNNING, 1)
        assert [i.id for i in store.retrying_intents()] == [intent.id]
        history = store.attempt_history(intent.id)
        assert (history.total, history.first_at, history.deadline_from) == (1, NOW, NOW)

    def test_finishing_changes_only_an_open_intent(self, store):
        store.commit_batch(Batch(intents=[_intent("1-r-0")]), NOW)
        (intent,) = store.intents()
        store.start_attempt(intent.id, NOW)
        assert store.finish_intent(intent, IntentStatus.DONE, now=NOW)
        assert not store.finish_intent(intent, IntentStatus.FAILED, now=NOW, error="late")
        assert store.get_intent(intent.id).status is IntentStatus.DONE
        assert store.start_attempt(intent.id, NOW) is None
        assert store.due_intents(LATER) == []

    def test_a_retry_is_due_at_the_time_it_was_put_off_to(self, store):
        store.commit_batch(Batch(intents=[_intent("1-r-0")]), NOW)
        (intent,) = store.intents()
        store.start_attempt(intent.id, NOW)
        retry_at = NOW + timedelta(minutes=5)
        store.finish_intent(intent, IntentStatus.PENDING, now=NOW, error="503", due_at=retry_at)
        assert store.due_intents(NOW) == []
        (due,) = store.due_intents(retry_at)
        assert (due.last_error, due.attempts) == ("503", 1)
        assert store.start_attempt(intent.id, retry_at) == 2
        history = store.attempt_history(intent.id)
        assert (history.total, history.first_at, history.last_at, history.deadline_from) == (
            2,
            NOW,
            retry_at,
            NOW,
        )

    def test_a_dead_intent_is_requeued_with_a_fresh_budget_and_its_history_kept(self, store):
        store.commit_batch(Batch(intents=[_intent("1-r-0")]), NOW)
        (intent,) = store.intents()
        store.start_attempt(intent.id, NOW)
        store.finish_intent(intent, IntentStatus.DEAD, now=NOW, error="503")
        assert not store.requeue(intent.id + 1, now=NOW)
        assert store.get_intent(intent.id + 1) is None  # no such intent
        row = AuditRow(1, "r", "suspend_sim", "requeued", "by ops", intent_id=intent.id)
        assert store.requeue(intent.id, now=LATER, audit=row)
        assert [r["outcome"] for r in store.audit_rows(event_id=1)] == ["requeued"]
        requeued = store.get_intent(intent.id)
        assert (requeued.status, requeued.attempts, requeued.due_at) == (
            IntentStatus.PENDING,
            0,
            LATER,
        )
        history = store.attempt_history(intent.id)
        assert (history.total, history.deadline_from) == (1, LATER)
        assert not store.requeue(intent.id, now=LATER)  # pending: not dead any more

    def test_a_dead_intent_can_be_discarded_and_only_a_dead_one(self, store):
        store.commit_batch(Batch(intents=[_intent("1-r-0"), _intent("1-r-1")]), NOW)
        dead, pending = store.intents()
        store.finish_intent(dead, IntentStatus.DEAD, now=NOW)
        assert store.discard(dead.id, now=NOW)
        assert not store.discard(pending.id, now=NOW)
        assert [i.idempotency_key for i in store.intents(IntentStatus.DISCARDED)] == ["1-r-0"]

    def test_a_cancelled_follow_up_never_falls_due(self, store):
        store.commit_batch(_planning(_follow_up("1-r-1")), NOW)
        store.commit_batch(_cancel("1-r-1"), NOW)
        (intent,) = store.intents()
        assert intent.status is IntentStatus.CANCELLED
        assert store.due_intents(LATER) == []
        assert store.start_attempt(intent.id, LATER) is None

    def test_a_cancelled_shadow_follow_up_stays_a_shadow(self, store):
        store.commit_batch(_planning(_follow_up("1-r-1", shadow=True), IntentStatus.SHADOW), NOW)
        store.commit_batch(_cancel("1-r-1", shadow=True), NOW)
        assert [i.status for i in store.intents()] == [IntentStatus.SHADOW]

    def test_a_cancel_too_late_leaves_the_running_follow_up_alone(self, store):
        store.commit_batch(_planning(_follow_up("1-r-1")), NOW)
        (intent,) = store.intents()
        store.start_attempt(intent.id, LATER)  # the dispatcher took it
        store.commit_batch(_cancel("1-r-1"), NOW)
        assert store.get_intent(intent.id).status is IntentStatus.RUNNING
        assert store.cancellable_follow_ups() == []
        outcomes = [r["outcome"] for r in store.audit_rows() if r["outcome"].startswith("cancel")]
        assert outcomes == ["cancel too late"]

    def test_outcomes_on_an_endpoint_are_the_dispatchers_rows_of_the_other_intents(self, store):
        store.commit_batch(Batch(intents=[_intent("1-r-0"), _intent("2-r-0", 2)]), NOW)
        first, second = store.intents()
        for intent, outcome in ((first, "done"), (second, "failed")):
            store.start_attempt(intent.id, NOW)
            row = AuditRow(1, "r", "suspend_sim", outcome, endpoint_id=5, intent_id=intent.id)
            store.finish_intent(intent, IntentStatus(outcome), now=NOW, audit=row)
        store.commit_batch(
            Batch(audit=[AuditRow(1, "r", "suspend_sim", "planned", endpoint_id=5)]), NOW
        )
        found = store.outcomes_on_endpoint("suspend_sim", 5, NOW, excluding_intent=second.id)
        assert found == ["done"]
        assert store.outcomes_on_endpoint("suspend_sim", 5, LATER, excluding_intent=0) == []
        assert store.outcomes_on_endpoint("webhook", 5, NOW, excluding_intent=0) == []


class TestRuleControl:
    port = "RuleControl"

    def _trip(self, store: Any) -> RuleOverride:
        tripped = RuleOverride("r", "shadow", "3 actions in 1h", T0, 7)
        held = [
            _intent(f"{n}-r-0", n, status=IntentStatus.HELD, target={"sim_id": n}) for n in (7, 8)
        ]
        store.commit_batch(
            Batch(
                intents=held, state=RuleStateChanges(guards={"r": [1.0, 2.0]}, overrides=[tripped])
            ),
            NOW,
        )
        return tripped

    def test_the_guard_summary_has_each_scopes_entries_and_held_intents(self, store):
        self._trip(store)
        assert store.guard_summary() == {"r": ([1.0, 2.0], 2)}

    def test_held_intents_of_a_rule_without_guard_entries_are_summarized_too(self, store):
        held = _intent("5-q-0", 5, rule_id="q", status=IntentStatus.HELD)
        store.commit_batch(Batch(intents=[held], state=RuleStateChanges(guards={"*": [1.0]})), NOW)
        assert store.guard_summary() == {"*": ([1.0], 0), "q": ([], 1)}

    def test_resuming_a_rule_lifts_its_override_and_empties_its_guard(self, store):
        tripped = self._trip(store)
        before = store.rule_state_version()
        resumed = store.resume_rule("r", now=LATER)
        assert (resumed.override, resumed.released, resumed.still_held) == (tripped, 0, 2)
        assert store.rule_overrides() == {}
        assert store.guard_entries("r") == []
        assert store.rule_state_version() != before
        assert len(store.intents(IntentStatus.HELD)) == 2
        (row,) = [r for r in store.audit_rows() if r["outcome"] == "resumed"]
        assert (row["rule_id"], row["detail"], row["at"]) == (
            "r",
            "resumed by an operator; 0 held actions released",
            LATER.timestamp(),
        )

    def test_resuming_can_release_the_held_intents(self, store):
        self._trip(store)
        resumed = store.resume_rule("r", now=LATER, release_held=True)
        assert (resumed.released, resumed.still_held) == (2, 0)
        assert [i.idempotency_key for i in store.due_intents(LATER)] == ["7-r-0", "8-r-0"]

    def test_one_held_intent_is_released_due_now_and_the_others_stay_held(self, store):
        self._trip(store)
        first, second = store.intents(IntentStatus.HELD)
        row = AuditRow(7, "r", "suspend_sim", "released", "released by ops", intent_id=first.id)
        assert store.release(first.id, now=LATER, audit=row)
        assert [i.idempotency_key for i in store.due_intents(LATER)] == ["7-r-0"]
        assert [i.id for i in store.intents(IntentStatus.HELD)] == [second.id]
        assert [r["outcome"] for r in store.audit_rows(event_id=7)] == ["released"]
        assert not store.release(first.id, now=LATER, audit=row)  # pending now, not held
        assert [r["outcome"] for r in store.audit_rows(event_id=7)] == ["released"]  # once

    def test_a_held_intent_can_be_discarded_and_not_as_a_dead_one(self, store):
        self._trip(store)
        first, _ = store.intents(IntentStatus.HELD)
        assert not store.discard(first.id, now=LATER)
        row = AuditRow(7, "r", "suspend_sim", "discarded", "by ops", intent_id=first.id)
        assert store.discard(first.id, now=LATER, audit=row, from_status=IntentStatus.HELD)
        assert store.get_intent(first.id).status is IntentStatus.DISCARDED
        discarded = [r for r in store.audit_rows(event_id=7) if r["outcome"] == "discarded"]
        assert [(r["intent_id"], r["at"]) for r in discarded] == [(first.id, LATER.timestamp())]

    def test_resuming_a_rule_the_guard_did_not_switch_does_nothing(self, store):
        before = store.rule_state_version()
        assert store.resume_rule("r", now=NOW) is None
        assert store.rule_state_version() == before

    def test_resuming_a_held_target_releases_the_status_actions_held_on_it(self, store):
        hold = RuleOverride("sim:9", "hold", "target flapping", T0, 7)
        held = [
            _intent(f"{n}-r{n}-0", n, rule_id=f"r{n}", status=IntentStatus.HELD) for n in (7, 8)
        ]
        other = _intent("6-r-0", 6, status=IntentStatus.HELD, target={"sim_id": 4})
        store.commit_batch(
            Batch(
                intents=[*held, other],
                state=RuleStateChanges(guards={"sim:9": [1.0, 2.0]}, overrides=[hold]),
            ),
            NOW,
        )
        resumed = store.resume_rule("sim:9", now=LATER, release_held=True)
        assert (resumed.override, resumed.released, resumed.still_held) == (hold, 2, 0)
        assert store.guard_entries("sim:9") == []
        assert [i.idempotency_key for i in store.intents(IntentStatus.HELD)] == ["6-r-0"]


class TestOwnActions:
    port = "OwnActions"

    def _done(self, store: Any, key: str, at: datetime, **extra: Any) -> Intent:
        store.commit_batch(Batch(intents=[_intent(key, **extra)]), NOW)
        intent = next(i for i in store.intents() if i.idempotency_key == key)
        store.finish_intent(intent, IntentStatus.DONE, now=at)
        return intent

    def test_status_actions_done_on_a_target_within_the_span_are_found(self, store):
        done = self._done(store, "1-r-0", NOW)
        self._done(store, "2-r-0", NOW + timedelta(hours=1))  # outside the span
        self._done(store, "3-r-0", NOW, target={"sim_id": 4})  # another SIM
        self._done(store, "4-r-0", NOW, kind="activate_sim")  # another kind
        found = store.status_actions(
            "sim:9", ["suspend_sim"], NOW.timestamp() - 60, NOW.timestamp() + 60
        )
        assert [(a.idempotency_key, a.rule_id, a.kind, a.intent_id) for a in found] == [
            ("1-r-0", "r", "suspend_sim", done.id)
        ]
        assert found[0].target == "sim:9"
        assert found[0].at == pytest.approx(NOW.timestamp())
        both = store.status_actions(
            "sim:9", ["suspend_sim", "activate_sim"], NOW.timestamp() - 60, NOW.timestamp() + 60
        )
        assert [a.idempotency_key for a in both] == ["1-r-0", "4-r-0"]

    def test_intents_not_done_are_not_status_changes(self, store):
        store.commit_batch(Batch(intents=[_intent("1-r-0")]), NOW)
        intent = store.intents()[0]
        store.finish_intent(intent, IntentStatus.FAILED, now=NOW, error="422")
        store.commit_batch(Batch(intents=[_intent("2-r-0", status=IntentStatus.HELD)]), NOW)
        span = (NOW.timestamp() - 60, NOW.timestamp() + 60)
        assert store.status_actions("sim:9", ["suspend_sim"], *span) == []


class TestDigestLedger:
    port = "DigestLedger"

    def _collect(self, store: Any, *events: tuple[int, int]) -> None:
        collected = [
            DigestEvent("d", event_id, T0 + timedelta(minutes=minute), f'{{"id": {event_id}}}')
            for event_id, minute in events
        ]
        store.commit_batch(Batch(digest_events=collected), NOW)

    def test_a_digest_seen_for_the_first_time_starts_from_now_once(self, store):
        assert store.digest_run_state("d") is None
        store.start_digest("d", NOW)
        store.start_digest("d", LATER)
        assert store.digest_run_state("d") == (NOW, None)

    def test_collected_events_are_claimed_in_time_order_and_counted_beyond_the_limit(self, store):
        self._collect(store, (3, 1), (1, 2), (2, 2))
        self._collect(store, (1, 2))  # collected again: kept once
        assert store.digest_backlog("d") == 3
        count, events = store.claim_digest("d", NOW, limit=2)
        assert (count, events) == (3, [{"id": 3}, {"id": 1}])
        assert store.digest_backlog("d") == 0
        assert store.digest_run_state("d")[1] == NOW

    def test_claiming_the_same_run_again_gives_the_same_events_and_no_newer(self, store):
        self._collect(store, (1, 1))
        store.claim_digest("d", NOW, limit=10)
        self._collect(store, (2, 2))  # after the claim: for the next run
        assert store.claim_digest("d", NOW, limit=10) == (1, [{"id": 1}])
        assert store.digest_backlog("d") == 1

    def test_a_finished_run_forgets_its_events_and_becomes_the_last_run(self, store):
        store.start_digest("d", T0)
        self._collect(store, (1, 1))
        store.claim_digest("d", NOW, limit=10)
        self._collect(store, (2, 2))
        store.finish_digest("d", NOW)
        assert store.digest_run_state("d") == (NOW, None)
        assert store.claim_digest("d", LATER, limit=10) == (1, [{"id": 2}])


class TestAuditLog:
    port = "AuditLog"

    def test_audit_rows_are_found_by_event_and_by_sim_in_the_order_written(self, store):
        rows = [
            AuditRow(1, "r", None, "matched", iccid="89-a", event_ts=T0.timestamp()),
            AuditRow(2, "r", None, "matched", iccid="89-b"),
            AuditRow(1, "r", "suspend_sim", "planned", iccid="89-a"),
        ]
        store.commit_batch(Batch(seen=[(1, T0), (2, T0)], audit=rows), NOW)
        by_event = store.audit_rows(event_id=1)
        assert [(r["outcome"], r["action"]) for r in by_event] == [
            ("matched", None),
            ("planned", "suspend_sim"),
        ]
        assert by_event[0]["at"] == NOW.timestamp()
        assert by_event[0]["event_ts"] == T0.timestamp()
        assert [r["event_id"] for r in store.audit_rows(iccid="89-b")] == [2]
        assert len(store.audit_rows()) == 3
        assert len(store.audit_rows(limit=2)) == 2

    def test_a_rules_trace_is_kept_with_its_row_as_json_text(self, store):
        steps = {"when": {"type": 19}, "threshold": {"count": 2, "needed": 3}}
        row = AuditRow(1, "r", None, "matched", steps=steps)
        store.commit_batch(
            Batch(seen=[(1, T0)], audit=[row, AuditRow(1, "r", "log", "planned")]), NOW
        )
        matched, planned = store.audit_rows(event_id=1)
        assert orjson.loads(matched["steps"]) == steps
        assert planned["steps"] is None

    def test_an_audit_row_keeps_its_organisation(self, store):
        rows = [
            AuditRow(1, "r", None, "matched", organisation="acme"),
            AuditRow(1, "r", None, "matched"),  # the single organisation's
        ]
        store.commit_batch(Batch(seen=[(1, T0)], audit=rows), NOW)
        assert [r["organisation"] for r in store.audit_rows(event_id=1)] == ["acme", None]

    def test_an_intents_outcome_is_audited_with_all_its_row_only_while_the_intent_was_open(
        self, store
    ):
        store.commit_batch(Batch(intents=[_intent("1-r-0")]), NOW)
        (intent,) = store.intents()
        store.start_attempt(intent.id, NOW)
        row = AuditRow(1, "r", "webhook", "done", "200", 7, 8, "8988", intent.id, 12.5)
        row = replace(row, steps={"k": 1}, organisation="acme")
        assert store.finish_intent(intent, IntentStatus.DONE, now=NOW, audit=row)
        late = replace(row, outcome="failed")
        assert not store.finish_intent(intent, IntentStatus.FAILED, now=NOW, audit=late)
        (kept,) = store.audit_rows(event_id=1)
        assert (kept["action"], kept["outcome"], kept["detail"]) == ("webhook", "done", "200")
        assert (kept["sim_id"], kept["endpoint_id"], kept["iccid"]) == (7, 8, "8988")
        assert (kept["intent_id"], kept["event_ts"]) == (intent.id, 12.5)
        assert (orjson.loads(kept["steps"]), kept["organisation"]) == ({"k": 1}, "acme")

    def test_rule_activity_counts_matches_and_planned_actions_since_a_time(self, store):
        earlier = NOW - timedelta(hours=30)
        store.commit_batch(
            Batch(seen=[(1, T0)], audit=[AuditRow(1, "a", "suspend_sim", "planned")]), earlier
        )
        rows = [
            AuditRow(2, "a", None, "matched"),
            AuditRow(2, "a", "suspend_sim", "planned"),
            AuditRow(2, "a", "activate_sim", "scheduled"),
            AuditRow(3, "a", None, "matched"),
            AuditRow(3, "a", None, "throttled"),
            AuditRow(3, "b", None, "matched"),
            AuditRow(3, None, None, "quarantined"),
        ]
        store.commit_batch(Batch(seen=[(2, T0), (3, T0)], audit=rows), NOW)
        found = store.rule_activity(NOW - timedelta(hours=24))
        assert [(r["rule_id"], r["matches"], r["actions"], r["last_fired"]) for r in found] == [
            ("a", 2, 2, NOW.timestamp()),
            ("b", 1, 0, None),
        ]
        assert store.rule_activity(NOW + timedelta(seconds=1)) == []

    def test_latest_audit_rows_come_newest_first_up_to_the_limit(self, store):
        rows = [AuditRow(n, "r", None, "matched", iccid=f"89-{n}") for n in (1, 2, 3)]
        store.commit_batch(Batch(seen=[(n, T0) for n in (1, 2, 3)], audit=rows), NOW)
        latest = store.latest_audit_rows(2)
        assert [(r["event_id"], r["iccid"], r["outcome"]) for r in latest] == [
            (3, "89-3", "matched"),
            (2, "89-2", "matched"),
        ]
        assert latest[0]["at"] == NOW.timestamp()

    def test_without_a_limit_the_latest_50_rows_and_the_newest_100_records_are_listed(self, store):
        rows = [AuditRow(n, "r", None, "matched") for n in range(1, 52)]
        quarantine = [("poller", "not JSON", f"{{{n}") for n in range(1, 102)]
        store.commit_batch(Batch(audit=rows, quarantine=quarantine), NOW)
        latest = store.latest_audit_rows()
        assert [r["event_id"] for r in latest] == list(range(51, 1, -1))
        listed = store.quarantined()
        assert [q["payload"] for q in listed] == [f"{{{n}" for n in range(101, 1, -1)]

    def test_without_a_limit_an_events_first_10000_audit_rows_are_read(self, store):
        store.commit_batch(Batch(audit=[AuditRow(1, "r", None, "x")] * 10_001), NOW)
        rows = store.audit_rows(event_id=1)
        assert len(rows) == 10_000
        assert rows[0]["id"] < rows[-1]["id"]  # the oldest first

    def test_audit_rows_keep_whole_and_fractional_event_times_and_empty_columns(self, store):
        # One batch's rows go in together: a whole-number time after a fractional one, and
        # a column no row fills, must come back as they were given.
        big = 2**62
        rows = [
            AuditRow(big, "r", None, "matched", event_ts=T0.timestamp() + 0.5),
            AuditRow(big, "r", None, "skipped", event_ts=int(T0.timestamp())),
            AuditRow(big, "r", None, "noted"),
        ]
        store.commit_batch(Batch(seen=[(big, T0)], audit=rows), NOW)
        found = store.audit_rows(event_id=big)
        assert [(r["outcome"], r["event_ts"]) for r in found] == [
            ("matched", T0.timestamp() + 0.5),
            ("skipped", T0.timestamp()),
            ("noted", None),
        ]
        assert {(r["sim_id"], r["iccid"], r["intent_id"]) for r in found} == {(None, None, None)}
        assert store.unseen([big, big - 1]) == {big - 1}

    def test_a_quarantined_record_is_kept_once_and_the_newest_come_first(self, store):
        for payload in ("{1", "{2", "{1"):
            store.commit_batch(Batch(quarantine=[("poller", "not JSON", payload)]), NOW)
        assert [q["payload"] for q in store.quarantined()] == ["{2", "{1"]
        assert store.quarantined()[0]["reason"] == "not JSON"

    def test_a_record_with_a_nul_character_is_quarantined_as_it_came(self, store):
        # PostgreSQL's text refuses NUL: a record carrying one must not fail its batch.
        store.commit_batch(Batch(quarantine=[("poller", "bad \x00", '{"a": "\x00\u00e9"}')]), NOW)
        store.commit_batch(
            Batch(audit=[AuditRow(1, "r", None, "x", detail="d\x00", iccid="8\x00")]), NOW
        )
        assert [q["payload"] for q in store.quarantined()] == ['{"a": "\x00\u00e9"}']
        assert len(store.audit_rows(event_id=1)) == 1

    def test_the_intents_of_events_are_found_in_planning_order(self, store):
        store.commit_batch(Batch(intents=[_intent("2-r-0", 2), _intent("1-r-0", 1)]), NOW)
        store.commit_batch(Batch(intents=[_intent("1-r-1", 1), _intent("3-r-0", 3)]), NOW)
        found = store.intents_for_events([1, 2, 1])
        assert [i.idempotency_key for i in found] == ["2-r-0", "1-r-0", "1-r-1"]

    def test_a_sims_folded_decisions_are_summed_per_rule_and_outcome(self, store):
        rows = [
            AuditRow(n, "r", None, outcome, iccid="89-a", event_ts=float(n))
            for n in range(1, 5)
            for outcome in ("matched", "below_threshold")
        ]
        store.commit_batch(Batch(audit=rows), NOW)
        assert store.decision_summaries("89-a") == []
        store.summarize_decisions(keep=1, span=100)
        (summary,) = store.decision_summaries("89-a")
        assert (summary["rule_id"], summary["outcome"], summary["count"]) == (
            "r",
            "below_threshold",
            3,
        )
        assert (summary["first_ts"], summary["last_ts"]) == (1.0, 3.0)

    def test_the_first_audit_row_written_is_looked_at_too(self, store):
        assert store.summarize_decisions(keep=1, span=100) is None  # nothing to look at
        rows = [AuditRow(n, "r", None, "throttled", iccid="89-a") for n in (1, 2)]
        store.commit_batch(Batch(audit=rows), NOW)  # the store's first audit rows
        assert store.summarize_decisions(keep=1, span=100) == 1
        assert [r["event_id"] for r in store.audit_rows()] == [2]

    def test_a_cancellation_is_audited_with_the_intent_it_cancelled(self, store):
        store.commit_batch(_planning(_follow_up("1-r-1")), NOW)
        (intent,) = store.intents()
        store.commit_batch(_cancel("1-r-1"), NOW)
        (row,) = [r for r in store.audit_rows() if r["outcome"] == "cancelled"]
        assert row["intent_id"] == intent.id

    def test_a_shadow_follow_ups_cancellation_is_audited_as_one_not_as_too_late(self, store):
        store.commit_batch(_planning(_follow_up("1-r-1", shadow=True), IntentStatus.SHADOW), NOW)
        store.commit_batch(_cancel("1-r-1", shadow=True), NOW)
        outcomes = [r["outcome"] for r in store.audit_rows() if r["outcome"].startswith("cancel")]
        assert outcomes == ["cancelled"]

    def test_folded_decisions_span_their_earliest_and_latest_event_times(self, store):
        # Event times out of order, and a decision written without one.
        times = [3.0, None, 1.0, 2.0, 9.0]
        rows = [
            AuditRow(n, "r", None, outcome, iccid="89-a", event_ts=at)
            for n, at in enumerate(times, start=1)
            for outcome in ("matched", "below_threshold")
        ]
        store.commit_batch(Batch(audit=rows), NOW)
        assert store.summarize_decisions(keep=1, span=100) == 4
        (summary,) = store.decision_summaries("89-a")
        assert (summary["count"], summary["first_ts"], summary["last_ts"]) == (4, 1.0, 3.0)

    def test_folded_decisions_after_one_without_an_event_time_span_the_times_they_have(self, store):
        # The first decision folded was written before event times were kept.
        rows = [
            AuditRow(n, "r", None, outcome, iccid="89-a", event_ts=at)
            for n, at in enumerate([None, 3.0, 1.0, 9.0], start=1)
            for outcome in ("matched", "below_threshold")
        ]
        store.commit_batch(Batch(audit=rows), NOW)
        assert store.summarize_decisions(keep=1, span=100) == 3
        (summary,) = store.decision_summaries("89-a")
        assert (summary["count"], summary["first_ts"], summary["last_ts"]) == (3, 1.0, 3.0)


class TestMeta:
    port = "Meta"

    def test_a_value_is_kept_until_it_is_replaced(self, store):
        assert store.get_meta("marker") is None
        store.set_meta("marker", "1")
        store.set_meta("marker", "2")
        assert store.get_meta("marker") == "2"

    def test_the_cursor_advances_with_its_batch(self, store):
        assert store.get_cursor() is None
        store.commit_batch(Batch(seen=[(1, T0)], cursor=T0), NOW)
        store.commit_batch(Batch(seen=[(2, T0)]), NOW)  # a batch without one leaves it
        assert store.get_cursor() == T0

    def test_each_organisation_has_its_own_cursor(self, store):
        store.commit_batch(Batch(seen=[(1, T0)], cursor=T0, organisation="acme"), NOW)
        assert store.get_cursor("acme") == T0
        assert store.get_cursor("globex") is None
        assert store.get_cursor() is None  # the single organisation's is apart


class TestRetainer:
    port = "Retainer"

    def test_rows_older_than_a_time_are_pruned_but_open_intents_stay(self, store):
        old = [_intent("1-r-0"), _intent("1-r-1")]
        store.commit_batch(
            Batch(
                intents=old,
                audit=[AuditRow(1, "r", None, "matched")],
                quarantine=[("poller", "bad", "{")],
            ),
            NOW,
        )
        done, _pending = store.intents()
        store.finish_intent(done, IntentStatus.DONE, now=NOW)
        store.commit_batch(Batch(audit=[AuditRow(2, "r", None, "matched")]), LATER)
        assert store.prune_older_than(NOW + SECOND, limit=100) == 3
        assert [i.idempotency_key for i in store.intents()] == ["1-r-1"]
        assert [r["event_id"] for r in store.audit_rows()] == [2]
        assert store.quarantined() == []
        assert store.prune_older_than(NOW + SECOND, limit=100) == 0

    def test_pruning_takes_at_most_its_limit_of_each_kind_at_a_time(self, store):
        rows = [AuditRow(n, "r", None, "matched") for n in range(5)]
        store.commit_batch(Batch(audit=rows), NOW)
        assert store.prune_older_than(LATER, limit=2) == 2
        assert len(store.audit_rows()) == 3

    def test_decisions_that_did_nothing_keep_the_newest_per_sim_and_rule(self, store):
        rows = [
            AuditRow(n, "r", None, outcome, iccid=iccid)
            for n, iccid in ((1, "89-a"), (2, "89-b"), (3, "89-a"), (4, "89-a"))
            for outcome in ("matched", "throttled")
        ]
        store.commit_batch(Batch(audit=rows), NOW)
        assert store.summarize_decisions(keep=2, span=100) == 1
        assert store.summarize_decisions(keep=2, span=100) is None  # all looked at
        kept = {(r["event_id"], r["iccid"]) for r in store.audit_rows()}
        assert kept == {(2, "89-b"), (3, "89-a"), (4, "89-a")}

    @pytest.mark.usefixtures("far_from_utc")  # days are UTC days, whatever the machine's zone
    def test_a_decision_summary_is_pruned_once_its_whole_day_is_older_than_the_cut(self, store):
        late = datetime(2025, 5, 1, 23, 0, tzinfo=UTC)  # its day ends an hour later
        rows = [
            AuditRow(n, "r", None, outcome, iccid="89-a")
            for n in (1, 2)
            for outcome in ("matched", "throttled")
        ]
        store.commit_batch(Batch(audit=rows), late)
        assert store.summarize_decisions(keep=1, span=100) == 1
        # The kept decision's two rows go; its day's summary stays while the day lasts.
        assert store.prune_older_than(late + timedelta(minutes=59), limit=100) == 2
        assert [s["count"] for s in store.decision_summaries("89-a")] == [1]
        assert store.prune_older_than(late + timedelta(hours=2), limit=100) == 1
        assert store.decision_summaries("89-a") == []


class TestStoreHealth:
    port = "StoreHealth"

    def test_a_fresh_store_is_sound_and_can_do_its_job(self, store):
        assert store.check_integrity()
        assert store.condition(NOW).ok

    def test_counts_are_intents_by_status_events_seen_records_quarantined_and_actions_not_planned(
        self, store
    ):
        store.commit_batch(
            Batch(
                seen=[(1, T0), (2, T0)],
                intents=[_intent("1-r-0"), _intent("1-r-1", status=IntentStatus.SHADOW)],
                quarantine=[("poller", "bad", "{")],
                audit=[
                    # An action that could not be planned for its event: failed, no intent.
                    AuditRow(2, "r", "suspend_sim", "failed", "no sim.id"),
                    AuditRow(2, "r", None, "failed", "the rule failed"),  # not an action
                    AuditRow(1, "r", "suspend_sim", "failed", "HTTP 422", intent_id=7),
                ],
            ),
            NOW,
        )
        assert store.counts() == {
            "intents_pending": 1,
            "intents_shadow": 1,
            "events_seen": 2,
            "quarantined": 1,
            "actions_not_planned": 1,
        }

    def test_the_oldest_rows_kept_are_dated_by_when_they_were_written(self, store):
        assert store.oldest_kept() == {"audit": None, "intent": None, "quarantine": None}
        store.commit_batch(Batch(intents=[_intent("1-r-0")]), NOW)
        store.commit_batch(Batch(audit=[AuditRow(1, "r", None, "matched")]), LATER)
        assert store.oldest_kept() == {"audit": LATER, "intent": NOW, "quarantine": None}

    def test_the_store_size_counts_what_it_holds(self, store):
        store.commit_batch(Batch(seen=[(n, T0) for n in range(2000)]), NOW)
        assert store.disk_bytes() > 0


class TestRuleStateVersions:
    """What keeps instances that share a store from judging on each other's stale state."""

    port = "UnitOfWork"

    def test_a_batch_that_changes_the_rules_state_makes_a_new_version(self, store):
        version = store.rule_state_version()
        changes = RuleStateChanges(throttles={("r", "9"): 10.0}, version=version)
        store.commit_batch(Batch(state=changes), NOW)
        assert changes.version == version + 1 == store.rule_state_version()

    def test_a_batch_that_changes_nothing_the_rules_read_keeps_the_version(self, store):
        version = store.rule_state_version()
        store.commit_batch(Batch(seen=[(1, T0)], state=RuleStateChanges(version=version)), NOW)
        assert store.rule_state_version() == version

    def test_each_batch_that_changes_state_makes_a_version_not_made_before(self, store):
        judged_on = [store.rule_state_version()]
        for until in (10.0, 20.0):
            changes = RuleStateChanges(throttles={("r", "9"): until}, version=judged_on[-1])
            store.commit_batch(Batch(state=changes), NOW)
            judged_on.append(store.rule_state_version())
        assert len(set(judged_on)) == 3
        for old in judged_on[:-1]:
            with pytest.raises(StaleRuleState):
                store.commit_batch(_state(throttles={("r", "9"): 30.0}, version=old), NOW)
        assert store.throttle_until("r", "9") == 20.0

    def test_of_two_batches_judged_on_one_version_the_second_to_change_state_is_refused(
        self, store
    ):
        version = store.rule_state_version()
        first = RuleStateChanges(windows={("r", "9"): ([1.0], 601.0)}, version=version)
        second = RuleStateChanges(windows={("r", "9"): ([2.0], 602.0)}, version=version)
        store.commit_batch(Batch(seen=[(1, T0)], state=first), NOW)
        with pytest.raises(StaleRuleState):
            store.commit_batch(Batch(seen=[(2, T0)], state=second), NOW)
        assert store.window("r", "9") == [1.0] and store.unseen([2]) == {2}


class TestOutboxLanesAndClaims:
    port = "Outbox"

    def _plan(self, store: Any, *intents: Intent) -> list[Intent]:
        store.commit_batch(Batch(intents=list(intents)), NOW)
        return store.intents()

    def test_an_intent_waits_behind_an_earlier_due_one_on_its_sim(self, store):
        self._plan(store, _intent("1-r-0"), _intent("2-r-0", 2))  # both suspend SIM 9
        assert [i.idempotency_key for i in store.due_intents(NOW)] == ["1-r-0"]

    def test_a_follow_up_due_later_holds_nothing_up_on_its_sim(self, store):
        self._plan(
            store,
            _intent("1-r-1", kind="activate_sim", due_at=LATER),
            _intent("2-r-0", 2),
        )
        assert [i.idempotency_key for i in store.due_intents(NOW)] == ["2-r-0"]

    def test_an_intent_waiting_for_its_retry_holds_its_sim(self, store):
        first, _ = self._plan(store, _intent("1-r-0"), _intent("2-r-0", 2))
        assert first.id is not None and store.start_attempt(first.id, NOW) == 1
        store.finish_intent(first, IntentStatus.PENDING, now=NOW, due_at=LATER)
        assert store.due_intents(NOW + SECOND) == []

    def test_a_claim_keeps_an_intent_from_other_owners_until_it_runs_out(self, store):
        (intent,) = self._plan(store, _intent("1-r-0"))
        assert intent.id is not None
        until = NOW + timedelta(seconds=30)
        assert store.start_attempt(intent.id, NOW, owner="a", claim_until=until) == 1
        store.finish_intent(intent, IntentStatus.PENDING, now=NOW, owner="a")  # a retry, due now
        assert store.start_attempt(intent.id, NOW, owner="a", claim_until=until) == 2
        assert store.due_intents(NOW + SECOND, owner="b") == []  # a's, while its claim runs
        assert store.start_attempt(intent.id, NOW + SECOND, owner="b") is None
        assert [i.id for i in store.due_intents(NOW + SECOND, owner="a")] == [intent.id]
        # a died: once its claim has run out, b takes the intent over.
        later = until + SECOND
        assert [i.id for i in store.due_intents(later, owner="b")] == [intent.id]
        assert store.start_attempt(intent.id, later, owner="b", claim_until=LATER) == 3

    def test_claims_on_several_intents_are_renewed_together(self, store):
        elsewhere = {"sim_id": 10, "endpoint_id": 6, "iccid": "8989"}  # not behind the first
        intents = self._plan(store, _intent("1-r-0"), _intent("2-r-0", 2, target=elsewhere))
        for intent in intents:
            store.start_attempt(intent.id, NOW, owner="a", claim_until=NOW + SECOND)
        assert store.renew_claims("a", [i.id for i in intents], LATER) == 2

    def test_a_claim_renewed_holds_and_only_its_owner_finishes_the_intent(self, store):
        (intent,) = self._plan(store, _intent("1-r-0"))
        assert intent.id is not None
        store.start_attempt(intent.id, NOW, owner="a", claim_until=NOW + SECOND)
        assert store.renew_claims("a", [intent.id], LATER) == 1
        assert store.renew_claims("b", [intent.id], LATER) == 0
        assert store.renew_claims("a", [], LATER) == 0
        assert store.due_intents(NOW + timedelta(minutes=1), owner="b") == []
        assert not store.finish_intent(intent, IntentStatus.DONE, now=NOW, owner="b")
        assert store.finish_intent(intent, IntentStatus.PENDING, now=NOW, owner="a")
        assert [i.id for i in store.due_intents(NOW, owner="b")] == [intent.id]

    def test_intents_read_with_a_claim_are_not_given_to_another_owner_until_it_runs_out(
        self, store
    ):
        self._plan(  # each on a SIM of its own: no lane holds one behind another
            store, *(_intent(f"{n}-r-0", n, target={"sim_id": n}) for n in (1, 2, 3))
        )
        soon = NOW + timedelta(seconds=5)
        first = store.due_intents(NOW, 2, owner="a", claim_until=soon)
        assert [i.idempotency_key for i in first] == ["1-r-0", "2-r-0"]
        # b reads at the same time: it is given what a was not.
        rest = store.due_intents(NOW, 2, owner="b", claim_until=soon)
        assert [i.idempotency_key for i in rest] == ["3-r-0"]
        assert store.due_intents(NOW, owner="b") == rest
        # a's own read claims again, and starting one keeps the longer claim of the start.
        assert first[0].id is not None
        assert store.start_attempt(first[0].id, NOW, owner="a", claim_until=LATER) == 1
        again = store.due_intents(NOW + SECOND, owner="a", claim_until=soon)
        assert [i.idempotency_key for i in again] == ["1-r-0", "2-r-0"]
        assert store.due_intents(soon + SECOND, owner="b") == [again[1], *rest]
        # a died: what it claimed by reading goes to b once the claim ran out, not what it
        # started, whose claim runs to LATER.
        assert store.start_attempt(first[0].id, soon + SECOND, owner="b") is None
        assert first[1].id is not None
        assert store.start_attempt(first[1].id, soon + SECOND, owner="b") == 1


class TestLeases:
    port = "Leases"
    TTL = timedelta(seconds=10)

    def test_one_holder_at_a_time_with_a_new_token_for_each(self, store):
        first = store.acquire_lease("leader", "a", self.TTL, NOW)
        assert first is not None
        assert store.acquire_lease("leader", "b", self.TTL, NOW + SECOND) is None
        assert store.acquire_lease("leader", "a", self.TTL, NOW + SECOND) == first  # renewed
        later = NOW + SECOND + self.TTL + SECOND  # a's lease ran out unrenewed
        second = store.acquire_lease("leader", "b", self.TTL, later)
        assert second is not None and second > first
        state = store.lease("leader")
        assert (state.name, state.holder, state.token) == ("leader", "b", second)
        assert state.expires_at == later + self.TTL

    def test_a_lease_says_since_when_its_holder_has_held_it(self, store):
        store.acquire_lease("leader", "a", self.TTL, NOW)
        store.acquire_lease("leader", "a", self.TTL, NOW + 5 * SECOND)  # renewed: the same
        assert store.lease("leader").changed_at == NOW
        later = NOW + 5 * SECOND + self.TTL + SECOND
        store.acquire_lease("leader", "b", self.TTL, later)
        assert store.lease("leader").changed_at == later

    def test_a_renewed_lease_lasts_its_time_from_the_renewal(self, store):
        token = store.acquire_lease("leader", "a", self.TTL, NOW)
        assert store.acquire_lease("leader", "a", self.TTL, NOW + 5 * SECOND) == token
        assert store.lease("leader").expires_at == NOW + 5 * SECOND + self.TTL
        assert store.acquire_lease("leader", "b", self.TTL, NOW + 12 * SECOND) is None

    def test_a_lease_is_held_to_its_last_instant_and_free_after_it(self, store):
        token = store.acquire_lease("leader", "a", self.TTL, NOW)
        end = NOW + self.TTL
        assert store.acquire_lease("leader", "b", self.TTL, end) is None
        assert store.acquire_lease("leader", "a", self.TTL, end) == token  # renewed in time
        assert store.acquire_lease("leader", "b", self.TTL, end + self.TTL + SECOND) is not None

    def test_a_released_lease_is_free_at_once(self, store):
        store.acquire_lease("leader", "a", self.TTL, NOW)
        store.release_lease("leader", "a", NOW + SECOND)
        assert store.acquire_lease("leader", "b", self.TTL, NOW + SECOND) is not None

    def test_a_batch_under_a_lease_that_moved_on_is_refused(self, store):
        token = store.acquire_lease("leader", "a", self.TTL, NOW)
        assert token is not None
        fenced = Batch(seen=[(1, T0)], cursor=T0, fence=Fence("leader", "a", token))
        store.commit_batch(fenced, NOW + SECOND)
        later = NOW + 2 * self.TTL
        assert store.acquire_lease("leader", "b", self.TTL, later) is not None
        stale = Batch(seen=[(2, T0)], cursor=T0 + SECOND, fence=Fence("leader", "a", token))
        with pytest.raises(LeaseLost) as refused:
            store.commit_batch(stale, later + SECOND)
        assert str(refused.value) == (
            f"the leader lease moved on (token {token} is no longer current):"
            " this batch is not recorded"
        )
        assert store.unseen([2]) == {2}

    def test_a_batch_at_the_very_end_of_its_lease_is_recorded(self, store):
        token = store.acquire_lease("leader", "a", self.TTL, NOW)
        assert token is not None
        store.commit_batch(Batch(seen=[(1, T0)], fence=Fence("leader", "a", token)), NOW + self.TTL)
        assert store.unseen([1]) == set()

    def test_a_batch_under_an_earlier_token_of_the_same_holder_is_refused(self, store):
        first = store.acquire_lease("leader", "a", self.TTL, NOW)
        later = NOW + 2 * self.TTL  # ran out: taken anew, with a new token
        second = store.acquire_lease("leader", "a", self.TTL, later)
        assert first is not None and second is not None and second != first
        with pytest.raises(LeaseLost):
            store.commit_batch(Batch(seen=[(1, T0)], fence=Fence("leader", "a", first)), later)

    def test_a_batch_under_a_lease_no_one_holds_is_refused(self, store):
        never = Batch(seen=[(1, T0)], fence=Fence("leader", "a", 1))
        with pytest.raises(LeaseLost):
            store.commit_batch(never, NOW)
        assert store.unseen([1]) == {1}

    def test_a_batch_under_a_lease_that_ran_out_is_refused_even_before_a_takeover(self, store):
        token = store.acquire_lease("leader", "a", self.TTL, NOW)
        assert token is not None
        with pytest.raises(LeaseLost):
            store.commit_batch(
                Batch(seen=[(1, T0)], fence=Fence("leader", "a", token)), NOW + 2 * self.TTL
            )


class TestMembers:
    port = "Members"

    def _member(self, instance: str, beat: datetime, **extra: Any) -> Member:
        values: dict[str, Any] = {
            "host": "h",
            "pid": 1,
            "version": "0.1.0",
            "rules_hash": "abc",
            "started_at": NOW,
            "heartbeat_at": beat,
        }
        return Member(instance, **(values | extra))

    def test_each_instance_is_listed_with_its_last_heartbeat(self, store):
        store.heartbeat(self._member("b", NOW))
        store.heartbeat(self._member("a", NOW, leader=True))
        store.heartbeat(self._member("b", NOW + SECOND, rules_hash="def"))
        assert store.members() == [
            self._member("a", NOW, leader=True),
            self._member("b", NOW + SECOND, rules_hash="def"),
        ]
        store.forget_member("a")
        assert [m.instance_id for m in store.members()] == ["b"]


class TestSilences:
    port = "Silences"

    def _silence(self, **extra: Any) -> Silence:
        values: dict[str, Any] = {
            "matchers": (("tag", "maintenance"), ("rule", "block-sim")),
            "comment": "firmware rollout",
            "created_by": "alice",
            "created_at": NOW,
            "ends_at": NOW + timedelta(hours=2),
        }
        return Silence(**(values | extra))

    def test_an_added_silence_is_read_back_with_its_id_who_and_why(self, store):
        added = store.add_silence(self._silence())
        assert added.id is not None
        assert store.silences(NOW) == [added]
        (kept,) = store.silences(NOW)
        assert kept.matchers == (("tag", "maintenance"), ("rule", "block-sim"))
        assert (kept.comment, kept.created_by) == ("firmware rollout", "alice")
        assert (kept.created_at, kept.ends_at) == (NOW, NOW + timedelta(hours=2))
        assert kept.expired_by is None

    def test_a_silence_past_its_end_is_listed_only_when_asked_for_earlier_ones(self, store):
        short = store.add_silence(self._silence(ends_at=NOW + timedelta(minutes=10)))
        long = store.add_silence(self._silence(comment="longer"))
        later = NOW + timedelta(hours=1)
        assert store.silences(later) == [long]
        assert store.silences(NOW) == [long, short]  # the newest first

    def test_expiring_a_silence_ends_it_now_and_notes_who(self, store):
        added = store.add_silence(self._silence())
        ended = store.expire_silence(added.id, "bob", NOW + SECOND)
        assert ended is not None
        assert (ended.expired_by, ended.expired_at) == ("bob", NOW + SECOND)
        assert ended.ends_at == NOW + SECOND
        assert store.silences(NOW + SECOND) == []
        assert ended.created_by == "alice"  # who added it stays

    def test_expiring_an_ended_or_unknown_silence_changes_nothing(self, store):
        added = store.add_silence(self._silence(ends_at=NOW + SECOND))
        again = store.expire_silence(added.id, "bob", LATER)
        assert again == added
        assert store.expire_silence(9999, "bob", NOW) is None
