"""A rule set as the pipeline asks it: which rules an event meets (through the index), which
usage rules a usage record counts for, why a rule did not match, and what the set says about
itself (its fingerprint, its absence and usage rules, whether it reads `tag_list`)."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from typing import Any

import pytest
from structlog.testing import capture_logs

from engine.events import Event, normalize
from engine.rules import RuleSet, When, load_rules_text
from engine.rules import index as index_module
from engine.rules.index import Bucket, RuleIndex
from engine.usage import read_usage

EVENT: dict[str, Any] = {
    "id": 7,
    "timestamp": "2025-05-01T16:05:03.000Z",
    "alert": False,
    "description": "Quota used up",
    "event_type": {"id": 19, "description": "Quota used up"},
    "event_source": {"id": 1, "description": "Policy Control"},
    "event_severity": {"id": 1, "description": "Warn"},
    "endpoint": {"id": 5, "name": "truck-1", "tags": "fleet"},
    "sim": {"id": 9, "iccid": "8988000000000000001"},
}
THROWN = 'Thrown: {"type":"boom"} (in operator: throw)'
USAGE: dict[str, Any] = {
    "id": 35,
    "traffic_type": {"id": 5, "description": "Data"},
    "start_timestamp": "2026-01-01T10:00:00Z",
    "end_timestamp": "2026-01-01T10:00:45Z",
    "volume": {"rx": 1.5, "tx": 0.5, "total": 2.0},
    "endpoint": {"id": 7, "name": "truck-0007"},
    "sim": {"id": 9, "iccid": "8988303000000000009"},
}


def event(**changes: Any) -> Event:
    record = {**EVENT, **changes}
    return normalize({k: v for k, v in record.items() if v is not None})


def load(text: str) -> RuleSet:
    return load_rules_text(textwrap.dedent(text))


def rule(ident: str, lines: str = "") -> str:
    """One rule of a `rules:` list: its id, `lines` (flow-style keys) and a log action."""
    return f"  - {{id: {ident}, {lines} actions: [{{log: {{}}}}]}}\n"


def ruleset(*rules: str) -> RuleSet:
    return load("rules:\n" + "".join(rules))


def ids(rules: Any) -> list[str]:
    return [r.id for r in rules]


# --- the index -----------------------------------------------------------------------------


def test_an_event_meets_the_rules_its_type_source_and_severity_admit_in_file_order() -> None:
    rules = ruleset(
        rule("any"),
        rule("type", "when: {type: 19},"),
        rule("other-type", "when: {type: 20},"),
        rule("source", "when: {source: 1},"),
        rule("other-source", "when: {source: 2},"),
        rule("severity", "when: {severity: warn},"),
        rule("other-severity", "when: {severity: info},"),
        rule("all", "when: {type: [20, 19], source: 1, severity: 1},"),
    )
    assert ids(rules.candidates(event())) == ["any", "type", "source", "severity", "all"]
    assert ids(rules.match(event())) == ["any", "type", "source", "severity", "all"]


def test_an_event_without_a_type_source_or_severity_meets_only_rules_asking_for_none() -> None:
    rules = ruleset(
        rule("any"), rule("type", "when: {type: 19},"), rule("src", "when: {source: 1},")
    )
    bare = event(event_type=None, event_source=None, event_severity=None)
    assert ids(rules.candidates(bare)) == ["any"]
    assert ids(rules.match(bare)) == ["any"]


def test_the_ids_a_condition_pins_narrow_the_candidates_with_when() -> None:
    rules = ruleset(
        rule("cond", "condition: {'==': [{var: event_type.id}, 19]},"),
        rule("both", "when: {type: [19, 20]}, condition: {'==': [{var: event_type.id}, 20]},"),
        rule("agree", "when: {type: [19, 20]}, condition: {'==': [{var: event_type.id}, 19]},"),
        rule("sev", "condition: {'==': [{var: event_severity.id}, 2]},"),
        rule("src", "condition: {'==': [{var: event_source.id}, 2]},"),
    )
    assert ids(rules.candidates(event())) == ["cond", "agree"]
    api = event(event_source={"id": 2, "description": "API"})
    assert ids(rules.candidates(api)) == ["cond", "agree", "src"]
    assert ids(rules.candidates(event(event_type={"id": 20, "description": "x"}))) == ["both"]
    narrower = ruleset(
        rule("when", "when: {type: 19}, condition: {in: [{var: event_type.id}, [19, 20]]},")
    )
    assert ids(narrower.match(event())) == ["when"]
    assert ids(narrower.match(event(event_type={"id": 20, "description": "x"}))) == []


def test_a_condition_requiring_the_alert_flag_keeps_the_rule_from_events_without_it() -> None:
    rules = ruleset(
        rule("alert", "condition: {'==': [{var: alert}, true]},"),
        rule("quiet", "when: {alert: false}, condition: {'==': [{var: alert}, true]},"),
    )
    index = RuleIndex(rules.rules)
    bucket = index.bucket(19, 1, 1)
    assert [entry[1].alert for entry in bucket.entries] == [True, False]
    assert ids(rules.match(event(alert=True))) == ["alert"]
    assert ids(rules.match(event(alert=False))) == []


def test_a_bucket_narrows_by_alert_and_tags_and_marks_what_is_left_to_test() -> None:
    rules = ruleset(
        rule("plain"),
        rule("alert", "when: {alert: true},"),
        rule("quiet", "when: {alert: false},"),
        rule("fleet", "when: {tags: fleet},"),
        rule("vip", "when: {tags: [fleet, vip]},"),
        rule("not-api", "when: {not: {source: api}},"),
    )
    bucket = RuleIndex(rules.rules).bucket(19, 1, 1)
    assert not bucket.narrows
    found = bucket.by_details(event(alert=False))
    assert [(entry[0].id, entry[2]) for entry in found] == [
        ("plain", False),
        ("quiet", False),
        ("fleet", False),
        ("not-api", True),
    ]
    assert bucket.by_details(event(alert=False)) is found  # worked out once per (alert, tags)
    assert ids(e[0] for e in bucket.by_details(event(alert=True, endpoint=None))) == [
        "plain",
        "alert",
        "not-api",
    ]


def test_a_bucket_forgets_its_alert_and_tags_keys_past_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(index_module, "_MAX_DETAIL_KEYS", 2)
    rules = ruleset(rule("fleet", "when: {tags: fleet},"))
    bucket = RuleIndex(rules.rules).bucket(19, 1, 1)
    first = bucket.by_details(event())
    bucket.by_details(event(alert=True))
    assert bucket.by_details(event()) is first
    bucket.by_details(event(endpoint={"id": 5, "name": "t", "tags": "x"}))
    assert bucket.by_details(event()) is not first  # cleared at the bound, worked out again
    assert ids(e[0] for e in bucket.by_details(event())) == ["fleet"]


def test_rules_pinned_to_devices_narrow_by_iccid_and_endpoint_name() -> None:
    rules = ruleset(
        rule("any"),
        rule("sim", "when: {iccid: '8988000000000000001'},"),
        rule("other-sim", "when: {iccid: '8988000000000000002'},"),
        rule("name", "when: {endpoint_name: [truck-1, truck-2]},"),
        rule("both", "when: {iccid: '8988000000000000001', endpoint_name: truck-2},"),
    )
    assert ids(rules.candidates(event())) == ["any", "sim", "name"]
    assert ids(rules.match(event())) == ["any", "sim", "name"]
    other = event(
        endpoint={"id": 5, "name": "truck-2"}, sim={"id": 9, "iccid": "8988000000000000002"}
    )
    assert ids(rules.candidates(other)) == ["any", "other-sim", "name"]
    bucket = RuleIndex(rules.rules).bucket(19, 1, 1)
    assert bucket.narrows


def test_a_device_no_rule_pins_meets_only_the_rules_pinned_to_none() -> None:
    by_sim = ruleset(rule("sim", "when: {iccid: '8988000000000000001'},"), rule("any"))
    by_name = ruleset(rule("name", "when: {endpoint_name: truck-1},"), rule("any"))
    stranger = event(
        endpoint={"id": 6, "name": "truck-9"}, sim={"id": 3, "iccid": "8988000000000000003"}
    )
    assert ids(by_sim.candidates(stranger)) == ["any"]
    assert ids(by_name.candidates(stranger)) == ["any"]
    assert ids(by_sim.candidates(event())) == ["sim", "any"]
    assert ids(by_name.candidates(event())) == ["name", "any"]


def test_what_a_bucket_knows_of_its_conditions() -> None:
    rules = ruleset(
        rule("a", "condition: {'==': [{var: detail.x}, 1]},"),
        rule("b", "condition: {'==': [{var: description}, 'x']},"),
        rule("c", "condition: {'==': [{var: detail.x}, 1]},"),
        rule("d"),
    )
    bucket = RuleIndex(rules.rules).bucket(19, 1, 1)
    assert bucket.conditions == 3
    assert bucket.repeats is True
    assert bucket.fields == ("description", "detail")
    assert bucket.rules == tuple(rules.rules)
    one = RuleIndex(rules.rules[:2]).bucket(19, 1, 1)
    assert (one.conditions, one.repeats) == (2, False)
    computed = ruleset(rule("a", "condition: {'==': [{var: [{cat: [de, scription]}]}, 'x']},"))
    assert RuleIndex(computed.rules).bucket(19, 1, 1).fields is None
    assert ids(computed.match(event(description="x"))) == ["a"]
    assert ids(computed.match(event(description="y"))) == []
    assert RuleIndex(ruleset(rule("d")).rules).bucket(19, 1, 1).fields == ()


def test_the_index_keeps_disabled_rules_out_and_its_buckets_are_worked_out_once() -> None:
    rules = ruleset(rule("enabled"), rule("disabled", "enabled: false,"))
    index = RuleIndex(rules.rules)
    assert ids(index.bucket(19, 1, 1).rules) == ["enabled"]
    assert index.bucket(19, 1, 1) is index.bucket(19, 1, 1)
    assert ids(index.bucket(None, None, None).rules) == ["enabled"]


def test_the_index_forgets_its_buckets_past_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "_MAX_CACHED_KEYS", 2)
    index = RuleIndex(ruleset(rule("r")).rules)
    first = index.bucket(1, 1, 1)
    index.bucket(2, 1, 1)
    assert index.bucket(1, 1, 1) is first
    index.bucket(3, 1, 1)
    assert index.bucket(1, 1, 1) is not first


def test_a_bucket_of_no_rules_selects_none() -> None:
    bucket = Bucket([])
    assert (bucket.rules, bucket.conditions, bucket.repeats, bucket.fields) == ((), 0, False, ())
    assert bucket.select(event()) == ()


# --- matching -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "matched"),
    [
        ("{var: detail.n}", True),
        ("{var: detail.text}", True),
        ("{var: detail.zero}", False),
        ("{var: detail.empty}", False),
        ("{var: detail.none}", False),
        ("{'==': [1, 1]}", True),
    ],
)
def test_a_condition_matches_when_its_value_is_truthy(condition: str, matched: bool) -> None:
    rules = ruleset(rule("r", f"condition: {condition},"))
    ev = event(detail={"n": 3, "text": "x", "zero": 0, "empty": [], "none": None})
    assert ids(rules.match(ev)) == (["r"] if matched else [])


def test_rules_repeating_a_condition_each_get_its_answer() -> None:
    rules = ruleset(
        rule("a", "condition: {var: detail.n},"),
        rule("b", "condition: {var: detail.n},"),
        rule("c", "condition: {'!': {var: detail.n}},"),
        rule("d", "condition: {'!': {var: detail.n}},"),
    )
    assert ids(rules.match(event(detail={"n": 1}))) == ["a", "b"]
    assert ids(rules.match(event(detail={"n": 0}))) == ["c", "d"]


def test_a_failing_condition_is_no_match_and_is_logged_once_with_its_rule_and_event() -> None:
    rules = ruleset(rule("bad", "condition: {throw: boom},"), rule("fine"))
    with capture_logs() as logs:
        assert ids(rules.match(event(id=1))) == ["fine"]
        assert ids(rules.match(event(id=2))) == ["fine"]
    assert len(logs) == 1
    (entry,) = logs
    assert entry["event"] == "rule condition failed (counted as no match; logged once per rule)"
    assert entry["log_level"] == "warning"
    assert (entry["rule_id"], entry["event_id"], entry["where"]) == ("bad", 1, "<rules>:2")
    assert entry["error"] == THROWN


def test_match_each_answers_as_match_and_names_the_rules_that_failed_otherwise() -> None:
    rules = ruleset(
        rule("a", "when: {type: 19},"),
        rule("b", "condition: {'!': {var: alert}},"),
        rule("c", "condition: {var: alert},"),
        rule("bad", "condition: {throw: boom},"),
        rule("d", "when: {tags: vip},"),
    )
    ev = event()
    with capture_logs() as logs:
        matched, failed = rules.match_each(ev)
    assert ids(matched) == ids(rules.match(ev)) == ["a", "b"]
    assert failed == []
    assert [(entry["rule_id"], entry["error"]) for entry in logs] == [("bad", THROWN)]


def test_match_each_sets_a_rule_that_fails_unexpectedly_beside_its_error() -> None:
    rules = ruleset(rule("a"), rule("b", "condition: {var: alert},"), rule("c"))
    boom = RuntimeError("boom")

    class Broken(When):
        __slots__ = ()

        def mismatch(self, event: Event) -> str | None:
            raise boom

    broken = replace(rules.rules[0], when=Broken())
    with_broken = RuleSet([broken, rules.rules[1], rules.rules[2]])
    matched, failed = with_broken.match_each(event(alert=True))
    assert ids(matched) == ["b", "c"]
    assert failed == [(broken, boom)]

    class Fatal(When):
        __slots__ = ()

        def mismatch(self, event: Event) -> str | None:
            raise KeyboardInterrupt

    fatal = RuleSet([replace(rules.rules[0], when=Fatal())])
    with pytest.raises(KeyboardInterrupt):
        fatal.match_each(event())


# --- usage rules --------------------------------------------------------------------------


def test_usage_rules_count_records_of_their_traffic_and_never_meet_events() -> None:
    rules = ruleset(
        rule("data", "usage: {data: '>1MB', within: 1h},"),
        rule("sms", "usage: {sms: '>3', within: 1h},"),
        rule("disabled", "enabled: false, usage: {data: '>1MB', within: 1h},"),
        rule("events"),
    )
    assert ids(rules.usage_rules) == ["data", "sms"]
    assert ids(rules.match_usage(read_usage(USAGE))) == ["data"]
    assert ids(rules.candidates(event())) == ["events"]
    assert ids(rules.match(event())) == ["events"]


def test_a_usage_rules_condition_picks_records_and_a_failing_one_is_no_match() -> None:
    rules = ruleset(
        rule("bad", "usage: {data: '>1MB', within: 1h}, condition: {throw: boom},"),
        rule("near", "usage: {data: '>1MB', within: 1h}, condition: {'==': [{var: sim.id}, 9]},"),
        rule("far", "usage: {data: '>1MB', within: 1h}, condition: {'==': [{var: sim.id}, 8]},"),
    )
    with capture_logs() as logs:
        assert ids(rules.match_usage(read_usage(USAGE))) == ["near"]
        assert ids(rules.match_usage(read_usage(USAGE))) == ["near"]
    assert [(entry["rule_id"], entry["error"]) for entry in logs] == [("bad", THROWN)]


# --- explanations ------------------------------------------------------------------------


def test_explain_says_why_a_rule_does_not_match_or_none_when_it_does() -> None:
    rules = ruleset(
        rule("ok"),
        rule("disabled", "enabled: false,"),
        rule("usage", "usage: {data: '>1MB', within: 1h},"),
        rule("type", "when: {type: 20},"),
        rule("fails", "condition: {var: alert},"),
        rule("bad", "condition: {throw: boom},"),
        rule("holds", "condition: {'!': {var: alert}},"),
    )
    by_id = {r.id: r for r in rules}
    ev = event()
    record = read_usage(USAGE)
    assert rules.explain(ev, by_id["ok"]) is None
    assert rules.explain(ev, by_id["holds"]) is None
    assert rules.explain(ev, by_id["disabled"]) == "rule is disabled"
    assert rules.explain(ev, by_id["usage"]) == (
        "a usage rule: it judges the Data Streamer's usage records, not events"
    )
    assert rules.explain(record, by_id["usage"]) is None
    assert rules.explain(record, by_id["ok"]) == "a usage record: only rules with `usage:` judge it"
    assert rules.explain(ev, by_id["type"]) == (
        "type is 19 (Quota used up), rule wants 20 (SMS quota threshold reached)"
    )
    assert rules.explain(ev, by_id["fails"]) == "condition was false"
    explained = rules.explain(ev, by_id["bad"])
    assert explained is not None and explained.startswith("condition error: ")
    assert len(explained) > len("condition error: ")


# --- what the set says about itself -------------------------------------------------------


def test_a_rule_set_is_a_sequence_of_its_rules_found_by_id() -> None:
    rules = ruleset(rule("a"), rule("b"))
    assert len(rules) == 2
    assert ids(rules) == ["a", "b"]
    assert rules.get("b") is rules.rules[1]
    assert rules.get("c") is None
    assert rules.warnings == ()
    with pytest.raises(ValueError) as caught:
        RuleSet([rules.rules[0], rules.rules[0]])
    assert str(caught.value) == "rule ids must be unique within a rule set"


def test_the_fingerprint_follows_the_rules_as_written_not_their_order() -> None:
    one = ruleset(rule("a"), rule("b", "when: {type: 19},"))
    again = ruleset(rule("b", "when: {type: 19},"), rule("a"))
    other = ruleset(rule("a"), rule("b", "when: {type: 20},"))
    assert len(one.fingerprint) == 12
    assert int(one.fingerprint, 16) >= 0
    assert one.fingerprint == again.fingerprint
    assert one.fingerprint != other.fingerprint
    assert one.fingerprint is one.fingerprint


def test_the_absence_rules_are_the_enabled_ones() -> None:
    absence = "absence: {for: 1h, per: endpoint.id},"
    rules = ruleset(rule("a", absence), rule("disabled", "enabled: false, " + absence), rule("e"))
    assert ids(rules.absence_rules) == ["a"]
    assert rules.has_absence is True
    assert ruleset(rule("disabled", "enabled: false, " + absence)).has_absence is False


def test_a_set_reads_tag_list_when_a_rule_mentions_it_or_was_built_by_hand() -> None:
    assert ruleset(rule("a")).reads_tag_list is False
    assert ruleset(rule("a"), rule("b", "condition: {var: endpoint.tag_list},")).reads_tag_list
    built = replace(ruleset(rule("a")).rules[0], definition=None)
    assert RuleSet([built]).reads_tag_list is True
