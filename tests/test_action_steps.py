"""A rule's `actions:` and `on_guard_trip:` lists (`engine.rules.steps`): what each item may
be, and the `file:line` refusal, word for word, when it is not.

An item is `{kind: params}`, judged by the action's own module, or the delayed follow-up
`{after: 2h, do: {kind: params}, cancel_if: {when: ..., condition: ...}}`. Every problem of a
list is reported, each at the line of the item (or key) it is about.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from engine.actions import ACTIONS
from engine.errors import RuleSetError
from engine.rules import EventTypeCatalog, load_rules_text
from engine.rules.model import ActionStep, CancelIf
from engine.rules.steps import parse_steps
from engine.section import Section
from engine.yamlfile import load_yaml

KNOWN = ", ".join(f"`{kind}`" for kind in sorted(ACTIONS))


def problems(text: str) -> list[str]:
    with pytest.raises(RuleSetError) as caught:
        load_rules_text(text, "rules.yaml")
    return [str(error) for error in caught.value.errors]


def rule_with(actions: str, key: str = "actions") -> str:
    """A rule `r` whose `key` holds `actions` (lines of YAML from line 4 on)."""
    extra = "" if key == "actions" else "    actions: [{log: {}}]\n"
    return f"rules:\n  - id: r\n{extra}    {key}:\n{actions}"


def steps_of(text: str, key: str = "actions") -> tuple[tuple[ActionStep, ...] | None, list[str]]:
    """`parse_steps` on a mapping written in YAML: its answer and the problems it recorded."""
    data, errors = load_yaml(text, "rules.yaml")
    assert not errors
    section = Section(data, "rules.yaml", "rule `r`")
    steps = parse_steps(section, key, EventTypeCatalog.bundled())
    return steps, [str(error) for error in section.errors]


# --- the list ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "got"),
    [("5", "the number 5"), ("{log: {}}", "a mapping"), ("log", "the string 'log'")],
)
def test_actions_that_are_not_a_list_are_refused_with_an_example(value: str, got: str) -> None:
    assert problems(f"rules:\n  - id: r\n    actions: {value}\n") == [
        f"rules.yaml:3: rule `r`: `actions` must be a list of actions, got {got}"
        " (e.g. - suspend_sim: {})"
    ]


def test_a_guard_trip_list_that_is_not_a_list_is_refused_by_its_own_name() -> None:
    text = "rules:\n  - id: r\n    actions: [{log: {}}]\n    on_guard_trip:\n"
    assert problems(text) == [
        "rules.yaml:4: rule `r`: `on_guard_trip` must be a list of actions, got nothing (null)"
        " (e.g. - suspend_sim: {})"
    ]


def test_an_empty_list_is_refused_by_its_own_name() -> None:
    text = "rules:\n  - id: r\n    actions: [{log: {}}]\n    on_guard_trip: []\n"
    assert problems(text) == [
        "rules.yaml:4: rule `r`: `on_guard_trip` is empty (add at least one action, e.g. - log: {})"
    ]


def test_a_list_with_one_bad_item_gives_no_steps_and_reports_only_that_item() -> None:
    steps, found = steps_of("actions:\n  - log: {}\n  - lgo: {}\n  - suspend_sim: {}\n")
    assert steps is None
    assert found == ["rules.yaml:3: rule `r`: unknown action `lgo` (did you mean `log`?)"]


def test_every_bad_item_of_a_list_is_reported_at_its_own_line() -> None:
    found = problems(rule_with("      - lgo: {}\n      - log: {}\n      - 7\n      - {}\n"))
    assert found == [
        "rules.yaml:4: rule `r`: unknown action `lgo` (did you mean `log`?)",
        "rules.yaml:6: rule `r`: an action must be a mapping like `suspend_sim: {}`,"
        " got the number 7",
        "rules.yaml:7: rule `r`: an empty action (write e.g. - suspend_sim: {})",
    ]


def test_good_items_become_steps_in_order_with_their_position_and_line() -> None:
    steps, found = steps_of(
        "on_guard_trip:\n  - log: {message: tripped}\n  - suspend_sim:\n", "on_guard_trip"
    )
    assert found == []
    assert steps is not None
    assert [(s.kind, s.index, s.after, s.cancel_if, s.where.line) for s in steps] == [
        ("log", 0, None, None, 2),
        ("suspend_sim", 1, None, None, 3),
    ]
    assert isinstance(steps[0].action, ACTIONS["log"])
    assert isinstance(steps[1].action, ACTIONS["suspend_sim"])  # no parameters: `{}`


# --- one action --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        pytest.param(
            "      -\n        log\n",
            "rules.yaml:5: rule `r`: an action must be a mapping like `suspend_sim: {}`,"
            " got the string 'log'",
            id="text",
        ),
        pytest.param(
            "      - {\n        }\n",
            "rules.yaml:4: rule `r`: an empty action (write e.g. - suspend_sim: {})",
            id="empty",
        ),
        pytest.param(
            "      - {\n         log: {}, suspend_sim: {}}\n",
            "rules.yaml:4: rule `r`: an action item takes exactly one key, the action kind;"
            " found `log`, `suspend_sim` (write one action per list item)",
            id="two kinds",
        ),
        pytest.param(
            "      - foo: 1\n        bar: 2\n",
            "rules.yaml:4: rule `r`: an action item takes exactly one key, the action kind;"
            " found `foo`, `bar` (write one action per list item)",
            id="two unknown keys",
        ),
        pytest.param(
            "      - url: https://hooks.example.com\n        webhook:\n",
            "rules.yaml:4: rule `r`: an action item takes exactly one key, the action kind;"
            " found `url`, `webhook` (indent the parameters under `webhook:`)",
            id="parameters beside the kind",
        ),
        pytest.param(
            "      - webhook: {}\n        url: https://hooks.example.com\n",
            "rules.yaml:4: rule `r`: an action item takes exactly one key, the action kind;"
            " found `webhook`, `url` (write one action per list item)",
            id="parameters beside a kind that has some",
        ),
        pytest.param(
            "      - {\n         lgo: {}}\n",
            "rules.yaml:5: rule `r`: unknown action `lgo` (did you mean `log`?)",
            id="misspelt kind, at the kind",
        ),
        pytest.param(
            "      - zzzzqq: {}\n",
            f"rules.yaml:4: rule `r`: unknown action `zzzzqq` (known actions: {KNOWN})",
            id="unknown kind",
        ),
        pytest.param(
            "      - 5: {}\n",
            f"rules.yaml:4: rule `r`: unknown action `5` (known actions: {KNOWN})",
            id="a number for a kind",
        ),
        pytest.param(
            "      - {\n         log: [1]}\n",
            "rules.yaml:5: rule `r`: `log` takes a mapping of parameters, got a list"
            " (write `log: {}` when there is nothing to set)",
            id="parameters as a list, at the kind",
        ),
        pytest.param(
            "      - log: hi\n",
            "rules.yaml:4: rule `r`: `log` takes a mapping of parameters, got the string 'hi'"
            " (write `log: {}` when there is nothing to set)",
            id="parameters as text",
        ),
        pytest.param(
            "      - {\n         log: {nope: 1}}\n",
            "rules.yaml:5: rule `r`: `log` has no parameter `nope` (allowed: `level`, `message`)",
            id="a parameter the action refuses, at the kind",
        ),
    ],
)
def test_a_bad_action_is_refused_at_its_line_saying_why(item: str, expected: str) -> None:
    assert problems(rule_with(item)) == [expected]


# --- follow-ups --------------------------------------------------------------------------------


def test_a_follow_up_keeps_its_delay_action_position_and_line() -> None:
    steps, found = steps_of("actions:\n  - log: {}\n  - after: 2h\n    do: {activate_sim: {}}\n")
    assert found == []
    assert steps is not None
    follow_up = steps[1]
    assert (follow_up.kind, follow_up.index, follow_up.after) == (
        "activate_sim",
        1,
        timedelta(hours=2),
    )
    assert isinstance(follow_up.action, ACTIONS["activate_sim"])
    assert follow_up.cancel_if is None
    assert follow_up.where.line == 3


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        pytest.param(
            "      - do: {log: {}}\n",
            ["rules.yaml:4: rule `r`: missing `after` (e.g. after: 24h)"],
            id="without after",
        ),
        pytest.param(
            "      - after: 1h\n",
            ["rules.yaml:4: rule `r`: missing `do` (e.g. do: {activate_sim: {}})"],
            id="without do",
        ),
        pytest.param(
            "      - after: 1h\n        do: log\n",
            [
                "rules.yaml:5: rule `r`: `do` must be one action like {activate_sim: {}},"
                " got the string 'log'"
            ],
            id="do as text",
        ),
        pytest.param(
            "      - after: 1h\n        do:\n          lgo: {}\n",
            ["rules.yaml:6: rule `r`: unknown action `lgo` (did you mean `log`?)"],
            id="an unknown action to do",
        ),
        pytest.param(
            "      - after: 1h\n        do: {log: {}, suspend_sim: {}}\n",
            [
                "rules.yaml:5: rule `r`: an action item takes exactly one key, the action kind;"
                " found `log`, `suspend_sim` (write one action per list item)"
            ],
            id="two actions to do",
        ),
        pytest.param(
            "      - after: soon\n        do: {log: {}}\n",
            [
                "rules.yaml:4: rule `r`: `after` is not a duration: the string 'soon' (write a"
                " whole number and a unit (s, m, h, d, w), e.g. 30s, 10m, 24h, 7d or 1h30m)"
            ],
            id="after not a duration",
        ),
        pytest.param(
            "      - after: 1h\n        do: {log: {}}\n        canel_if: {}\n",
            [
                "rules.yaml:6: rule `r`: unknown key `canel_if` in a follow-up action"
                " (did you mean `cancel_if`?)"
            ],
            id="a misspelt key",
        ),
        pytest.param(
            "      - after: 1h\n        do: {log: {}}\n        zzqqxx: 1\n",
            [
                "rules.yaml:6: rule `r`: unknown key `zzqqxx` in a follow-up action"
                " (a follow-up takes `after`, `do`, `cancel_if`)"
            ],
            id="an unknown key",
        ),
        pytest.param(
            "      - after: 1h\n        log: {}\n",
            [
                "rules.yaml:4: rule `r`: missing `do` (e.g. do: {activate_sim: {}})",
                "rules.yaml:5: rule `r`: unknown key `log` in a follow-up action"
                " (put the action under `do:`, e.g. do: {log: {}})",
            ],
            id="the action beside after",
        ),
    ],
)
def test_a_bad_follow_up_is_refused_at_its_line_saying_why(item: str, expected: list[str]) -> None:
    assert problems(rule_with(item)) == expected


@pytest.mark.parametrize(
    "item",
    [
        pytest.param("  - after: 1h\n    do: {log: {}}\n    zz: 1\n", id="an unknown key"),
        pytest.param("  - after: soon\n    do: {log: {}}\n", id="a bad delay"),
        pytest.param("  - after: 1h\n    do: {lgo: {}}\n", id="a bad action"),
        pytest.param("  - do: {log: {}}\n", id="no delay"),
        pytest.param("  - after: 1h\n    do: log\n", id="do not a mapping"),
        pytest.param("  - after: 1h\n    do: {log: {}}\n    cancel_if: {}\n", id="empty cancel_if"),
        pytest.param(
            "  - after: 1h\n    do: {log: {}}\n    cancel_if: {when: {type: nope}}\n",
            id="a bad cancel_if",
        ),
    ],
)
def test_a_follow_up_with_any_problem_gives_no_steps(item: str) -> None:
    steps, found = steps_of(f"actions:\n{item}")
    assert steps is None
    assert len(found) == 1, found


# --- cancel_if ---------------------------------------------------------------------------------


FOLLOW_UP = "      - after: 2h\n        do: {activate_sim: {}}\n        cancel_if:\n"
EMPTY_CANCEL_IF = (
    "rules.yaml:7: rule `r` → cancel_if: `cancel_if` has an empty `when` and no `condition`,"
    " so any event would cancel the follow-up: give `when` or `condition` what to wait for"
)


def cancel_if_of(lines: str) -> CancelIf | None:
    rules = load_rules_text(rule_with("      - log: {}\n" + FOLLOW_UP + lines), "rules.yaml")
    return rules.rules[0].actions[1].cancel_if


def test_a_cancel_if_with_only_when_cancels_on_those_events_whatever_they_hold() -> None:
    cancel_if = cancel_if_of("          when: {type: 8}\n")
    assert cancel_if is not None
    assert cancel_if.when.type_ids == frozenset({8})
    assert cancel_if.condition is None
    assert cancel_if.where.line == 8


def test_a_cancel_if_with_only_a_condition_cancels_on_any_event_that_meets_it() -> None:
    cancel_if = cancel_if_of("          condition: {'==': [{var: event_source.id}, 2]}\n")
    assert cancel_if is not None
    assert cancel_if.when.type_ids is None
    assert cancel_if.condition is not None
    assert cancel_if.condition.source == {"==": [{"var": "event_source.id"}, 2]}


def test_a_cancel_if_condition_that_deserves_a_warning_warns_beside_the_rule() -> None:
    text = rule_with(FOLLOW_UP + "          condition: {in: [vip, {var: endpoint.tags}]}\n")
    text = text.replace("    actions:\n", "    when: {type: 1}\n    actions:\n")
    warnings = [str(w) for w in load_rules_text(text, "rules.yaml").warnings]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(
        'rules.yaml:8: rule `r` → cancel_if: `in` over `endpoint.tags` looks for "vip"'
    )


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        pytest.param(
            "          {}\n",
            ["rules.yaml:7: rule `r` → cancel_if: `cancel_if` needs `when`, `condition` or both"],
            id="empty",
        ),
        pytest.param(
            "          when:\n",
            [EMPTY_CANCEL_IF],
            id="an empty when alone",
        ),
        pytest.param(
            "          when: {}\n          condition:\n",
            [EMPTY_CANCEL_IF],
            id="an empty when and an empty condition",
        ),
        pytest.param(
            "          whn: {type: 8}\n",
            ["rules.yaml:7: rule `r` → cancel_if: unknown key `whn` (did you mean `when`?)"],
            id="misspelt, said once",
        ),
        pytest.param(
            "          whn: 1\n          when: {type: 8}\n",
            ["rules.yaml:7: rule `r` → cancel_if: unknown key `whn` (did you mean `when`?)"],
            id="misspelt beside a good key",
        ),
        pytest.param(
            "          zzqq: 1\n",
            [
                "rules.yaml:7: rule `r` → cancel_if: unknown key `zzqq`"
                " (known keys: `when`, `condition`)"
            ],
            id="unknown",
        ),
        pytest.param(
            "          when: {type: nope}\n",
            [
                "rules.yaml:7: rule `r` → cancel_if → when: unknown event type `nope`"
                " (use the numeric type id)"
            ],
            id="a bad when",
        ),
        pytest.param(
            "          when: x\n",
            ["rules.yaml:7: rule `r` → cancel_if: `when` must be a mapping, got the string 'x'"],
            id="when not a mapping",
        ),
        pytest.param(
            "          condition: {nope: 1}\n",
            [
                "rules.yaml:7: rule `r` → cancel_if: invalid condition: unknown operator `nope`;"
                " did you mean `none`?"
            ],
            id="a bad condition",
        ),
    ],
)
def test_a_bad_cancel_if_is_refused_at_its_line_saying_why(lines: str, expected: list[str]) -> None:
    assert problems(rule_with(FOLLOW_UP + lines)) == expected


def test_a_cancel_if_that_is_not_a_mapping_is_refused() -> None:
    found = problems(
        rule_with("      - after: 2h\n        do: {activate_sim: {}}\n        cancel_if: x\n")
    )
    assert found == ["rules.yaml:6: rule `r`: `cancel_if` must be a mapping, got the string 'x'"]


def test_a_cancel_if_condition_on_a_type_the_catalog_lacks_warns_naming_it() -> None:
    text = rule_with(FOLLOW_UP + "          condition: {'==': [{var: event_type.id}, 999]}\n")
    text = text.replace("    actions:\n", "    when: {type: 1}\n    actions:\n")
    warnings = [str(w) for w in load_rules_text(text, "rules.yaml").warnings]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(
        "rules.yaml:8: rule `r` → cancel_if: event type 999 is not in the catalog"
    )
