"""Rules that count, wait and remember: threshold windows, throttles, the blast-radius guard,
shadow mode and cancellable follow-ups, judged by the pipeline over a real SQLite file.

Every event carries its own timestamp; the rules run on that clock, so these tests move
time by writing it into the events instead of sleeping.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from engine.errors import StoreError
from engine.model import AbsenceMark, FollowUpKey, IntentStatus, RuleStateChanges
from engine.pipeline import BatchResult, Decision, Pipeline
from engine.rules import MaxActions
from engine.state import (
    GuardCount,
    RuleMemory,
    count_destructive,
    count_event,
    format_duration,
    format_moment,
    key_of,
)
from engine.store import SqliteStore
from engine.store.memory import MemoryStore

from helpers import rules_from

NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)  # when the store is told things happen

T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
ICCID_A = "8988303000000000001"
ICCID_B = "8988303000000000002"
SIMS = {ICCID_A: 1, ICCID_B: 2}


def event(
    event_id: int, minutes: float, iccid: str | None = ICCID_A, type_id: int = 19, **extra: Any
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": event_id,
        "timestamp": format_moment(T0 + timedelta(minutes=minutes)),
        "event_type": {"id": type_id},
        "event_source": {"id": 1},
        "event_severity": {"id": 1},
        "sim": None,
        "endpoint": None,
    }
    if iccid is not None:
        sim = SIMS.get(iccid, 99)
        record["sim"] = {"id": sim, "iccid": iccid}
        record["endpoint"] = {"id": 500 + sim, "name": f"truck-{sim}"}
    return record | extra


class Engine:
    """A pipeline on a state file, restartable like the daemon (a fresh Pipeline and store)."""

    def __init__(self, tmp_path: Path, rules: str, **options: Any):
        self.path = tmp_path / "state" / "engine.sqlite3"
        self.rules = rules_from(tmp_path, rules)
        self.options = options
        self.store = SqliteStore(self.path)
        self.pipeline = Pipeline(self.rules, self.store, **options)

    def restart(self) -> None:
        self.store.close()
        self.store = SqliteStore(self.path)
        self.pipeline = Pipeline(self.rules, self.store, **self.options)

    def feed(self, *records: dict[str, Any]) -> BatchResult:
        return self.pipeline.process(list(records), source="test")

    def feed_each(self, *records: dict[str, Any]) -> list[BatchResult]:
        return [self.feed(record) for record in records]

    def intents(self, kind: str | None = None) -> list[Any]:
        return [i for i in self.store.intents() if kind is None or i.kind == kind]

    def audit(self, outcome: str) -> list[dict[str, Any]]:
        return [r for r in self.store.audit_rows() if r["outcome"] == outcome]


def outcomes(results: list[BatchResult]) -> list[tuple[int, str]]:
    return [(d.event_id, d.outcome) for r in results for d in r.decisions]


THRESHOLD = """
rules:
  - id: quota-3-in-10m
    when: {type: 19}
    threshold: {count: 3, within: 10m, per: sim.iccid}
    actions: [{suspend_sim: {}}]
