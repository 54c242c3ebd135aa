"""Reading one mapping of a YAML file (engine.section): what each check takes and how it
says what it refuses, and the two conventions of rule files (every problem collected,
each starting with whose it is) and the config file (dotted option names, an empty option
is its default, the first problem raised)."""

from __future__ import annotations

import datetime
from datetime import timedelta

import pytest

from engine.durations import DURATION_HINT
from engine.errors import ConfigError
from engine.section import (
    Section,
    as_flag,
    describe,
    did_you_mean,
    duration,
    number,
    one_of,
    whole_number,
)
from engine.yamlfile import load_yaml


def rule_file(text: str, label: str = "rule `a`") -> Section:
    data, _ = load_yaml(text, "rules.yaml")
    return Section(data, "rules.yaml", label)


def config_file(text: str) -> Section:
    data, _ = load_yaml(text, "config.yaml", json_values=False)
    return Section.config_file(data, "config.yaml")


def problems(section: Section) -> list[str]:
    return [str(error) for error in section.errors]


def refusal(section: Section, read: object) -> str:
    """The config file's first problem, raised while `read` reads it."""
    with pytest.raises(ConfigError) as info:
        read(section)  # type: ignore[operator]
    return str(info.value)


# --- how values are told ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "told"),
    [
        (None, "nothing (null)"),
        (True, "`true`"),
        ("yes", "the string 'yes'"),
        ("x" * 50, f"the string {'x' * 40!r}"),
        (3, "the number 3"),
        (0.5, "the number 0.5"),
        ({"a": 1}, "a mapping"),
        ([1], "a list"),
        (datetime.date(2025, 5, 1), "date"),
    ],
)
def test_a_value_is_told_in_words_a_long_string_cut_short(value: object, told: str) -> None:
    assert describe(value) == told


def test_the_closest_known_word_is_suggested_if_any_is_close() -> None:
    assert did_you_mean("intervall", ["interval", "internal", "initial_lookback"]) == (
        "did you mean `interval`?"
    )
    assert did_you_mean("colour", ["interval", "timeout"]) is None


# --- checks -----------------------------------------------------------------------------------


def test_a_text_key_takes_a_string_says_to_quote_anything_else_and_empty_means_none() -> None:
    rule = rule_file("id: a\ndescription: 5\nnote:\n")
    assert rule.text("description") is None
    assert rule.text("note") is None
    assert rule.text("title", default="untitled") == "untitled"
    assert problems(rule) == [
        "rules.yaml:2: rule `a`: `description` must be a string, got the number 5 (quote it)"
    ]


def test_a_flag_takes_true_or_false_only() -> None:
    rule = rule_file("enabled: yes\nalert: 'yes'\n")
    assert rule.flag("enabled", default=False) is True
    assert rule.flag("alert", default=False) is False
    assert rule.flag("absent", default=True) is True
    assert problems(rule) == [
        "rules.yaml:2: rule `a`: `alert` must be true or false, got the string 'yes'"
    ]
    assert as_flag(False, "x") is False


@pytest.mark.parametrize(
    ("value", "minimum", "taken"),
    [(1, 1, 1), (0, 0, 0), (10**12, 1, 10**12), (0, 1, None), (-1, 0, None), (True, 0, None)],
)
def test_a_whole_number_of_at_least_its_minimum(value: object, minimum: int, taken: object) -> None:
    check = whole_number(minimum)
    if taken is not None:
        assert check(value, "count") == taken
        return
    with pytest.raises(ConfigError) as info:
        check(value, "count")
    assert info.value.message == (
        f"`count` must be a whole number of at least {minimum:,}, got {describe(value)}"
    )


def test_count_and_whole_number_refuse_what_is_not_a_whole_number() -> None:
    rule = rule_file("count: 1.5\nlimit: '3'\nn: 1000\n")
    assert rule.count("count") is None
    assert rule.get("limit", whole_number(1000), 7) == 7
    assert rule.get("n", whole_number(1000), 7) == 1000
    assert problems(rule) == [
        "rules.yaml:1: rule `a`: `count` must be a whole number of at least 1, got the number 1.5",
        "rules.yaml:2: rule `a`: `limit` must be a whole number of at least 1,000, got the "
        "string '3'",
    ]


