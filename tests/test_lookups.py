"""Lookups: a rule's condition judged on facts fetched for the event's endpoint (quota,
this month's usage, connectivity), handed to the pipeline as data. Judged over a real
SQLite file; the facts here are what a fetcher or a fixture file would hand over."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.errors import RuleSetError
from engine.events import normalize
from engine.lookups import Fact, endpoint_of, facts_for
from engine.pipeline import BatchResult, Pipeline
from engine.state import format_moment
from engine.store import SqliteStore

from helpers import rules_from

T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)

OVER_MONTHLY_USAGE = """
rules:
  - id: cap-heavy-users
    when: {type: [18]}
    lookup: [stats.month, quota.data]
    condition: {">": [{"var": "lookup.stats.month.data.volume"}, 500]}
    actions:
      - log:
          message: "{{ lookup.stats.month.data.volume }} MB, {{ lookup.quota.data.volume }} left"
"""


def event(event_id: int, endpoint: int = 501) -> dict[str, Any]:
    return {
        "id": event_id,
        "timestamp": format_moment(T0 + timedelta(minutes=event_id)),
        "event_type": {"id": 18},
        "event_source": {"id": 1},
        "event_severity": {"id": 1},
        "sim": {"id": 1, "iccid": "8988303000000000001"},
        "endpoint": {"id": endpoint, "name": "truck-1"},
    }


def usage(volume: float, left: float = 20.0) -> dict[str, Fact]:
    return {
        "stats.month": Fact({"data": {"volume": volume}}),
        "quota.data": Fact({"volume": left, "status": {"id": 1}}),
    }


class Engine:
    def __init__(self, tmp_path: Path, rules: str):
        self.store = SqliteStore(tmp_path / "engine.sqlite3")
        self.pipeline = Pipeline(rules_from(tmp_path, rules), self.store)

    def feed(self, *records: dict[str, Any], lookups: Any = None) -> BatchResult:
        return self.pipeline.process(list(records), source="test", lookups=lookups)

    def audit(self, outcome: str) -> list[dict[str, Any]]:
        return [r for r in self.store.audit_rows() if r["outcome"] == outcome]


def decisions(result: BatchResult) -> list[tuple[int, str, str]]:
    return [(d.event_id, d.rule_id, d.outcome) for d in result.decisions]


def test_a_rule_acts_when_its_condition_holds_on_the_looked_up_facts(tmp_path):
    engine = Engine(tmp_path, OVER_MONTHLY_USAGE)

    result = engine.feed(event(1), lookups={501: usage(812.5)})

    assert decisions(result) == [(1, "cap-heavy-users", "fired")]
    [planned] = result.planned
    assert planned.action.params["message"] == "812.5 MB, 20.0 left"


def test_a_rule_does_not_act_when_its_condition_is_false_on_the_facts(tmp_path):
    engine = Engine(tmp_path, OVER_MONTHLY_USAGE)

    result = engine.feed(event(1), lookups={501: usage(120.0)})

    assert decisions(result) == [(1, "cap-heavy-users", "condition_false")]
    assert not result.planned


def test_an_unavailable_lookup_is_recorded_and_the_rule_does_not_act_by_default(tmp_path):
    engine = Engine(tmp_path, OVER_MONTHLY_USAGE)
    facts = usage(900.0) | {"stats.month": Fact(error="HTTP 429 from the API")}

    result = engine.feed(event(1), lookups={501: facts})

    assert decisions(result) == [(1, "cap-heavy-users", "lookup_unavailable")]
    assert not result.planned
    [row] = engine.audit("lookup_unavailable")
    assert row["detail"] == (
        "lookup unavailable: stats.month for endpoint 501: HTTP 429 from the API"
    )


def test_a_rule_with_on_lookup_error_act_acts_when_a_fact_is_missing(tmp_path):
    rules = OVER_MONTHLY_USAGE.replace(
        "lookup: [stats.month, quota.data]",
        "lookup: [stats.month, quota.data]\n    on_lookup_error: act",
    ).replace("{{ lookup.stats.month.data.volume }} MB, {{ lookup.quota.data.volume }} left", "x")
    engine = Engine(tmp_path, rules)

    result = engine.feed(event(1, endpoint=502), lookups={501: usage(900.0)})

    assert decisions(result) == [(1, "cap-heavy-users", "fired")]
    [row] = engine.audit("lookup_unavailable")
    assert "stats.month for endpoint 502 was not fetched; acting" in row["detail"]


def test_the_pipeline_names_the_facts_each_endpoint_needs(tmp_path):
    rules = (
        OVER_MONTHLY_USAGE
        + """
  - id: offline-check
    when: {type: [18, 19]}
    lookup: [connectivity]
    actions: [{log: {message: "x"}}]
  - id: no-lookups
    when: {type: [18]}
    actions: [{log: {message: "x"}}]