"""


# -- the pure parts ------------------------------------------------------------------------


def test_a_window_fires_when_the_events_within_reach_the_count_and_then_starts_empty():
    first = count_event([], 100.0, 600.0, 3)
    second = count_event(first.entries, 200.0, 600.0, 3)
    third = count_event(second.entries, 300.0, 600.0, 3)
    assert (first.fired, first.count, second.fired, second.count) == (False, 1, False, 2)
    assert (third.fired, third.count, third.entries) == (True, 3, [])


def test_a_window_counts_its_start_and_drops_what_is_older():
    assert count_event([100.0, 150.0], 700.0, 600.0, 3).fired  # 100 = 700 - 600: inside
    later = count_event([100.0, 150.0], 700.5, 600.0, 3)
    assert (later.fired, later.count, later.entries) == (False, 2, [150.0, 700.5])


def test_a_late_event_is_counted_against_its_own_window():
    verdict = count_event([500.0, 900.0], 450.0, 100.0, 3)
    # 500 and 900 are after 450: kept for later events, not counted for this one.
    assert (verdict.fired, verdict.count, verdict.entries) == (False, 1, [450.0, 500.0, 900.0])


def test_the_guard_allows_up_to_its_limit_and_refuses_the_next():
    entries: list[float] = []
    for at in (1.0, 2.0):
        verdict = count_destructive(entries, at, 600.0, 2)
        assert verdict.allowed
        entries = verdict.entries
    refused = count_destructive(entries, 3.0, 600.0, 2)
    assert (refused.allowed, refused.count, refused.entries) == (False, 3, [1.0, 2.0])
    assert count_destructive(entries, 602.5, 600.0, 2).allowed  # 1.0 and 2.0 have expired


def test_the_guard_counts_an_action_exactly_one_span_old_and_says_how_many_it_allowed():
    assert count_destructive([0.0], 600.0, 600.0, 2) == GuardCount(True, 2, [0.0, 600.0])
    assert count_destructive([0.0, 1.0], 600.0, 600.0, 2).allowed is False
    assert count_destructive([0.0], 600.5, 600.0, 1) == GuardCount(True, 1, [600.5])


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("sim.iccid", ICCID_A),
        ("sim.id", "1"),
        ("alert", "false"),
        ("endpoint.name", "truck-1"),
        ("endpoint.tags", None),
        ("sim.iccid.more", None),
        ("detail.list.1", "b"),
        ("detail.empty", None),
        ("detail.yes", "true"),
        ("detail.whole", "2"),
        ("detail.part", "2.5"),
        ("detail.object", '{"a":1,"b":2}'),
        ("detail.list", '["a","b"]'),
        ("detail.list.2", None),
        ("detail.list.first", None),
        ("detail.missing.deeper", None),
    ],
)
def test_a_key_is_the_text_of_the_value_at_the_path(path, expected):
    detail = {"list": ["a", "b"], "empty": "", "yes": True, "whole": 2.0, "part": 2.5}
    raw = event(1, 0) | {"alert": False, "detail": detail | {"object": {"b": 2, "a": 1}}}
    assert key_of(raw, path) == expected
    assert key_of(raw, path) == expected  # and again, from the paths already read


def test_a_key_is_read_through_any_mapping_not_only_a_dict():
    raw = MappingProxyType({"sim": MappingProxyType({"id": 7})})
    assert key_of(raw, "sim.id") == "7"


def test_durations_and_moments_read_as_operators_write_them():
    assert [format_duration(timedelta(seconds=s)) for s in (600, 5400, 86400, 45)] == [
        "10m",
        "1h30m",
        "1d",
        "45s",
    ]
    assert format_moment(T0) == "2025-05-01T10:00:00Z"
    assert format_moment(T0 + timedelta(milliseconds=250)) == "2025-05-01T10:00:00.250Z"


def test_moments_are_written_in_utc_whatever_the_machines_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        berlin = T0.astimezone(timezone(timedelta(hours=2)))
        assert format_moment(berlin) == "2025-05-01T10:00:00Z"
        assert format_moment(T0.timestamp()) == "2025-05-01T10:00:00Z"
    finally:
        monkeypatch.undo()
        time.tzset()


# -- threshold windows ---------------------------------------------------------------------


def test_a_threshold_rule_fires_at_exactly_the_count_and_not_before(tmp_path):
    engine = Engine(tmp_path, THRESHOLD)
    results = engine.feed_each(event(1, 0), event(2, 1))
    assert engine.intents() == []
    assert [d for r in results for d in r.decisions] == [
        Decision(
            1,
            "quota-3-in-10m",
            "below_threshold",
            f"1 of 3 events for sim.iccid={ICCID_A} within 10m",
        ),
        Decision(
            2,
            "quota-3-in-10m",
            "below_threshold",
            f"2 of 3 events for sim.iccid={ICCID_A} within 10m",
        ),
    ]
    (third,) = engine.feed_each(event(3, 2))
    assert third.decisions == [
        Decision(3, "quota-3-in-10m", "fired", f"3 of 3 events for sim.iccid={ICCID_A} within 10m")
    ]
    (suspend,) = engine.intents()
    assert (suspend.event_id, suspend.kind, suspend.status) == (
        3,
        "suspend_sim",
        IntentStatus.PENDING,
    )
    assert [r["event_id"] for r in engine.audit("below_threshold")] == [1, 2]
    assert [r["detail"] for r in engine.audit("fired")] == [
        f"3 of 3 events for sim.iccid={ICCID_A} within 10m"
    ]


def test_after_a_firing_the_next_needs_count_fresh_events(tmp_path):
    engine = Engine(tmp_path, THRESHOLD)
    results = [engine.feed(*(event(i, i) for i in range(1, 8)))]
    assert outcomes(results) == [
        (1, "below_threshold"),
        (2, "below_threshold"),
        (3, "fired"),
        (4, "below_threshold"),
        (5, "below_threshold"),
        (6, "fired"),
        (7, "below_threshold"),
    ]


def test_each_key_has_its_own_window(tmp_path):
    engine = Engine(tmp_path, THRESHOLD)
    engine.feed_each(
        event(1, 0, ICCID_A), event(2, 1, ICCID_B), event(3, 2, ICCID_A), event(4, 3, ICCID_B)
    )
    assert engine.intents() == []
    (fifth,) = engine.feed_each(event(5, 4, ICCID_A))
    assert outcomes([fifth]) == [(5, "fired")]
    assert [i.target["iccid"] for i in engine.intents()] == [ICCID_A]


def test_events_older_than_the_window_no_longer_count(tmp_path):
    engine = Engine(tmp_path, THRESHOLD)
    results = engine.feed_each(event(1, 0), event(2, 5), event(3, 10.5), event(4, 11))
    assert outcomes(results) == [
        (1, "below_threshold"),
        (2, "below_threshold"),
        (3, "below_threshold"),  # the event at 0m left the window at 10m
        (4, "fired"),  # 5m, 10.5m, 11m
    ]
    assert results[2].decisions[0].reason == f"2 of 3 events for sim.iccid={ICCID_A} within 10m"


def test_an_event_without_the_per_field_is_not_counted_and_the_audit_says_why(tmp_path):
    engine = Engine(tmp_path, THRESHOLD)
    results = engine.feed_each(event(1, 0), event(2, 1, iccid=None), event(3, 2), event(4, 3))
    assert outcomes(results) == [
        (1, "below_threshold"),
        (2, "below_threshold"),
        (3, "below_threshold"),
        (4, "fired"),
    ]
    assert results[1].decisions[0].reason == "sim.iccid is missing: the event is not counted"
    (row,) = [r for r in engine.audit("below_threshold") if r["event_id"] == 2]
    assert row["detail"] == "sim.iccid is missing: the event is not counted"


def test_the_default_key_is_the_sim_id(tmp_path):
    engine = Engine(tmp_path, THRESHOLD.replace(", per: sim.iccid", ""))
    results = engine.feed_each(event(1, 0, ICCID_A), event(2, 1, ICCID_B))
    assert results[1].decisions[0].reason == "1 of 3 events for sim.id=2 within 10m"


def test_a_restart_mid_window_neither_forgets_the_count_nor_fires_twice(tmp_path):
    engine = Engine(tmp_path, THRESHOLD)
    engine.feed_each(event(1, 0), event(2, 1))
    engine.restart()
    (third,) = engine.feed_each(event(3, 2))
    assert outcomes([third]) == [(3, "fired")]
    engine.restart()
    again = engine.feed(event(1, 0), event(2, 1), event(3, 2))  # a poll overlap re-reads them
    assert again.duplicates == 3 and again.decisions == []
    assert [(i.event_id, i.kind) for i in engine.intents()] == [(3, "suspend_sim")]


def test_a_batch_whose_commit_failed_is_judged_again_from_the_stored_count(tmp_path, monkeypatch):
    engine = Engine(tmp_path, THRESHOLD)
    engine.feed(event(1, 0))
    real_commit = engine.store.commit_batch
    failures = iter([True])

    def commit_once_failing(batch, now):
        if next(failures, False):
            raise StoreError("disk full")
        return real_commit(batch, now)

    monkeypatch.setattr(engine.store, "commit_batch", commit_once_failing)
    with pytest.raises(StoreError):
        engine.feed(event(2, 1))
    # Had the failed batch's count stuck in memory, event 2 would now make 3 and fire.
    retried = engine.feed(event(2, 1))
    assert retried.decisions[0].reason == f"2 of 3 events for sim.iccid={ICCID_A} within 10m"
    assert engine.intents() == []
    assert outcomes([engine.feed(event(3, 2))]) == [(3, "fired")]
    assert len(engine.intents()) == 1


def test_windows_long_over_are_pruned_from_the_store(tmp_path):
    engine = Engine(tmp_path, THRESHOLD)
    engine.feed(event(1, 0, ICCID_A))
    assert engine.store.window("quota-3-in-10m", ICCID_A) != []
    engine.feed(event(2, 3 * 60, ICCID_B))  # three hours later
    assert engine.store.window("quota-3-in-10m", ICCID_A) == []
    assert engine.store.window("quota-3-in-10m", ICCID_B) != []


def test_a_long_window_keeps_its_count_through_the_prunes_that_happen_while_it_is_open(tmp_path):
    rules = """
    rules:
      - id: three-in-a-day
        when: {type: 19}
        threshold: {count: 3, within: 24h}
        actions: [{suspend_sim: {}}]
    """
    engine = Engine(tmp_path, rules)
    engine.feed(event(1, 0))
    # Other sims' events move event time on by hours: a prune runs at each of them.
    engine.feed_each(*(event(10 + hour, hour * 60, ICCID_B) for hour in range(1, 6)))
    engine.feed(event(2, 6 * 60))
    engine.restart()  # and the store's copy of the window was kept by its prunes as well
    engine.feed_each(*(event(20 + hour, hour * 60, ICCID_B) for hour in range(7, 12)))
    assert outcomes([engine.feed(event(3, 12 * 60))]) == [(3, "fired")]


# -- throttles -----------------------------------------------------------------------------

THROTTLE = """
rules:
  - id: page-once-an-hour
    when: {type: 19}
    throttle: {per: sim.iccid, for: 1h}
    actions: [{log: {message: "quota used up on {{ event.sim.iccid }}"}}]
