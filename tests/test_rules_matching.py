"""Matching events against rules: the shorthand, conditions, the index, and explanations."""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import datalogic_py
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from engine.actions import ACTIONS
from engine.errors import ConfigError, Location
from engine.events import Event, normalize
from engine.rules import (
    ActionStep,
    Condition,
    ConditionError,
    Rule,
    RuleSet,
    When,
    compile_condition,
    load_rules_text,
)
from engine.rules import condition as condition_module
from engine.rules.condition import EventData, implied_alert, implied_ids, project, truthy
from engine.rules.when import Exclusion

HERE = Path(__file__).parent
NOWHERE = Location("test.yaml", 1)

QUOTA_USED_UP: dict[str, Any] = {
    "id": 412912410077392,
    "timestamp": "2025-05-01T16:05:03.000Z",
    "alert": True,
    "description": "Quota volume is completely used up and data access denied for endpoint.",
    "event_type": {"id": 19, "description": "Quota used up"},
    "event_source": {"id": 1, "description": "Policy Control"},
    "event_severity": {"id": 1, "description": "Warn"},
    "organisation": {"id": 731245, "name": "Acme Fleet GmbH"},
    "endpoint": {"id": 18345221, "name": "truck-0042", "tags": "fleet,berlin"},
    "sim": {"id": 9123344, "iccid": "8988303000012345678"},
    "detail": {"quota": {"threshold_percentage": 20, "volume": "0.000000"}},
}


def event(**changes: Any) -> Event:
    """The quota-used-up example event, with top-level fields replaced (None drops one)."""
    record = {**QUOTA_USED_UP, **changes}
    return normalize({k: v for k, v in record.items() if v is not None})


def rules_of(yaml_text: str) -> RuleSet:
    return load_rules_text(textwrap.dedent(yaml_text), "test.yaml")


def one_rule(when: str = "{}", condition: str | None = None) -> RuleSet:
    cond = f"\n    condition: {condition}" if condition is not None else ""
    return rules_of(f"rules:\n  - id: r\n    when: {when}{cond}\n    actions: [{{log: {{}}}}]\n")


def matches(rules: RuleSet, ev: Event) -> list[str]:
    return [rule.id for rule in rules.match(ev)]


# --- the `when` shorthand ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "when",
    [
        "{type: 19}",
        "{type: 'quota used up'}",
        "{type: [3, 19]}",
        "{source: 1}",
        "{source: policy_control}",
        "{severity: warn}",
        "{severity: [warning, critical]}",
        "{alert: true}",
        "{iccid: '8988303000012345678'}",
        "{endpoint_name: [truck-0041, truck-0042]}",
        "{tags: fleet}",
        "{tags: [berlin, fleet]}",
        "{type: 19, source: policy_control, severity: 1, alert: true, tags: fleet}",
    ],
)
def test_shorthand_that_fits_the_event_matches(when: str) -> None:
    rules = one_rule(when)
    assert matches(rules, event()) == ["r"]
    assert rules.explain(event(), rules.rules[0]) is None


@pytest.mark.parametrize(
    ("when", "reason"),
    [
        ("{type: 3}", "type is 19 (Quota used up), rule wants 3 (Create PDP Context)"),
        (
            "{type: [3, 5]}",
            "type is 19 (Quota used up), rule wants 3 (Create PDP Context) or "
            "5 (Delete PDP Context)",
        ),
        ("{source: network}", "source is Policy Control, rule wants Network"),
        ("{severity: critical}", "severity is Warn, rule wants Critical"),
        ("{severity: [info, critical]}", "severity is Warn, rule wants Info or Critical"),
        ("{alert: false}", "alert is true, rule wants false"),
        (
            "{iccid: '8988303000012345722'}",
            "iccid is 8988303000012345678, rule wants 8988303000012345722",
        ),
        ("{endpoint_name: meter-7781}", "endpoint_name is truck-0042, rule wants meter-7781"),
        ("{tags: [fleet, vip]}", "endpoint tags lack vip"),
        ("{tags: [vip, fleet, test]}", "endpoint tags lack test, vip"),
    ],
)
def test_shorthand_that_does_not_fit_says_which_part_failed(when: str, reason: str) -> None:
    rules = one_rule(when)
    assert matches(rules, event()) == []
    assert rules.explain(event(), rules.rules[0]) == reason


