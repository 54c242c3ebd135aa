"""One event never stops a batch: whatever goes wrong judging one event for one rule fails
that pair only. Its changes are taken back, the failure is in the audit log, the batch's
failures and the log (once per rule and reason), and every other rule and event goes on.
Judged by the pipeline over a real SQLite file; the daemon-level checks are in test_poison."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from engine.actions.log import Log
from engine.emnify import ClientSettings, EmnifyClient
from engine.errors import EventFormatError
from engine.events import normalize
from engine.jsontext import Unreadable, loads_records
from engine.pipeline import BatchResult, Pipeline
from engine.rules.condition import Condition
from engine.state import format_moment
from engine.store import SqliteStore

from helpers import rules_from

T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)


def event(event_id: int, minutes: float = 0, sim: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "timestamp": format_moment(T0 + timedelta(minutes=minutes)),
        "event_type": {"id": 19},
        "event_source": {"id": 1},
        "event_severity": {"id": 1},
        "sim": {"id": sim, "iccid": f"89883030000000000{sim:02d}"},
        "endpoint": {"id": 500 + sim, "name": f"truck-{sim}"},
    } | extra


def pipeline(tmp_path: Path, rules: str) -> Pipeline:
    return Pipeline(rules_from(tmp_path, rules), SqliteStore(tmp_path / "engine.sqlite3"))


def planned(result: BatchResult) -> list[tuple[int, str, str]]:
    return [(p.event.id, p.rule.id, p.action.kind) for p in result.planned]


@pytest.fixture
def log_fails_on_boom(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `log` action whose planning hits a bug (not an ActionError) for events marked boom."""
    original = Log.plan

    def plan(self: Log, event: Any, context: Any) -> Any:
        if event.raw.get("boom"):
            raise RuntimeError("a bug in planning")
        return original(self, event, context)

    monkeypatch.setattr(Log, "plan", plan)


TWO_RULES = """
rules:
  - id: percent
    when: {type: 19}
    actions:
      - log: {message: "{{ 100 * event.used / event.total }}% used"}
  - id: suspend
    when: {type: 19}
    actions:
      - suspend_sim: {}
"""


def test_a_template_dividing_by_zero_fails_that_rule_for_that_event_only(tmp_path):
    engine = pipeline(tmp_path, TWO_RULES)
    result = engine.process(
        [event(1, used=5, total=10), event(2, used=5, total=0), event(3, used=1, total=4)],
        source="test",
    )
    assert planned(result) == [
        (1, "percent", "log"),
        (1, "suspend", "suspend_sim"),
        (2, "suspend", "suspend_sim"),
        (3, "percent", "log"),
        (3, "suspend", "suspend_sim"),
    ]
    ((failure),) = result.failures
    assert (failure.event_id, failure.rule_id) == (2, "percent")
    assert "division by zero" in failure.reason
    (row,) = [r for r in engine.store.audit_rows(event_id=2) if r["outcome"] == "failed"]
    assert row["rule_id"] == "percent" and "division by zero" in row["detail"]


def test_a_follow_up_due_past_the_year_9999_is_not_planned_and_the_rest_of_the_rule_is(
    tmp_path,
):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: suspend-then-restore
            when: {type: 19}
            actions:
              - suspend_sim: {}
              - after: 24h
                do: {activate_sim: {}}
        """,
    )
    far = event(2) | {"timestamp": "9999-12-31T12:00:00Z"}
    result = engine.process([event(1), far, event(3, minutes=1)], source="test")
    assert planned(result) == [  # in event time: the far one last
        (1, "suspend-then-restore", "suspend_sim"),
        (1, "suspend-then-restore", "activate_sim"),
        (3, "suspend-then-restore", "suspend_sim"),
        (3, "suspend-then-restore", "activate_sim"),
        (2, "suspend-then-restore", "suspend_sim"),
    ]
    (failure,) = result.failures
    assert failure.stage == "plan" and failure.action == "activate_sim"
    assert "past the year 9999" in failure.reason


def test_a_rule_that_fails_after_counting_takes_its_window_back(tmp_path, log_fails_on_boom):
    # Without the undo, the failed firing would have emptied the window: the third event
    # would then be the first of a new count and the rule would not fire on it.
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: two-in-ten
            when: {type: 19}
            threshold: {count: 2, within: 10m}
            actions:
              - log: {message: "two quota events"}
        """,
    )
    result = engine.process(
        [event(1), event(2, minutes=1, boom=True), event(3, minutes=2)], source="test"
    )
    assert planned(result) == [(3, "two-in-ten", "log")]
    assert [(f.event_id, f.stage) for f in result.failures] == [(2, "judge")]
    assert not [r for r in engine.store.audit_rows(event_id=2) if r["outcome"] == "fired"]


