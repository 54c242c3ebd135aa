"""The trace of each rule's match, step by step: the event's `when` values, what its
condition read, the threshold's count, the throttle's mark, the guard's count, the silence;
recorded by the pipeline in a real SQLite file and read back by `why` (JSON and text)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from engine.commands import why
from engine.lookups import Fact
from engine.model import Silence
from engine.pipeline import Pipeline
from engine.rules.trace import MAX_TEXT
from engine.silencing import Quiet
from engine.state import format_moment
from engine.store import SqliteStore

from helpers import rules_from

T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
ICCID = "8988303000000000001"


def _event(event_id: int, minutes: float = 0, **extra: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "timestamp": format_moment(T0 + timedelta(minutes=minutes)),
        "event_type": {"id": 19, "description": "Quota used up"},
        "event_source": {"id": 1},
        "event_severity": {"id": 1},
        "sim": {"id": 1, "iccid": ICCID},
        "endpoint": {"id": 501, "name": "truck-1", "tags": "fleet,north"},
    } | extra


def _judged(
    tmp_path: Path, rules: str, *records: dict[str, Any], lookups: Any = None, **options: Any
) -> SqliteStore:
    store = SqliteStore(tmp_path / "engine.sqlite3")
    pipeline = Pipeline(rules_from(tmp_path, rules), store, **options)
    for record in records:
        pipeline.process([record], source="test", lookups=lookups)
    return store


def _steps(store: SqliteStore, event_id: int, rule: str = "quota") -> dict[str, Any]:
    (event,) = why.collect(store, event_id=event_id)["events"]
    (matched,) = [d for d in event["decisions"] if d["outcome"] == "matched" and d["rule"] == rule]
    steps: dict[str, Any] = matched["steps"]
    return steps


THRESHOLD = """
rules:
  - id: quota
    when: {type: 19, source: policy_control}
    condition: {"in": ["fleet", {"var": "endpoint.tag_list"}]}
    threshold: {count: 3, within: 10m, per: sim.iccid}
    throttle: {per: sim.iccid, for: 1h}
    actions: [{suspend_sim: {}}]
"""


def test_the_trace_names_the_when_keys_with_the_events_values(tmp_path):
    store = _judged(tmp_path, THRESHOLD, _event(1))
    assert _steps(store, 1)["when"] == {"type": "19 (Quota used up)", "source": "Policy Control"}


def test_the_trace_holds_the_values_the_condition_read(tmp_path):
    store = _judged(tmp_path, THRESHOLD, _event(1))
    assert _steps(store, 1)["condition"] == {"endpoint.tag_list": '["fleet","north"]'}


def test_the_trace_holds_the_looked_up_facts_a_false_condition_read(tmp_path):
    rules = """
rules:
  - id: quota
    when: {type: 19}
    lookup: [stats.month]
    condition: {">": [{"var": "lookup.stats.month.data.volume"}, 500]}
    actions: [{log: {}}]
"""
    facts = {501: {"stats.month": Fact({"data": {"volume": 120.0}})}}
    store = _judged(tmp_path, rules, _event(1), lookups=facts)
    assert _steps(store, 1)["condition"] == {"lookup.stats.month.data.volume": 120.0}
    outcomes = [d["outcome"] for d in why.collect(store, event_id=1)["events"][0]["decisions"]]
    assert outcomes == ["matched", "condition_false"]


def test_the_trace_counts_the_threshold_against_what_it_needs(tmp_path):
    store = _judged(tmp_path, THRESHOLD, _event(1), _event(2, 1), _event(3, 2))
    assert _steps(store, 2)["threshold"] == {
        "count": 2,
        "needed": 3,
        "within": "10m",
        "per": "sim.iccid",
        "key": ICCID,
    }
    assert _steps(store, 3)["threshold"]["count"] == 3


def test_the_trace_says_until_when_a_rule_is_throttled(tmp_path):
    events = [_event(n, n) for n in range(1, 7)]  # a firing empties the window: 3 more
    store = _judged(tmp_path, THRESHOLD, *events)
    until = format_moment(T0 + timedelta(minutes=3, hours=1))
    assert _steps(store, 3)["throttle"] == {
        "per": "sim.iccid",
        "key": ICCID,
        "until": until,
        "throttled": False,
    }
    assert _steps(store, 6)["throttle"]["throttled"] is True
    assert "throttle" not in _steps(store, 1)  # below the threshold it is not reached


GUARDED = """
rules:
  - id: quota
    when: {type: 19}
    max_actions: {count: 1, within: 10m}
    actions: [{suspend_sim: {}}]
"""


def test_the_trace_counts_the_guard_and_says_when_it_held(tmp_path):
    store = _judged(tmp_path, GUARDED, _event(1), _event(2, 1))
    assert _steps(store, 1)["guard"] == {
        "rule": {"count": 1, "max": 1, "within": "10m", "held": False}
    }
    assert _steps(store, 2)["guard"]["rule"]["held"] is True


def test_the_trace_names_the_silence_that_kept_the_rule_quiet(tmp_path):
    silence = Silence(
        matchers=(("iccid", ICCID),),
        comment="antenna work",
        created_by="ops",
        created_at=T0,
        ends_at=T0 + timedelta(hours=1),
        id=7,
    )
    quiet = Quiet(silences=(silence,), now=None)
    store = _judged(tmp_path, GUARDED, _event(1), quiet=lambda now: quiet)
    assert _steps(store, 1)["silence"] == "silenced by #7 (antenna work)"


def test_a_long_value_is_cut_short_in_the_trace(tmp_path):
    rules = """
rules:
  - id: quota
    when: {type: 19}
    condition: {"!=": [{"var": "description"}, ""]}
    actions: [{log: {}}]
"""
    store = _judged(tmp_path, rules, _event(1, description="x" * 5000))
    assert len(_steps(store, 1)["condition"]["description"]) == MAX_TEXT


def test_why_prints_each_step_with_the_values_and_the_count(tmp_path):
    store = _judged(tmp_path, THRESHOLD, _event(1), _event(2, 1), _event(3, 2))
    text = why.render(why.collect(store, event_id=3))
    assert "  steps of quota:" in text
    assert "    when: type=19 (Quota used up), source=Policy Control" in text
    assert '    condition read: endpoint.tag_list=["fleet","north"]' in text
    assert f"    threshold: 3 of 3 within 10m for sim.iccid={ICCID}" in text


def test_replay_records_no_trace(tmp_path):
    store = _judged(tmp_path, THRESHOLD, _event(1), audit=False)
    assert store.audit_rows(event_id=1) == []