@pytest.mark.parametrize(
    ("when", "changes", "reason"),
    [
        (
            "{endpoint_name: [meter-1, meter-2, meter-3]}",
            {},
            "endpoint_name is truck-0042, rule wants one of meter-1, meter-2, meter-3",
        ),
        (
            "{endpoint_name: meter-1}",
            {"endpoint": None},
            "endpoint_name is missing, rule wants meter-1",
        ),
        (
            "{severity: critical}",
            {"event_severity": None},
            "severity is missing, rule wants Critical",
        ),
        ("{source: network}", {"event_source": {"id": 7}}, "source is 7, rule wants Network"),
        ("{type: 3}", {"event_type": {"id": 19}}, "type is 19, rule wants 3 (Create PDP Context)"),
        ("{type: 3}", {"event_type": None}, "type is missing, rule wants 3 (Create PDP Context)"),
    ],
)
def test_an_explanation_names_what_the_event_has_even_when_it_is_missing_or_unnamed(
    when: str, changes: dict[str, Any], reason: str
) -> None:
    rules = one_rule(when)
    assert rules.explain(event(**changes), rules.rules[0]) == reason


def test_details_hold_only_when_alert_iccid_endpoint_name_tags_and_not_all_hold() -> None:
    fitting = When(
        alert=True,
        iccids=frozenset({"8988303000012345678"}),
        endpoint_names=frozenset({"truck-0042"}),
        tags=frozenset({"fleet"}),
        exclude=Exclusion(tags=frozenset({"vip"})),
    )
    assert fitting.details_hold(event())
    for unmet in (
        When(alert=False),
        When(iccids=frozenset({"8988303000012345722"})),
        When(endpoint_names=frozenset({"meter-1"})),
        When(tags=frozenset({"vip"})),
        When(exclude=Exclusion(tags=frozenset({"fleet"}))),
    ):
        assert not unmet.details_hold(event()), unmet


def test_a_when_built_by_hand_names_what_it_has_no_name_for_by_number() -> None:
    assert When(type_ids=frozenset({3, 5})).mismatch(event()) == (
        "type is 19 (Quota used up), rule wants 3 or 5"
    )
    assert When(source_ids=frozenset({7})).mismatch(event()) == (
        "source is Policy Control, rule wants 7"
    )
    unnamed = event(event_source={"id": 7}, event_severity={"id": 5})
    assert Exclusion(source_ids=frozenset({7})).excluded_by(unnamed) == (
        "source is 7, which the rule excludes"
    )
    assert Exclusion(severity_ids=frozenset({5})).excluded_by(unnamed) == (
        "severity is 5, which the rule excludes"
    )


@pytest.mark.parametrize(
    ("excluded", "reason"),
    [
        ("{type: 19}", "type is 19 (Quota used up)"),
        ("{source: policy_control}", "source is Policy Control"),
        ("{severity: warn}", "severity is Warn"),
        ("{alert: true}", "alert is true"),
        ("{iccid: '8988303000012345678'}", "iccid is 8988303000012345678"),
        ("{endpoint_name: truck-0042}", "endpoint_name is truck-0042"),
        ("{tags: [vip, berlin, fleet]}", "endpoint is tagged berlin, fleet"),
    ],
)
def test_not_leaves_out_an_event_with_an_excluded_value_and_says_which(
    excluded: str, reason: str
) -> None:
    rules = one_rule(f"{{not: {excluded}}}")
    assert matches(rules, event()) == []
    assert rules.explain(event(), rules.rules[0]) == f"{reason}, which the rule excludes"


@pytest.mark.parametrize(
    "excluded",
    [
        "{type: 3}",
        "{source: network}",
        "{severity: critical}",
        "{alert: false}",
        "{iccid: '8988303000012345722'}",
        "{endpoint_name: meter-1}",
        "{tags: vip}",
    ],
)
def test_not_lets_through_an_event_without_the_excluded_value(excluded: str) -> None:
    rules = one_rule(f"{{not: {excluded}}}")
    assert matches(rules, event()) == ["r"]
    assert rules.explain(event(), rules.rules[0]) is None


def test_not_names_the_first_source_and_severity_by_name_too() -> None:
    first = event(event_source={"id": 0}, event_severity={"id": 0})
    for excluded, reason in (
        ("{source: network}", "source is Network"),
        ("{severity: info}", "severity is Info"),
    ):
        rules = one_rule(f"{{not: {excluded}}}")
        assert rules.explain(first, rules.rules[0]) == f"{reason}, which the rule excludes"