"""


def test_a_throttle_keeps_the_rule_quiet_for_that_key_until_the_period_ends(tmp_path):
    engine = Engine(tmp_path, THROTTLE)
    results = engine.feed_each(
        event(1, 0, ICCID_A), event(2, 30, ICCID_A), event(3, 31, ICCID_B), event(4, 60, ICCID_A)
    )
    assert outcomes(results) == [(1, "fired"), (2, "throttled"), (3, "fired"), (4, "fired")]
    assert results[1].decisions[0].reason == (
        f"throttled for sim.iccid={ICCID_A} until 2025-05-01T11:00:00Z"
    )
    assert [i.event_id for i in engine.intents()] == [1, 3, 4]
    (row,) = engine.audit("throttled")
    assert (row["event_id"], row["detail"]) == (2, results[1].decisions[0].reason)


def test_a_throttle_survives_a_restart(tmp_path):
    engine = Engine(tmp_path, THROTTLE)
    engine.feed(event(1, 0))
    engine.restart()
    results = [engine.feed(event(2, 58), event(3, 59)), engine.feed(event(4, 61))]
    assert outcomes(results) == [(2, "throttled"), (3, "throttled"), (4, "fired")]


def test_a_throttled_firing_still_empties_the_window(tmp_path):
    rules = """
    rules:
      - id: two-then-quiet
        when: {type: 19}
        threshold: {count: 2, within: 10m}
        throttle: {for: 1h}
        actions: [{suspend_sim: {}}]
    """
    engine = Engine(tmp_path, rules)
    results = engine.feed_each(*(event(i, i) for i in range(1, 6)), event(6, 62), event(7, 63))
    assert outcomes(results) == [
        (1, "below_threshold"),
        (2, "fired"),
        (3, "below_threshold"),
        (4, "throttled"),  # the window filled again within the hour: throttled, emptied
        (5, "below_threshold"),
        (6, "below_threshold"),  # 5m has left the 10m window by 62m
        (7, "fired"),
    ]


def test_a_batch_whose_commit_failed_is_not_throttled_by_its_own_mark_when_judged_again(
    tmp_path, monkeypatch
):
    engine = Engine(tmp_path, THROTTLE)
    real_commit = engine.store.commit_batch
    failures = iter([True])

    def commit_once_failing(batch, now):
        if next(failures, False):
            raise StoreError("disk full")
        return real_commit(batch, now)

    monkeypatch.setattr(engine.store, "commit_batch", commit_once_failing)
    with pytest.raises(StoreError):
        engine.feed(event(1, 0))
    assert outcomes([engine.feed(event(1, 0))]) == [(1, "fired")]
    assert [i.event_id for i in engine.intents()] == [1]
    assert outcomes([engine.feed(event(2, 5))]) == [(2, "throttled")]


# -- shadow mode ---------------------------------------------------------------------------


def test_a_shadow_rule_counts_and_records_what_it_would_have_done(tmp_path):
    engine = Engine(tmp_path, THRESHOLD.replace("actions:", "mode: shadow\n    actions:"))
    results = engine.feed_each(event(1, 0), event(2, 1), event(3, 2))
    assert outcomes(results) == [(1, "below_threshold"), (2, "below_threshold"), (3, "shadow")]
    assert results[2].decisions[0].reason == "rule in shadow mode: would have acted"
    (intent,) = engine.intents()
    assert intent.status is IntentStatus.SHADOW
    assert [r["event_id"] for r in engine.audit("would have acted")] == [3]
    assert engine.store.due_intents(T0 + timedelta(days=1)) == []


def test_dry_run_shadows_every_rule_and_still_throttles(tmp_path):
    engine = Engine(tmp_path, THROTTLE, dry_run=True)
    results = engine.feed_each(event(1, 0), event(2, 5))
    assert outcomes(results) == [(1, "shadow"), (2, "throttled")]
    assert results[0].decisions[0].reason == "dry run: would have acted"
    assert [i.status for i in engine.intents()] == [IntentStatus.SHADOW]


# -- the blast-radius guard ----------------------------------------------------------------

GUARDED = """
rules:
  - id: suspend-on-quota
    when: {type: 19}
    max_actions: {count: 2, within: 10m}
    actions:
      - suspend_sim: {}
      - log: {message: "suspending {{ event.sim.iccid }}"}
    on_guard_trip:
      - log: {message: "guard: {{ guard.reason }}", level: error}