def test_a_rule_that_fails_after_its_throttle_mark_takes_the_mark_back(tmp_path, log_fails_on_boom):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: hourly
            when: {type: 19}
            throttle: {for: 1h}
            actions:
              - log: {message: "quota"}
        """,
    )
    first = engine.process([event(1, boom=True)], source="test")
    second = engine.process([event(2, minutes=1)], source="test")
    assert planned(first) == [] and len(first.failures) == 1
    assert planned(second) == [(2, "hourly", "log")]


def test_a_failed_rule_leaves_no_half_of_its_actions_behind(tmp_path, log_fails_on_boom):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: suspend-and-log
            when: {type: 19}
            actions:
              - suspend_sim: {}
              - log: {message: "suspended"}
          - id: other
            when: {type: 19}
            actions:
              - suspend_sim: {}
        """,
    )
    result = engine.process([event(1, boom=True)], source="test")
    assert planned(result) == [(1, "other", "suspend_sim")]
    intents = engine.store.intents_for_events([1])
    assert [(i.rule_id, i.kind) for i in intents] == [("other", "suspend_sim")]


def restarted(engine: Pipeline) -> Pipeline:
    """A fresh pipeline on the same store file, as after a restart: only what was committed."""
    store = engine.store
    assert isinstance(store, SqliteStore)
    store.close()
    return Pipeline(engine.rules, SqliteStore(store.path))


def test_a_window_a_failed_rule_changed_is_not_committed_either(tmp_path, log_fails_on_boom):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: two-in-ten
            when: {type: 19}
            threshold: {count: 2, within: 10m}
            actions:
              - log: {message: "two quota events"}
        """,
    )
    engine.process([event(1), event(2, minutes=1, boom=True)], source="test")
    engine = restarted(engine)
    assert planned(engine.process([event(3, minutes=2)], source="test")) == [
        (3, "two-in-ten", "log")
    ]


def test_a_throttle_mark_a_failed_rule_set_is_not_committed_either(tmp_path, log_fails_on_boom):
    rules = """
    rules:
      - id: hourly
        when: {type: 19}
        throttle: {for: 1h}
        actions:
          - log: {message: "quota"}
    """
    engine = pipeline(tmp_path, rules)
    engine.process([event(1, boom=True)], source="test")
    engine = restarted(engine)
    assert planned(engine.process([event(2, minutes=1)], source="test")) == [(2, "hourly", "log")]


GUARDED_THEN_LOGGED = """
rules:
  - id: guarded
    when: {type: 19}
    max_actions: {count: 1, within: 10m}
    actions:
      - suspend_sim: {}
      - log: {message: "suspended"}