def test_event_without_sim_or_endpoint_does_not_meet_rules_pinned_to_them() -> None:
    bare = event(sim=None, endpoint=None)
    assert matches(one_rule("{iccid: '8988303000012345678'}"), bare) == []
    assert matches(one_rule("{endpoint_name: truck-0042}"), bare) == []
    assert matches(one_rule("{tags: fleet}"), bare) == []
    rules = one_rule("{iccid: '8988303000012345678'}")
    assert rules.explain(bare, rules.rules[0]) == (
        "iccid is missing, rule wants 8988303000012345678"
    )


def test_event_without_type_meets_only_rules_that_do_not_ask_for_one() -> None:
    untyped = event(event_type=None)
    assert matches(one_rule("{type: 19}"), untyped) == []
    assert matches(one_rule("{severity: warn}"), untyped) == ["r"]


def test_source_and_severity_given_by_name_only_in_the_event_still_match() -> None:
    ev = event(event_source={"name": "Policy Control"}, event_severity={"description": "WARNING"})
    assert matches(one_rule("{source: policy_control, severity: warn}"), ev) == ["r"]


# --- conditions ----------------------------------------------------------------------------------


def test_condition_true_matches_and_false_does_not() -> None:
    not_vip = '{"!": {"in": ["vip", {"var": "endpoint.tags"}]}}'
    rules = one_rule("{type: 19}", not_vip)
    assert matches(rules, event()) == ["r"]
    vip = event(endpoint={"id": 1, "name": "truck-0042", "tags": "vip,fleet"})
    assert matches(rules, vip) == []
    assert rules.explain(vip, rules.rules[0]) == "condition was false"


def test_condition_sees_the_normalized_raw_event() -> None:
    rules = one_rule("{}", '{"==": [{"var": "detail.quota.volume"}, "0.000000"]}')
    assert matches(rules, event()) == ["r"]
    # `detail` sent as a JSON string is parsed by normalize before conditions see it.
    as_text = event(detail='{"quota": {"volume": "0.000000"}}')
    assert matches(rules, as_text) == ["r"]


def test_condition_error_counts_as_no_match_and_is_logged_once_per_rule() -> None:
    rules = rules_of(
        """\
        rules:
          - id: adds-to-text
            condition: {"+": [{"var": "description"}, 1]}
            actions: [{log: {}}]
          - id: throws
            condition: {"throw": "boom"}
            actions: [{log: {}}]
          - id: fine
            actions: [{log: {}}]
        """
    )
    with capture_logs() as logs:
        for number in range(5):
            assert matches(rules, event(id=number)) == ["fine"]
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert sorted(entry["rule_id"] for entry in warnings) == ["adds-to-text", "throws"]
    assert all(entry["error"] for entry in warnings)
    explanation = rules.explain(event(), rules.rules[1])
    assert explanation is not None and explanation.startswith("condition error: ")


def test_rules_repeating_one_condition_each_log_its_own_error_once() -> None:
    rules = rules_of(
        """\
        rules:
          - id: a
            condition: {"throw": "boom"}
            actions: [{log: {}}]
          - id: b
            condition: {"throw": "boom"}
            actions: [{log: {}}]
        """
    )
    with capture_logs() as logs:
        for number in range(3):
            assert matches(rules, event(id=number)) == []
    assert sorted(entry["rule_id"] for entry in logs) == ["a", "b"]


def test_an_event_field_json_cannot_carry_fails_only_conditions_that_read_it() -> None:
    rules = rules_of(
        """\
        rules:
          - id: reads-tags
            condition: {"in": ["fleet", {"var": "endpoint.tags"}]}
            actions: [{log: {}}]
          - id: reads-odd-field
            condition: {"!!": {"var": "odd"}}
            actions: [{log: {}}]
        """
    )
    ev = event()
    ev.raw["odd"] = datetime.now(UTC)  # no JSON form: no shared DataHandle for this event
    with capture_logs():
        assert matches(rules, ev) == ["reads-tags"]
    assert rules.explain(ev, rules.rules[0]) is None
    explanation = rules.explain(ev, rules.rules[1])
    assert explanation is not None and explanation.startswith("condition error: ")


# --- the rule set --------------------------------------------------------------------------------


