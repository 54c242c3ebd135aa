"""Loading rule files: what operators may write, and the `file:line` errors when they slip."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from engine.actions import ACTIONS
from engine.durations import MAX_DURATION, DurationTooLong
from engine.errors import RuleSetError
from engine.rules import (
    EventTypeCatalog,
    RuleSet,
    Threshold,
    Throttle,
    When,
    load_rules,
    load_rules_text,
    parse_duration,
)

INVALID = Path(__file__).parent / "data" / "rules_invalid"


def write(directory: Path, text: str, name: str = "rules.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(directory: Path, text: str) -> RuleSet:
    return load_rules(write(directory, text))


def problems(path: Path) -> list[str]:
    with pytest.raises(RuleSetError) as caught:
        load_rules(path)
    return [str(error) for error in caught.value.errors]


def only_problem(path: Path) -> str:
    found = problems(path)
    assert len(found) == 1, found
    return found[0]


def when_of(directory: Path, when: str) -> RuleSet:
    return load(
        directory,
        f"""
        rules:
          - id: r
            when: {when}
            actions: [{{log: {{}}}}]
        """,
    )


# --- one test per class of invalid rule: the message carries the exact file:line -------------


def test_yaml_syntax_error_names_the_line_yaml_reports() -> None:
    message = only_problem(INVALID / "yaml_syntax_error.yaml")
    assert message.startswith(f"{INVALID / 'yaml_syntax_error.yaml'}:3: invalid YAML:")


def test_duplicate_yaml_key_is_an_error_not_a_silent_override() -> None:
    message = only_problem(INVALID / "duplicate_yaml_key.yaml")
    assert message.startswith(f"{INVALID / 'duplicate_yaml_key.yaml'}:5: duplicate key `when`")
    assert "first at line 3" in message


def test_unknown_rule_key_suggests_the_known_one() -> None:
    message = only_problem(INVALID / "unknown_rule_key.yaml")
    assert message == (
        f"{INVALID / 'unknown_rule_key.yaml'}:3: rule `misspelt-when`: unknown key `whne` "
        "(did you mean `when`?)"
    )


def test_unknown_when_key_suggests_the_known_one() -> None:
    message = only_problem(INVALID / "unknown_when_key.yaml")
    assert message.startswith(f"{INVALID / 'unknown_when_key.yaml'}:5: ")
    assert "unknown key `severity_level` (did you mean `severity`?)" in message


def test_enabled_given_as_a_quoted_string_is_a_type_error() -> None:
    message = only_problem(INVALID / "enabled_not_bool.yaml")
    assert message == (
        f"{INVALID / 'enabled_not_bool.yaml'}:3: rule `quoted-yes`: "
        "`enabled` must be true or false, got the string 'yes'"
    )


def test_event_type_given_as_a_mapping_is_a_type_error() -> None:
    message = only_problem(INVALID / "type_is_mapping.yaml")
    assert message.startswith(f"{INVALID / 'type_is_mapping.yaml'}:5: rule `type-mapping`")
    assert "`type` must be an event-type id or name, got a mapping" in message


def test_rule_without_id_is_reported_at_the_rule_by_its_position() -> None:
    message = only_problem(INVALID / "missing_id.yaml")
    assert message.startswith(f"{INVALID / 'missing_id.yaml'}:6: rule #2: missing `id`")


def test_rule_without_actions_is_reported_at_the_rule() -> None:
    message = only_problem(INVALID / "missing_actions.yaml")
    assert message.startswith(
        f"{INVALID / 'missing_actions.yaml'}:2: rule `nothing-to-do`: missing `actions`"
    )


def test_empty_action_list_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: idle\n    actions: []\n")
    assert only_problem(path).startswith(f"{path}:3: rule `idle`: `actions` is empty")


def test_duplicate_rule_id_in_one_file_names_both_locations() -> None:
    path = INVALID / "duplicate_rule_id.yaml"
    message = only_problem(path)
    assert message.startswith(f"{path}:5: duplicate rule id `quota-used-up`")
    assert f"first defined at {path}:2" in message


def test_duplicate_rule_id_across_two_files_names_both_files(tmp_path: Path) -> None:
    first = write(tmp_path, "rules:\n  - id: shared\n    actions: [{log: {}}]\n", "a.yaml")
    second = write(
        tmp_path,
        "rules:\n  - id: other\n    actions: [{log: {}}]\n  - id: shared\n"
        "    actions: [{log: {}}]\n",
        "b.yaml",
    )
    message = only_problem(tmp_path)
    assert message.startswith(f"{second}:4: duplicate rule id `shared`")
    assert f"first defined at {first}:2" in message


def test_unknown_action_kind_suggests_the_registered_one() -> None:
    message = only_problem(INVALID / "unknown_action.yaml")
    assert message == (
        f"{INVALID / 'unknown_action.yaml'}:6: rule `typo-in-action`: "
        "unknown action `suspend_simm` (did you mean `suspend_sim`?)"
    )


def test_action_parameters_are_judged_by_the_action_module_at_the_action_line() -> None:
    message = only_problem(INVALID / "action_params_rejected.yaml")
    assert message.startswith(f"{INVALID / 'action_params_rejected.yaml'}:7: ")
    assert "rule `webhook-without-url`" in message
    assert "`url`" in message


def test_parameters_not_indented_under_the_action_get_a_hint() -> None:
    message = only_problem(INVALID / "action_params_not_indented.yaml")
    assert message.startswith(f"{INVALID / 'action_params_not_indented.yaml'}:4: ")
    assert "indent the parameters under `webhook:`" in message


def test_unknown_event_type_name_suggests_a_catalog_name_at_the_item_line() -> None:
    message = only_problem(INVALID / "unknown_event_type_name.yaml")
    assert message.startswith(f"{INVALID / 'unknown_event_type_name.yaml'}:6: ")
    assert "unknown event type `Quota usd up` (did you mean `Quota used up`?)" in message


def test_invalid_severity_name_lists_the_valid_ones() -> None:
    message = only_problem(INVALID / "invalid_severity.yaml")
    assert message.startswith(f"{INVALID / 'invalid_severity.yaml'}:4: ")
    assert "unknown severity `urgent`" in message
    assert "0 Info, 1 Warn, 2 Critical" in message


def test_misspelt_severity_name_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(
        tmp_path, "rules:\n  - id: r\n    when: {severity: critcal}\n    actions: [{log: {}}]\n"
    )
    assert "unknown severity `critcal` (did you mean `critical`?)" in only_problem(path)


def test_invalid_source_name_lists_the_valid_ones() -> None:
    message = only_problem(INVALID / "invalid_source.yaml")
    assert message.startswith(f"{INVALID / 'invalid_source.yaml'}:4: ")
    assert "unknown source `portal`" in message
    assert "1 Policy Control" in message


def test_severity_id_out_of_range_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: r\n    when: {severity: 3}\n    actions: [{log: {}}]\n")
    assert f"{path}:3: " in only_problem(path)
    assert "unknown severity id 3" in only_problem(path)


def test_condition_with_unknown_operator_reports_pointer_and_suggestion() -> None:
    message = only_problem(INVALID / "condition_unknown_operator.yaml")
    assert message == (
        f"{INVALID / 'condition_unknown_operator.yaml'}:5: rule `typo-in-operator`: "
        "invalid condition: unknown operator `inn` at `/!` (did you mean `in`?)"
    )


def test_condition_with_bad_arity_reports_pointer_at_the_condition_line() -> None:
    message = only_problem(INVALID / "condition_bad_arity.yaml")
    assert message.startswith(f"{INVALID / 'condition_bad_arity.yaml'}:5: ")
    assert "`<` takes at least 2 arguments, not 1 at `/and/1`" in message


def test_condition_written_as_a_string_is_refused_as_an_always_true_constant(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        """\
        rules:
          - id: json-in-a-string
            condition: '{"==": [{"var": "alert"}, true]}'
            actions: [{log: {}}]
        """,
    )
    message = only_problem(path)
    assert message.startswith(f"{path}:3: ")
    assert "JsonLogic would read it as a constant" in message
    assert message.endswith(
        '(write the expression as a mapping, e.g. {"==": [{"var": "alert"}, true]})'
    )


def test_bad_follow_up_duration_names_the_format() -> None:
    message = only_problem(INVALID / "bad_duration.yaml")
    assert message.startswith(f"{INVALID / 'bad_duration.yaml'}:7: rule `unblock-later`: ")
    assert "`after` is not a duration: the string '1.5h'" in message
    assert "e.g. 30s, 10m, 24h, 7d or 1h30m" in message


def test_empty_file_has_no_rules() -> None:
    path = INVALID / "empty_file.yaml"
    assert only_problem(path).startswith(f"{path}:1: no rules found in {path}")


def test_empty_rule_list_has_no_rules() -> None:
    path = INVALID / "empty_rule_list.yaml"
    assert only_problem(path).startswith(f"{path}:1: no rules found in {path}")


def test_rule_id_with_spaces_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: block this sim\n    actions: [{log: {}}]\n")
    message = only_problem(path)
    assert message.startswith(f"{path}:2: rule #1: `id` 'block this sim' may only use")


def test_unquoted_iccid_is_refused_with_a_hint_to_quote_it(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "rules:\n  - id: r\n    when:\n      iccid: 8988303000012345678\n"
        "    actions: [{log: {}}]\n",
    )
    message = only_problem(path)
    assert message.startswith(f"{path}:4: ")
    assert "quote it" in message


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        (
            "type",
            "[]",
            "`type` is an empty list, which no event matches (remove the key to match any value)",
        ),
        ("tags", '","', "`tags` names no tag"),
    ],
)
def test_a_when_refusal_points_at_the_line_of_its_key(
    tmp_path: Path, key: str, value: str, says: str
) -> None:
    path = write(
        tmp_path,
        f"rules:\n  - id: r\n    when:\n      alert: true\n      {key}: {value}\n"
        "    actions: [{log: {}}]\n",
    )
    assert only_problem(path) == f"{path}:5: rule `r` → when: {says}"


# What the refusals suggest writing instead.
TYPE_EXAMPLE = '(e.g. type: 19 or type: ["Quota used up"])'
SOURCES_LISTED = "(use one of: 0 Network, 1 Policy Control, 2 API, 1000 Engine)"
WANTS_TEXT = "must be a string or a list of strings, got"


@pytest.mark.parametrize(
    ("when", "says"),
    [
        (
            "{type: []}",
            "when: `type` is an empty list, which no event matches (remove the key to match any "
            "value)",
        ),
        ("{type: zzzzzz}", "when: unknown event type `zzzzzz` (use the numeric type id)"),
        (
            "{type: true}",
            f"when: `type` must be an event-type id or name, got `true` {TYPE_EXAMPLE}",
        ),
        (
            "{type: -1}",
            f"when: `type` must be an event-type id or name, got the number -1 {TYPE_EXAMPLE}",
        ),
        (
            "{severity: true}",
            "when: `severity` must be an id or a name, got `true` (use one of: 0 Info, 1 Warn, "
            "2 Critical)",
        ),
        (
            "{source: 1.5}",
            f"when: `source` must be an id or a name, got the number 1.5 {SOURCES_LISTED}",
        ),
        ("{source: 3}", f"when: unknown source id 3 {SOURCES_LISTED}"),
        ("{endpoint_name: {a: 1}}", f"when: `endpoint_name` {WANTS_TEXT} a mapping"),
        ("{iccid: 5}", f'when: `iccid` {WANTS_TEXT} the number 5 (quote it: iccid: "5")'),
        ("{tags: [5]}", f'when: `tags` {WANTS_TEXT} the number 5 (quote it: tags: "5")'),
        ("{not: {}}", "when → not: `not` lists nothing to exclude (e.g. not: {tags: vip})"),
    ],
)
def test_a_when_value_that_cannot_be_read_is_refused_saying_what_to_write(
    tmp_path: Path, when: str, says: str
) -> None:
    path = write(tmp_path, f"rules:\n  - id: r\n    when: {when}\n    actions: [{{log: {{}}}}]\n")
    assert only_problem(path) == f"{path}:3: rule `r` → {says}"


def test_unknown_top_level_key_suggests_rules(tmp_path: Path) -> None:
    path = write(tmp_path, "rule:\n  - id: r\n    actions: [{log: {}}]\n")
    found = problems(path)
    assert f"{path}:1: unknown top-level key `rule` (did you mean `rules`?)" in found


def test_yaml_tags_that_json_cannot_carry_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "rules:\n  - id: r\n    description: !!binary aGVsbG8=\n    actions: [{log: {}}]\n",
    )
    assert only_problem(path).startswith(f"{path}:3: invalid YAML:")


def test_disabled_rules_are_still_validated(tmp_path: Path) -> None:
    path = write(
        tmp_path, "rules:\n  - id: r\n    enabled: false\n    actions: [{suspend_simm: {}}]\n"
    )
    assert "unknown action `suspend_simm`" in only_problem(path)


@pytest.mark.parametrize(
    ("snippet", "line", "expected"),
    [
        ("mode: canary", 3, "`mode` must be `live` or `shadow`"),
        ("threshold: {count: 0, within: 10m}", 3, "`count` must be a whole number of at least 1"),
        ("threshold: {count: 3}", 3, "missing `within`"),
        ("threshold: {count: 3, within: 10m, per: 'sim iccid'}", 3, "dotted path"),
        ("throttle: {per: sim.iccid}", 3, "missing `for`"),
        ("throttle: {for: 0s}", 3, "`for` must be longer than zero"),
        ("throttle: {for: 1h, per: sim.iccid, burst: 2}", 3, "unknown key `burst`"),
        ("max_actions: {count: 10, within: soon}", 3, "`within` is not a duration"),
        ("schedule: 5", 3, "`schedule` must be a cron expression"),
        ("digest: daily", 3, "`digest` must be a mapping"),
        ("on_guard_trip: [{pagee: {}}]", 3, "unknown action `pagee`"),
    ],
)
def test_reserved_keys_are_shape_checked(
    tmp_path: Path, snippet: str, line: int, expected: str
) -> None:
    path = write(tmp_path, f"rules:\n  - id: r\n    {snippet}\n    actions: [{{log: {{}}}}]\n")
    message = only_problem(path)
    assert message.startswith(f"{path}:{line}: rule `r`"), message
    assert expected in message


def test_follow_up_with_the_action_beside_after_is_told_to_use_do(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        rules:
          - id: r
            actions:
              - after: 24h
                activate_sim: {}
        """,
    )
    found = problems(path)
    assert any(m.startswith(f"{path}:5: ") and "put the action under `do:`" in m for m in found), (
        found
    )