"""


def _sims(count: int) -> list[str]:
    return [f"89883030000000001{n:02d}" for n in range(count)]


def test_the_guard_holds_the_action_over_the_limit_switches_to_shadow_and_notifies_once(tmp_path):
    engine = Engine(tmp_path, GUARDED)
    iccids = _sims(5)
    results = engine.feed_each(*(event(i + 1, i, iccid) for i, iccid in enumerate(iccids)))
    assert outcomes(results) == [
        (1, "fired"),
        (2, "fired"),
        (3, "held"),
        (4, "shadow"),
        (5, "shadow"),
    ]
    held_reason = "blast-radius guard: 3 destructive actions within 10m > 2"
    assert results[2].decisions[0].reason == held_reason
    assert (
        results[3]
        .decisions[0]
        .reason.startswith("switched to shadow by the blast-radius guard at 2025-05-01T10:02:00Z")
    )
    by_event = [(i.event_id, i.kind, i.status.value, i.idempotency_key) for i in engine.intents()]
    assert by_event == [
        (1, "suspend_sim", "pending", "1-suspend-on-quota-0"),
        (1, "log", "pending", "1-suspend-on-quota-1"),
        (2, "suspend_sim", "pending", "2-suspend-on-quota-0"),
        (2, "log", "pending", "2-suspend-on-quota-1"),
        (3, "suspend_sim", "held", "3-suspend-on-quota-0"),
        (3, "log", "pending", "3-suspend-on-quota-on_guard_trip-0"),
        (3, "log", "shadow", "3-suspend-on-quota-1"),
        (4, "suspend_sim", "shadow", "4-suspend-on-quota-0"),
        (4, "log", "shadow", "4-suspend-on-quota-1"),
        (5, "suspend_sim", "shadow", "5-suspend-on-quota-0"),
        (5, "log", "shadow", "5-suspend-on-quota-1"),
    ]
    (notice,) = [i for i in engine.intents() if "on_guard_trip" in i.idempotency_key]
    assert notice.params["message"] == f"guard: {held_reason}"
    assert [r["event_id"] for r in engine.audit("guard_tripped")] == [3]
    assert [(r["event_id"], r["detail"]) for r in engine.audit("held")] == [(3, held_reason)]


def test_a_tripped_rule_stays_in_shadow_across_a_restart_until_resumed(tmp_path):
    engine = Engine(tmp_path, GUARDED)
    iccids = _sims(6)
    engine.feed_each(*(event(i + 1, i, iccid) for i, iccid in enumerate(iccids[:3])))
    engine.restart()
    assert outcomes([engine.feed(event(4, 3, iccids[3]))]) == [(4, "shadow")]

    resumed = engine.store.resume_rule("suspend-on-quota", now=NOW)
    assert resumed is not None and (resumed.released, resumed.still_held) == (0, 1)
    assert engine.store.resume_rule("suspend-on-quota", now=NOW) is None
    # The running pipeline sees the resume at its next batch; the guard window starts empty.
    assert outcomes([engine.feed(event(5, 4, iccids[4]))]) == [(5, "fired")]
    assert outcomes([engine.feed(event(6, 5, iccids[5]))]) == [(6, "fired")]
    assert [i.event_id for i in engine.intents("suspend_sim") if i.status.value == "held"] == [3]
    assert [r["outcome"] for r in engine.store.audit_rows() if r["event_id"] is None] == ["resumed"]


def test_resume_can_release_the_held_actions(tmp_path):
    engine = Engine(tmp_path, GUARDED)
    engine.feed_each(*(event(i + 1, i, iccid) for i, iccid in enumerate(_sims(3))))
    resumed = engine.store.resume_rule("suspend-on-quota", release_held=True, now=NOW)
    assert resumed is not None and (resumed.released, resumed.still_held) == (1, 0)
    (released,) = [i for i in engine.intents("suspend_sim") if i.event_id == 3]
    assert released.status is IntentStatus.PENDING
    # Due, once the actions planned before it on the same SIM are done (they keep order).
    assert released not in engine.store.due_intents(datetime.now(UTC))
    for earlier in engine.intents("suspend_sim"):
        if earlier.event_id in (1, 2):
            engine.store.finish_intent(earlier, IntentStatus.DONE, now=NOW)
    assert released in engine.store.due_intents(datetime.now(UTC))


def test_the_global_guard_counts_destructive_actions_of_all_rules(tmp_path):
    rules = """
    rules:
      - id: suspend-on-quota
        when: {type: 19}
        actions: [{suspend_sim: {}}]
      - id: disable-on-blocked
        when: {type: 11}
        actions: [{disable_endpoint: {}}, {log: {message: blocked}}]
    """
    engine = Engine(tmp_path, rules, max_actions=MaxActions(2, timedelta(minutes=10)))
    iccids = _sims(4)
    results = engine.feed_each(
        event(1, 0, iccids[0], type_id=19),
        event(2, 1, iccids[1], type_id=11),
        event(3, 2, iccids[2], type_id=11),
        event(4, 3, iccids[3], type_id=19),
        event(5, 13, iccids[0], type_id=19),
    )
    assert [(d.event_id, d.rule_id, d.outcome) for r in results for d in r.decisions] == [
        (1, "suspend-on-quota", "fired"),
        (2, "disable-on-blocked", "fired"),
        (3, "disable-on-blocked", "held"),
        (4, "suspend-on-quota", "held"),  # the global window is still full: it trips too
        (5, "suspend-on-quota", "shadow"),  # tripped rules stay in shadow until resumed
    ]
    assert results[2].decisions[0].reason == (
        "blast-radius guard (global): 3 destructive actions within 10m > 2"
    )
    log_of_3 = [i for i in engine.intents("log") if i.event_id == 3]
    assert [i.status for i in log_of_3] == [IntentStatus.SHADOW]


def test_a_resume_that_lands_while_a_batch_is_judged_makes_it_judged_again(tmp_path, monkeypatch):
    engine = Engine(tmp_path, GUARDED)
    iccids = _sims(4)
    engine.feed_each(*(event(i + 1, i, iccid) for i, iccid in enumerate(iccids[:3])))
    real_commit = engine.store.commit_batch
    operator = SqliteStore(engine.path)
    calls = []

    def resume_meanwhile(batch, now):
        calls.append(batch)
        if len(calls) == 1:  # `rules resume` from another process, just before the commit
            operator.resume_rule("suspend-on-quota", now=NOW)
        return real_commit(batch, now)

    monkeypatch.setattr(engine.store, "commit_batch", resume_meanwhile)
    result = engine.feed(event(4, 3, iccids[3]))
    operator.close()
    assert len(calls) == 2
    assert outcomes([result]) == [(4, "fired")]
    assert [i.status for i in engine.intents("suspend_sim") if i.event_id == 4] == [
        IntentStatus.PENDING
    ]


# -- follow-ups a later event cancels ------------------------------------------------------

FOLLOW_UP = """
rules:
  - id: suspend-for-a-day
    when: {type: 19}
    actions:
      - suspend_sim: {}
      - after: 24h
        do: {activate_sim: {}}
        cancel_if:
          when: {type: 8}
          condition: {"==": [{"var": "event_source.id"}, 2]}