@pytest.mark.parametrize(
    ("value", "taken"),
    [(0.1, 0.1), (2, 2.0), (1e9, 1e9), (0.05, None), (True, None), ("1", None), (None, None)],
)
def test_a_number_of_at_least_its_minimum_is_taken_as_a_float(
    value: object, taken: float | None
) -> None:
    check = number(0.1)
    if taken is not None:
        assert check(value, "timeout") == taken and type(check(value, "timeout")) is float
        return
    with pytest.raises(ConfigError) as info:
        check(value, "timeout")
    assert (
        info.value.message == f"`timeout` must be a number of at least 0.1, got {describe(value)}"
    )


def test_a_number_refuses_nan() -> None:
    with pytest.raises(ConfigError, match="got the number nan"):
        number(0)(float("nan"), "timeout")


@pytest.mark.parametrize(
    ("value", "taken"),
    [
        ("10m", timedelta(minutes=10)),
        ("1h30m", timedelta(minutes=90)),
        ("1s", timedelta(1 / 86400)),
    ],
)
def test_a_duration_is_written_with_its_unit_and_is_longer_than_zero(
    value: str, taken: timedelta
) -> None:
    assert duration()(value, "for") == taken


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("0s", f"`for` must be longer than zero ({DURATION_HINT})"),
        (10, f"`for` is not a duration: the number 10 ({DURATION_HINT})"),
        ("10 minutes", f"`for` is not a duration: the string '10 minutes' ({DURATION_HINT})"),
        (True, f"`for` is not a duration: `true` ({DURATION_HINT})"),
        (
            "3651d",
            "`for`: '3651d' is longer than 10 years (no window, throttle or delay needs more)",
        ),
    ],
)
def test_a_duration_that_is_zero_bare_or_too_long_is_refused_saying_how_to_write_one(
    value: object, said: str
) -> None:
    with pytest.raises(ConfigError) as info:
        duration()(value, "for")
    assert str(info.value) == said


def test_a_duration_may_be_zero_where_its_reader_allows_it() -> None:
    assert duration(longer_than_zero=False)("0s", "delay") == timedelta(0)


@pytest.mark.parametrize(
    ("value", "taken"),
    [
        (30, timedelta(seconds=30)),
        (1.5, timedelta(seconds=1.5)),
        (0, timedelta(0)),
        ("10m", timedelta(minutes=10)),
        (3650 * 86400, timedelta(days=3650)),
    ],
)
def test_a_config_duration_may_also_be_a_number_of_seconds(value: object, taken: timedelta) -> None:
    assert duration(longer_than_zero=False, seconds=True)(value, "interval") == taken


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (3650 * 86400 + 1, "`interval` must be a number of seconds up to 3650 days"),
        (-(3650 * 86400 + 1), "`interval` must be a number of seconds up to 3650 days"),
        (float("nan"), "`interval` must be a number of seconds up to 3650 days"),
        (
            True,
            f"`interval` is not a duration: `true` ({DURATION_HINT}, or a number of seconds)",
        ),
        (0, f"`interval` must be longer than zero ({DURATION_HINT}, or a number of seconds)"),
    ],
)
def test_a_config_duration_in_seconds_is_bounded_and_never_a_flag(value: object, said: str) -> None:
    with pytest.raises(ConfigError) as info:
        duration(seconds=True)(value, "interval")
    assert str(info.value) == said


def test_one_of_takes_a_listed_word_and_suggests_the_closest_for_a_misspelt_one() -> None:
    check = one_of("debug", "info", "warning")
    assert check("info", "log.level") == "info"
    with pytest.raises(ConfigError) as info:
        check("inf", "log.level")
    assert str(info.value) == (
        "`log.level` must be one of debug, info, warning, got the string 'inf' "
        "(did you mean `info`?)"
    )
    with pytest.raises(ConfigError) as info:
        check(3, "log.level")
    assert str(info.value) == "`log.level` must be one of debug, info, warning, got the number 3"
    with pytest.raises(ConfigError) as info:
        one_of("1", "2")(12, "mode")  # close as text, but not text: no suggestion
    assert info.value.hint is None