ORDERED = """\
rules:
  - id: third-in-file-is-first-here
    when: {type: 19}
    actions: [{log: {}}]
  - id: any-event
    actions: [{log: {}}]
  - id: other-type
    when: {type: 3}
    actions: [{log: {}}]
  - id: switched-off
    enabled: false
    when: {type: 19}
    actions: [{log: {}}]
  - id: critical-only
    when: {severity: critical}
    actions: [{log: {}}]
"""


def test_matches_come_in_rule_file_order() -> None:
    assert matches(rules_of(ORDERED), event()) == ["third-in-file-is-first-here", "any-event"]


def test_disabled_rules_load_but_never_match_nor_become_candidates() -> None:
    rules = rules_of(ORDERED)
    switched_off = rules.get("switched-off")
    assert switched_off is not None and not switched_off.enabled
    assert switched_off not in rules.candidates(event())
    assert rules.explain(event(), switched_off) == "rule is disabled"


def test_candidates_are_the_rules_whose_indexed_shorthand_admits_the_event() -> None:
    rules = rules_of(ORDERED)
    assert [r.id for r in rules.candidates(event())] == ["third-in-file-is-first-here", "any-event"]
    critical = event(event_severity={"id": 2, "description": "Critical"})
    assert [r.id for r in rules.candidates(critical)] == [
        "third-in-file-is-first-here",
        "any-event",
        "critical-only",
    ]


def test_rules_pinned_to_devices_are_candidates_only_for_those_devices() -> None:
    text = "rules:\n" + "".join(
        f"  - id: device-{n}\n    when: {{type: 19, iccid: '{n:019d}'}}\n"
        "    actions: [{log: {}}]\n"
        for n in range(200)
    )
    rules = rules_of(text + "  - id: any-sim\n    when: {type: 19}\n    actions: [{log: {}}]\n")
    ev = event(sim={"id": 1, "iccid": f"{42:019d}"})
    assert [r.id for r in rules.candidates(ev)] == ["device-42", "any-sim"]
    assert matches(rules, ev) == ["device-42", "any-sim"]


JSONLOGIC_ONLY = """
rules:
  - id: quota-alerts-in-jsonlogic
    condition: {and: [{in: [{var: event_type.id}, [18, 19]]}, {"==": [{var: alert}, true]}]}
    actions: [{log: {}}]
  - id: network-in-jsonlogic
    condition: {"==": [{var: event_source.id}, 0]}
    actions: [{log: {}}]
"""


def test_a_rule_in_jsonlogic_alone_is_a_candidate_only_for_the_types_its_condition_names() -> None:
    rules = rules_of(JSONLOGIC_ONLY)
    quota = rules.get("quota-alerts-in-jsonlogic")
    assert quota is not None and quota.condition is not None
    assert quota.condition.implied_ids == {"type": frozenset({18, 19})}
    assert quota.condition.implied_alert is True
    assert quota in rules.candidates(event())
    assert quota not in rules.candidates(event(event_type={"id": 3, "description": "x"}))
    assert matches(rules, event(alert=False)) == []
    # An id sent as 19.0 is type 19 to the index, and `in` finds it too.
    assert matches(rules, event(event_type={"id": 19.0})) == ["quota-alerts-in-jsonlogic"]


def test_loose_equality_with_zero_is_not_an_index_key() -> None:
    # The evaluator holds `null == 0`, so an event without a source still matches.
    rules = rules_of(JSONLOGIC_ONLY)
    network = rules.get("network-in-jsonlogic")
    assert network is not None and network.condition is not None
    assert network.condition.implied_ids == {}
    assert "network-in-jsonlogic" in matches(rules, event(event_source=None))


def test_get_finds_rules_by_id() -> None:
    rules = rules_of(ORDERED)
    assert rules.get("any-event") is rules.rules[1]
    assert rules.get("missing") is None
    assert len(rules) == 5


def test_rule_set_refuses_duplicate_ids_when_built_by_hand() -> None:
    rule = rules_of(ORDERED).rules[0]
    with pytest.raises(ValueError, match="unique"):
        RuleSet([rule, rule])


# --- the index agrees with trying every rule --------------------------------------------------


