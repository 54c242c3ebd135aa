"""Tags match whole tags: `vip` is not `vipersat`, in conditions, in `when` and in `not`.

emnify sends an endpoint's tags as one comma-separated string, in which JsonLogic's `in`
finds text, not tags. The normalized event carries `endpoint.tag_list` (whole tags), the
shorthand has `tags:` and `not: {tags: ...}`, and `validate` warns about `in` over the string.
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from engine.cli import main
from engine.errors import RuleSetError
from engine.events import Event, normalize
from engine.rules import RuleSet, load_rules_text

from helpers import write_rules

QUOTA_USED_UP: dict[str, Any] = {
    "id": 412912410077392,
    "timestamp": "2025-05-01T16:05:03.000Z",
    "alert": True,
    "event_type": {"id": 19, "description": "Quota used up"},
    "event_source": {"id": 1, "description": "Policy Control"},
    "event_severity": {"id": 1, "description": "Warn"},
    "endpoint": {"id": 18345221, "name": "truck-0042", "tags": "fleet,berlin"},
    "sim": {"id": 9123344, "iccid": "8988303000012345678"},
}


def tagged(tags: str | None) -> Event:
    return normalize({**QUOTA_USED_UP, "endpoint": {"id": 5, "name": "truck-5", "tags": tags}})


def rules_of(text: str) -> RuleSet:
    return load_rules_text(textwrap.dedent(text), "test.yaml")


def matching(rules: RuleSet, event: Event) -> list[str]:
    return [rule.id for rule in rules.match(event)]


def test_the_normalized_event_lists_whole_tags_trimmed_in_order() -> None:
    assert tagged(" vipersat , fleet,,fleet").raw["endpoint"]["tag_list"] == ["vipersat", "fleet"]
    assert tagged(None).raw["endpoint"]["tag_list"] == []
    as_list = normalize({**QUOTA_USED_UP, "endpoint": {"id": 5, "tags": ["vip", " x "]}})
    assert as_list.raw["endpoint"]["tag_list"] == ["vip", "x"]
    # The record as received is left as it was.
    record = {**QUOTA_USED_UP}
    normalize(record)
    assert "tag_list" not in record["endpoint"]


def test_events_carry_the_tag_list_only_for_rules_that_may_read_it(tmp_path) -> None:
    from engine.pipeline import Pipeline
    from engine.store import MemoryStore

    reading = rules_of(
        """
        rules:
          - id: vip
            condition: {"in": ["vip", {"var": "endpoint.tag_list"}]}
            actions: [{log: {message: "{{ event.endpoint.tag_list | join('+') }}"}}]
        """
    )
    blind = rules_of("rules:\n  - id: any\n    actions: [{log: {}}]\n")
    assert (reading.reads_tag_list, blind.reads_tag_list) == (True, False)
    record = {**QUOTA_USED_UP, "endpoint": {"id": 5, "name": "truck-5", "tags": "vip,x"}}
    # Without the list the record is its own raw (no copy) and the tags still count.
    plain = normalize(record, tag_list=False)
    assert plain.raw is record and plain.tags == frozenset({"vip", "x"})
    result = Pipeline(reading, MemoryStore()).process([record], source="test")
    assert [p.action.params["message"] for p in result.planned] == ["vip+x"]


def test_a_condition_over_the_tag_list_tells_vip_from_vipersat() -> None:
    rules = rules_of(
        """\
        rules:
          - id: vip-only
            condition: {"in": ["vip", {"var": "endpoint.tag_list"}]}
            actions: [{log: {}}]
          - id: all-but-vip
            condition: {"!": {"in": ["vip", {"var": "endpoint.tag_list"}]}}
            actions: [{log: {}}]
        """
    )
    assert matching(rules, tagged("fleet,vip")) == ["vip-only"]
    assert matching(rules, tagged("vipersat,fleet")) == ["all-but-vip"]
    assert matching(rules, tagged(None)) == ["all-but-vip"]


def test_a_rule_pair_split_on_vip_acts_on_a_vipersat_device_and_shadows_a_vip_one() -> None:
    # The pair the README suggests: act on everything but VIP devices, only watch the VIPs.
    rules = rules_of(
        """\
        rules:
          - id: suspend-on-quota-used-up
            when: {type: 19, not: {tags: vip}}
            actions: [{suspend_sim: {}}]
          - id: watch-vip-quota-used-up
            mode: shadow
            when: {type: 19, tags: vip}
            actions: [{suspend_sim: {}}]
        """
    )
    assert matching(rules, tagged("vipersat")) == ["suspend-on-quota-used-up"]
    assert matching(rules, tagged("fleet, vip")) == ["watch-vip-quota-used-up"]
    assert matching(rules, tagged("")) == ["suspend-on-quota-used-up"]


def test_not_leaves_out_events_with_any_of_its_values_and_says_which() -> None:
    rules = rules_of(
        """\
        rules:
          - id: r
            when:
              type: 19
              not: {tags: [vip, test], iccid: "8988303000000000001", source: api}
            actions: [{log: {}}]
        """
    )
    rule = rules.rules[0]
    assert matching(rules, tagged("fleet,vipersat")) == ["r"]
    assert matching(rules, tagged("test")) == []
    assert rules.explain(tagged("fleet,test"), rule) == (
        "endpoint is tagged test, which the rule excludes"
    )
    api = normalize({**QUOTA_USED_UP, "event_source": {"id": 2}})
    assert rules.explain(api, rule) == "source is API, which the rule excludes"
    other_sim = normalize({**QUOTA_USED_UP, "sim": {"id": 1, "iccid": "8988303000000000001"}})
    assert matching(rules, other_sim) == []


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ('{tags: ","}', "`tags` names no tag"),
        ('{tags: [" , "]}', "`tags` names no tag"),
        ('{not: {tags: ","}}', "`tags` names no tag"),
        ("{not: {}}", "`not` lists nothing to exclude"),
        ("{not: {tgas: vip}}", "unknown key `tgas`"),
        ("{not: {not: {tags: vip}}}", "unknown key `not`"),
        ("{not: vip}", "`not` must be a mapping"),
    ],
)
def test_a_tag_test_that_names_no_tag_is_refused_rather_than_matching_everything(
    when: str, message: str
) -> None:
    with pytest.raises(RuleSetError) as raised:
        rules_of(f"rules:\n  - id: r\n    when: {when}\n    actions: [{{log: {{}}}}]\n")
    assert message in str(raised.value)


def test_validate_warns_of_in_over_the_tag_text_with_its_line_and_still_passes(
    tmp_path: Any, capsys: Any
) -> None:
    path = write_rules(
        tmp_path,
        """\
        rules:
          - id: not-vip
            when: {type: 19}
            condition:
              "!": {"in": ["vip", {"var": "endpoint.tags"}]}
            actions: [{log: {}}]
          - id: whole-tags
            condition: {"in": ["vip", {"var": "endpoint.tag_list"}]}
            actions: [{log: {}}]
        """,
    )
    assert main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, captured.err
    assert f"{path}:4: rule `not-vip`: `in` over `endpoint.tags`" in warnings[0]
    assert '{"in": ["vip", {"var": "endpoint.tag_list"}]}' in warnings[0]
    assert "1 warning(s)" in captured.out


def tag_text_warnings(condition: str) -> list[tuple[str, str | None]]:
    rules = rules_of(
        f"rules:\n  - id: r\n    condition: {condition}\n    actions: [{{log: {{}}}}]\n"
    )
    return [
        (str(warning).removesuffix(f" ({warning.hint})"), warning.hint)
        for warning in rules.warnings
    ]


def test_in_over_the_tag_text_is_warned_of_with_the_needle_it_looks_for() -> None:
    ((message, hint),) = tag_text_warnings('{"in": [7, {"var": ["endpoint.tags", ""]}]}')
    assert message == (
        "test.yaml:3: rule `r`: `in` over `endpoint.tags` looks for 7 inside the "
        "comma-separated tag text, so it matches longer tags too (`vip` is found in `vipersat`)"
    )
    assert hint is not None
    assert hint.startswith('test whole tags: {"in": [7, {"var": "endpoint.tag_list"}]}')


def test_in_over_the_tag_text_with_a_computed_needle_shows_it_as_dots() -> None:
    ((message, hint),) = tag_text_warnings('{"in": [{"var": "x"}, {"var": "endpoint.tags"}]}')
    assert "looks for ... inside" in message
    assert hint is not None and '{"in": [..., ' in hint


def test_each_in_over_the_tag_text_in_a_condition_is_warned_of() -> None:
    condition = (
        '{"or": [{"in": ["a", {"var": "endpoint.tags"}]}, '
        '{"!": {"in": ["b", {"var": "endpoint.tags"}]}}]}'
    )
    found = tag_text_warnings(condition)
    assert ['"a"' in message for message, _ in found] == [True, False]
    assert ['"b"' in message for message, _ in found] == [False, True]


@pytest.mark.parametrize(
    "condition",
    [
        '{"in": ["vip", {"var": "endpoint.tag_list"}]}',
        '{"in": [{"var": "endpoint.tags"}, ["a,b"]]}',
        '{"in": ["vip", {"var": "endpoint.tags"}, 1]}',
        '{"in": ["vip", {"var": []}]}',
        '{"in": ["vip", "endpoint.tags"]}',
        '{"in": ["var", ["var"]]}',
    ],
)
def test_in_over_anything_but_the_tag_text_is_not_warned_of(condition: str) -> None:
    assert tag_text_warnings(condition) == []