# --- a rule file's mapping ----------------------------------------------------------------------


def test_a_rule_files_problems_are_collected_each_with_its_line_and_whose_it_is() -> None:
    rule = rule_file("id: a\ncount: 0\nenabled: 1\n")
    assert rule.count("count") is None
    assert rule.flag("enabled", default=True) is True
    rule.warn("id", "an old spelling", "write it anew")
    assert problems(rule) == [
        "rules.yaml:2: rule `a`: `count` must be a whole number of at least 1, got the number 0",
        "rules.yaml:3: rule `a`: `enabled` must be true or false, got the number 1",
    ]
    assert [str(w) for w in rule.warnings] == [
        "rules.yaml:1: rule `a`: an old spelling (write it anew)"
    ]


def test_a_mapping_without_a_label_says_the_problem_alone() -> None:
    data, _ = load_yaml("\n\nrules: 3\n", "rules.yaml")
    top = Section(data, "rules.yaml")
    top.warn(None, "no rules")
    assert top.count("rules") == 3
    assert top.require("rules") is True
    assert top.require("version", "add `version: 1`") is False
    top.check_keys(["version"])
    assert problems(top) == [
        "rules.yaml:3: missing `version` (add `version: 1`)",
        "rules.yaml:3: unknown key `rules` (known keys: `version`)",
    ]
    assert [str(w) for w in top.warnings] == ["rules.yaml:3: no rules"]


def test_a_rule_key_left_empty_is_a_value_the_check_judges() -> None:
    rule = rule_file("count:\n")
    assert rule.count("count") is None
    assert problems(rule) == [
        "rules.yaml:1: rule `a`: `count` must be a whole number of at least 1, got nothing (null)"
    ]


def test_the_keys_nobody_read_are_reported_with_the_closest_key_read() -> None:
    rule = rule_file("id: a\ndescripton: x\nwhen: {type: 1}\nzzz: 1\n")
    rule.text("id")
    rule.text("description")
    rule.sub("when")
    rule.finish()
    assert problems(rule) == [
        "rules.yaml:2: rule `a`: unknown key `descripton` (did you mean `description`?)",
        "rules.yaml:4: rule `a`: unknown key `zzz` (known keys: `id`, `description`, `when`)",
    ]


def test_a_nested_mapping_is_labelled_by_its_key_or_the_name_given() -> None:
    rule = rule_file("when:\n  type: x\nthen:\n  count: 0\nalso: 5\n")
    when = rule.sub("when")
    then = rule.section("then", "the actions")
    trigger = rule.sub("when", "the trigger")
    assert when is not None and when.label == "rule `a` → when"
    assert trigger is not None and trigger.label == "rule `a` → the trigger"
    assert when.count("type") is None
    assert then.count("count") is None
    assert rule.sub("also", "more") is None
    assert rule.sub("absent") is None
    rule.finish()
    assert problems(rule) == [
        "rules.yaml:2: rule `a` → when: `type` must be a whole number of at least 1, got the "
        "string 'x'",
        "rules.yaml:4: rule `a` → the actions: `count` must be a whole number of at least 1, got "
        "the number 0",
        "rules.yaml:5: rule `a`: `also` must be a mapping, got the number 5",
        "rules.yaml:1: rule `a`: `absent` must be a mapping, got nothing (null)",
    ]


def test_a_section_absent_or_not_a_mapping_reads_on_with_defaults() -> None:
    rule = rule_file("id: a\nthrottle: [1]\nother:\n")
    throttle = rule.section("throttle")
    absent = rule.section("absent")
    empty = rule.section("other")
    assert throttle.count("count") is None and throttle.data == {} and throttle.data.line == 2
    assert absent.data == {} and absent.at().line == 1 and absent.label == "rule `a` → absent"
    assert empty.data == {} and empty.data.line == 3
    rule.finish()
    assert problems(rule) == [
        "rules.yaml:2: rule `a`: `throttle` must be a mapping, got a list",
        "rules.yaml:1: rule `a`: unknown key `id` (known keys: `throttle`, `absent`, `other`)",
    ]


# --- the config file ---------------------------------------------------------------------------