_LOG = ACTIONS["log"].from_params({}, NOWHERE)
_CONDITIONS = [
    compile_condition(source, NOWHERE)
    for source in (
        {"!": {"in": ["vip", {"var": "endpoint.tags"}]}},
        {"in": ["fleet", {"var": "endpoint.tags"}]},
        {"in": ["vip", {"var": "endpoint.tag_list"}]},
        {"!": {"in": ["vip", {"var": "endpoint.tag_list"}]}},
        {"<": [{"var": "detail.quota.volume"}, 1]},
        {"==": [{"var": "alert"}, True]},
        {"missing": ["sim.iccid"]},
        {"!!": {"var": ""}},  # reads the whole event
        {"+": [{"var": "endpoint.name"}, 1]},  # errors on text, 1 when there is no endpoint
        {"var": "event_type.description"},  # truthy text
        True,
        False,
        # Conditions that the index reads type, source, severity and alert constraints from:
        {"==": [{"var": "event_type.id"}, 19]},
        {"in": [{"var": "event_type.id"}, [1, 3]]},
        {"and": [{"===": [{"var": "event_severity.id"}, 0]}, {"==": [{"var": "alert"}, True]}]},
        {
            "and": [
                {"==": [19, {"var": "event_type.id"}]},
                {"in": ["vip", {"var": "endpoint.tags"}]},
            ]
        },
        {"==": [{"var": "event_source.id"}, 0]},  # true for a missing id, too: not indexed
        {"and": [{"==": [{"var": ["event_source.id"]}, 1]}, {"==": [{"var": "alert"}, False]}]},
    )
]


def _subset(values: list[Any]) -> st.SearchStrategy[frozenset[Any] | None]:
    # Mostly unconstrained, so that generated rules match often enough to be interesting.
    return st.one_of(st.none(), st.none(), st.frozensets(st.sampled_from(values), min_size=1))


_EXCLUSIONS = st.builds(
    Exclusion,
    type_ids=_subset([1, 19]),
    source_ids=_subset([0, 2]),
    alert=st.one_of(st.none(), st.none(), st.booleans()),
    iccids=_subset(["a", "d"]),
    endpoint_names=_subset(["n2"]),
    tags=_subset(["vip", "vipersat", "berlin"]),
)

_WHENS = st.builds(
    When,
    exclude=st.none() | _EXCLUSIONS,
    type_ids=_subset([1, 3, 11, 19, 99]),
    source_ids=_subset([0, 1, 2]),
    severity_ids=_subset([0, 1, 2]),
    alert=st.one_of(st.none(), st.none(), st.booleans()),
    iccids=_subset(["a", "b", "c"]),
    endpoint_names=_subset(["n1", "n2"]),
    tags=_subset(["vip", "fleet", "berlin"]),
)


@st.composite
def _rule_sets(draw: st.DrawFn) -> list[Rule]:
    rules = []
    for number in range(draw(st.integers(0, 25))):
        where = Location("generated.yaml", number + 1)
        condition: Condition | None = draw(st.none() | st.sampled_from(_CONDITIONS))
        rules.append(
            Rule(
                id=f"rule-{number}",
                description="",
                enabled=draw(st.booleans()),
                mode="live",
                when=draw(_WHENS),
                condition=condition,
                condition_source=condition.source if condition else None,
                actions=(ActionStep("log", _LOG, 0, None, None, where),),
                where=where,
            )
        )
    return rules


def _maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | value


_TAG_TEXTS = ["vip", "fleet", "fleet,berlin", "vip,fleet,berlin", "vipersat"]
_RECORDS = st.fixed_dictionaries(
    {
        "id": st.integers(1, 10**15),
        "timestamp": st.just("2025-05-01T16:05:03.000Z"),
        "alert": st.booleans(),
        # Ids as the API sends them, and as it sometimes does: text, a float, empty text.
        "event_type": _maybe(st.builds(dict, id=st.sampled_from([1, 3, 11, 19, 99, "19", 19.0]))),
        "event_source": _maybe(st.builds(dict, id=st.sampled_from([0, 1, 2, "1", ""]))),
        "event_severity": _maybe(st.builds(dict, id=st.integers(0, 2))),
        "sim": _maybe(st.builds(dict, id=st.just(7), iccid=st.sampled_from(["a", "b", "d"]))),
        "endpoint": _maybe(
            st.builds(
                dict,
                id=st.just(8),
                name=st.sampled_from(["n1", "n2", "n3"]),
                tags=_maybe(st.sampled_from(_TAG_TEXTS)),
            )
        ),
        "detail": _maybe(
            st.builds(dict, quota=st.builds(dict, volume=st.sampled_from([0, 0.5, "2.0", None])))
        ),
    }
)


