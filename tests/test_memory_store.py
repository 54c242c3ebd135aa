"""Replay's store in memory: its compact sets answer as Python sets would, it keeps little,
and a pipeline on it judges as one on the daemon's SQLite store (the ports' contract itself
is `test_store_contract.py`'s)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.model import Batch, Intent
from engine.pipeline import Pipeline
from engine.store import MemoryStore, SqliteStore
from engine.store import memory as memory_module
from engine.store.memory import IdSet, IntentKeys

from helpers import rules_from

ids = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.lists(st.one_of(ids, st.integers(0, 50)), max_size=30),
            st.lists(st.integers(0, 10**6), max_size=30).map(sorted),  # the common batch
        ),
        max_size=8,
    ),
    ids,
)
def test_idset_holds_what_was_added_and_nothing_else(batches, probe):
    compact, reference = IdSet(), set()
    for batch in batches:
        compact.add_all(batch)
        reference.update(batch)
        probes = [*batch, probe, probe + 1 if probe < 2**63 - 1 else probe, *list(reference)[:5]]
        for event_id in probes:
            assert (event_id in compact) == (event_id in reference)
        assert compact.missing(probes) == set(probes) - reference
    assert len(compact) == len(reference)
    assert compact.missing([]) == set()


def test_ids_in_time_order_take_eight_bytes_each():
    compact = IdSet()
    compact.add_all(range(10**14, 10**14 + 100_000, 3))
    compact.add_all([10**14 + 1, 10**14 + 3])  # one straggler, one repeat
    assert len(compact) == 33_335
    assert 10**14 + 1 in compact and 10**14 + 2 not in compact
    assert len(compact._stragglers) == 1


# Keys as the pipeline writes them, and the shapes that must not be taken for them.
_heads = st.one_of(
    st.integers(0, 10**16).map(str),
    st.sampled_from(["", "0", "00", "07", "+7", "-7", " 7", "\u0667", "digest", "7_0"]),
)
_rests = st.sampled_from(["r-0", "r-1", "s-0", "r-on_guard_trip-0", "", "-", "0-r-0", "r"])
_keys = st.one_of(
    st.builds(lambda head, rest: f"{head}-{rest}", _heads, _rests),
    st.sampled_from(["7", "", "-", "digest-r-2025-05-01T10:00:00Z-0"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_keys, max_size=12), max_size=6), st.lists(_keys, max_size=5))
def test_intent_keys_count_and_hold_what_a_set_of_the_keys_would(batches, probes):
    with patch.object(memory_module, "_RESTS", 4):  # so that the codes run out, too
        compact, reference = IntentKeys(), set[str]()
        for batch in batches:
            assert compact.add_new(batch) == len(set(batch) - reference)
            reference.update(batch)
            for key in [*batch, *probes]:
                assert (key in compact) == (key in reference)


def _intent(key: str, event_id: int) -> Intent:
    return Intent(key, event_id, "r", 0, "suspend_sim", {}, {"sim_id": 9})


def test_replays_store_keeps_each_key_in_eight_bytes_and_no_intent_but_follow_ups():
    store = MemoryStore()
    moment = datetime(2025, 5, 1, tzinfo=UTC)
    for start in range(412907744516221, 412907744516221 + 10_000, 1000):
        batch = Batch(
            seen=[(n, moment) for n in range(start, start + 1000)],
            intents=[_intent(f"{n}-rule-0", n) for n in range(start, start + 1000, 2)]
            + [_intent(f"{n}-other-0", n) for n in range(start, start + 1000, 5)],
        )
        assert store.commit_batch(batch, moment) == 700
    keys = store._keys
    assert len(keys._numbered._ascending) == 7_000 and not keys._numbered._stragglers
    assert not keys._others
    assert store._waiting == {}
    assert store.seen_count() == 10_000


# -- a pipeline on replay's store judges as one on the daemon's ---------------------------

REMEMBERING = """
rules:
  - id: quota-burst
    when: {type: 19}
    threshold: {count: 2, within: 10m, per: sim.iccid}
    throttle: {per: sim.iccid, for: 1h}
    actions:
      - suspend_sim: {}
      - after: 24h
        do: {activate_sim: {}}
        cancel_if: {when: {type: 8}}
  - id: block-on-abuse
    when: {type: 11}
    max_actions: {count: 2, within: 10m}
    actions: [{disable_endpoint: {}}]
    on_guard_trip:
      - log: {message: "guard tripped: {{ guard.reason }}", level: error}
  - id: trial
    mode: shadow
    when: {type: 19}
    actions:
      - after: 1h
        do: {activate_sim: {}}
        cancel_if: {when: {type: 8}}