def test_an_option_left_empty_takes_its_default() -> None:
    top = config_file("poller:\n  interval:\n  lookback: 5m\nlog:\n")
    poller = top.section("poller")
    assert poller.get("interval", duration(seconds=True), timedelta(seconds=10)) == timedelta(
        seconds=10
    )
    assert poller.duration("lookback") == timedelta(minutes=5)
    assert top.section("log").get("level", one_of("info", "debug"), "info") == "info"
    assert top.text("title", default="none") == "none"
    poller.finish()
    top.finish()


def test_a_config_files_first_problem_is_raised_with_the_options_dotted_path() -> None:
    top = config_file("api:\n  timeouts:\n    read: 0\n")
    api = top.section("api")
    timeouts = api.section("timeouts")
    assert timeouts.path == "api.timeouts."
    assert refusal(timeouts, lambda s: s.get("read", number(0.1), 1.0)) == (
        "config.yaml:3: `api.timeouts.read` must be a number of at least 0.1, got the number 0"
    )
    assert top.errors == []


def test_an_unknown_option_is_refused_naming_its_path_and_the_known_ones() -> None:
    top = config_file("poller:\n  intervall: 10\n")
    poller = top.section("poller")
    poller.get("interval", duration(seconds=True), None)
    assert refusal(poller, Section.finish) == (
        "config.yaml:2: unknown option `poller.intervall` (did you mean `interval`?)"
    )
    top = config_file("poller:\n  zzz: 10\n")
    assert refusal(top.section("poller"), lambda s: s.check_keys(["interval", "lookback"])) == (
        "config.yaml:2: unknown option `poller.zzz` (known options: `interval`, `lookback`)"
    )


def test_an_option_that_should_be_a_mapping_is_refused_at_once() -> None:
    top = config_file("\nlog: debug\n")
    assert refusal(top, lambda s: s.section("log")) == (
        "config.yaml:2: `log` must be a mapping, got the string 'debug'"
    )
    assert refusal(top, lambda s: s.sub("log")) == (
        "config.yaml:2: `log` must be a mapping, got the string 'debug'"
    )


def test_a_list_of_mappings_is_read_with_each_entrys_index() -> None:
    top = config_file("users:\n  - {name: a}\n  - {name: b}\nnone: []\n")
    users = top.entries("users", "users", "users: [{name: a}]")
    assert [(index, item["name"]) for index, item in users] == [(0, "a"), (1, "b")]
    assert users[1][1].line == 3
    assert top.entries("none", "users") == []
    assert top.entries("absent", "users", at_least_one=True) == []
    top.finish()


@pytest.mark.parametrize(
    ("text", "at_least_one", "said"),
    [
        (
            "title: x\nusers: {name: a}\n",
            False,
            "config.yaml:2: `users` must be a list of users, got a mapping (users: [{name: a}])",
        ),
        (
            "title: x\nusers: []\n",
            True,
            "config.yaml:2: `users` must be a list of users, got a list (users: [{name: a}])",
        ),
        (
            "users:\n  - {name: a}\n  - admin\n",
            False,
            "config.yaml:3: `users[1]` must be a mapping, got the string 'admin' "
            "(users: [{name: a}])",
        ),
    ],
)
def test_a_list_of_mappings_refuses_anything_else_at_its_line_with_an_example(
    text: str, at_least_one: bool, said: str
) -> None:
    top = config_file(text)
    assert (
        refusal(
            top,
            lambda s: s.entries("users", "users", "users: [{name: a}]", at_least_one=at_least_one),
        )
        == said
    )


def test_the_options_of_a_list_entry_are_named_by_the_entrys_own_path() -> None:
    top = config_file("ui:\n  users:\n    - {name: a, role: boss}\n")
    ui = top.section("ui")
    ((_, item),) = ui.entries("users", "users")
    user = Section.config_file(item, ui.file)
    user.path = "ui.users[0]."
    assert refusal(user, lambda s: s.get("role", one_of("viewer", "admin"), "viewer")) == (
        "config.yaml:3: `ui.users[0].role` must be one of viewer, admin, got the string 'boss'"
    )
    ui.finish()
