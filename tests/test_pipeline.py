"""The batch pipeline (`engine.pipeline`) as its callers see it: what a batch reports, what it
hands the store to commit (seen ids, intents, audit rows, quarantined records), what it logs.

Judged over an in-memory store that keeps each committed batch, so that what the pipeline
asked the store to record can be read back as it was handed over; the stores' own tests
check that they keep it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from engine import absence as absence_module
from engine import secrets
from engine.actions.log import Log
from engine.echoes import LoopBreaker
from engine.engine_events import EngineEventDraft
from engine.errors import LeaseLost, StaleRuleState, StoreError
from engine.events import normalize
from engine.jsontext import loads_records
from engine.lookups import Fact
from engine.model import (
    Batch,
    Fence,
    FollowUpKey,
    Intent,
    IntentStatus,
    RuleOverride,
    Silence,
)
from engine.pipeline import Judged, Pipeline, Planned, dedup_horizon
from engine.rules import MaxActions
from engine.rules.condition import Condition
from engine.rules.loader import load_rules
from engine.silencing import Quiet
from engine.state import PRUNE_MARGIN, format_moment
from engine.store import MemoryStore, SqliteStore

from helpers import rules_from, write_rules

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


class KeptStore(MemoryStore):
    """A memory store that keeps every batch committed to it, as it was handed over."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[Batch] = []

    def commit_batch(self, batch: Batch, now: datetime) -> int:
        created = super().commit_batch(batch, now)
        self.batches.append(batch)
        return created

    @property
    def last(self) -> Batch:
        return self.batches[-1]


def pipeline(tmp_path: Path, rules: str, **options: Any) -> Pipeline:
    return Pipeline(rules_from(tmp_path, rules), KeptStore(), **options)


def kept(engine: Pipeline) -> Batch:
    store = engine.store
    assert isinstance(store, KeptStore)
    return store.last


LOG_RULE = """
rules:
  - id: note
    when: {type: 19}
    actions:
      - log: {message: "seen"}
"""


# -- quarantined records ---------------------------------------------------------------------