"""


def test_a_follow_up_is_due_after_the_event_and_a_matching_later_event_cancels_it(tmp_path):
    engine = Engine(tmp_path, FOLLOW_UP)
    (planned,) = [engine.feed(event(1, 0))]
    (follow_up,) = engine.intents("activate_sim")
    assert follow_up.due_at == T0 + timedelta(hours=24)
    assert planned.planned[1].as_json()["due"] == "2025-05-02T10:00:00Z"

    other_sim = engine.feed(event(2, 60, ICCID_B, type_id=8, event_source={"id": 2}))
    wrong_source = engine.feed(event(3, 61, type_id=8, event_source={"id": 0}))
    assert other_sim.cancelled == [] and wrong_source.cancelled == []
    cancelling = engine.feed(event(4, 62, type_id=8, event_source={"id": 2}))
    ((_, cancelled),) = cancelling.cancelled
    assert cancelled.as_json() == {
        "event_id": 4,
        "rule": "suspend-for-a-day",
        "action": "cancel",
        "cancels": "1-suspend-for-a-day-1",
    }
    (follow_up,) = engine.intents("activate_sim")
    assert follow_up.status is IntentStatus.CANCELLED
    (row,) = engine.audit("cancelled")
    assert row["event_id"] == 4 and row["intent_id"] == follow_up.id
    assert "cancelled by event 4" in row["detail"]
    assert engine.store.due_intents(datetime.now(UTC)) == engine.intents("suspend_sim")


def test_a_follow_up_key_is_pruned_only_once_its_intent_is_long_past_due(tmp_path):
    engine = Engine(tmp_path, FOLLOW_UP)
    engine.feed(event(1, 0))
    engine.feed(event(2, 30, ICCID_B))  # a prune half an hour later: still waiting
    assert [f.idempotency_key for f in engine.store.cancellable_follow_ups()] == [
        "1-suspend-for-a-day-1",
        "2-suspend-for-a-day-1",
    ]
    engine.feed(event(3, 26 * 60, type_id=8))  # two hours past the first one's due time
    assert [f.idempotency_key for f in engine.store.cancellable_follow_ups()] == []
    (follow_up, _) = engine.intents("activate_sim")
    assert follow_up.status is IntentStatus.PENDING  # forgotten as cancellable, not cancelled


def test_a_follow_up_stays_cancellable_across_a_restart_but_not_after_it_is_due(tmp_path):
    engine = Engine(tmp_path, FOLLOW_UP)
    engine.feed(event(1, 0, ICCID_A), event(2, 0, ICCID_B))
    engine.restart()
    too_late = engine.feed(event(3, 24 * 60 + 1, ICCID_B, type_id=8, event_source={"id": 2}))
    in_time = engine.feed(event(4, 120, ICCID_A, type_id=8, event_source={"id": 2}))
    assert too_late.cancelled == []
    assert [c.follow_up.idempotency_key for _, c in in_time.cancelled] == ["1-suspend-for-a-day-1"]
    statuses = {i.idempotency_key: i.status for i in engine.intents("activate_sim")}
    assert statuses == {
        "1-suspend-for-a-day-1": IntentStatus.CANCELLED,
        "2-suspend-for-a-day-1": IntentStatus.PENDING,
    }


def test_a_cancel_after_the_dispatcher_took_the_follow_up_is_recorded_as_too_late(tmp_path):
    engine = Engine(tmp_path, FOLLOW_UP)
    engine.feed(event(1, 0))
    (follow_up,) = engine.intents("activate_sim")
    engine.store.start_attempt(follow_up.id, NOW)  # the dispatcher is running it right now
    engine.feed(event(2, 30, type_id=8, event_source={"id": 2}))
    (follow_up,) = engine.intents("activate_sim")
    assert follow_up.status is IntentStatus.RUNNING
    (row,) = engine.audit("cancel too late")
    assert row["event_id"] == 2


def test_cancelling_one_follow_up_leaves_the_others_waiting_on_the_same_key(tmp_path):
    engine = Engine(tmp_path, FOLLOW_UP)
    engine.feed(event(1, 0))
    engine.feed(event(2, 30))  # a second follow-up for the same sim
    # At 10m only the first was planned: the second is not this event's to cancel.
    first = engine.feed(event(3, 10, type_id=8, event_source={"id": 2}))
    assert [c.follow_up.idempotency_key for _, c in first.cancelled] == ["1-suspend-for-a-day-1"]
    second = engine.feed(event(4, 40, type_id=8, event_source={"id": 2}))
    assert [c.follow_up.idempotency_key for _, c in second.cancelled] == ["2-suspend-for-a-day-1"]
    statuses = [i.status for i in engine.intents("activate_sim")]
    assert statuses == [IntentStatus.CANCELLED, IntentStatus.CANCELLED]


def test_a_cancel_taken_back_leaves_the_follow_up_cancellable_again():
    # The pipeline takes back an event's work when the event is quarantined half-way
    # (`RuleMemory.undo` to the mark of `begin_event`): a cancel it made is undone too.
    memory = RuleMemory(MemoryStore())
    memory.begin(RuleStateChanges())
    planned = FollowUpKey(
        "1-suspend-for-a-day-1", "suspend-for-a-day", 1, 1, "sim.id", "1", T0, T0 + timedelta(1)
    )
    memory.add_follow_up(planned)
    memory.begin_event()
    mark = len(memory.journal)
    memory.drop_follow_up(planned)
    assert memory.follow_ups_for({"sim": {"id": 1}}) == [] and not memory.has_follow_ups
    memory.undo(mark)
    assert memory.follow_ups_for({"sim": {"id": 1}}) == [planned]
    assert memory.journal == []


def test_absence_marks_read_before_the_first_batch_is_a_mistake_that_says_so():
    memory = RuleMemory(MemoryStore())
    with pytest.raises(AssertionError, match=r"^begin\(\) loads them$"):
        memory.absence_marks("quiet-sims")
    with pytest.raises(AssertionError, match=r"^begin\(\) loads them$"):
        memory.set_absence("quiet-sims", "1", None)


def test_a_follow_up_due_exactly_the_late_margin_ago_stays_cancellable_by_a_late_event(tmp_path):
    engine = Engine(tmp_path, FOLLOW_UP)
    engine.feed(event(1, 0))  # due at 24h
    engine.feed(event(2, 25 * 60, ICCID_B))  # a prune: keeps what ended at 24h or later
    late = engine.feed(event(3, 24 * 60 - 1, type_id=8, event_source={"id": 2}))
    assert [c.follow_up.idempotency_key for _, c in late.cancelled] == ["1-suspend-for-a-day-1"]


class _GuardedStore(MemoryStore):
    """A store that already holds one destructive action in the global guard."""

    def guard_entries(self, scope: str) -> list[float]:
        return [100.0] if scope == "global" else []


def test_the_guard_reads_its_scope_from_the_store_and_then_sees_its_own_batchs_entries():
    memory = RuleMemory(_GuardedStore())
    changes = RuleStateChanges()
    memory.begin(changes)
    assert memory.guard("global") == [100.0] and memory.guard("rule:a") == []
    memory.set_guard("global", [100.0, 200.0])
    assert memory.guard("global") == [100.0, 200.0]
    assert changes.guards == {"global": [100.0, 200.0]}


def test_an_absence_mark_forgotten_is_gone_and_taken_back_returns():
    memory = RuleMemory(MemoryStore())
    changes = RuleStateChanges()
    memory.begin(changes)
    mark = AbsenceMark("quiet-sims", "1", 100.0)
    memory.set_absence("quiet-sims", "1", mark)
    memory.begin_event()
    before = len(memory.journal)
    memory.set_absence("quiet-sims", "1", None)
    assert memory.absence_marks("quiet-sims") == {}
    assert changes.absences == {("quiet-sims", "1"): None}
    memory.undo(before)
    assert memory.absence_marks("quiet-sims") == {"1": mark}
    assert changes.absences == {("quiet-sims", "1"): mark}