def _holds_checked_by_hand(rule: Rule, ev: Event) -> bool:
    """The rule judged on its own: every `when` part, then the condition on the whole event."""
    if rule.when.mismatch(ev) is not None:
        return False
    if rule.condition is None:
        return True
    try:
        return truthy(rule.condition.evaluate(ev.raw))
    except ConditionError:
        return False


@settings(max_examples=300, deadline=None)
@given(rules=_rule_sets(), records=st.lists(_RECORDS, min_size=1, max_size=8))
def test_index_and_match_agree_with_checking_every_rule(
    rules: list[Rule], records: list[dict[str, Any]]
) -> None:
    rule_set = RuleSet(rules)
    with capture_logs():
        for record in records:
            ev = normalize({k: v for k, v in record.items() if v is not None})
            expected = [r for r in rules if r.enabled and _holds_checked_by_hand(r, ev)]
            assert rule_set.match(ev) == expected
            assert [r for r in rules if rule_set.explain(ev, r) is None] == expected
            candidates = list(rule_set.candidates(ev))
            assert all(rule in candidates for rule in expected)
            assert candidates == [r for r in rules if r in candidates]  # file order


# --- the official JsonLogic conformance cases, through the condition layer --------------------

_CASES = [
    case
    for case in json.loads((HERE / "data" / "jsonlogic-tests.json").read_text(encoding="utf-8"))
    if not isinstance(case, str)  # strings are section headings
]

# Cases where our condition layer knowingly differs from json-logic-js, with the reason.
# Empty: datalogic-py's one miss ("apple" as a rule is read as JSON text) is handled by
# passing string rules JSON-encoded.
KNOWN_DIFFERENCES: dict[int, str] = {}