"""
_T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)


def _event(event_id: int, minute: int, sim: int, type_id: int) -> dict[str, Any]:
    return {
        "id": event_id,
        "timestamp": (_T0 + timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "event_type": {"id": type_id},
        "event_source": {"id": 1},
        "event_severity": {"id": 1},
        "sim": {"id": sim, "iccid": f"89883030000000000{sim:02d}"},
        "endpoint": {"id": 500 + sim, "name": f"truck-{sim}"},
    }


# (id, minute after 10:00, sim, type): 19 quota used up, 11 abuse, 8 activation
_EVENTS = [
    (1, 0, 1, 19),  # sim 1: 1 of 2; a shadow follow-up for 11:00
    (2, 1, 1, 19),  # sim 1: 2 of 2 → suspend, follow-up for tomorrow; throttled till 11:01
    (3, 2, 2, 19),  # sim 2: 1 of 2
    (4, 3, 1, 19),  # sim 1: throttled
    (5, 4, 1, 11),  # abuse: 1 of the guard's 2
    (6, 5, 2, 11),  # 2 of 2
    (7, 6, 3, 11),  # 3: held, the guard trips, the rule goes to shadow
    (8, 30, 2, 8),  # sim 2 activated: cancels its shadow follow-up
    (9, 31, 2, 19),  # sim 2: 10:02 has left the window: 1 of 2
    (2, 1, 1, 19),  # a repeated id
    (10, 200, 1, 8),  # sim 1 activated: cancels tomorrow's follow-up (a prune has run)
    (11, 201, 1, 19),  # sim 1: 1 of 2, the throttle long over
    (12, 202, 1, 19),  # 2 of 2 → suspend again
    (13, 203, 3, 11),  # the rule is in shadow now
    (14, 900, 4, 19),  # hours later: the windows and marks before are pruned
    (15, 901, 4, 19),
]


def _judged(pipeline_on: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for record in records:
        result = pipeline_on().process([record], source="test", in_given_order=True)
        lines.extend(line.as_json() for line in result.in_order())
    return lines


def test_a_pipeline_on_replays_store_judges_as_one_on_the_daemons(tmp_path):
    """Every event is its own batch, judged by a pipeline started afresh on the store, so
    all it remembers (windows, throttles, the guard and its switch to shadow, follow-ups and
    their cancellation, pruning) is read back from the store each time."""
    rules = rules_from(tmp_path, REMEMBERING)
    records = [_event(*e) for e in _EVENTS]
    sqlite = SqliteStore(tmp_path / "state.sqlite3")
    memory = MemoryStore()
    daemon = _judged(lambda: Pipeline(rules, sqlite), records)
    restarted = _judged(lambda: Pipeline(rules, memory, audit=False), records)
    replay = Pipeline(rules, MemoryStore(), audit=False)
    replayed = _judged(lambda: replay, records)
    assert restarted == daemon
    assert replayed == daemon
    kinds = [(line["event_id"], line["action"], bool(line.get("shadow"))) for line in daemon]
    assert (2, "suspend_sim", False) in kinds and (10, "cancel", False) in kinds
    assert (8, "cancel", True) in kinds and (13, "disable_endpoint", True) in kinds
    assert memory.cancellable_follow_ups() == sqlite.cancellable_follow_ups()
    assert memory.rule_overrides() == sqlite.rule_overrides()
    sqlite.close()