"""


def test_a_destructive_action_a_failed_rule_planned_is_not_counted_by_the_guard(
    tmp_path, log_fails_on_boom
):
    engine = pipeline(tmp_path, GUARDED_THEN_LOGGED)
    one_batch = engine.process([event(1, boom=True), event(2, minutes=1, sim=2)], source="test")
    assert [(d.event_id, d.outcome) for d in one_batch.decisions] == [(1, "failed"), (2, "fired")]
    (tmp_path / "again").mkdir()
    engine = pipeline(tmp_path / "again", GUARDED_THEN_LOGGED)
    engine.process([event(1, boom=True)], source="test")
    engine = restarted(engine)
    second = engine.process([event(2, minutes=1, sim=2)], source="test")
    assert [d.outcome for d in second.decisions] == ["fired"]


def test_a_guard_trip_in_a_rule_that_then_failed_is_taken_back(tmp_path, log_fails_on_boom):
    engine = pipeline(tmp_path, GUARDED_THEN_LOGGED)
    engine.process([event(1)], source="test")
    tripped = engine.process([event(2, minutes=1, sim=2, boom=True)], source="test")
    assert [(f.event_id, f.stage) for f in tripped.failures] == [(2, "judge")]
    assert [r for r in engine.store.audit_rows() if r["outcome"] == "guard_tripped"] == []
    # Not in shadow: the next destructive action over the limit is held, and trips it.
    held = engine.process([event(3, minutes=2, sim=3)], source="test")
    assert [d.outcome for d in held.decisions] == ["held"]
    engine = restarted(engine)
    after = engine.process([event(4, minutes=3, sim=4)], source="test")
    assert [d.outcome for d in after.decisions] == ["shadow"]


def test_a_follow_up_planned_by_a_rule_that_then_failed_is_taken_back(tmp_path, log_fails_on_boom):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: cycle
            when: {type: 19}
            actions:
              - after: 1h
                do: {activate_sim: {}}
                cancel_if: {when: {type: 8}}
              - log: {message: "planned"}
        """,
    )
    engine.process([event(1, sim=1), event(2, sim=2, boom=True)], source="test")
    waiting = [f.idempotency_key for f in engine.store.cancellable_follow_ups()]
    assert waiting == ["1-cycle-0"]
    both = [event(3, 1, sim=2, event_type={"id": 8}), event(4, 1, sim=1, event_type={"id": 8})]
    cancelled = engine.process(both, source="test").cancelled
    assert [c.follow_up.idempotency_key for _, c in cancelled] == ["1-cycle-0"]


FRAGILE_AND_STURDY = """
rules:
  - id: fragile
    when: {type: 19}
    condition: {">": [{"var": "detail.volume"}, 5]}
    actions: [{log: {message: "big"}}]
  - id: sturdy
    when: {type: 19}
    actions: [{suspend_sim: {}}]
"""


def with_breaking_condition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> Pipeline:
    """The rules above, the fragile one's condition raising `error` on every evaluation,
    in the fast path and the full one alike."""
    engine = pipeline(tmp_path, FRAGILE_AND_STURDY)
    fragile = engine.rules.get("fragile")
    assert fragile is not None and fragile.condition is not None

    def broken(raw: dict[str, Any]) -> bool:
        raise error

    monkeypatch.setattr(fragile.condition, "fast", broken)
    monkeypatch.setattr(Condition, "holds", lambda self, raw: broken(raw))
    return engine


def test_a_condition_that_breaks_unexpectedly_fails_only_its_rule(tmp_path, monkeypatch):
    engine = with_breaking_condition(tmp_path, monkeypatch, RuntimeError("evaluator bug"))
    result = engine.process([event(1, detail={"volume": 9})], source="test")
    assert planned(result) == [(1, "sturdy", "suspend_sim")]
    assert [(f.rule_id, f.stage) for f in result.failures] == [("fragile", "match")]


def test_a_panic_of_the_condition_engine_fails_only_its_rule(tmp_path, monkeypatch):
    # pyo3 raises a Rust panic as PanicException, a BaseException: it must not end the batch.
    class PanicException(BaseException):
        pass

    engine = with_breaking_condition(tmp_path, monkeypatch, PanicException("allocation failed"))
    result = engine.process([event(1, detail={"volume": 9}), event(2, minutes=1)], source="t")
    assert planned(result) == [(1, "sturdy", "suspend_sim"), (2, "sturdy", "suspend_sim")]
    assert [(f.event_id, f.rule_id) for f in result.failures] == [(1, "fragile"), (2, "fragile")]


def test_a_rule_failing_on_every_event_is_logged_once_per_reason(tmp_path):
    engine = pipeline(tmp_path, TWO_RULES)
    records = [event(i, used=i, total=0) for i in range(1, 30)]
    records += [event(100 + i, used=1, total="x") for i in range(5)]
    with capture_logs() as logs:
        result = engine.process(records, source="test")
        engine.process([event(200, used=1, total=0)], source="test")
    assert len(result.failures) == 34
    lines = [e for e in logs if e.get("rule") == "percent" and e["log_level"] == "error"]
    assert len(lines) == 2  # division by zero, and a number divided by text
    engine.set_rules(engine.rules)  # a reload: a rule still failing says so again
    with capture_logs() as logs:
        engine.process([event(201, used=1, total=0)], source="test")
    assert len([e for e in logs if e.get("rule") == "percent"]) == 1