def _same(actual: Any, expected: Any) -> bool:
    """Equal as JSON values: booleans are not numbers, 1 and 1.0 are the same number."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(actual) is type(expected) and actual == expected
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        return actual == expected
    if isinstance(expected, list) and isinstance(actual, list):
        return len(actual) == len(expected) and all(map(_same, actual, expected))
    if isinstance(expected, dict) and isinstance(actual, dict):
        return actual.keys() == expected.keys() and all(
            _same(actual[k], expected[k]) for k in actual
        )
    return type(actual) is type(expected) and actual == expected


def test_the_whole_conformance_suite_is_present() -> None:
    assert len(_CASES) == 277


@pytest.mark.parametrize(
    ("number", "case"),
    [
        pytest.param(
            n,
            case,
            marks=[pytest.mark.xfail(reason=KNOWN_DIFFERENCES[n], strict=True)]
            if n in KNOWN_DIFFERENCES
            else [],
        )
        for n, case in enumerate(_CASES)
    ],
)
def test_jsonlogic_conformance_case(number: int, case: list[Any]) -> None:
    source, data, expected = case
    condition = compile_condition(source, NOWHERE)
    assert _same(condition.evaluate(data), expected)
    if isinstance(data, dict):
        # The matcher hands the engine only the fields a condition reads: same answer.
        projected = project(data, condition.fields)
        assert _same(condition.compiled.evaluate(projected), expected)
        handle = datalogic_py.DataHandle(projected)
        assert _same(condition.compiled.evaluate_data(handle), expected)


def test_condition_evaluate_raises_condition_error_on_failure() -> None:
    with pytest.raises(ConditionError):
        compile_condition({"throw": "x"}, NOWHERE).evaluate({})


# --- what a compiled condition knows of itself -------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("", False),
        ("x", True),
        (0, False),
        (0.0, False),
        (1, True),
        ([], False),
        ([0], True),
        ({}, False),
        ({"a": 1}, True),
        (None, False),
    ],
)
def test_truthy_answers_a_boolean_by_jsonlogic_truthiness(value: Any, expected: bool) -> None:
    assert truthy(value) is expected


def test_a_condition_evaluated_on_text_reads_it_as_text_not_as_json() -> None:
    assert compile_condition({"var": ""}, NOWHERE).evaluate("abc") == "abc"


def test_an_unknown_top_level_operator_is_reported_without_a_pointer() -> None:
    with pytest.raises(ConfigError) as caught:
        compile_condition({"inn": [1, 2]}, NOWHERE)
    assert caught.value.where == NOWHERE
    assert caught.value.message == "invalid condition: unknown operator `inn`"
    assert caught.value.hint == "did you mean `in`?"


def test_a_wrong_number_of_arguments_gets_no_operator_suggestion() -> None:
    with pytest.raises(ConfigError) as caught:
        compile_condition({"==": [1]}, NOWHERE)
    assert caught.value.message == "invalid condition: `==` takes at least 2 arguments, not 1"
    assert caught.value.hint is None


def _refused_with(monkeypatch: pytest.MonkeyPatch, *diagnostics: dict[str, Any]) -> ConfigError:
    """What `compile_condition` says when the engine refuses with these diagnostics."""
    error = datalogic_py.CompileError("the engine's own summary")
    error.diagnostics = list(diagnostics)

    def refuse(source: Any) -> Any:
        raise error

    monkeypatch.setattr(condition_module, "_compile", refuse)
    with pytest.raises(ConfigError) as caught:
        compile_condition({"==": [1, 1]}, NOWHERE)
    return caught.value


def _diagnostic(severity: str, message: str, operator: str | None = None) -> dict[str, Any]:
    code = "UnknownOperator" if operator else "Other"
    return {
        "severity": severity,
        "message": message,
        "pointer": "",
        "operator": operator,
        "code": code,
    }


def test_a_refused_condition_names_its_errors_and_leaves_out_the_engines_warnings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused = _refused_with(
        monkeypatch,
        _diagnostic("warning", "a mere warning", "inn"),
        _diagnostic("error", "unknown operator `iff`", "iff"),
    )
    assert refused.where == NOWHERE
    assert refused.message == "invalid condition: unknown operator `iff`"
    assert refused.hint == "did you mean `if`?"


def test_a_refusal_with_only_warnings_still_names_them(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = _refused_with(monkeypatch, _diagnostic("warning", "odd, and refused"))
    assert refused.message == "invalid condition: odd, and refused"


def test_a_refusal_without_diagnostics_gives_the_engines_summary_at_the_condition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused = _refused_with(monkeypatch)
    assert refused.where == NOWHERE
    assert refused.message == "invalid condition: the engine's own summary"
    assert refused.hint is None


def test_a_condition_shows_itself_cut_to_eighty_characters() -> None:
    condition = compile_condition({"==": [{"var": "a"}, "x" * 100]}, NOWHERE)
    written = '{"==":[{"var":"a"},"' + "x" * 100
    assert repr(condition) == f"Condition({written[:80]})"


def test_the_paths_a_condition_reads_are_keys_with_escaped_dots_kept_once_each() -> None:
    read = {"var": "ab\\.cd\\.ef.g"}
    condition = compile_condition({"and": [read, read]}, NOWHERE)
    assert condition.reads == (("ab.cd.ef", "g"),)
    assert condition.fields is None  # a key with a dot: the matcher hands over the whole event


def test_the_paths_of_a_condition_with_a_computed_var_are_the_literal_ones_written() -> None:
    source = {"==": [{"var": {"cat": ["a", ".b"]}}, {"var": ["endpoint.name", "x"]}]}
    condition = compile_condition(source, NOWHERE)
    assert condition.reads == (("endpoint", "name"),)
    assert condition.fields is None


def test_a_condition_reading_plain_paths_is_handed_only_their_top_level_fields() -> None:
    source = {"==": [{"var": "sim.iccid"}, {"var": "endpoint.name"}]}
    condition = compile_condition(source, NOWHERE)
    assert condition.reads == (("endpoint", "name"), ("sim", "iccid"))
    assert condition.fields == ("endpoint", "sim")


def test_a_condition_reading_the_whole_event_is_handed_all_of_it() -> None:
    assert compile_condition({"var": ""}, NOWHERE).fields is None
    assert compile_condition({"==": [1, 1]}, NOWHERE).fields == ()


def test_the_alert_flag_a_conjunct_requires_is_implied_either_way_round() -> None:
    source = {"and": [{"==": [{"var": "x"}, 1]}, {"===": [False, {"var": "alert"}]}]}
    assert implied_alert(source) is False
    assert implied_alert({"==": [{"var": "alert"}, True]}) is True


@pytest.mark.parametrize(
    "source",
    [
        {"==": [{"var": "alert"}, 1]},
        {"!=": [{"var": "alert"}, True]},
        {"==": [{"var": "alert"}, True], "x": 1},
        {"==": [{"var": "alert"}, True, 1]},
        {"or": [{"==": [{"var": "alert"}, True]}]},
    ],
)
def test_no_alert_flag_is_implied_by_anything_but_an_equality_with_a_boolean(source: Any) -> None:
    assert implied_alert(source) is None


def test_ids_implied_by_several_conjuncts_are_those_all_of_them_allow() -> None:
    source = {
        "and": [
            {"==": [19, {"var": ["event_type.id"]}]},
            {"in": [{"var": "event_type.id"}, [3, 19]]},
            {"in": [{"var": "event_source.id"}, [2]]},
        ]
    }
    assert implied_ids(source) == {"type": frozenset({19}), "source": frozenset({2})}


@pytest.mark.parametrize(
    "source",
    [
        {"==": [{"var": "event_type.id"}, True]},
        {"==": [{"var": ["event_type.id", 5]}, 19]},
        {"==": [{"var": "event_type.id"}, -1]},
        {"in": [{"var": "event_severity.id"}, [1, -1]]},
        {"in": [{"var": "event_severity.id"}, []]},
        {"in": [19, {"var": "event_type.id"}]},
        {"!=": [{"var": "event_type.id"}, 19]},
        {"==": [{"var": "event_type.id"}, 19, 3]},
        {"==": [{"var": "event_type.id"}, 19], "x": 1},
    ],
)
def test_no_ids_are_implied_by_what_does_not_pin_them(source: Any) -> None:
    assert implied_ids(source) == {}


def test_strict_equality_with_id_zero_implies_it_and_loose_does_not() -> None:
    assert implied_ids({"===": [{"var": "event_type.id"}, 0]}) == {"type": frozenset({0})}
    assert implied_ids({"==": [{"var": "event_type.id"}, 0]}) == {}


def test_a_condition_evaluated_on_data_json_cannot_carry_fails_as_a_condition_error() -> None:
    with pytest.raises(ConditionError, match="unsupported Python value"):
        compile_condition({"var": "a"}, NOWHERE).evaluate({1: "a"})


def test_a_condition_that_is_not_json_shaped_is_refused_by_the_evaluators_word() -> None:
    with pytest.raises(ConfigError) as caught:
        compile_condition({"==": [1, {2: 3}]}, NOWHERE)
    assert caught.value.where == NOWHERE
    assert caught.value.message.startswith("invalid condition: unsupported Python value")


def test_a_condition_too_long_to_cache_compiles_and_evaluates_all_the_same() -> None:
    names = [f"truck-{number:04d}" for number in range(500)]
    condition = compile_condition({"in": [{"var": "endpoint.name"}, names]}, NOWHERE)
    assert condition.evaluate({"endpoint": {"name": "truck-0042"}}) is True
    assert condition.evaluate({"endpoint": {"name": "truck-9999"}}) is False


def test_the_full_evaluator_is_handed_only_the_fields_a_condition_reads() -> None:
    condition = compile_condition({"==": [{"var": "a"}, 1]}, NOWHERE)
    assert condition.evaluated(EventData({"a": 1, "b": {1: "json cannot carry this"}})) is True


def test_a_condition_failing_on_an_event_says_why() -> None:
    condition = compile_condition({"throw": "out of range"}, NOWHERE)
    failure = condition.evaluated(EventData({}))
    assert isinstance(failure, ConditionError)
    assert str(failure) == 'Thrown: {"type":"out of range"} (in operator: throw)'


def test_every_problem_of_a_condition_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        compile_condition({"and": [{"inn": 1}, {"==": [1]}]}, NOWHERE)
    assert caught.value.message == (
        "invalid condition: unknown operator `inn` at `/and/0`; "
        "`==` takes at least 2 arguments, not 1 at `/and/1`"
    )
    assert caught.value.hint == "did you mean `in`?"


def test_conditions_sharing_one_parsed_event_each_read_the_event() -> None:
    data = EventData({"a": 2, "b": 3}, fields=("a", "b"), share=True)
    first = compile_condition({"+": [{"var": "a"}, 1]}, NOWHERE)
    second = compile_condition({"*": [{"var": "b"}, 2]}, NOWHERE)
    assert first.evaluated(data) == 3
    assert second.evaluated(data) == 6  # the second full evaluation reads the parsed event
    assert first.evaluated(data) == 3