"""
    )
    engine = Engine(tmp_path, rules)
    other = event(2, endpoint=777) | {"event_type": {"id": 19}}

    wanted = engine.pipeline.wanted_lookups([event(1), other, {"not": "an event"}])

    assert wanted == {501: {"stats.month", "quota.data", "connectivity"}, 777: {"connectivity"}}


def test_rules_without_lookups_need_nothing_fetched(tmp_path):
    rules = OVER_MONTHLY_USAGE.replace("    lookup: [stats.month, quota.data]\n", "")
    engine = Engine(tmp_path, rules)
    assert engine.pipeline.wanted_lookups([event(1)]) == {}


@pytest.mark.parametrize(
    ("line", "message", "at"),
    [
        ("lookup: [stats.mnth]", "unknown lookup `stats.mnth` (did you mean `stats.month`", 5),
        ("lookup: [connectivity, connectivity]", "lookup `connectivity` is listed twice", 5),
        ("lookup: connectivity", "`lookup` must be a list of names", 5),
        ("lookup: [connectivity]\n    on_lookup_error: maybe", "must be `skip` or `act`", 6),
    ],
)
def test_a_wrong_lookup_is_refused_at_load_with_its_file_and_line(tmp_path, line, message, at):
    rules = OVER_MONTHLY_USAGE.replace("lookup: [stats.month, quota.data]", line)
    with pytest.raises(RuleSetError) as caught:
        rules_from(tmp_path, rules)
    text = str(caught.value)
    assert message in text
    assert f"rules.yaml:{at}: rule `cap-heavy-users`" in text


def test_only_enabled_rules_ask_for_facts_and_an_event_naming_no_endpoint_asks_none(tmp_path):
    rules = (
        OVER_MONTHLY_USAGE
        + """
  - id: switched-off
    enabled: false
    when: {type: [18]}
    lookup: [connectivity]
    actions: [{log: {message: "x"}}]
"""
    )
    engine = Engine(tmp_path, rules)
    nameless = event(1) | {"endpoint": {"name": "no id"}}
    wanted = engine.pipeline.wanted_lookups([nameless, event(2, endpoint=777)])
    assert wanted == {777: {"stats.month", "quota.data"}}


def test_an_endpoint_id_given_as_text_is_the_endpoint_whose_facts_are_looked_up() -> None:
    assert endpoint_of(normalize(event(1) | {"endpoint": {"id": "501"}})) == 501
    assert endpoint_of(normalize(event(1) | {"endpoint": {"name": "no id"}})) is None
    assert endpoint_of(normalize({k: v for k, v in event(1).items() if k != "endpoint"})) is None


def test_the_facts_there_are_given_nested_and_the_first_missing_one_said() -> None:
    table = {
        501: {
            "quota.data": Fact(error="HTTP 503"),
            "stats.month": Fact({"data": {"volume": 12}}),
            "connectivity": Fact({"status": {"description": "ONLINE"}}),
        }
    }
    nested, missing = facts_for(
        table, 501, ["quota.data", "quota.sms", "stats.month", "connectivity"]
    )
    assert nested == {
        "stats": {"month": {"data": {"volume": 12}}},
        "connectivity": {"status": {"description": "ONLINE"}},
    }
    assert missing == "lookup unavailable: quota.data for endpoint 501: HTTP 503"
