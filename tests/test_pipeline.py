"""The batch pipeline (`engine.pipeline`) as its callers see it: what a batch reports, what it
hands the store to commit (seen ids, intents, audit rows, quarantined records), what it logs.

Judged over an in-memory store that keeps each committed batch, so that what the pipeline
asked the store to record can be read back as it was handed over; the stores' own tests
check that they keep it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from structlog.testing import capture_logs

from engine import secrets
from engine.model import Batch
from engine.pipeline import Pipeline, dedup_horizon
from engine.state import format_moment
from engine.store import MemoryStore

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