def test_an_event_too_deep_to_judge_is_quarantined_whole_and_its_neighbours_judged(tmp_path):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: suspend
            when: {type: 19}
            actions: [{suspend_sim: {}}]
          - id: per-detail
            when: {type: 19}
            threshold: {count: 1, within: 10m, per: detail}
            actions: [{log: {message: "seen"}}]
        """,
    )
    deep: Any = 1
    for _ in range(400):
        deep = {"a": deep}
    result = engine.process(
        [event(1, detail={"a": 1}), event(2, detail=deep), event(3, detail={"a": 2})],
        source="test",
    )
    assert [e for e, _, _ in planned(result)] == [1, 1, 3, 3]
    assert (result.new_events, result.quarantined) == (2, 1)
    assert result.matched_rules == {"suspend": 2, "per-detail": 2}
    assert engine.store.unseen([1, 2, 3]) == set()
    assert engine.store.intents_for_events([2]) == []
    (kept,) = engine.store.quarantined()
    assert "nested too deeply" in kept["reason"]
    assert kept["payload"].startswith('{"id"')


def test_a_record_the_reader_cannot_handle_at_all_is_quarantined(tmp_path, monkeypatch):
    engine = pipeline(tmp_path, TWO_RULES)

    class Odd(dict):  # type: ignore[type-arg]
        def get(self, key: Any, default: Any = None) -> Any:
            raise RuntimeError("a reader bug")

    result = engine.process([event(1, used=1, total=2), Odd(id=2)], source="test")
    assert planned(result) == [(1, "percent", "log"), (1, "suspend", "suspend_sim")]
    assert result.quarantined == 1
    assert "RuntimeError: a reader bug" in result.rejected[0][1]


# -- ids beyond 64 bits ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "9223372036854775808",  # 2**63: an unsigned 64-bit integer to orjson
        "-9223372036854775809",  # read as a float that rounds onto -2**63
        "18446744073709551616",  # 2**64: a float
        "-9223372036854775808.5",
        "1e300",
        '"9223372036854775808"',
    ],
)
@pytest.mark.parametrize("field", ["id", "sim", "endpoint", "event_type", "event_source"])
def test_an_id_outside_64_bits_is_refused_whatever_the_json_reader_made_of_it(text, field):
    import orjson

    record = orjson.loads(b'{"timestamp": "2025-05-01T10:00:00Z", "id": 7}')
    value = orjson.loads(text)
    if field == "id":
        record["id"] = value
    else:
        record[field] = {"id": value}
    with pytest.raises(EventFormatError, match="out of range for an id"):
        normalize(record)


def test_ids_at_the_64_bit_edges_are_kept_exactly():
    for edge in (2**63 - 1, -(2**63)):
        record = {"id": edge, "timestamp": "2025-05-01T10:00:00Z", "sim": {"id": edge}}
        assert (normalize(record).id, normalize(record).sim_id) == (edge, edge)
    assert normalize({"id": 12.0, "timestamp": "2025-05-01T10:00:00Z"}).id == 12


# -- records too deep to read ----------------------------------------------------------------


DEEP_TEXT = b'{"id": 2, "detail": ' + b"[" * 3000 + b"]" * 3000 + b"}"


def test_a_record_too_deep_to_read_leaves_the_other_records_of_its_array_readable():
    records = loads_records(b'[{"id": 1, "x": "]}"},' + DEEP_TEXT + b', {"id": 3}]')
    assert records[0] == {"id": 1, "x": "]}"} and records[2] == {"id": 3}
    assert isinstance(records[1], Unreadable) and "nested too deeply" in records[1].reason
    (alone,) = loads_records(DEEP_TEXT)
    assert isinstance(alone, Unreadable)


def test_scalars_beside_a_record_too_deep_to_read_are_read_as_themselves():
    records = loads_records(b'[1, "a, ]b", null, ' + DEEP_TEXT + b", true]")
    assert records[:3] == [1, "a, ]b", None] and records[4] is True
    assert isinstance(records[3], Unreadable)


def test_a_body_that_is_not_json_stays_an_error_with_its_own_position():
    import orjson

    with pytest.raises(orjson.JSONDecodeError, match=r"char 2\)"):
        loads_records(b"[{]," + DEEP_TEXT + b"]")
    bad_after = b"[" + DEEP_TEXT + b', {"a": tru}]'
    with pytest.raises(orjson.JSONDecodeError, match="depth"):
        loads_records(bad_after)  # the whole body's own error, not the item's


async def test_an_event_page_holding_an_unreadable_or_non_object_record_is_still_read():
    pages = []

    async def api(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/authenticate":
            return httpx.Response(200, json={"auth_token": "t"})
        body = b'[{"id": 1}, null, ' + DEEP_TEXT + b', {"id": 3}]'
        return httpx.Response(200, content=body, headers={"x-total-pages": "1"})

    settings = ClientSettings(base_url="https://emnify.test")
    async with EmnifyClient("app-token", settings, transport=httpx.MockTransport(api)) as client:
        async for page in client.iter_event_pages(T0, T0 + timedelta(minutes=1)):
            pages.append(page)
    (page,) = pages
    assert page.events[0] == {"id": 1} and page.events[1] is None
    assert isinstance(page.events[2], Unreadable) and page.events[3] == {"id": 3}


def test_a_batch_of_many_malformed_records_writes_one_log_line(tmp_path):
    engine = pipeline(tmp_path, TWO_RULES)
    records: list[Any] = [{"id": "x"} for _ in range(500)] + [[1]] * 500
    with capture_logs() as logs:
        result = engine.process(records, source="data_streamer")
    assert result.quarantined == 1000
    (line,) = [e for e in logs if "quarantined" in e["event"]]
    assert line["event"] == "1000 records quarantined"
    assert set(line["reasons"].values()) == {500}


def test_an_interrupt_while_judging_still_ends_the_batch(tmp_path, log_fails_on_boom, monkeypatch):
    engine = pipeline(tmp_path, TWO_RULES)

    def interrupted(self: Log, event: Any, context: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(Log, "plan", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.process([event(1, used=1, total=2)], source="test")
    assert engine.store.unseen([1]) == {1}  # nothing of the batch was committed


def test_events_judged_elsewhere_are_matched_here_when_they_come_without_rules(tmp_path):
    from engine.pipeline import Judged

    engine = pipeline(tmp_path, TWO_RULES)
    suspend = engine.rules.get("suspend")
    assert suspend is not None
    result = engine.process_judged(
        [
            Judged(normalize(event(1, used=1, total=2)), None),  # matched here: both rules
            Judged(normalize(event(2, used=1, total=2)), [suspend]),  # as matched elsewhere
        ]
    )
    assert planned(result) == [
        (1, "percent", "log"),
        (1, "suspend", "suspend_sim"),
        (2, "suspend", "suspend_sim"),
    ]


def test_a_key_whose_failed_firing_left_no_throttle_mark_survives_the_next_prune(
    tmp_path, log_fails_on_boom
):
    rules = """
    rules:
      - id: hourly
        when: {type: 19}
        throttle: {for: 1h}
        actions:
          - log: {message: "quota"}
    """
    engine = pipeline(tmp_path, rules)
    engine.process([event(1, sim=1)], source="test")
    engine = restarted(engine)  # the store holds a mark: marks are read from it per key
    engine.process([event(2, minutes=1, sim=2, boom=True)], source="test")
    later = engine.process([event(3, minutes=20, sim=2), event(4, minutes=21, sim=1)], source="t")
    assert planned(later) == [(3, "hourly", "log")]


def test_a_window_whose_failed_firing_was_taken_back_survives_the_next_prune(
    tmp_path, log_fails_on_boom
):
    rules = """
    rules:
      - id: two-in-an-hour
        when: {type: 19}
        threshold: {count: 2, within: 1h}
        actions:
          - log: {message: "two"}
    """
    engine = pipeline(tmp_path, rules)
    engine.process([event(1, sim=1)], source="test")
    engine = restarted(engine)  # windows are now read from the store, key by key
    engine.process([event(2, minutes=1, sim=1, boom=True)], source="test")
    later = engine.process([event(3, minutes=20, sim=1)], source="test")
    assert planned(later) == [(3, "two-in-an-hour", "log")]