def test_a_quarantined_record_is_kept_as_its_compact_json_text(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    record = {"id": "not a number", "event_type": {"id": 19}, "tags": ["a", "b"]}
    result = engine.process([record], source="data_streamer")
    assert result.quarantined == 1
    ((source, reason, text),) = kept(engine).quarantine
    assert source == "data_streamer"
    assert reason == result.rejected[0][1]
    assert text == orjson.dumps(record).decode()  # compact, as received


def test_a_record_with_an_integer_past_64_bits_is_kept_as_text_with_its_other_values_as_text(
    tmp_path,
):
    engine = pipeline(tmp_path, LOG_RULE)
    at = datetime(2025, 5, 1, tzinfo=UTC)
    record = {"id": 2**70, "seen_at": at}
    engine.process([record], source="test")
    ((_, _, text),) = kept(engine).quarantine
    assert text == json.dumps({"id": 2**70, "seen_at": str(at)})


def test_a_record_with_values_json_has_no_type_for_is_kept_with_them_as_text(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    engine.process([{"id": "x", "amount": Decimal("1.5")}], source="test")
    ((_, _, text),) = kept(engine).quarantine
    assert text == '{"id":"x","amount":"1.5"}'


def test_a_record_too_deep_for_json_is_kept_as_far_as_a_person_would_read_it(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    deep: Any = [1]
    for _ in range(5000):
        deep = [deep]
    engine.process([deep], source="test")
    ((_, _, text),) = kept(engine).quarantine
    assert text.startswith("(nested too deeply for JSON) [[[[[[[[")
    assert len(text) < 200


def test_a_quarantined_record_is_cut_short_past_a_megabyte_saying_how_long_it_was(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    record = {"id": "x", "description": "d" * (1024 * 1024)}
    whole = orjson.dumps(record).decode()
    engine.process([record], source="test")
    ((_, _, text),) = kept(engine).quarantine
    limit = 1024 * 1024
    assert text == whole[:limit] + f"... (cut short: {len(whole)} characters)"


def test_a_record_of_exactly_a_megabyte_is_kept_whole(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    record = {"id": "x", "description": ""}
    record["description"] = "d" * (1024 * 1024 - len(orjson.dumps(record)))
    engine.process([record], source="test")
    ((_, _, text),) = kept(engine).quarantine
    assert text == orjson.dumps(record).decode() and len(text) == 1024 * 1024


def test_one_quarantined_record_is_logged_as_an_event_with_its_reason(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    with capture_logs() as logs:
        result = engine.process([{"id": "x"}, event(2)], source="poller")
    (line,) = [e for e in logs if "quarantined" in e["event"]]
    assert line["event"] == "event quarantined"
    assert line["source"] == "poller"
    assert line["reason"] == result.rejected[0][1]
    assert "reasons" not in line
    assert line["log_level"] == "warning"


def test_a_batch_of_bad_records_logs_the_commonest_reasons_with_their_counts(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    records: list[Any] = [[1]] * 3 + [{"id": "x"}] * 2 + ["text"] * 4 + [None]
    with capture_logs() as logs:
        result = engine.process(records, source="poller")
    (line,) = [e for e in logs if "quarantined" in e["event"]]
    assert line["event"] == "10 records quarantined"
    by_reason: dict[str, int] = {}
    for _, reason in result.rejected:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    commonest = sorted(by_reason.items(), key=lambda item: -item[1])
    assert line["reason"] == commonest[0][0]
    assert line["reasons"] == dict(commonest[:3])


def test_a_reader_crash_is_quarantined_with_the_error_named_cut_short_and_redacted(
    tmp_path, monkeypatch
):
    engine = pipeline(tmp_path, LOG_RULE)
    secrets.register("hunter2-secret")
    long = "the reader failed on hunter2-secret " + "x" * 400

    def crash(record: Any, **_: Any) -> Any:
        if record.get("id") == 1:
            raise RuntimeError(long)
        if record.get("id") == 2:
            raise RuntimeError
        raise KeyError("id")

    monkeypatch.setattr("engine.pipeline.normalize", crash)
    result = engine.process([event(1), event(2), event(3)], source="test")
    reasons = [reason for _, reason in result.rejected]
    cut = f"RuntimeError: {long}"[:299] + "…"  # 300 characters, then the secret redacted
    assert reasons[0] == cut.replace("hunter2-secret", "***")
    assert reasons[1:] == ["RuntimeError", "KeyError: 'id'"]


def test_a_reason_of_exactly_three_hundred_characters_is_kept_whole(tmp_path, monkeypatch):
    engine = pipeline(tmp_path, LOG_RULE)
    message = "m" * (300 - len("RuntimeError: "))

    def crash(record: Any, **_: Any) -> Any:
        raise RuntimeError(message)

    monkeypatch.setattr("engine.pipeline.normalize", crash)
    result = engine.process([event(1)], source="test")
    assert result.rejected == [(0, f"RuntimeError: {message}")]


# -- what the audit log is handed --------------------------------------------------------------


def test_every_audit_row_carries_the_events_time_and_who_it_was_about(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    engine.process([event(7, minutes=3, sim=4)], source="test")
    rows = kept(engine).audit
    assert [row.outcome for row in rows] == ["matched", "planned"]
    for row in rows:
        assert row.event_id == 7 and row.rule_id == "note"
        assert row.event_ts == (T0 + timedelta(minutes=3)).timestamp()
        assert (row.sim_id, row.endpoint_id, row.iccid) == (4, 504, "8988303000000000004")


# -- follow-ups ---------------------------------------------------------------------------------


def test_a_follow_up_due_past_the_year_9999_fails_saying_when_it_would_be_due(tmp_path):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: later
            when: {type: 19}
            actions:
              - after: 2d
                do: {log: {message: "later"}}
        """,
    )
    result = engine.process([event(1) | {"timestamp": "9999-12-31T12:00:00Z"}], source="test")
    ((failure),) = result.failures
    assert failure.reason == (
        "follow-up due 2d after 9999-12-31T12:00:00Z falls past the year 9999"
    )
    assert (failure.stage, failure.action) == ("plan", "log")


# -- the store's dedup horizon ------------------------------------------------------------------


def test_seen_ids_are_kept_for_the_poll_overlap_and_a_day_more():
    assert dedup_horizon(timedelta(minutes=10)) == timedelta(hours=24, minutes=10)
    assert dedup_horizon(timedelta(0)) == timedelta(hours=24)


# -- events judged elsewhere --------------------------------------------------------------------


def test_events_judged_elsewhere_are_recorded_as_seen_by_the_single_organisation(tmp_path):
    store = SqliteStore(tmp_path / "engine.sqlite3")
    engine = Pipeline(rules_from(tmp_path, LOG_RULE), store)
    engine.process_judged([Judged(normalize(event(1)), None)])
    assert store.unseen([1]) == set()
    again = engine.process([event(1)], source="poller")
    assert (again.duplicates, again.new_events, again.planned) == (1, 0, [])


# -- organisations ------------------------------------------------------------------------------

SCOPED = """
rules:
  - id: acme-only
    organisation: acme
    when: {type: 19}
    actions: [{log: {message: "acme"}}]
  - id: everyone
    when: {type: 19}
    actions: [{log: {message: "any"}}]
"""


def scoped_pipeline(tmp_path: Path) -> Pipeline:
    (tmp_path / "rules").mkdir()
    write_rules(tmp_path / "rules", SCOPED)
    rules = load_rules(tmp_path / "rules", organisations={"acme": None, "globex": None})
    return Pipeline(rules, KeptStore())


def test_an_organisations_events_carry_its_name_and_its_intents_keys_are_its_own(tmp_path):
    engine = scoped_pipeline(tmp_path)
    result = engine.process([event(1, org="globex")], source="poller", organisation="acme")
    assert [(p.rule.id, p.key, p.event.raw["org"]) for p in result.planned] == [
        ("acme-only", "acme:1-acme-only-0", "acme"),
        ("everyone", "acme:1-everyone-0", "acme"),
    ]
    assert kept(engine).organisation == "acme"
    assert [row.organisation for row in kept(engine).audit] == ["acme"] * 4
    again = engine.process([event(1)], source="data_streamer", organisation="acme")
    assert (again.duplicates, again.planned) == (1, [])


def test_a_rule_scoped_to_an_organisation_passes_over_another_organisations_events(tmp_path):
    engine = scoped_pipeline(tmp_path)
    result = engine.process([event(1)], source="poller", organisation="globex")
    assert [(p.rule.id, p.key) for p in result.planned] == [("everyone", "globex:1-everyone-0")]
    assert result.matched_rules == {"everyone": 1}
    engine.set_rules(engine.rules)  # a reload keeps them scoped
    result = engine.process([event(2)], source="poller", organisation="globex")
    assert [p.rule.id for p in result.planned] == ["everyone"]


def test_an_event_of_the_single_organisation_cannot_name_one_itself(tmp_path):
    engine = scoped_pipeline(tmp_path)
    result = engine.process([event(1, org="acme")], source="data_streamer")
    assert [(p.rule.id, p.key) for p in result.planned] == [("everyone", "1-everyone-0")]
    assert "org" not in result.planned[0].event.raw
    assert kept(engine).organisation == ""
    # The next batch is the single organisation's again, whatever the last one was.
    engine.process([event(2)], source="poller", organisation="acme")
    after = engine.process([event(3)], source="poller")
    assert [p.key for p in after.planned] == ["3-everyone-0"]
    assert kept(engine).organisation == ""
    engine.process([event(4)], source="poller", organisation="acme")
    judged = engine.process_judged([Judged(normalize(event(5)), None)])
    assert [p.key for p in judged.planned] == ["5-everyone-0"]
    assert kept(engine).organisation == ""


# -- usage records ------------------------------------------------------------------------------

USAGE = """
rules:
  - id: heavy
    usage: {data: ">200MB", within: 24h, per: endpoint}
    actions: [{log: {message: "heavy"}}]
"""


def usage_record(record_id: int, mb: float, minutes: float = 0) -> dict[str, Any]:
    at = T0 + timedelta(minutes=minutes)
    return {
        "id": record_id,
        "traffic_type": {"id": 5, "description": "Data"},
        "start_timestamp": format_moment(at - timedelta(seconds=45)),
        "end_timestamp": format_moment(at),
        "volume": {"rx": mb * 0.8, "tx": mb * 0.2, "total": mb},
        "endpoint": {"id": 501, "name": "truck-1"},
        "sim": {"id": 1, "iccid": "8988303000000000001"},
    }


def test_usage_records_are_passed_over_while_no_rule_uses_them(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    result = engine.process([usage_record(1, 10), event(2), usage_record(3, 10)], source="s")
    assert (result.usage_ignored, result.usage_used) == (2, 0)
    assert (result.new_events, result.quarantined) == (1, 0)
    assert [seen for seen, _ in kept(engine).seen] == [2]


def test_a_usage_rule_sums_the_records_of_its_key_and_fires_past_its_limit(tmp_path):
    engine = pipeline(tmp_path, USAGE)
    first = engine.process([usage_record(1, 150), event(9)], source="s")
    assert (first.usage_used, first.usage_ignored, first.new_events) == (1, 0, 2)
    ((decision),) = first.decisions
    assert (decision.outcome, decision.reason) == (
        "below_threshold",
        "usage 150 MB in 24h, not > 200 MB for endpoint.id=501",
    )
    second = engine.process([usage_record(2, 100, minutes=1)], source="s")
    ((planned),) = second.planned
    assert second.decisions[0].reason == "usage 250 MB in 24h > 200 MB for endpoint.id=501"
    (matched,) = [r for r in kept(engine).audit if r.outcome == "matched"]
    assert matched.steps is not None
    assert matched.steps["usage"] == second.decisions[0].reason
    nowhere = usage_record(3, 500, minutes=2) | {"endpoint": None}
    third = engine.process([nowhere], source="s")
    assert [(d.outcome, d.reason) for d in third.decisions] == [
        ("below_threshold", "endpoint.id is missing: the usage record is not counted")
    ]
    assert planned.as_json() == {
        "usage_record_id": 2,
        "rule": "heavy",
        "action": "log",
        "target": planned.action.target,
        "params": planned.action.params,
    }


def test_a_malformed_usage_record_is_quarantined_saying_it_is_one(tmp_path):
    engine = pipeline(tmp_path, USAGE)
    bad = usage_record(1, 10) | {"volume": "lots"}
    result = engine.process([bad], source="data_streamer")
    ((index, reason),) = result.rejected
    assert index == 0 and reason.startswith("usage record ")
    assert (result.usage_used, result.quarantined) == (0, 1)


# -- what replay prints -------------------------------------------------------------------------

GUARDED = """
rules:
  - id: suspend
    when: {type: 19}
    max_actions: {count: 1, within: 10m}
    actions:
      - suspend_sim: {}
      - log: {message: "suspended"}
      - after: 1h
        do: {activate_sim: {}}
    on_guard_trip:
      - log: {message: "guard"}
"""


def test_each_planned_action_reads_as_json_with_only_what_applies_to_it(tmp_path):
    engine = pipeline(tmp_path, GUARDED)
    result = engine.process([event(1), event(2, minutes=1, sim=2)], source="test")

    def shown(planned: Planned) -> dict[str, Any]:
        out = planned.as_json()
        assert (out.pop("target"), out.pop("params")) == (
            planned.action.target,
            planned.action.params,
        )
        return out

    assert [shown(p) for p in result.planned] == [
        {"event_id": 1, "rule": "suspend", "action": "suspend_sim"},
        {"event_id": 1, "rule": "suspend", "action": "log"},
        {"event_id": 1, "rule": "suspend", "action": "activate_sim", "due": "2025-05-01T11:00:00Z"},
        {"event_id": 2, "rule": "suspend", "action": "suspend_sim", "held": True},
        {"event_id": 2, "rule": "suspend", "action": "log", "on_guard_trip": True},
        {"event_id": 2, "rule": "suspend", "action": "log", "shadow": True},
        {
            "event_id": 2,
            "rule": "suspend",
            "action": "activate_sim",
            "due": "2025-05-01T11:01:00Z",
            "shadow": True,
        },
    ]
    assert [p.key for p in result.planned] == [
        "1-suspend-0",
        "1-suspend-1",
        "1-suspend-2",
        "2-suspend-0",
        "2-suspend-on_guard_trip-0",
        "2-suspend-1",
        "2-suspend-2",
    ]


def test_a_cancellation_is_told_in_the_order_the_events_caused_it(tmp_path):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: nap
            mode: shadow
            when: {type: 19}
            actions:
              - log: {message: "now"}
              - after: 1h
                do: {log: {message: "later"}}
                cancel_if: {when: {type: 8}}
        """,
    )
    result = engine.process(
        [event(1), event(2, minutes=1, event_type={"id": 8}), event(3, minutes=2)],
        source="test",
    )
    told = [line.as_json() for line in result.in_order()]
    assert [(line["event_id"], line["action"]) for line in told] == [
        (1, "log"),
        (1, "log"),
        (2, "cancel"),
        (3, "log"),
        (3, "log"),
    ]
    assert told[2] == {
        "event_id": 2,
        "rule": "nap",
        "action": "cancel",
        "cancels": "1-nap-1",
        "shadow": True,
    }


# -- a batch judged on state that changed under it ----------------------------------------------


class StaleStore(KeptStore):
    """A store whose rule state changes under the first `times` batches committed."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times
        self.commits = 0

    def commit_batch(self, batch: Batch, now: datetime) -> int:
        self.commits += 1
        if self.commits <= self.times:
            raise StaleRuleState("rule state changed while the batch was judged")
        return super().commit_batch(batch, now)


THROTTLED = """
rules:
  - id: once-an-hour
    when: {type: 19}
    throttle: {for: 1h}
    actions: [{log: {message: "seen"}}]
"""


def test_a_batch_whose_state_changed_under_it_is_judged_again_up_to_five_times(tmp_path):
    store = StaleStore(times=4)
    engine = Pipeline(rules_from(tmp_path, THROTTLED), store)
    with capture_logs() as logs:
        result = engine.process([event(1)], source="test")
    assert store.commits == 5
    # Judged afresh each time: its own throttle mark of an attempt before does not hold it.
    assert [d.outcome for d in result.decisions] == ["fired"]
    again = [e for e in logs if e["event"].startswith("rule state changed during the batch")]
    assert len(again) == 4 and again[0]["log_level"] == "info"


def test_a_batch_whose_state_keeps_changing_fails_after_the_fifth_time(tmp_path):
    store = StaleStore(times=5)
    engine = Pipeline(rules_from(tmp_path, THROTTLED), store)
    with pytest.raises(StoreError) as failed:
        engine.process([event(1)], source="test")
    assert store.commits == 5
    assert str(failed.value) == (
        "the batch was judged 5 times and each time the rules' state changed before it could"
        " be recorded (rule state changed while the batch was judged); it is tried again later"
    )
    assert not isinstance(failed.value, StaleRuleState)
    assert failed.value.__cause__ is None and failed.value.__suppress_context__
    store.times = 0
    assert [d.outcome for d in engine.process([event(1)], source="test").decisions] == ["fired"]


# -- rule failures in the log -------------------------------------------------------------------


def test_a_failing_rule_logs_its_first_five_reasons_and_numbers_do_not_make_a_new_one(tmp_path):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: broken
            when: {type: 19}
            actions:
              - log: {message: "{{ event[event.pick].x }}"}
        """,
    )
    picks = ["a1", "a2", "b1", "b22", "c1", "d1", "e1", "f1", "a3"]
    records = [event(i, pick=pick) for i, pick in enumerate(picks, start=1)]
    with capture_logs() as logs:
        result = engine.process(records, source="test")
    assert len(result.failures) == 9
    lines = [e for e in logs if e.get("rule") == "broken"]
    assert [line["event_id"] for line in lines] == [1, 3, 5, 6, 7]
    assert lines[0]["event"] == (
        "action not planned (logged once per rule and reason; the audit log has every one)"
    )
    assert lines[0]["log_level"] == "error"
    assert (lines[0]["action"], lines[0]["event_id"]) == ("log", 1)
    assert lines[0]["reason"] == result.failures[0].reason
    assert "stage" not in lines[0]


# -- shadow mode and silences -------------------------------------------------------------------


def matched_steps(engine: Pipeline, event_id: int) -> dict[str, Any]:
    (row,) = [r for r in kept(engine).audit if r.event_id == event_id and r.outcome == "matched"]
    assert row.steps is not None
    return row.steps


def test_a_shadow_rules_trace_and_audit_say_it_only_would_have_acted(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE.replace("id: note", "id: note\n    mode: shadow"))
    result = engine.process([event(1)], source="test")
    reason = "rule in shadow mode: would have acted"
    assert matched_steps(engine, 1)["shadow"] == reason
    assert "silence" not in matched_steps(engine, 1)
    assert [(r.outcome, r.detail) for r in kept(engine).audit] == [
        ("matched", reason),
        ("would have acted", None),
    ]
    assert [(d.outcome, d.reason) for d in result.decisions] == [("shadow", reason)]


def test_a_silenced_match_is_recorded_as_silenced_by_what_and_not_run(tmp_path):
    silence = Silence(
        matchers=(("iccid", "8988303000000000001"),),
        comment="antenna work",
        created_by="ops",
        created_at=T0,
        ends_at=T0 + timedelta(hours=1),
        id=7,
    )
    quiet = Quiet(silences=(silence,), now=None)
    engine = pipeline(tmp_path, LOG_RULE, quiet=lambda now: quiet)
    result = engine.process([event(1), event(2, sim=2)], source="test")
    why = "silenced by #7 (antenna work)"
    assert matched_steps(engine, 1) == {"when": matched_steps(engine, 1)["when"], "silence": why}
    assert [(r.event_id, r.outcome, r.detail) for r in kept(engine).audit] == [
        (1, "matched", why),
        (1, "silenced", why),
        (2, "matched", None),
        (2, "planned", None),
    ]
    assert [(d.outcome, d.reason) for d in result.decisions] == [
        ("silenced", why),
        ("fired", "when and condition held"),
    ]
    assert [(p.shadow, p.silenced) for p in result.planned] == [(True, why), (False, None)]
    assert result.planned[0].as_json()["silenced"] == why
    assert [i.status.value for i in kept(engine).intents] == ["shadow", "pending"]


# -- an event too deep to judge -----------------------------------------------------------------


def test_an_event_too_deep_to_judge_takes_back_only_what_it_added(tmp_path):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: two-steps
            when: {type: 19}
            actions: [{log: {message: "one"}}, {log: {message: "two"}}]
          - id: per-detail
            when: {type: 19}
            threshold: {count: 1, within: 10m, per: detail}
            actions: [{log: {message: "seen"}}]
          - id: last
            when: {type: 19}
            condition: {"==": [{"var": "detail"}, null]}
            actions: [{log: {message: "last"}}]
        """,
    )
    deep: Any = 1
    for _ in range(400):
        deep = {"a": deep}
    with capture_logs() as logs:
        result = engine.process(
            [{"id": "bad"}, event(1, detail={"a": 1}), event(2, detail=deep), event(3, minutes=1)],
            source="test",
        )
    assert [(p.event.id, p.rule.id) for p in result.planned] == [
        (1, "two-steps"),
        (1, "two-steps"),
        (1, "per-detail"),
        (3, "two-steps"),
        (3, "two-steps"),
        (3, "last"),
    ]
    assert [(d.event_id, d.outcome) for d in result.decisions] == [
        (1, "fired"),
        (1, "fired"),
        (3, "fired"),
        (3, "below_threshold"),
        (3, "fired"),
    ]
    assert result.matches == 5
    assert result.matched_rules == {"two-steps": 2, "per-detail": 2, "last": 1}
    assert (result.received, result.new_events, result.quarantined) == (4, 2, 2)
    assert result.poisoned == [(2, "nested too deeply to be judged")]
    batch = kept(engine)
    assert [(source, reason[:6]) for source, reason, _ in batch.quarantine] == [
        ("test", result.rejected[0][1][:6]),
        ("judging", "nested"),
    ]
    assert [(row.event_id, row.rule_id, row.outcome) for row in batch.audit] == [
        (1, "two-steps", "matched"),
        (1, "two-steps", "planned"),
        (1, "two-steps", "planned"),
        (1, "per-detail", "matched"),
        (1, "per-detail", "fired"),
        (1, "per-detail", "planned"),
        (3, "two-steps", "matched"),
        (3, "two-steps", "planned"),
        (3, "two-steps", "planned"),
        (3, "per-detail", "matched"),
        (3, "per-detail", "below_threshold"),
        (3, "last", "matched"),
        (3, "last", "planned"),
    ]
    assert [i.idempotency_key for i in batch.intents] == [
        "1-two-steps-0",
        "1-two-steps-1",
        "1-per-detail-0",
        "3-two-steps-0",
        "3-two-steps-1",
        "3-last-0",
    ]
    (line,) = [e for e in logs if e.get("source") == "judging"]
    assert (line["event"], line["event_id"]) == ("event quarantined", 2)
    assert line["reason"] == "nested too deeply to be judged"


# -- the batch ----------------------------------------------------------------------------------


def test_events_are_judged_in_time_order_and_the_batch_says_its_newest(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    result = engine.process(
        [event(2, minutes=5), event(1, minutes=5), event(3, minutes=125)][::-1], source="test"
    )
    assert [p.event.id for p in result.planned] == [1, 2, 3]
    assert [seen for seen, _ in kept(engine).seen] == [1, 2, 3]
    assert result.newest == T0 + timedelta(minutes=125)
    newest = (T0 + timedelta(minutes=125)).timestamp()
    assert kept(engine).state.prune_before == newest - PRUNE_MARGIN.total_seconds()


def test_events_kept_in_their_given_order_prune_from_the_newest_of_them(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    records = [event(2, minutes=125), event(1, minutes=5), event(3, minutes=0)]
    result = engine.process(records, source="test", in_given_order=True)
    assert [p.event.id for p in result.planned] == [2, 1, 3]
    assert result.newest == T0  # the last one judged
    newest = (T0 + timedelta(minutes=125)).timestamp()
    assert kept(engine).state.prune_before == newest - PRUNE_MARGIN.total_seconds()


def test_an_event_seen_before_or_twice_in_a_batch_is_judged_once(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    engine.process([event(1)], source="test")
    result = engine.process([event(1), event(2), event(2), event(3)], source="test")
    assert (result.received, result.new_events, result.duplicates) == (4, 2, 2)
    assert [p.event.id for p in result.planned] == [2, 3]
    assert [seen for seen, _ in kept(engine).seen] == [2, 3]
    empty = engine.process([], source="test")
    assert (empty.received, empty.new_events, empty.newest) == (0, 0, None)


def test_the_engines_own_events_are_kept_in_the_audit_log_whether_or_not_a_rule_matches(
    tmp_path,
):
    engine = pipeline(tmp_path, LOG_RULE)
    own = event(5, minutes=1) | {
        "event_source": {"id": 1000},
        "event_type": {"id": 1001},
        "description": "guard tripped",
    }
    engine.process([own, event(6, minutes=2)], source="test")
    rows = [(r.event_id, r.rule_id, r.action, r.outcome, r.detail) for r in kept(engine).audit]
    assert rows[0] == (5, None, None, "engine_event", "guard tripped")
    assert [row[0] for row in rows[1:]] == [6, 6]
    quiet = Pipeline(rules_from(tmp_path, LOG_RULE), KeptStore(), audit=False)
    quiet.process([own], source="test")
    assert kept(quiet).audit == []


def test_a_pipeline_without_an_audit_log_still_plans_and_records_its_intents(tmp_path):
    engine = pipeline(tmp_path, GUARDED, audit=False)
    result = engine.process([event(1), event(2, minutes=1, sim=2)], source="test")
    assert kept(engine).audit == []
    assert len(kept(engine).intents) == len(result.planned) == 7


def test_events_without_the_throttles_field_share_one_mark_named_missing(tmp_path):
    engine = pipeline(tmp_path, THROTTLED.replace("{for: 1h}", "{for: 1h, per: detail.box}"))
    result = engine.process([event(1), event(2, minutes=1, sim=2)], source="test")
    assert [(d.outcome, d.reason) for d in result.decisions] == [
        ("fired", "when and condition held"),
        ("throttled", "throttled for detail.box=(missing) until 2025-05-01T11:00:00Z"),
    ]
    assert matched_steps(engine, 2)["throttle"] == {
        "per": "detail.box",
        "key": None,
        "until": "2025-05-01T11:00:00Z",
        "throttled": True,
    }
    assert matched_steps(engine, 1)["throttle"]["throttled"] is False
    counting = pipeline(
        tmp_path,
        THROTTLED.replace(
            "throttle: {for: 1h}", "threshold: {count: 2, within: 1h, per: detail.box}"
        ),
    )
    result = counting.process([event(1)], source="test")
    assert [(d.outcome, d.reason) for d in result.decisions] == [
        ("below_threshold", "detail.box is missing: the event is not counted")
    ]
    assert matched_steps(counting, 1)["threshold"] == {
        "per": "detail.box",
        "key": None,
        "needed": 2,
    }


# -- follow-ups and their cancellation ----------------------------------------------------------

FOLLOW_UPS = """
rules:
  - id: nap
    when: {type: 19}
    actions:
      - suspend_sim: {}
      - after: 1h
        do: {activate_sim: {}}
        cancel_if:
          when: {type: 8}
          condition: {"==": [{"var": "detail.ok"}, true]}
  - id: doze
    when: {type: 19}
    actions:
      - after: 2h
        do: {log: {message: "awake"}}
        cancel_if: {when: {type: 8}}
"""


def test_a_cancellation_hands_the_store_what_to_record_either_way(tmp_path):
    engine = pipeline(tmp_path, FOLLOW_UPS)
    engine.process([event(1)], source="test")
    result = engine.process([event(2, minutes=5, event_type={"id": 8})], source="test")
    # nap's cancel_if wants detail.ok: only doze's follow-up is cancelled.
    assert [c.follow_up.idempotency_key for _, c in result.cancelled] == ["1-doze-0"]
    (cancel,) = kept(engine).state.cancels
    assert (cancel.idempotency_key, cancel.shadow) == ("1-doze-0", False)
    audit, too_late = cancel.audit, cancel.too_late
    assert (audit.event_id, audit.rule_id, audit.action, audit.outcome) == (
        2,
        "doze",
        None,
        "cancelled",
    )
    assert audit.detail == (
        "1-doze-0 (due 2025-05-01T12:00:00Z) cancelled by event 2: cancel_if of doze matched"
        " (sim.id=1)"
    )
    assert (too_late.event_id, too_late.rule_id, too_late.action) == (2, "doze", None)
    assert (too_late.outcome, too_late.detail) == (
        "cancel too late",
        "event 2 met cancel_if of 1-doze-0, but it had already been taken by the dispatcher",
    )
    assert audit.event_ts == too_late.event_ts == (T0 + timedelta(minutes=5)).timestamp()


def test_a_shadow_follow_ups_cancellation_is_recorded_as_would_have_cancelled(tmp_path):
    engine = pipeline(tmp_path, FOLLOW_UPS, dry_run=True)
    engine.process([event(1)], source="test")
    engine.process([event(2, minutes=5, event_type={"id": 8}, detail={"ok": True})], source="t")
    cancels = kept(engine).state.cancels
    assert [(c.idempotency_key, c.shadow, c.audit.outcome) for c in cancels] == [
        ("1-nap-1", True, "would have cancelled"),
        ("1-doze-0", True, "would have cancelled"),
    ]


def test_a_cancel_if_that_breaks_fails_that_rules_cancel_if_and_keeps_its_follow_up(
    tmp_path, monkeypatch
):
    engine = pipeline(tmp_path, FOLLOW_UPS)
    engine.process([event(1), event(2, minutes=1)], source="test")
    calls: list[int] = []

    def breaks_once(self: Condition, raw: dict[str, Any]) -> bool:
        calls.append(raw["id"])
        if len(calls) == 1:
            raise RuntimeError("evaluator bug")
        return True

    monkeypatch.setattr(Condition, "holds", breaks_once)
    cancelling = event(3, minutes=5, event_type={"id": 8})
    result = engine.process([cancelling], source="test")
    assert [(f.event_id, f.rule_id, f.stage, f.reason) for f in result.failures] == [
        (3, "nap", "cancel_if", "cancel_if of 1-nap-1: RuntimeError: evaluator bug")
    ]
    assert [(d.rule_id, d.outcome) for d in result.decisions] == [("nap", "failed")]
    assert sorted(c.follow_up.idempotency_key for _, c in result.cancelled) == [
        "1-doze-0",
        "2-doze-0",
        "2-nap-1",
    ]
    assert result.engine_events == []


def test_a_follow_up_whose_rule_changed_since_is_kept(tmp_path):
    engine = pipeline(tmp_path, FOLLOW_UPS)
    engine.process([event(1)], source="test")
    engine.set_rules(rules_from(tmp_path, LOG_RULE.replace("note", "nap")))
    result = engine.process([event(2, minutes=5, event_type={"id": 8})], source="test")
    assert result.cancelled == [] and result.failures == []


# -- the loop breaker ---------------------------------------------------------------------------

SUSPENDER = """
rules:
  - id: suspender
    when: {type: 19}
    actions: [{suspend_sim: {}}]
"""


def test_a_flapping_target_is_said_as_an_engine_event_and_logged_with_how_to_resume(tmp_path):
    breaker = LoopBreaker(max_changes=1, within=timedelta(minutes=10), hold_for=timedelta(hours=1))
    engine = pipeline(tmp_path, SUSPENDER, loop_breaker=breaker)
    engine.process([event(1)], source="test")
    with capture_logs() as logs:
        result = engine.process([event(2, minutes=1)], source="test")
    counted = "2 status changes on sim:1 within 10m > 1"
    resume = "resume with `event-engine rules resume sim:1`"
    (said,) = result.engine_events
    assert said == EngineEventDraft(
        "target_flapping",
        {
            "target": "sim:1",
            "rule": "suspender",
            "event_id": 2,
            "reason": counted,
            "held_until": "2025-05-01T11:01:00Z",
            "resume": "event-engine rules resume sim:1",
        },
        sim={"id": 1, "iccid": "8988303000000000001"},
        endpoint={"id": 501},
        at=T0 + timedelta(minutes=1),
    )
    (line,) = [e for e in logs if e["event"].startswith("loop breaker")]
    assert line == {
        "event": "loop breaker: status actions on the target held",
        "log_level": "error",
        "target": "sim:1",
        "rule": "suspender",
        "event_id": 2,
        "reason": counted,
    }
    rows = [(r.rule_id, r.outcome, r.detail) for r in kept(engine).audit if r.outcome != "matched"]
    assert rows == [
        ("suspender", "target flapping", f"{counted}; {resume}"),
        ("suspender", "held", f"target flapping: {counted}; held for 1h; {resume}"),
    ]
    (hold,) = kept(engine).state.overrides
    assert (hold.rule_id, hold.mode, hold.since, hold.event_id) == (
        "sim:1",
        "hold",
        T0 + timedelta(minutes=1),
        2,
    )
    assert hold.reason == f"target flapping: {counted}; held for 1h or until resumed"
    # The hold ends an hour after it began, to the microsecond.
    later = engine.process([event(3, minutes=61)], source="test")
    assert [p.held for p in later.planned] == [False]
    # A SIM without an endpoint is said as one.
    alone = [event(n, minutes=62 + n, sim=2) | {"endpoint": None} for n in (4, 5)]
    flapped = engine.process(alone, source="test")
    assert [(d.sim, d.endpoint) for d in flapped.engine_events] == [
        ({"id": 2, "iccid": "8988303000000000002"}, None)
    ]


# -- leases -------------------------------------------------------------------------------------


def test_a_batch_is_committed_with_its_cursor_under_its_lease(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    fence = Fence("leader", "a", 7)
    engine.process([event(1)], source="poller", cursor=T0, fence=fence)
    assert (kept(engine).cursor, kept(engine).fence) == (T0, fence)
    engine.judge_absences(T0, fence=fence)
    assert kept(engine).fence == fence


def test_a_batch_under_a_lease_that_moved_on_is_refused_whole(tmp_path):
    store = SqliteStore(tmp_path / "engine.sqlite3")
    now = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
    engine = Pipeline(rules_from(tmp_path, LOG_RULE), store, clock=lambda: now)
    token = store.acquire_lease("leader", "a", timedelta(seconds=10), now - timedelta(minutes=1))
    assert token is not None
    assert store.acquire_lease("leader", "b", timedelta(seconds=10), now) is not None
    with pytest.raises(LeaseLost):
        engine.process([event(1)], source="poller", fence=Fence("leader", "a", token))
    assert store.unseen([1]) == {1} and store.intents() == []


# -- the blast-radius guard ---------------------------------------------------------------------


def test_a_tripped_guard_holds_the_action_switches_the_rule_to_shadow_and_says_so(tmp_path):
    engine = pipeline(
        tmp_path,
        GUARDED.replace(
            'log: {message: "guard"}',
            'log: {message: "{{ guard.rule_id }}: {{ guard.reason }} ({{ rule.description }},'
            ' event {{ event.id }})"}',
        ).replace("id: suspend\n", "id: suspend\n    description: quota guard\n"),
    )
    engine.process([event(1)], source="test")
    with capture_logs() as logs:
        result = engine.process([event(2, minutes=1, sim=2)], source="test")
    held = "blast-radius guard: 2 destructive actions within 10m > 1"
    switched = (
        f"switched to shadow by the blast-radius guard at 2025-05-01T10:01:00Z ({held});"
        " resume with `event-engine rules resume suspend`"
    )
    assert result.engine_events == [
        EngineEventDraft(
            "guard_tripped",
            {"rule": "suspend", "reason": held, "event_id": 2},
            sim={"id": 2, "iccid": "8988303000000000002"},
            endpoint={"id": 502},
        )
    ]
    (line,) = [e for e in logs if e["event"].startswith("blast-radius")]
    assert line == {
        "event": "blast-radius guard tripped: rule switched to shadow",
        "log_level": "error",
        "rule": "suspend",
        "event_id": 2,
        "reason": held,
    }
    (override,) = kept(engine).state.overrides
    assert override == RuleOverride("suspend", "shadow", switched, T0 + timedelta(minutes=1), 2)
    assert [(r.outcome, r.action, r.detail) for r in kept(engine).audit] == [
        ("matched", None, None),
        ("held", "suspend_sim", held),
        ("guard_tripped", None, switched),
        ("planned", "log", None),
        ("would have acted", "log", None),
        ("would have acted", "activate_sim", "due 2025-05-01T11:01:00+00:00"),
    ]
    assert [(i.kind, i.status.value) for i in kept(engine).intents] == [
        ("suspend_sim", "held"),
        ("log", "pending"),
        ("log", "shadow"),
        ("activate_sim", "shadow"),
    ]
    assert kept(engine).intents[1].params["message"] == f"suspend: {held} (quota guard, event 2)"
    assert [(d.outcome, d.reason) for d in result.decisions] == [("held", held)]
    assert matched_steps(engine, 2)["guard"] == {
        "rule": {"count": 2, "max": 1, "within": "10m", "held": True}
    }
    # Held and tripped actions do not wait to be cancelled.
    assert kept(engine).state.follow_ups == []


def test_the_global_guard_counts_after_the_rules_own_and_says_which_held(tmp_path):
    engine = pipeline(
        tmp_path,
        SUSPENDER.replace(
            "when: {type: 19}", "when: {type: 19}\n    max_actions: {count: 5, within: 1h}"
        ),
        max_actions=MaxActions(1, timedelta(minutes=10)),
        loop_breaker=None,
    )
    engine.process([event(1)], source="test")
    assert set(kept(engine).state.guards) == {"suspender", "*"}
    result = engine.process([event(2, minutes=1, sim=2)], source="test")
    held = "blast-radius guard (global): 2 destructive actions within 10m > 1"
    assert [(d.outcome, d.reason) for d in result.decisions] == [("held", held)]
    assert matched_steps(engine, 2)["guard"] == {
        "rule": {"count": 2, "max": 5, "within": "1h", "held": False},
        "global": {"count": 2, "max": 1, "within": "10m", "held": True},
    }
    # A held action is not counted: the rule's own window still holds one.
    assert kept(engine).state.guards == {}


# -- absence rules ------------------------------------------------------------------------------

WENT_SILENT = """
rules:
  - id: went-silent
    when: {type: 19}
    absence: {for: 2h, per: sim.iccid}
    actions:
      - log: {message: "{{ absence.key }} quiet since {{ absence.since }}"}
      - suspend_sim: {}
"""
ICCID = "8988303000000000001"


def test_an_absence_rule_records_each_sighting_and_waits_for_the_silence(tmp_path):
    engine = pipeline(tmp_path, WENT_SILENT)
    no_iccid = event(2, minutes=1) | {"sim": {"id": 9}}
    result = engine.process([event(1), no_iccid], source="test")
    assert result.planned == [] and result.matches == 2
    seen = f"sim.iccid={ICCID} seen: fires after 2h without a matching event"
    missing = "sim.iccid is missing: the event does not count for any key"
    assert [(d.event_id, d.rule_id, d.outcome, d.reason) for d in result.decisions] == [
        (1, "went-silent", "seen", seen),
        (2, "went-silent", "seen", missing),
    ]
    rows = [(r.event_id, r.rule_id, r.outcome, r.detail) for r in kept(engine).audit]
    assert rows == [
        (1, "went-silent", "matched", None),
        (1, "went-silent", "seen", seen),
        (2, "went-silent", "matched", None),
        (2, "went-silent", "seen", missing),
    ]
    ((rule, key),) = kept(engine).state.absences
    assert (rule, key) == ("went-silent", ICCID)


def test_a_silence_fires_the_absence_rules_actions_at_its_own_time(tmp_path):
    engine = pipeline(tmp_path, WENT_SILENT, loop_breaker=None)
    engine.process([event(1)], source="test", complete=T0)
    result = engine.judge_absences(T0 + timedelta(hours=3))
    reason = f"no matching event for 2h since 2025-05-01T10:00:00Z (sim.iccid={ICCID})"
    assert (result.received, result.new_events) == (0, 0)
    assert (result.matches, result.matched_rules) == (1, {"went-silent": 1})
    assert [(d.outcome, d.reason) for d in result.decisions] == [("fired", reason)]
    at = "2025-05-01T12:00:00Z"
    assert [p.key for p in result.planned] == [
        f"absence-went-silent-{ICCID}-{at}-0",
        f"absence-went-silent-{ICCID}-{at}-1",
    ]
    log = result.planned[0]
    assert log.action.params["message"] == f"{ICCID} quiet since 2025-05-01T10:00:00Z"
    assert log.as_json()["at"] == at and log.absence is not None
    assert log.as_json()["absence"] == log.absence
    assert log.event.id == 1 and log.event.timestamp == T0 + timedelta(hours=2)
    rows = [(r.event_id, r.outcome, r.action, r.detail) for r in kept(engine).audit]
    assert rows == [
        (1, "absent", None, reason),
        (1, "planned", "log", None),
        (1, "planned", "suspend_sim", None),
    ]
    # Complete time does not move back: judging an earlier time again fires nothing.
    assert engine.judge_absences(T0 + timedelta(hours=1)).planned == []
    assert engine.judge_absences(T0 + timedelta(hours=3)).planned == []
    # Nor does a batch that says nothing of complete time.
    assert engine.process([event(2, minutes=200)], source="test").planned == []


def test_a_silence_of_a_shadow_or_silenced_absence_rule_is_recorded_not_run(tmp_path):
    silence = Silence(
        matchers=(("iccid", ICCID),),
        comment="antenna work",
        created_by="ops",
        created_at=T0,
        ends_at=T0 + timedelta(days=1),
        id=3,
    )
    engine = pipeline(tmp_path, WENT_SILENT, quiet=lambda now: Quiet(silences=(silence,), now=None))
    engine.process([event(1)], source="test", complete=T0)
    result = engine.judge_absences(T0 + timedelta(hours=3))
    why = "silenced by #3 (antenna work)"
    assert [(p.shadow, p.silenced) for p in result.planned] == [(True, why), (True, why)]
    assert [(d.outcome, d.reason) for d in result.decisions] == [("silenced", why)]
    shadow = pipeline(tmp_path, WENT_SILENT, dry_run=True)
    shadow.process([event(1)], source="test", complete=T0)
    result = shadow.judge_absences(T0 + timedelta(hours=3))
    assert [(p.shadow, p.silenced) for p in result.planned] == [(True, None), (True, None)]
    assert [d.outcome for d in result.decisions] == ["shadow"]


def test_an_absence_rule_that_fails_fails_alone_and_takes_back_what_it_changed(
    tmp_path, monkeypatch
):
    engine = pipeline(
        tmp_path,
        WENT_SILENT
        + """
  - id: also-silent
    when: {type: 19}
    absence: {for: 1h, per: sim.iccid}
    actions: [{log: {message: "quiet"}}]
""",
    )
    engine.process([event(1)], source="test", complete=T0)
    real = absence_module.judge

    def judge(mark: Any, complete: float, absence: Any, *, listed: bool) -> Any:
        if mark.rule_id == "went-silent":
            raise RuntimeError("absence bug")
        return real(mark, complete, absence, listed=listed)

    monkeypatch.setattr(absence_module, "judge", judge)
    with capture_logs() as logs:
        result = engine.judge_absences(T0 + timedelta(hours=3))
    assert [(f.event_id, f.rule_id, f.stage, f.reason) for f in result.failures] == [
        (0, "went-silent", "absence", "RuntimeError: absence bug")
    ]
    assert [p.rule.id for p in result.planned] == ["also-silent"]
    assert [key for key in kept(engine).state.absences] == [("also-silent", ICCID)]
    (line,) = [e for e in logs if e["event"] == "absence rule failed"]
    assert (line["rule"], line["reason"], line["log_level"]) == (
        "went-silent",
        "RuntimeError: absence bug",
        "error",
    )


# -- lookups ------------------------------------------------------------------------------------

LOOKING = """
rules:
  - id: heavy
    when: {type: 19}
    lookup: [stats.month, quota.data]
    condition: {"var": "lookup.quota.data.volume"}
    actions:
      - log: {message: "{{ lookup.quota.data.volume }} left"}
"""


def facts(left: float, month: Fact | None = None) -> dict[int, dict[str, Fact]]:
    return {
        501: {
            "stats.month": month or Fact({"data": {"volume": 1}}),
            "quota.data": Fact({"volume": left}),
        }
    }


def test_a_lookup_rule_acts_on_facts_its_condition_finds_truthy(tmp_path):
    engine = pipeline(tmp_path, LOOKING)
    result = engine.process([event(1), event(2, sim=2)], source="test", lookups=facts(20.5))
    assert [p.action.params["message"] for p in result.planned] == ["20.5 left"]
    assert [(d.event_id, d.outcome) for d in result.decisions] == [
        (1, "fired"),
        (2, "lookup_unavailable"),
    ]
    assert matched_steps(engine, 1)["condition"] == {"lookup.quota.data.volume": 20.5}
    judged = engine.process_judged([Judged(normalize(event(4)), None)], lookups=facts(7))
    assert [p.action.params["message"] for p in judged.planned] == ["7 left"]
    result = engine.process([event(3)], source="test", lookups=facts(0))
    reason = "condition was false on the looked-up facts"
    assert [(d.outcome, d.reason) for d in result.decisions] == [("condition_false", reason)]
    assert [(r.outcome, r.detail) for r in kept(engine).audit] == [
        ("matched", None),
        ("condition_false", reason),
    ]


def test_a_lookup_rule_without_its_facts_says_which_is_missing_and_skips_or_acts(tmp_path):
    engine = pipeline(tmp_path, LOOKING)
    failed = facts(20, month=Fact(error="HTTP 429 from the API"))
    result = engine.process([event(1)], source="test", lookups=failed)
    missing = "lookup unavailable: stats.month for endpoint 501: HTTP 429 from the API"
    assert [(d.outcome, d.reason) for d in result.decisions] == [("lookup_unavailable", missing)]
    assert [(r.outcome, r.detail) for r in kept(engine).audit] == [
        ("matched", None),
        ("lookup_unavailable", missing),
    ]
    acting = pipeline(
        tmp_path, LOOKING.replace("    condition:", "    on_lookup_error: act\n    condition:")
    )
    result = acting.process([event(1)], source="test", lookups=failed)
    assert [(d.outcome, d.reason) for d in result.decisions] == [
        ("fired", "when and condition held")
    ]
    # The facts it has are there for its actions.
    assert [p.action.params["message"] for p in result.planned] == ["20 left"]
    assert [(r.outcome, r.detail) for r in kept(acting).audit] == [
        ("matched", None),
        ("lookup_unavailable", f"{missing}; acting"),
        ("planned", None),
    ]
    # The facts were the batch's own: the next batch without them has none.
    later = acting.process([event(2, minutes=1)], source="test")
    assert [r.detail for r in kept(acting).audit if r.outcome == "lookup_unavailable"] == [
        "lookup unavailable: stats.month for endpoint 501 was not fetched; acting"
    ]
    assert later.planned == [] and [f.stage for f in later.failures] == ["plan"]


# -- the engine's own echoes --------------------------------------------------------------------

ECHOED = """
rules:
  - id: suspend-on-quota
    when: {type: 19}
    actions: [{suspend_sim: {}}]
  - id: tell-ops
    when: {type: 9}
    actions: [{log: {message: "suspended"}}]
  - id: audit-own
    when: {type: 9}
    on_own_actions: true
    actions: [{log: {message: "{{ event.caused_by.rule }} {{ event.caused_by.intent }}"}}]
"""


def suspension(event_id: int, minutes: float, sim: int = 1) -> dict[str, Any]:
    return event(event_id, minutes, sim=sim, event_type={"id": 9}, event_source={"id": 2})


def test_a_replayed_status_change_counts_as_done_when_planned_and_its_echo_is_known(tmp_path):
    engine = pipeline(tmp_path, ECHOED, planned_is_done=True)
    engine.process([event(1)], source="test")
    result = engine.process([suspension(2, 1), suspension(3, 2, sim=2)], source="test")
    why = "echo of intent 1-suspend-on-quota-0 (rule suspend-on-quota)"
    deaf = f"{why}: the rule does not act on the engine's own actions"
    assert [(d.event_id, d.rule_id, d.outcome, d.reason) for d in result.decisions] == [
        (2, "tell-ops", "own_echo", deaf),
        (2, "audit-own", "fired", "when and condition held"),
        (3, "tell-ops", "fired", "when and condition held"),
        (3, "audit-own", "fired", "when and condition held"),
    ]
    echo_rows = [
        (r.event_id, r.rule_id, r.action, r.outcome, r.detail)
        for r in kept(engine).audit
        if r.event_id == 2 and r.outcome in ("echo", "own echo")
    ]
    assert echo_rows == [
        (2, "suspend-on-quota", "suspend_sim", "echo", why),
        (2, "tell-ops", None, "own echo", deaf),
    ]
    (audited,) = [p for p in result.planned if p.event.id == 2]
    assert audited.action.params["message"] == "suspend-on-quota 1-suspend-on-quota-0"
    assert "caused_by" not in result.planned[-1].event.raw


def test_a_status_change_planned_in_the_same_batch_is_echoed_too_unless_taken_back(tmp_path):
    engine = pipeline(tmp_path, ECHOED, planned_is_done=True)
    result = engine.process([event(1), suspension(2, 1)], source="test")
    assert [(d.rule_id, d.outcome) for d in result.decisions if d.event_id == 2] == [
        ("tell-ops", "own_echo"),
        ("audit-own", "fired"),
    ]
    # Without `planned_is_done` (a daemon: the dispatcher has not run it) it is no echo.
    live = pipeline(tmp_path, ECHOED)
    result = live.process([event(1), suspension(2, 1)], source="test")
    assert [(d.rule_id, d.outcome) for d in result.decisions if d.event_id == 2] == [
        ("tell-ops", "fired"),
        ("audit-own", "fired"),
    ]


def test_a_status_change_a_failed_rule_took_back_is_no_echo(tmp_path, monkeypatch):
    rules = ECHOED.replace(
        "actions: [{suspend_sim: {}}]", 'actions: [{suspend_sim: {}}, {log: {message: "x"}}]'
    )
    engine = pipeline(tmp_path, rules, planned_is_done=True)
    original = Log.plan

    def plan(self: Log, event: Any, context: Any) -> Any:
        if event.raw.get("boom"):
            raise RuntimeError("a bug in planning")
        return original(self, event, context)

    monkeypatch.setattr(Log, "plan", plan)
    result = engine.process([event(1, boom=True), suspension(2, 1)], source="test")
    assert [(d.rule_id, d.outcome) for d in result.decisions] == [
        ("suspend-on-quota", "failed"),
        ("tell-ops", "fired"),
        ("audit-own", "fired"),
    ]
    later = engine.process([suspension(3, 2)], source="test")
    assert [d.outcome for d in later.decisions] == ["fired", "fired"]


def test_planned_status_changes_are_echoed_within_the_echo_window_only(tmp_path):
    engine = pipeline(tmp_path, ECHOED, planned_is_done=True)
    engine.process([event(1)], source="test")
    engine.process([event(5, 19, sim=2)], source="test")  # a later batch plans another
    result = engine.process(
        [suspension(2, 9), suspension(3, 11), suspension(6, 25, sim=2)], source="test"
    )
    assert [(d.event_id, d.outcome) for d in result.decisions if d.rule_id == "tell-ops"] == [
        (2, "own_echo"),
        (3, "fired"),
        (6, "own_echo"),
    ]


# -- what a planned action becomes --------------------------------------------------------------


def test_a_follow_up_becomes_a_scheduled_intent_a_later_event_of_its_key_may_cancel(tmp_path):
    engine = pipeline(tmp_path, FOLLOW_UPS)
    result = engine.process([event(1, sim=3)], source="test")
    nap = result.planned[1]
    due = T0 + timedelta(hours=1)
    assert kept(engine).intents[1] == Intent(
        idempotency_key="1-nap-1",
        event_id=1,
        rule_id="nap",
        action_index=1,
        kind="activate_sim",
        params=nap.action.params,
        target=nap.action.target,
        status=IntentStatus.PENDING,
        due_at=due,
    )
    assert nap.action.target != {}
    assert [(r.rule_id, r.action, r.outcome, r.detail) for r in kept(engine).audit] == [
        ("nap", None, "matched", None),
        ("nap", "suspend_sim", "planned", None),
        ("nap", "activate_sim", "scheduled", "due 2025-05-01T11:00:00+00:00"),
        ("doze", None, "matched", None),
        ("doze", "log", "scheduled", "due 2025-05-01T12:00:00+00:00"),
    ]
    assert kept(engine).state.follow_ups == [
        FollowUpKey("1-nap-1", "nap", 1, 1, "sim.id", "3", T0, due),
        FollowUpKey("1-doze-0", "doze", 0, 1, "sim.id", "3", T0, T0 + timedelta(hours=2)),
    ]


def test_a_follow_up_is_cancelled_by_the_key_its_rule_counts_or_throttles_by(tmp_path):
    counted = FOLLOW_UPS.replace(
        "  - id: doze\n    when: {type: 19}\n",
        "  - id: doze\n    when: {type: 19}\n"
        "    threshold: {count: 1, within: 1h, per: sim.iccid}\n",
    )
    engine = pipeline(tmp_path, counted)
    engine.process([event(1)], source="test")
    assert [(f.rule_id, f.key_path) for f in kept(engine).state.follow_ups] == [
        ("nap", "sim.id"),
        ("doze", "sim.iccid"),
    ]
    throttled = FOLLOW_UPS.replace(
        "  - id: doze\n    when: {type: 19}\n",
        "  - id: doze\n    when: {type: 19}\n    throttle: {for: 1h, per: endpoint.name}\n",
    )
    engine = pipeline(tmp_path, throttled)
    engine.process([event(1)], source="test")
    assert [(f.key_path, f.key) for f in kept(engine).state.follow_ups] == [
        ("sim.id", "1"),
        ("endpoint.name", "truck-1"),
    ]


def test_a_follow_up_of_an_event_without_its_key_is_planned_but_cannot_be_cancelled(tmp_path):
    rules = FOLLOW_UPS.replace(
        "  - id: doze\n    when: {type: 19}\n",
        "  - id: doze\n    when: {type: 19}\n    throttle: {for: 1h, per: detail.box}\n",
    )
    engine = pipeline(tmp_path, rules)
    with capture_logs() as logs:
        result = engine.process([event(1)], source="test")
    assert [p.key for p in result.planned] == ["1-nap-0", "1-nap-1", "1-doze-0"]
    assert [f.rule_id for f in kept(engine).state.follow_ups] == ["nap"]
    (line,) = [e for e in logs if e["event"].startswith("follow-up cannot")]
    assert line == {
        "event": "follow-up cannot be cancelled: the event has no key",
        "log_level": "warning",
        "rule": "doze",
        "event_id": 1,
        "path": "detail.box",
    }


def test_a_held_follow_up_waits_for_no_cancellation(tmp_path):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: later
            when: {type: 19}
            max_actions: {count: 1, within: 1h}
            actions:
              - after: 1h
                do: {suspend_sim: {}}
                cancel_if: {when: {type: 8}}
        """,
    )
    engine.process([event(1)], source="test")
    assert [f.idempotency_key for f in kept(engine).state.follow_ups] == ["1-later-0"]
    result = engine.process([event(2, minutes=1, sim=2)], source="test")
    assert [p.held for p in result.planned] == [True]
    assert kept(engine).state.follow_ups == []
    ((row),) = [r for r in kept(engine).audit if r.outcome == "held"]
    assert row.detail == "blast-radius guard: 2 destructive actions within 1h > 1"


# -- an action that cannot be planned -----------------------------------------------------------

BROKEN_TEMPLATE = """
rules:
  - id: percent
    when: {type: [19, 1001]}
    actions:
      - log: {message: "{{ 100 // event.total }}%"}
      - log: {message: "noted"}
"""


def test_an_action_that_cannot_be_planned_fails_for_good_and_is_said_as_an_engine_event(
    tmp_path,
):
    engine = pipeline(tmp_path, BROKEN_TEMPLATE)
    no_sim = event(2, minutes=1, total=0) | {"sim": None, "endpoint": None}
    result = engine.process([event(1, total=0), no_sim], source="test")
    reason = "template error: ZeroDivisionError: integer division or modulo by zero"
    assert [(f.event_id, f.rule_id, f.stage, f.reason, f.action) for f in result.failures] == [
        (1, "percent", "plan", reason, "log"),
        (2, "percent", "plan", reason, "log"),
    ]
    detail = {"rule": "percent", "action": "log", "reason": reason, "stage": "plan"}
    assert result.engine_events == [
        EngineEventDraft(
            "action_failed",
            detail | {"event_id": 1},
            sim={"id": 1, "iccid": "8988303000000000001"},
            endpoint={"id": 501},
        ),
        EngineEventDraft("action_failed", detail | {"event_id": 2}),
    ]
    # The rule's other actions are planned all the same, and its decision is that it fired.
    assert [(p.event.id, p.action.params["message"]) for p in result.planned] == [
        (1, "noted"),
        (2, "noted"),
    ]
    assert [(d.outcome, d.reason) for d in result.decisions] == [
        ("fired", "when and condition held"),
        ("fired", "when and condition held"),
    ]
    rows = [(r.event_id, r.action, r.outcome, r.detail) for r in kept(engine).audit]
    assert rows == [
        (1, None, "matched", None),
        (1, "log", "failed", reason),
        (1, "log", "planned", None),
        (2, None, "matched", None),
        (2, "log", "failed", reason),
        (2, "log", "planned", None),
    ]


def test_an_engine_event_whose_action_cannot_be_planned_says_no_more_engine_events(tmp_path):
    engine = pipeline(tmp_path, BROKEN_TEMPLATE)
    own = event(5, total=0) | {"event_source": {"id": 1000}, "event_type": {"id": 1001}}
    result = engine.process([own], source="test")
    assert [f.stage for f in result.failures] == ["plan"]
    assert result.engine_events == []


def test_a_rule_that_fails_as_a_whole_is_logged_with_its_stage(tmp_path, monkeypatch):
    engine = pipeline(tmp_path, LOG_RULE)
    monkeypatch.setattr(Log, "plan", lambda self, event, context: 1 / 0)
    with capture_logs() as logs:
        result = engine.process([event(1)], source="test")
    reason = "ZeroDivisionError: division by zero"
    assert [(f.stage, f.reason, f.action) for f in result.failures] == [("judge", reason, None)]
    assert [(d.outcome, d.reason) for d in result.decisions] == [("failed", reason)]
    assert result.engine_events == []
    (line,) = [e for e in logs if e.get("rule") == "note"]
    assert line["event"].startswith("rule failed on an event (logged once per rule")
    assert (line["stage"], line["event_id"], line["reason"]) == ("judge", 1, reason)
    assert "action" not in line
    assert [(r.outcome, r.detail) for r in kept(engine).audit] == [("failed", reason)]


def test_a_follow_ups_status_change_counts_when_due_and_forgets_no_change_before_it(tmp_path):
    breaker = LoopBreaker(max_changes=1, within=timedelta(minutes=10), hold_for=timedelta(hours=1))
    rules = """
    rules:
      - id: nap
        when: {type: 19}
        actions:
          - suspend_sim: {}
          - after: 30m
            do: {activate_sim: {}}
    """
    engine = pipeline(tmp_path, rules, loop_breaker=breaker)
    result = engine.process([event(1)], source="test")
    assert [p.held for p in result.planned] == [False, False]
    assert kept(engine).state.guards == {
        "sim:1": [T0.timestamp(), (T0 + timedelta(minutes=30)).timestamp()]
    }
    # Within the window of the suspension: held, and the target with it until resumed.
    flapping = engine.process([event(2, minutes=5)], source="test")
    assert [p.held for p in flapping.planned] == [True, True]
    resume = "resume with `event-engine rules resume sim:1`"
    held = [r.detail for r in kept(engine).audit if r.outcome == "held"]
    assert held == [
        f"target flapping: 2 status changes on sim:1 within 10m > 1; held for 1h; {resume}",
        "target flapping: sim:1 held since 2025-05-01T10:05:00Z until 2025-05-01T11:05:00Z;"
        f" {resume}",
    ]
    assert [d.reason for d in flapping.decisions] == held[1:]


def test_a_silence_in_force_when_a_late_event_is_judged_covers_it(tmp_path):
    now = datetime(2025, 5, 2, 9, 0, tzinfo=UTC)  # the next day: the event arrives late
    silence = Silence(
        matchers=(("rule", "note"),),
        comment="maintenance",
        created_by="ops",
        created_at=now - timedelta(minutes=5),
        ends_at=now + timedelta(hours=1),
        id=4,
    )
    engine = pipeline(
        tmp_path,
        LOG_RULE,
        clock=lambda: now,
        quiet=lambda at: Quiet(silences=(silence,), now=at),
    )
    result = engine.process([event(1)], source="test")
    assert [p.silenced for p in result.planned] == ["silenced by #4 (maintenance)"]


def test_an_event_judged_elsewhere_that_no_rule_matched_still_cancels_a_follow_up(tmp_path):
    engine = pipeline(tmp_path, FOLLOW_UPS)
    engine.process([event(1)], source="test")
    cancelling = normalize(event(2, minutes=5, event_type={"id": 8}))
    result = engine.process_judged([Judged(cancelling, [])])
    assert [c.follow_up.idempotency_key for _, c in result.cancelled] == ["1-doze-0"]
    assert (result.received, result.new_events, result.matches) == (1, 1, 0)


def test_the_loop_breaker_counts_no_status_change_a_rule_only_would_have_made(tmp_path):
    breaker = LoopBreaker(max_changes=1, within=timedelta(minutes=10), hold_for=timedelta(hours=1))
    engine = pipeline(tmp_path, SUSPENDER, loop_breaker=breaker, dry_run=True)
    result = engine.process([event(1), event(2, minutes=1), event(3, minutes=2)], source="test")
    assert [(p.shadow, p.held) for p in result.planned] == [(True, False)] * 3
    assert kept(engine).state.guards == {} and kept(engine).state.overrides == []


def test_a_throttle_ends_at_its_period_exactly(tmp_path):
    engine = pipeline(tmp_path, THROTTLED)
    result = engine.process(
        [event(1), event(2, minutes=59.99), event(3, minutes=60)], source="test"
    )
    assert [d.outcome for d in result.decisions] == ["fired", "throttled", "fired"]


def test_silences_of_several_keys_fire_in_the_order_they_ended(tmp_path):
    engine = pipeline(tmp_path, WENT_SILENT, loop_breaker=None)
    seen = [event(1, sim=2), event(2, minutes=60, sim=1), event(3, minutes=180, sim=2)]
    engine.process(seen, source="test", complete=T0)
    result = engine.judge_absences(T0 + timedelta(hours=6))
    assert (result.matches, result.matched_rules) == (3, {"went-silent": 3})
    fired = [(p.absence or {}) for p in result.planned[::2]]
    assert [(f["at"], f["key"][-1]) for f in fired] == [
        ("2025-05-01T12:00:00Z", "2"),  # sim 2: quiet from 10:00 to 13:00
        ("2025-05-01T13:00:00Z", "1"),  # sim 1: last seen at 11:00
        ("2025-05-01T15:00:00Z", "2"),  # sim 2: last seen at 13:00
    ]


def test_a_reason_logged_before_does_not_keep_the_next_rules_failure_from_the_log(tmp_path):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: first
            when: {type: 19}
            actions: [{log: {message: "{{ 1 // event.zero }}"}}]
          - id: second
            when: {type: 19}
            actions: [{log: {message: "{{ event.missing.deeper }}"}}]
        """,
    )
    engine.process([event(1, zero=0, missing={"deeper": 1})], source="test")
    with capture_logs() as logs:
        engine.process([event(2, zero=0)], source="test")
    assert [(e["rule"], e["event_id"]) for e in logs if "rule" in e] == [("second", 2)]


def test_the_facts_wanted_are_those_of_every_readable_record(tmp_path):
    engine = pipeline(tmp_path, LOOKING)
    records = [{"not": "an event"}, event(1), event(2, sim=7)]
    assert engine.wanted_lookups(records) == {
        501: {"stats.month", "quota.data"},
        507: {"stats.month", "quota.data"},
    }


def test_a_usage_record_cancels_no_follow_up_even_of_its_endpoint(tmp_path):
    rules = USAGE + (
        "  - id: nap\n"
        "    when: {type: 19}\n"
        "    actions:\n"
        "      - after: 1h\n"
        '        do: {log: {message: "later"}}\n'
        "        cancel_if: {when: {endpoint_name: truck-1}}\n"
    )
    engine = pipeline(tmp_path, rules)
    engine.process([event(1)], source="test")
    used = engine.process([usage_record(5, 10, minutes=5)], source="test")
    assert used.cancelled == [] and used.usage_used == 1
    cancelling = engine.process([event(2, minutes=6, event_type={"id": 8})], source="test")
    assert [c.follow_up.idempotency_key for _, c in cancelling.cancelled] == ["1-nap-0"]


def test_without_complete_time_a_batch_fires_no_silence_however_late_its_events(tmp_path):
    engine = pipeline(tmp_path, WENT_SILENT)
    engine.process([event(1)], source="test")
    later = engine.process([event(2, minutes=600, sim=2)], source="test")
    assert later.planned == []
    # Told the input is complete up to its newest event, it does.
    replayed = engine.process(
        [event(3, minutes=601, sim=3)], source="test", complete_to_newest=True
    )
    assert [(p.absence or {}).get("key") for p in replayed.planned[::2]] == [ICCID]


def test_a_rule_that_fails_whole_takes_back_its_own_failures_and_no_one_elses_notice(
    tmp_path, monkeypatch
):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: a
            when: {type: 19}
            max_actions: {count: 1, within: 1h}
            actions: [{suspend_sim: {}}]
          - id: b
            when: {type: 19}
            condition: {"==": [{"var": "detail.b"}, true]}
            actions:
              - log: {message: "{{ 1 // event.zero }}"}
              - log: {message: "crash", level: warning}
        """,
    )
    original = Log.plan

    def plan(self: Log, event: Any, context: Any) -> Any:
        if self.level == "warning":
            raise RuntimeError("a bug in planning")
        return original(self, event, context)

    monkeypatch.setattr(Log, "plan", plan)
    engine.process([event(1)], source="test")
    result = engine.process([event(2, minutes=1, sim=2, zero=0, detail={"b": True})], source="t")
    assert [(f.rule_id, f.stage) for f in result.failures] == [("b", "judge")]
    assert [draft.kind for draft in result.engine_events] == ["guard_tripped"]
    assert [(d.rule_id, d.outcome) for d in result.decisions] == [("a", "held"), ("b", "failed")]


def test_each_rule_logs_a_reason_another_rule_logged_already(tmp_path):
    broken = '[{log: {message: "{{ 1 // event.zero }}"}}]'
    engine = pipeline(
        tmp_path,
        f"""
        rules:
          - id: first
            when: {{type: 19}}
            actions: {broken}
          - id: second
            when: {{type: 19}}
            actions: {broken}
        """,
    )
    with capture_logs() as logs:
        engine.process([event(1, zero=0), event(2, zero=0)], source="test")
    assert [(e["rule"], e["event_id"]) for e in logs if "rule" in e] == [
        ("first", 1),
        ("second", 1),
    ]


def test_a_lookup_rule_without_a_condition_acts_once_its_facts_are_there(tmp_path):
    engine = pipeline(
        tmp_path, LOOKING.replace('    condition: {"var": "lookup.quota.data.volume"}\n', "")
    )
    result = engine.process([event(1)], source="test", lookups=facts(0))
    assert [p.action.params["message"] for p in result.planned] == ["0 left"]


def test_a_key_seen_again_after_its_silence_fired_is_watched_again(tmp_path):
    engine = pipeline(tmp_path, WENT_SILENT, loop_breaker=None)
    engine.process([event(1)], source="test", complete=T0)
    first = engine.judge_absences(T0 + timedelta(hours=3))
    assert [(p.absence or {}).get("at") for p in first.planned[::2]] == ["2025-05-01T12:00:00Z"]
    # Read ahead of complete time: it waits until time is complete up to it.
    engine.process([event(2, minutes=240)], source="test", complete=T0 + timedelta(hours=3))
    again = engine.judge_absences(T0 + timedelta(hours=7))
    assert [(p.absence or {}).get("at") for p in again.planned[::2]] == ["2025-05-01T16:00:00Z"]
    # Quiet past `forget_after` (30 days unless written), an unlisted key is forgotten.
    engine.judge_absences(T0 + timedelta(days=29))
    assert kept(engine).state.absences == {}
    engine.judge_absences(T0 + timedelta(days=31))
    assert kept(engine).state.absences == {("went-silent", ICCID): None}


def test_events_judged_elsewhere_are_judged_in_the_order_given(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    later, earlier = normalize(event(1, minutes=5)), normalize(event(2))
    result = engine.process_judged([Judged(later, None), Judged(earlier, None)])
    assert [p.event.id for p in result.planned] == [1, 2]


def test_events_judged_elsewhere_make_time_complete_up_to_the_newest_of_them(tmp_path):
    engine = pipeline(tmp_path, WENT_SILENT)
    judged = [Judged(normalize(event(1)), None), Judged(normalize(event(2, 180, sim=2)), None)]
    result = engine.process_judged(judged)
    fired = [(p.absence or {}) for p in result.planned[::2]]
    assert [(f["key"], f["at"]) for f in fired] == [(ICCID, "2025-05-01T12:00:00Z")]


def test_an_event_too_deep_to_judge_keeps_the_failures_of_the_events_before_it(
    tmp_path, monkeypatch
):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: per-detail
            when: {type: 19}
            threshold: {count: 1, within: 10m, per: detail}
            actions: [{log: {message: "seen"}}]
        """,
    )
    monkeypatch.setattr(Log, "plan", lambda self, event, context: 1 / 0)
    deep: Any = 1
    for _ in range(400):
        deep = {"a": deep}
    records = [event(1, detail=1), event(3, minutes=1, detail=2), event(2, minutes=2, detail=deep)]
    result = engine.process(records, source="test")
    assert [(f.event_id, f.stage) for f in result.failures] == [(1, "judge"), (3, "judge")]
    assert [e for e, _ in result.poisoned] == [2]
    assert (result.matches, result.matched_rules) == (2, {"per-detail": 2})


def test_a_follow_up_due_a_window_after_the_change_before_it_counts_that_change_once(tmp_path):
    breaker = LoopBreaker(max_changes=2, within=timedelta(minutes=10), hold_for=timedelta(hours=1))
    rules = """
    rules:
      - id: nap
        when: {type: 19}
        actions:
          - suspend_sim: {}
          - after: 10m
            do: {activate_sim: {}}
    """
    engine = pipeline(tmp_path, rules, loop_breaker=breaker)
    engine.process([event(1)], source="test")
    ten = (T0 + timedelta(minutes=10)).timestamp()
    assert kept(engine).state.guards == {"sim:1": [T0.timestamp(), ten]}
    result = engine.process([event(2, minutes=5)], source="test")
    assert [p.held for p in result.planned] == [False, True]  # the third change in 10m


def test_a_reloaded_rules_actions_see_its_new_description(tmp_path):
    text = LOG_RULE.replace('message: "seen"', 'message: "{{ rule.description }}"')
    engine = pipeline(tmp_path, text.replace("id: note", "id: note\n    description: old"))
    engine.process([event(1)], source="test")
    engine.set_rules(
        rules_from(tmp_path, text.replace("id: note", "id: note\n    description: new"))
    )
    result = engine.process([event(2)], source="test")
    assert [p.action.params["message"] for p in result.planned] == ["new"]


def test_a_rule_that_fails_whole_after_planning_leaves_no_intent_behind(tmp_path, monkeypatch):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: r
            when: {type: 19}
            actions: [{suspend_sim: {}}, {log: {message: "x"}}]
        """,
    )
    original = Log.plan

    def plan(self: Log, event: Any, context: Any) -> Any:
        if event.raw.get("boom"):
            raise RuntimeError("a bug in planning")
        return original(self, event, context)

    monkeypatch.setattr(Log, "plan", plan)
    result = engine.process([event(1), event(2, minutes=1, sim=2, boom=True)], source="test")
    assert [i.idempotency_key for i in kept(engine).intents] == ["1-r-0", "1-r-1"]
    assert [(p.event.id, p.action.kind) for p in result.planned] == [(1, "suspend_sim"), (1, "log")]


def test_a_silence_of_one_rule_keeps_that_absence_rule_from_acting(tmp_path):
    silence = Silence(
        matchers=(("rule", "went-silent"),),
        comment="known outage",
        created_by="ops",
        created_at=T0,
        ends_at=T0 + timedelta(days=1),
        id=9,
    )
    engine = pipeline(tmp_path, WENT_SILENT, quiet=lambda now: Quiet(silences=(silence,), now=None))
    engine.process([event(1)], source="test", complete=T0)
    result = engine.judge_absences(T0 + timedelta(hours=3))
    assert [d.outcome for d in result.decisions] == ["silenced"]


def test_an_on_guard_trip_action_that_cannot_be_planned_fails_as_the_rules_own(tmp_path):
    engine = pipeline(
        tmp_path,
        GUARDED.replace('log: {message: "guard"}', 'log: {message: "{{ 1 // event.zero }}"}'),
    )
    engine.process([event(1)], source="test")
    result = engine.process([event(2, minutes=1, sim=2, zero=0)], source="test")
    reason = "template error: ZeroDivisionError: integer division or modulo by zero"
    assert [(f.event_id, f.rule_id, f.stage, f.reason) for f in result.failures] == [
        (2, "suspend", "plan", reason)
    ]
    assert [d.kind for d in result.engine_events] == ["guard_tripped", "action_failed"]


# -- who each note is about ---------------------------------------------------------------------


def test_every_row_a_rules_judging_writes_names_that_rule(tmp_path):
    silent = pipeline(tmp_path, WENT_SILENT, loop_breaker=None)
    silent.process([event(1)], source="test", complete=T0)
    silent.judge_absences(T0 + timedelta(hours=3))
    assert {(r.rule_id, r.outcome) for r in kept(silent).audit} >= {("went-silent", "absent")}
    looking = pipeline(tmp_path, LOOKING)
    unfetched = facts(20, month=Fact(error="HTTP 429 from the API"))
    looking.process([event(1)], source="test", lookups=unfetched)
    looking.process([event(2)], source="test", lookups=facts(0))
    acting = pipeline(
        tmp_path, LOOKING.replace("    condition:", "    on_lookup_error: act\n    condition:")
    )
    acting.process([event(1)], source="test", lookups=unfetched)
    tripped = pipeline(tmp_path, GUARDED)
    tripped.process([event(1), event(2, minutes=1, sim=2)], source="test")
    for engine, rule, outcomes in (
        (silent, "went-silent", {"absent"}),
        (looking, "heavy", {"lookup_unavailable", "condition_false"}),
        (acting, "heavy", {"lookup_unavailable"}),
        (tripped, "suspend", {"guard_tripped"}),
    ):
        store = engine.store
        assert isinstance(store, KeptStore)
        rows = [row for batch in store.batches for row in batch.audit]
        assert {row.outcome for row in rows} >= outcomes
        assert {row.rule_id for row in rows} == {rule}


# -- what an engine event names -----------------------------------------------------------------


def test_a_guard_trip_names_only_the_sim_and_endpoint_its_event_had(tmp_path):
    endpoints = pipeline(
        tmp_path,
        GUARDED.replace("suspend_sim: {}", "disable_endpoint: {}").replace(
            "do: {activate_sim: {}}", "do: {enable_endpoint: {}}"
        ),
    )
    without_sim = [event(n, minutes=n, sim=n) | {"sim": None} for n in (1, 2)]
    (said,) = endpoints.process(without_sim, source="test").engine_events
    assert (said.kind, said.sim, said.endpoint) == ("guard_tripped", None, {"id": 502})
    sims = pipeline(tmp_path, GUARDED)
    without_endpoint = [event(n, minutes=n, sim=n) | {"endpoint": None} for n in (1, 2)]
    (said,) = sims.process(without_endpoint, source="test").engine_events
    assert (said.kind, said.sim, said.endpoint) == (
        "guard_tripped",
        {"id": 2, "iccid": "8988303000000000002"},
        None,
    )


def test_a_flapping_endpoint_is_said_as_one_without_its_events_sim(tmp_path):
    breaker = LoopBreaker(max_changes=1, within=timedelta(minutes=10), hold_for=timedelta(hours=1))
    engine = pipeline(
        tmp_path, SUSPENDER.replace("suspend_sim", "disable_endpoint"), loop_breaker=breaker
    )
    result = engine.process([event(1), event(2, minutes=1)], source="test")
    (said,) = result.engine_events
    assert (said.kind, said.detail["target"]) == ("target_flapping", "endpoint:501")
    assert (said.sim, said.endpoint) == (None, {"id": 501})


# -- which failures take an event back whole ----------------------------------------------------

TWO_LOGS = """
rules:
  - id: fragile
    when: {type: 19}
    actions: [{log: {message: "fragile", level: warning}}]
  - id: sturdy
    when: {type: 19}
    actions: [{log: {message: "sturdy"}}]
"""


def failing_fragile(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """The `fragile` rule's action raising `error` as it is planned."""
    original = Log.plan

    def plan(self: Log, event: Any, context: Any) -> Any:
        if self.level == "warning":
            raise error
        return original(self, event, context)

    monkeypatch.setattr(Log, "plan", plan)


FRAGILE_CONDITION = TWO_LOGS.replace(
    "when: {type: 19}", 'when: {type: 19}\n    condition: {"var": "detail.on"}', 1
)


def breaking_condition(
    monkeypatch: pytest.MonkeyPatch, engine: Pipeline, error: BaseException
) -> None:
    """The `fragile` rule's condition raising `error`, in the fast path and the full one."""
    fragile = engine.rules.get("fragile")
    assert fragile is not None and fragile.condition is not None

    def broken(raw: dict[str, Any]) -> bool:
        raise error

    monkeypatch.setattr(fragile.condition, "fast", broken)
    monkeypatch.setattr(Condition, "holds", lambda self, raw: broken(raw))


def test_a_rule_raising_a_plain_type_error_fails_alone_and_the_event_is_judged_on(
    tmp_path, monkeypatch
):
    engine = pipeline(tmp_path, TWO_LOGS)
    failing_fragile(monkeypatch, TypeError("unsupported operand type(s) for +: 'int' and 'str'"))
    result = engine.process([event(1)], source="test")
    reason = "TypeError: unsupported operand type(s) for +: 'int' and 'str'"
    assert [(f.rule_id, f.stage, f.reason) for f in result.failures] == [
        ("fragile", "judge", reason)
    ]
    assert [p.rule.id for p in result.planned] == ["sturdy"]
    assert (result.poisoned, result.quarantined, result.new_events) == ([], 0, 1)


def test_an_event_past_the_recursion_limit_in_a_rule_its_match_or_a_cancel_if_is_taken_back(
    tmp_path, monkeypatch
):
    engine = pipeline(tmp_path, TWO_LOGS)
    failing_fragile(monkeypatch, RecursionError("maximum recursion depth exceeded"))
    result = engine.process([event(1)], source="test")
    assert (result.failures, result.planned, result.matches) == ([], [], 0)
    assert result.poisoned == [(1, "nested too deeply to be judged")]
    matching = pipeline(tmp_path, FRAGILE_CONDITION)
    breaking_condition(monkeypatch, matching, RecursionError("maximum recursion depth exceeded"))
    result = matching.process([event(1, detail={"on": True})], source="test")
    assert (result.failures, result.planned) == ([], [])
    assert result.poisoned == [(1, "nested too deeply to be judged")]
    # Condition.holds raises it still: so does a cancel_if's condition.
    follow_ups = pipeline(tmp_path, FOLLOW_UPS)
    follow_ups.process([event(1)], source="test")
    result = follow_ups.process([event(2, minutes=5, event_type={"id": 8})], source="test")
    assert (result.failures, result.cancelled) == ([], [])
    assert result.poisoned == [(2, "nested too deeply to be judged")]
    assert kept(follow_ups).state.cancels == []


DEEP_FIRST = """
rules:
  - id: per-detail
    when: {type: 19}
    threshold: {count: 1, within: 10m, per: detail}
    actions: [{log: {message: "one"}}, {log: {message: "two"}}]
  - id: after-it
    when: {type: 19}
    actions: [{log: {message: "after"}}]
  - id: doze
    when: {type: 19}
    actions:
      - after: 2h
        do: {log: {message: "awake"}}
        cancel_if: {when: {type: 8}}
"""


def nested(depth: int) -> Any:
    deep: Any = 1
    for _ in range(depth):
        deep = {"a": deep}
    return deep


def test_an_event_too_deep_at_its_first_rule_takes_back_no_match_of_the_rules_after_it(tmp_path):
    engine = pipeline(tmp_path, DEEP_FIRST)
    result = engine.process(
        [event(1, detail=1), event(2, minutes=1, detail=nested(400))], source="t"
    )
    assert [e for e, _ in result.poisoned] == [2]
    assert result.matches == 3
    assert result.matched_rules == {"per-detail": 1, "after-it": 1, "doze": 1}


def test_an_event_too_deep_to_judge_takes_back_the_follow_ups_it_cancelled(tmp_path):
    engine = pipeline(tmp_path, DEEP_FIRST.replace("when: {type: 19}", "when: {type: 8}", 2))
    engine.process([event(1), event(2, sim=2)], source="test")
    late = {"event_type": {"id": 8}}
    result = engine.process(
        [
            event(3, minutes=1, detail=1, **late),
            event(4, minutes=2, sim=2, detail=nested(400), **late),
        ],
        source="test",
    )
    assert [e for e, _ in result.poisoned] == [4]
    assert [c.follow_up.idempotency_key for _, c in result.cancelled] == ["1-doze-0"]
    assert [c.idempotency_key for c in kept(engine).state.cancels] == ["1-doze-0"]
    # The follow-up the event cancelled is still waiting: the next such event cancels it.
    again = engine.process([event(5, minutes=3, sim=2, **late)], source="test")
    assert [c.follow_up.idempotency_key for _, c in again.cancelled] == ["2-doze-0"]


def test_a_rule_that_fails_whole_forgets_what_it_counted_and_keeps_the_rows_of_rules_before_it(
    tmp_path, monkeypatch
):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: three
            when: {type: 19}
            actions: [{log: {message: "1"}}, {log: {message: "2"}}, {log: {message: "3"}}]
          - id: hourly
            when: {type: 19}
            throttle: {for: 1h}
            actions: [{log: {message: "crash", level: warning}}]
        """,
    )
    original = Log.plan

    def plan(self: Log, event: Any, context: Any) -> Any:
        if self.level == "warning" and event.raw.get("boom"):
            raise RuntimeError("a bug in planning")
        return original(self, event, context)

    monkeypatch.setattr(Log, "plan", plan)
    engine.process([event(1, boom=True)], source="test")
    assert [(r.rule_id, r.outcome) for r in kept(engine).audit] == [
        ("three", "matched"),
        ("three", "planned"),
        ("three", "planned"),
        ("three", "planned"),
        ("hourly", "failed"),
    ]
    # Its throttle was taken back with it: the next event is not throttled.
    result = engine.process([event(2, minutes=1)], source="test")
    assert [(d.rule_id, d.outcome) for d in result.decisions] == [
        ("three", "fired"),
        ("hourly", "fired"),
    ]


def test_a_rule_that_fails_while_matching_is_recorded_with_its_error(tmp_path, monkeypatch):
    engine = pipeline(tmp_path, FRAGILE_CONDITION)
    breaking_condition(monkeypatch, engine, RuntimeError("evaluator bug"))
    result = engine.process([event(1, detail={"on": True})], source="test")
    reason = "RuntimeError: evaluator bug"
    assert [(f.rule_id, f.stage, f.reason) for f in result.failures] == [
        ("fragile", "match", reason)
    ]
    assert next((d.rule_id, d.outcome, d.reason) for d in result.decisions) == (
        "fragile",
        "failed",
        reason,
    )
    assert next((r.rule_id, r.outcome, r.detail) for r in kept(engine).audit) == (
        "fragile",
        "failed",
        reason,
    )


# -- edges of throttles, follow-ups and the loop breaker ----------------------------------------


def test_a_throttled_events_trace_names_the_key_it_is_throttled_by(tmp_path):
    engine = pipeline(tmp_path, THROTTLED.replace("{for: 1h}", "{for: 1h, per: sim.iccid}"))
    engine.process([event(1), event(2, minutes=1)], source="test")
    assert matched_steps(engine, 2)["throttle"] == {
        "per": "sim.iccid",
        "key": ICCID,
        "until": "2025-05-01T11:00:00Z",
        "throttled": True,
    }


def test_a_follow_up_is_cancelled_from_its_planning_time_until_just_before_it_is_due(tmp_path):
    engine = pipeline(
        tmp_path,
        """
        rules:
          - id: doze
            when: {type: 19}
            actions:
              - after: 2h
                do: {log: {message: "awake"}}
                cancel_if: {when: {type: 8}}
        """,
    )
    engine.process([event(1), event(2, sim=2)], source="test")
    cancelling = {"event_type": {"id": 8}}
    result = engine.process(
        [event(3, **cancelling), event(4, minutes=120, sim=2, **cancelling)], source="test"
    )
    assert [c.follow_up.idempotency_key for _, c in result.cancelled] == ["1-doze-0"]


def test_a_follow_up_planned_a_window_after_a_change_keeps_that_change_counted(tmp_path):
    breaker = LoopBreaker(max_changes=1, within=timedelta(minutes=10), hold_for=timedelta(hours=1))
    engine = pipeline(
        tmp_path,
        SUSPENDER
        + """
  - id: wake-later
    when: {type: 8}
    actions:
      - after: 30m
        do: {activate_sim: {}}
""",
        loop_breaker=breaker,
    )
    # A suspension at 10:00; at 10:10, a follow-up due at 10:40, then another suspension:
    # the one at 10:00 is still in the window of the one at 10:10.
    records = [event(1), event(2, minutes=10, event_type={"id": 8}), event(3, minutes=10)]
    result = engine.process(records, source="test")
    assert [(p.event.id, p.held) for p in result.planned] == [(1, False), (2, False), (3, True)]


# -- what reaches the pipeline ------------------------------------------------------------------


def test_an_unreadable_record_is_quarantined_saying_why_it_could_not_be_read(tmp_path):
    engine = pipeline(tmp_path, LOG_RULE)
    deep = b"[" * 2000 + b"]" * 2000
    records = loads_records(b"[" + orjson.dumps(event(1)) + b"," + deep + b"]")
    result = engine.process(records, source="data_streamer")
    assert result.rejected == [(1, "nested too deeply to read as JSON")]
    assert [p.event.id for p in result.planned] == [1]


def test_a_usage_window_kept_in_the_store_is_summed_on_after_a_restart(tmp_path):
    path = tmp_path / "engine.sqlite3"
    store = SqliteStore(path)
    Pipeline(rules_from(tmp_path, USAGE), store).process([usage_record(1, 150)], source="s")
    store.close()
    store = SqliteStore(path)
    try:
        restarted = Pipeline(rules_from(tmp_path, USAGE), store)
        result = restarted.process([usage_record(2, 100, minutes=1)], source="s")
    finally:
        store.close()
    assert [d.reason for d in result.decisions] == [
        "usage 250 MB in 24h > 200 MB for endpoint.id=501"
    ]


def test_a_batch_that_makes_time_complete_fires_the_silences_ended_by_then(tmp_path):
    engine = pipeline(tmp_path, WENT_SILENT, loop_breaker=None)
    engine.process([event(1)], source="test", complete=T0)
    result = engine.process(
        [event(2, minutes=170, sim=2)], source="test", complete=T0 + timedelta(hours=3)
    )
    assert [(p.absence or {}).get("key") for p in result.planned[::2]] == [ICCID]


def test_a_rule_set_of_scoped_rules_only_passes_over_other_organisations_events(tmp_path):
    (tmp_path / "rules").mkdir()
    write_rules(tmp_path / "rules", SCOPED.split("  - id: everyone")[0])
    rules = load_rules(tmp_path / "rules", organisations={"acme": None, "globex": None})
    engine = Pipeline(rules, KeptStore())
    assert engine.process([event(1)], source="poller", organisation="globex").planned == []
    acme = engine.process([event(2)], source="poller", organisation="acme")
    assert [p.rule.id for p in acme.planned] == ["acme-only"]


# -- listed keys of an absence rule -------------------------------------------------------------


def test_a_listed_key_is_kept_past_forget_after_and_fires_no_more_once_it_fired(tmp_path):
    rules = rules_from(
        tmp_path,
        WENT_SILENT.replace(
            "per: sim.iccid}", 'per: sim.iccid, forget_after: 1d, keys: ["8988303000000000002"]}'
        ),
    )
    store = SqliteStore(tmp_path / "engine.sqlite3")
    try:
        engine = Pipeline(rules, store, loop_breaker=None)
        engine.process([event(1)], source="test", complete=T0)
        first = engine.judge_absences(T0 + timedelta(hours=3))
        assert sorted(
            ((p.absence or {})["key"], (p.absence or {})["seen"]) for p in first.planned[::2]
        ) == [
            (ICCID, True),
            ("8988303000000000002", False),
        ]
        # The listed key reports once, then stays quiet past `forget_after`.
        engine.process(
            [event(2, minutes=240, sim=2)], source="test", complete=T0 + timedelta(hours=3)
        )
        quiet = engine.judge_absences(T0 + timedelta(days=2))
        assert [(p.absence or {})["at"] for p in quiet.planned[::2]] == ["2025-05-01T16:00:00Z"]
        assert [(m.rule_id, m.key) for m in store.absence_marks()] == [
            ("went-silent", "8988303000000000002")
        ]
        later = [engine.judge_absences(T0 + timedelta(days=2, hours=h)) for h in (3, 6)]
        assert [r.planned for r in later] == [[], []]
    finally:
        store.close()


def test_a_key_seen_many_times_ahead_of_complete_time_keeps_each_long_silence(tmp_path):
    engine = pipeline(tmp_path, WENT_SILENT, loop_breaker=None)
    # Every 10 minutes from 10:00 to 13:00 and from 16:00 to 19:00: more sightings than a
    # key keeps waiting, read before time is complete up to any of them.
    minutes = [*range(0, 181, 10), *range(360, 541, 10)]
    seen = engine.process([event(n, m) for n, m in enumerate(minutes, 1)], source="test")
    assert (seen.failures, [d.outcome for d in seen.decisions]) == ([], ["seen"] * 38)
    result = engine.judge_absences(T0 + timedelta(hours=10))
    assert [(p.absence or {}).get("at") for p in result.planned[::2]] == ["2025-05-01T15:00:00Z"]