def test_cancel_if_keys_are_checked(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        rules:
          - id: r
            actions:
              - after: 24h
                do: {activate_sim: {}}
                cancel_if: {whn: {type: 8}}
        """,
    )
    message = only_problem(path)
    assert message.startswith(f"{path}:6: ")
    assert "unknown key `whn` (did you mean `when`?)" in message


def test_every_problem_of_the_set_is_reported_not_just_the_first(tmp_path: Path) -> None:
    write(tmp_path, "rules:\n  - id: a\n    enabled: 1\n    actions: [{log: {}}]\n", "a.yaml")
    write(
        tmp_path,
        "rules:\n  - id: b\n    when: {type: nope}\n    actions: [{nope: {}}]\n",
        "b.yaml",
    )
    found = problems(tmp_path)
    assert [m.split(": ")[0] for m in found] == [
        f"{tmp_path / 'a.yaml'}:3",
        f"{tmp_path / 'b.yaml'}:3",
        f"{tmp_path / 'b.yaml'}:4",
    ]


def test_missing_path_and_empty_folder_are_errors(tmp_path: Path) -> None:
    assert "does not exist" in only_problem(tmp_path / "nope.yaml")
    (tmp_path / "empty").mkdir()
    assert "no rule files" in only_problem(tmp_path / "empty")


def test_a_file_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("rules:\n  - id: caf\xe9\n".encode("latin-1"))
    assert only_problem(path).startswith(f"{path}: not UTF-8 text")


# --- what operators may write ------------------------------------------------------------------


FULL_RULE = """\
rules:
  - id: block-sim-on-quota-exhausted
    description: Suspend SIMs whose data quota is used up
    mode: shadow
    when:
      severity: [warn, critical]
      source: policy_control
      type: [19, "Quota used up"]
      alert: true
      iccid: "8988303000012345678"
      endpoint_name: [truck-0042, truck-0043]
      tags: fleet
    condition:
      "!": {"in": ["vip", {"var": "endpoint.tags"}]}
    threshold: {count: 3, within: 10m, per: sim.iccid}
    throttle: {per: sim.iccid, for: 1h}
    # schedule and digest: a rule of their own (they exclude threshold), see test_digest.py
    enabled: true
    max_actions: {count: 100, within: 1h}
    on_guard_trip:
      - log: {message: "guard tripped"}
    actions:
      - suspend_sim: {}
      - webhook: {url: "https://hooks.example.com/ops", body: {text: "SIM {{ event.sim.iccid }}"}}
      - after: 24h
        do: {activate_sim: {}}
        cancel_if:
          when: {type: "SIM activation"}
          condition: {"==": [{"var": "event_source.id"}, 2]}
"""


def test_full_rule_becomes_a_typed_frozen_model(tmp_path: Path) -> None:
    rules = load(tmp_path, FULL_RULE)
    rule = rules.rules[0]
    assert rules.get("block-sim-on-quota-exhausted") is rule
    assert rule.description == "Suspend SIMs whose data quota is used up"
    assert rule.enabled is True
    assert rule.mode == "shadow"
    assert rule.where.line == 2
    assert rule.when.type_ids == {19}
    assert rule.when.source_ids == {1}
    assert rule.when.severity_ids == {1, 2}
    assert rule.when.alert is True
    assert rule.when.iccids == {"8988303000012345678"}
    assert rule.when.endpoint_names == {"truck-0042", "truck-0043"}
    assert rule.when.tags == {"fleet"}
    assert rule.condition is not None
    assert rule.condition_source == {"!": {"in": ["vip", {"var": "endpoint.tags"}]}}
    assert type(rule.condition_source) is dict  # plain data, not the loader's line-aware dict
    assert rule.threshold == Threshold(3, timedelta(minutes=10), "sim.iccid")
    assert rule.throttle == Throttle(timedelta(hours=1), "sim.iccid")
    assert rule.max_actions is not None and rule.max_actions.count == 100
    assert [step.kind for step in rule.on_guard_trip] == ["log"]
    with pytest.raises(AttributeError):
        rule.id = "other"  # type: ignore[misc]


def test_action_steps_keep_kind_position_delay_and_location(tmp_path: Path) -> None:
    rule = load(tmp_path, FULL_RULE).rules[0]
    kinds = [(s.kind, s.index, s.after, s.where.line) for s in rule.actions]
    assert kinds == [
        ("suspend_sim", 0, None, 23),
        ("webhook", 1, None, 24),
        ("activate_sim", 2, timedelta(hours=24), 25),
    ]
    assert all(isinstance(s.action, ACTIONS[s.kind]) for s in rule.actions)
    cancel_if = rule.actions[2].cancel_if
    assert cancel_if is not None
    assert cancel_if.when.type_ids == {8}
    assert cancel_if.condition is not None
    assert rule.actions[0].cancel_if is None


def test_defaults_when_only_id_and_actions_are_given(tmp_path: Path) -> None:
    rule = load(tmp_path, "rules:\n  - id: minimal\n    actions:\n      - log:\n").rules[0]
    assert (rule.description, rule.enabled, rule.mode) == ("", True, "live")
    assert rule.when.type_ids is None and rule.condition is None and rule.condition_source is None
    assert (rule.threshold, rule.throttle, rule.schedule, rule.digest) == (None, None, None, None)
    assert rule.actions[0].kind == "log"  # `log:` with no params means `log: {}`


def test_a_file_may_be_a_bare_list_of_rules(tmp_path: Path) -> None:
    rules = load(tmp_path, "- id: a\n  actions: [{log: {}}]\n- id: b\n  actions: [{log: {}}]\n")
    assert [r.id for r in rules] == ["a", "b"]


def test_folder_loads_yaml_and_yml_files_in_name_order_and_not_recursively(
    tmp_path: Path,
) -> None:
    write(tmp_path, "rules:\n  - id: second\n    actions: [{log: {}}]\n", "b.yml")
    write(tmp_path, "rules:\n  - id: first\n    actions: [{log: {}}]\n", "a.yaml")
    write(tmp_path, "not yaml at all: [", "notes.txt")
    (tmp_path / "nested").mkdir()
    write(tmp_path / "nested", "rules:\n  - id: nested\n    actions: [{log: {}}]\n", "c.yaml")
    assert [r.id for r in load_rules(tmp_path)] == ["first", "second"]


def test_anchors_and_merge_keys_let_rules_share_parts(tmp_path: Path) -> None:
    rules = load(
        tmp_path,
        """\
        rules:
          - id: a
            when: &quota {source: policy_control, type: 19}
            actions: &notify [{log: {}}]
          - id: b
            when: {<<: *quota, severity: critical}
            actions: *notify
        """,
    )
    b = rules.get("b")
    assert b is not None
    assert (b.when.source_ids, b.when.type_ids, b.when.severity_ids) == ({1}, {19}, {2})


def test_unquoted_dates_stay_text(tmp_path: Path) -> None:
    rule = load(
        tmp_path,
        """\
        rules:
          - id: r
            condition: {">": [{"var": "timestamp"}, 2025-05-01]}
            actions: [{log: {}}]
        """,
    ).rules[0]
    assert rule.condition_source == {">": [{"var": "timestamp"}, "2025-05-01"]}


@pytest.mark.parametrize(
    ("written", "ids"),
    [
        ("2", {2}),
        ("critical", {2}),
        ("CRITICAL", {2}),
        ("Warning", {1}),
        ("warn", {1}),
        ("[info, 2]", {0, 2}),
    ],
)
def test_severity_by_id_or_case_insensitive_name(
    tmp_path: Path, written: str, ids: set[int]
) -> None:
    assert when_of(tmp_path, f"{{severity: {written}}}").rules[0].when.severity_ids == ids


@pytest.mark.parametrize(
    ("written", "ids"),
    [
        ("0", {0}),
        ("network", {0}),
        ("policy_control", {1}),
        ("'policy control'", {1}),
        ("'Policy Control'", {1}),
        ("API", {2}),
        ("policy-control", {1}),
        ("'  Policy   Control '", {1}),
        ("[network, api]", {0, 2}),
        ("1000", {1000}),
        ("engine", {1000}),
    ],
)
def test_source_by_id_or_name(tmp_path: Path, written: str, ids: set[int]) -> None:
    assert when_of(tmp_path, f"{{source: {written}}}").rules[0].when.source_ids == ids


@pytest.mark.parametrize(
    ("written", "ids"),
    [
        ("19", {19}),
        ("'Quota used up'", {19}),
        ("'QUOTA USED UP'", {19}),
        ("'Organization blocked'", {12}),
        ("'Organisation blocked'", {12}),
        ("[19, 'SMS quota used up', 11]", {11, 19, 21}),
        ("24", {24}),  # an id the bundled catalog lacks is fine: the live list has more
        ("0", {0}),
    ],
)
def test_type_by_id_or_catalog_name(tmp_path: Path, written: str, ids: set[int]) -> None:
    assert when_of(tmp_path, f"{{type: {written}}}").rules[0].when.type_ids == ids


def test_type_names_resolve_through_the_catalog_given(tmp_path: Path) -> None:
    catalog = EventTypeCatalog.from_records([{"id": 77, "description": "Endpoint limit extension"}])
    path = write(
        tmp_path,
        "rules:\n  - id: r\n    when: {type: endpoint limit extension}\n    actions: [{log: {}}]\n",
    )
    assert load_rules(path, catalog=catalog).rules[0].when.type_ids == {77}


def test_alert_iccid_endpoint_name_and_tags_shorthand(tmp_path: Path) -> None:
    when = (
        when_of(
            tmp_path,
            "{alert: false, iccid: ['8988303000012345678', '8988303000012345722'], "
            "endpoint_name: truck-0042, tags: [fleet, berlin]}",
        )
        .rules[0]
        .when
    )
    assert when.alert is False
    assert when.iccids == {"8988303000012345678", "8988303000012345722"}
    assert when.endpoint_names == {"truck-0042"}
    assert when.tags == {"fleet", "berlin"}


def test_tags_written_as_emnify_comma_string_mean_each_tag(tmp_path: Path) -> None:
    assert when_of(tmp_path, "{tags: 'fleet, berlin'}").rules[0].when.tags == {"fleet", "berlin"}


def test_empty_or_null_when_sets_no_constraint(tmp_path: Path) -> None:
    assert when_of(tmp_path, "").rules[0].when == When()
    assert when_of(tmp_path, "{}").rules[0].when == When()


def test_load_rules_text_names_the_source_in_errors() -> None:
    with pytest.raises(RuleSetError) as caught:
        load_rules_text("rules:\n  - id: r\n", "inline.yaml")
    assert str(caught.value).startswith("inline.yaml:2: rule `r`: missing `actions`")


def test_example_rules_shipped_with_the_engine_load() -> None:
    rules = load_rules(Path(__file__).parent.parent / "rules")
    assert len(rules) >= 1


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("10m", timedelta(minutes=10)),
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d 2h 3m 4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration_reads_units_and_combinations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "1.5h", "30m1h", "1h1h", "10M", "ten minutes", "h"])
def test_parse_duration_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_parse_duration_refuses_what_is_not_text_naming_its_type() -> None:
    with pytest.raises(ValueError, match=r"^a duration must be text like `10m`, got int$"):
        parse_duration(600)  # type: ignore[arg-type]


def test_parse_duration_takes_up_to_ten_years_and_quotes_a_longer_text_cut_short() -> None:
    assert parse_duration("3650d") == MAX_DURATION
    longer = "3650d" + " " * 40 + "1s"
    with pytest.raises(DurationTooLong) as info:
        parse_duration(longer)
    assert str(info.value) == f"{longer[:40]!r} is longer than 10 years"


# --- event-type catalog ------------------------------------------------------------------------


def test_bundled_catalog_resolves_names_case_and_spelling_insensitively() -> None:
    catalog = EventTypeCatalog.bundled()
    assert catalog.id_of("Quota used up") == 19
    assert catalog.id_of("quota_used_up") == 19
    assert catalog.id_of("Organization blocked") == catalog.id_of("organisation BLOCKED") == 12
    assert catalog.id_of("no such type") is None
    assert catalog.name_of(19) == "Quota used up"
    assert 19 in catalog and 24 not in catalog


def test_catalog_from_api_records_uses_description_as_the_name() -> None:
    catalog = EventTypeCatalog.from_records(
        [{"id": 19, "description": "Quota used up"}, {"id": 99, "name": "Something new"}]
    )
    assert catalog.id_of("quota used up") == 19
    assert catalog.id_of("something new") == 99


def test_merged_catalog_prefers_the_newer_names() -> None:
    newer = EventTypeCatalog.from_records([{"id": 19, "description": "Data quota used up"}])
    merged = EventTypeCatalog.bundled().merged(newer)
    assert merged.id_of("data quota used up") == 19
    assert merged.id_of("SIM activation") == 8
