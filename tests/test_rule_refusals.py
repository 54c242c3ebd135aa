"""What one rule may say, and every refusal word for word at its `file:line`.

Operators read these messages to fix their rules: each test pins a refusal whole (where it
points, what it says, what it suggests), and what the rule reads when it is accepted.
"""

from __future__ import annotations

import textwrap
from datetime import timedelta

import pytest

from engine.errors import ConfigError, Location, RuleSetError
from engine.rules import EventTypeCatalog, RuleSet, load_rules_text
from engine.rules.catalog import TypicalOrigin
from engine.rules.model import Rule
from engine.rules.rule_parser import DEFAULT_FORGET_AFTER, parse_rule, rule_id
from engine.yamlfile import YamlList, load_yaml

LOG = "actions: [{log: {}}]"
USAGE_HINT = (
    "a usage rule is fed by the Data Streamer's usage records, not by events; use "
    "`condition` to pick records, or a separate rule for events"
)
KNOWN_LOOKUPS = "known lookups: `quota.data`, `quota.sms`, `stats.month`, `connectivity`"


def rules(text: str, catalog: EventTypeCatalog | None = None) -> RuleSet:
    return load_rules_text(textwrap.dedent(text), catalog=catalog)


def refusals(text: str, catalog: EventTypeCatalog | None = None) -> list[str]:
    with pytest.raises(RuleSetError) as caught:
        rules(text, catalog)
    return [str(error) for error in caught.value.errors]


def one_rule(text: str) -> str:
    """A rule of `rules:` with `text` (its lines after `id: r`) and a log action."""
    return "rules:\n  - id: r\n" + textwrap.indent(textwrap.dedent(text), "    ") + f"    {LOG}\n"


# --- the rule itself and its id ------------------------------------------------------------


def test_a_rule_that_is_not_a_mapping_is_refused_by_its_position() -> None:
    assert refusals("rules: [5]") == [
        "<rules>:1: rule #1 must be a mapping with `id`, `when`, `actions`, ..., got the number 5"
    ]


def test_a_rule_without_an_id_is_told_how_to_write_one() -> None:
    assert refusals(f"rules:\n  - {LOG}\n  - {{{LOG}}}\n") == [
        "<rules>:2: rule #1: missing `id` (add e.g. `id: block-sim-on-quota-exhausted`)",
        "<rules>:3: rule #2: missing `id` (add e.g. `id: block-sim-on-quota-exhausted`)",
    ]


def test_an_id_that_is_not_text_is_told_to_quote_it() -> None:
    assert refusals(f"rules:\n  - id: 5\n    {LOG}\n") == [
        "<rules>:2: rule #1: `id` must be a string, got the number 5 (quote it)"
    ]


def test_an_id_with_other_characters_is_refused_saying_which_it_may_use() -> None:
    assert refusals(f"rules:\n  - id: a/b\n    {LOG}\n") == [
        "<rules>:2: rule #1: `id` 'a/b' may only use letters, digits, `_`, `.` and `-` "
        "(e.g. block-sim-on-quota-exhausted)"
    ]


def test_an_id_of_letters_digits_dots_dashes_and_underscores_is_valid() -> None:
    assert rules(f"rules:\n  - id: Az09_.-x\n    {LOG}\n").rules[0].id == "Az09_.-x"
    data, _ = load_yaml("{id: a b}", "<rules>")
    assert rule_id(data) is None  # type: ignore[arg-type]
    data, _ = load_yaml("{id: 7}", "<rules>")
    assert rule_id(data) is None  # type: ignore[arg-type]


def test_a_rule_reads_its_defaults_when_only_id_and_actions_are_written() -> None:
    rule = rules(f"rules:\n  - id: r\n    description:\n    {LOG}\n").rules[0]
    assert rule.description == ""
    assert rule.enabled is True
    assert rule.mode == "live"
    assert rule.on_own_actions is False
    assert rule.condition is None and rule.condition_source is None
    assert rule.on_guard_trip == ()
    assert rule.lookup == () and rule.lookup_condition is None
    assert rule.on_lookup_error == "skip"
    assert (rule.threshold, rule.throttle, rule.max_actions) == (None, None, None)
    assert (rule.schedule, rule.digest, rule.absence, rule.usage) == (None, None, None, None)
    assert rule.organisation is None
    assert rule.definition == {"id": "r", "description": None, "actions": [{"log": {}}]}


def test_a_null_condition_is_no_condition() -> None:
    rule = rules(one_rule("condition:\n")).rules[0]
    assert rule.condition is None and rule.condition_source is None


def test_on_own_actions_and_a_guard_trip_are_read() -> None:
    rule = rules(
        one_rule(
            "on_own_actions: true\nmax_actions: {count: 2, within: 1h}\n"
            "on_guard_trip: [{log: {}}]\n"
        )
    ).rules[0]
    assert rule.on_own_actions is True
    assert [step.kind for step in rule.on_guard_trip] == ["log"]


def test_a_mode_other_than_live_or_shadow_is_refused_naming_what_was_written() -> None:
    assert refusals(one_rule("mode: 3\n")) == [
        "<rules>:3: rule `r`: `mode` must be `live` or `shadow`, got the number 3"
    ]


def test_a_when_that_is_not_a_mapping_is_refused() -> None:
    assert refusals(one_rule("when: [1]\n")) == [
        "<rules>:3: rule `r`: `when` must be a mapping, got a list"
    ]


# --- lookup and on_lookup_error ------------------------------------------------------------


def test_a_lookup_list_reads_known_names_in_order() -> None:
    rule = rules(
        one_rule(
            "lookup: [stats.month, quota.data]\non_lookup_error: act\n"
            "condition: {'>': [{var: quota.data.volume}, 1]}\n"
        )
    ).rules[0]
    assert rule.lookup == ("stats.month", "quota.data")
    assert rule.on_lookup_error == "act"
    # The condition waits for the facts: it is judged after the lookup, not by the index.
    assert rule.condition is None
    assert rule.lookup_condition is not None
    assert rule.condition_source == {">": [{"var": "quota.data.volume"}, 1]}


def test_on_lookup_error_skip_is_read() -> None:
    rule = rules(one_rule("lookup: [quota.sms]\non_lookup_error: skip\n")).rules[0]
    assert rule.on_lookup_error == "skip"


def test_a_lookup_that_is_not_a_list_of_names_is_refused_listing_the_known_ones() -> None:
    expected = f"`lookup` must be a list of names, got %s ({KNOWN_LOOKUPS})"
    assert refusals(one_rule("lookup: []\n")) == ["<rules>:3: rule `r`: " + expected % "a list"]
    assert refusals(one_rule("lookup: quota.data\n")) == [
        "<rules>:3: rule `r`: " + expected % "the string 'quota.data'"
    ]


def test_each_bad_lookup_name_is_refused_at_its_own_line() -> None:
    text = one_rule("lookup:\n  - quota.data\n  - quota.data\n  - 5\n  - quota.dta\n  - zzz\n")
    assert refusals(text) == [
        "<rules>:5: rule `r`: lookup `quota.data` is listed twice",
        f"<rules>:6: rule `r`: unknown lookup the number 5 ({KNOWN_LOOKUPS})",
        "<rules>:7: rule `r`: unknown lookup `quota.dta` (did you mean `quota.data`?)",
        f"<rules>:8: rule `r`: unknown lookup `zzz` ({KNOWN_LOOKUPS})",
    ]


def test_on_lookup_error_without_lookup_or_of_another_word_is_refused() -> None:
    assert refusals(one_rule("on_lookup_error: act\n")) == [
        "<rules>:3: rule `r`: `on_lookup_error` needs `lookup`"
    ]
    assert refusals(one_rule("lookup: [quota.data]\non_lookup_error: maybe\n")) == [
        "<rules>:4: rule `r`: `on_lookup_error` must be `skip` or `act`, got the string "
        "'maybe' (`skip`: record `lookup unavailable` and do not act; `act`: act as if it "
        "held)"
    ]


@pytest.mark.parametrize(
    "other",
    [
        "absence: {for: 1h, per: endpoint.id}\n",
        "schedule: '0 8 * * *'\ndigest: {}\n",
    ],
)
def test_a_lookup_on_a_rule_that_acts_on_no_single_event_is_refused(other: str) -> None:
    assert refusals(one_rule("lookup: [quota.data]\n" + other)) == [
        "<rules>:3: rule `r`: `lookup` fetches facts for one event's endpoint: an absence or "
        "digest rule acts on no single event (drop `lookup`, or judge the event in a rule of "
        "its own)"
    ]


# --- threshold, throttle, max_actions --------------------------------------------------------


def test_threshold_throttle_and_max_actions_are_read_whole() -> None:
    rule = rules(
        one_rule(
            "threshold: {count: 3, within: 10m, per: sim.iccid}\n"
            "throttle: {for: 1h, per: endpoint.id}\n"
            "max_actions: {count: 5, within: 2h}\n"
        )
    ).rules[0]
    assert (rule.threshold.count, rule.threshold.within, rule.threshold.per) == (  # type: ignore[union-attr]
        3,
        timedelta(minutes=10),
        "sim.iccid",
    )
    assert (rule.throttle.period, rule.throttle.per) == (timedelta(hours=1), "endpoint.id")  # type: ignore[union-attr]
    assert (rule.max_actions.count, rule.max_actions.within) == (5, timedelta(hours=2))  # type: ignore[union-attr]


def test_an_empty_per_groups_nothing() -> None:
    rule = rules(one_rule("threshold: {count: 3, within: 10m, per: }\n")).rules[0]
    assert rule.threshold is not None and rule.threshold.per is None


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "threshold: {per: x}",
            [
                "rule `r` → threshold: missing `count` (e.g. count: 3)",
                "rule `r` → threshold: missing `within` (e.g. within: 10m)",
            ],
        ),
        (
            "threshold: {count: 3, within: 1m, per: 'a b', over: 1}",
            [
                "rule `r` → threshold: unknown key `over` (known keys: `count`, `within`, `per`)",
                "rule `r` → threshold: `per` must be a dotted path into the event, got the "
                "string 'a b' (e.g. sim.iccid or endpoint.id)",
            ],
        ),
        ("throttle: {}", ["rule `r` → throttle: missing `for` (e.g. for: 1h)"]),
        (
            "throttle: {for: 1h, per: 5}",
            [
                "rule `r` → throttle: `per` must be a dotted path into the event, got the "
                "number 5 (e.g. sim.iccid or endpoint.id)"
            ],
        ),
        (
            "max_actions: {}",
            [
                "rule `r` → max_actions: missing `count` (e.g. count: 100)",
                "rule `r` → max_actions: missing `within` (e.g. within: 1h)",
            ],
        ),
    ],
)
def test_threshold_throttle_and_max_actions_refusals(snippet: str, expected: list[str]) -> None:
    assert refusals(one_rule(snippet + "\n")) == [f"<rules>:3: {m}" for m in expected]


# --- organisation ------------------------------------------------------------------------


def test_an_organisation_that_is_not_a_name_is_refused() -> None:
    assert refusals(one_rule("organisation: ''\n")) == [
        "<rules>:3: rule `r`: `organisation` must be the name of an organisation, got the "
        "string '' (e.g. organisation: acme (a name under `organisations:` in the config))"
    ]
    assert refusals(one_rule("organisation: 5\n"))[0].startswith(
        "<rules>:3: rule `r`: `organisation` must be the name of an organisation, got the number 5"
    )


def test_any_organisation_is_taken_where_the_configured_ones_are_not_known() -> None:
    assert rules(one_rule("organisation: acme\n")).rules[0].organisation == "acme"


# --- usage -------------------------------------------------------------------------------


def test_a_usage_limit_is_read_with_its_per() -> None:
    for written, per in [
        ("", "endpoint.id"),
        ("per: sim", "sim.id"),
        ("per: iccid", "sim.iccid"),
        ("per: endpoint", "endpoint.id"),
        ("per: record.owner", "record.owner"),
    ]:
        text = f"rules:\n  - id: r\n    usage: {{sms: '>=3', within: 1h, {written}}}\n    {LOG}\n"
        usage = rules(text).rules[0].usage
        assert usage is not None
        assert (usage.traffic, usage.above, usage.inclusive, usage.within, usage.per) == (
            "sms",
            3,
            True,
            timedelta(hours=1),
            per,
        )


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (
            "{data: '>1MB', sms: '>3', within: 1h}",
            [
                '`usage` needs one of `data` or `sms`, not both (e.g. data: ">200MB" or '
                'sms: ">100"; a rule of its own for the other)'
            ],
        ),
        (
            "{within: 1h}",
            [
                '`usage` needs one of `data` or `sms` (e.g. data: ">200MB" or '
                'sms: ">100"; a rule of its own for the other)'
            ],
        ),
        (
            "{data: lots, per: 'a b', over: 1}",
            [
                "unknown key `over` (known keys: `data`, `sms`, `within`, `per`)",
                "`data` 'lots' is not a comparison like \">200MB\"",
                "missing `within` (e.g. within: 24h)",
                "`per` must be endpoint, sim, iccid or a dotted path into the usage record, "
                "got the string 'a b' (e.g. per: endpoint)",
            ],
        ),
    ],
)
def test_usage_refusals(usage: str, expected: list[str]) -> None:
    text = f"rules:\n  - id: r\n    usage: {usage}\n    {LOG}\n"
    assert refusals(text) == [f"<rules>:3: rule `r` → usage: {m}" for m in expected]


@pytest.mark.parametrize("key", ["when", "threshold", "absence", "schedule", "digest", "lookup"])
def test_a_usage_rule_refuses_what_picks_counts_or_collects_events(key: str) -> None:
    value = {
        "when": "{type: 1}",
        "threshold": "{count: 1, within: 1h}",
        "absence": "{for: 1h, per: x}",
        "schedule": "'0 8 * * *'",
        "digest": "{}",
        "lookup": "[quota.data]",
    }[key]
    text = one_rule(f"usage: {{data: '>1MB', within: 1h}}\n{key}: {value}\n")
    found = refusals(text)
    assert f"<rules>:4: rule `r`: `{key}` cannot be combined with `usage` ({USAGE_HINT})" in found


# --- absence -----------------------------------------------------------------------------


def test_an_absence_is_read_with_its_keys_as_the_event_writes_them() -> None:
    rule = rules(
        one_rule(
            "absence:\n  for: 1h\n  per: sim.iccid\n  forget_after: 2h\n"
            "  keys: [' 8988 ', 42, '8988', b]\n"
        )
    ).rules[0]
    assert rule.absence is not None
    assert rule.absence.period == timedelta(hours=1)
    assert rule.absence.per == "sim.iccid"
    assert rule.absence.forget_after == timedelta(hours=2)
    assert rule.absence.keys == ("8988", "42", "b")


def test_an_absence_forgets_a_key_after_30_days_unless_told() -> None:
    absence = rules(one_rule("absence: {for: 1h, per: endpoint.id}\n")).rules[0].absence
    assert absence is not None
    assert absence.forget_after == DEFAULT_FORGET_AFTER == timedelta(days=30)
    assert absence.keys == ()


@pytest.mark.parametrize(
    ("absence", "expected"),
    [
        (
            "{}",
            [
                "<rules>:3: rule `r` → absence: missing `for` (e.g. for: 6h)",
                "<rules>:3: rule `r` → absence: missing `per` (e.g. per: endpoint.id)",
            ],
        ),
        (
            "{for: 2h, per: endpoint.id, forget_after: 2h}",
            [
                "<rules>:3: rule `r` → absence: `forget_after` (2h) must be longer than `for` "
                "(2h): a key would be forgotten before it could fire (e.g. forget_after: 14h)"
            ],
        ),
        (
            "{for: 2h, per: endpoint.id, keys: []}",
            [
                "<rules>:3: rule `r` → absence: `keys` must be a list of the `per` field's "
                'values, got a list (e.g. keys: ["8988303000000000001", "8988303000000000002"] '
                "with per: sim.iccid)"
            ],
        ),
        (
            "{for: 2h, per: endpoint.id, keys: x}",
            [
                "<rules>:3: rule `r` → absence: `keys` must be a list of the `per` field's "
                "values, got the string 'x' (e.g. keys: [\"8988303000000000001\", "
                '"8988303000000000002"] with per: sim.iccid)'
            ],
        ),
    ],
)
def test_absence_refusals(absence: str, expected: list[str]) -> None:
    assert refusals(f"rules:\n  - id: r\n    absence: {absence}\n    {LOG}\n") == expected


def test_an_absence_refusal_points_at_the_line_of_its_key() -> None:
    text = one_rule("absence:\n  for: 2h\n  per:\n  forget_after: 1h\n  keys: []\n")
    assert refusals(text) == [
        "<rules>:5: rule `r` → absence: `per` must be a dotted path into the event, got "
        "nothing (null) (e.g. sim.iccid or endpoint.id)",
        "<rules>:6: rule `r` → absence: `forget_after` (1h) must be longer than `for` (2h): a "
        "key would be forgotten before it could fire (e.g. forget_after: 14h)",
        "<rules>:7: rule `r` → absence: `keys` must be a list of the `per` field's values, got "
        'a list (e.g. keys: ["8988303000000000001", "8988303000000000002"] with per: '
        "sim.iccid)",
    ]


def test_an_absence_without_a_field_to_watch_is_refused_not_loaded_as_an_event_rule() -> None:
    # It loaded as an ordinary rule, acting on every event, before.
    assert refusals(one_rule("absence: {for: 1h, per: }\n")) == [
        "<rules>:3: rule `r` → absence: `per` must be a dotted path into the event, got "
        "nothing (null) (e.g. sim.iccid or endpoint.id)"
    ]


def test_a_forget_after_just_longer_than_for_is_taken() -> None:
    absence = rules(one_rule("absence: {for: 2h, per: x, forget_after: 121m}\n")).rules[0].absence
    assert absence is not None and absence.forget_after == timedelta(minutes=121)


def test_each_absence_key_that_is_not_text_or_a_whole_number_is_refused_at_its_line() -> None:
    text = one_rule(
        "absence:\n  for: 1h\n  per: x\n  keys:\n    - ok\n    - ' '\n    - true\n    - 1.5\n"
    )
    hint = '(quote ICCIDs: "8988303000000000001")'
    refused = "rule `r` → absence: `keys` items must be text or whole numbers, got"
    assert refusals(text) == [
        f"<rules>:8: {refused} the string ' ' {hint}",
        f"<rules>:9: {refused} `true` {hint}",
        f"<rules>:10: {refused} the number 1.5 {hint}",
    ]


def _with_keys(count: int) -> Rule | list[ConfigError]:
    """A rule whose absence lists `count` keys, parsed without writing them as YAML."""
    data, _ = load_yaml(one_rule("absence:\n  for: 1h\n  per: x\n  keys: [k]\n"), "<rules>")
    rule = data["rules"][0]  # type: ignore[index]
    keys = YamlList(rule["absence"].line)
    keys.extend(str(n) for n in range(count))
    rule["absence"]["keys"] = keys
    return parse_rule(rule, Location("<rules>", 2), 1, EventTypeCatalog.bundled())


def test_an_absence_may_watch_at_most_a_hundred_thousand_keys_from_the_start() -> None:
    found = _with_keys(100_001)
    assert isinstance(found, list)
    assert [str(error) for error in found] == [
        "<rules>:6: rule `r` → absence: `keys` may list at most 100,000 keys, got 100,001"
    ]
    rule = _with_keys(100_000)
    assert isinstance(rule, Rule) and rule.absence is not None
    assert len(rule.absence.keys) == 100_000


def test_an_absence_rule_refuses_what_counts_throttles_or_collects_events() -> None:
    text = one_rule(
        "absence: {for: 1h, per: endpoint.id}\n"
        "threshold: {count: 1, within: 1h}\n"
        "throttle: {for: 1h}\n"
        "schedule: '0 8 * * *'\n"
        "digest: {}\n"
        "max_actions: {count: 1, within: 1h}\n"
        "on_guard_trip: [{log: {}}]\n"
    )
    hint = "(an absence rule fires once per silence; use a separate rule)"
    found = [m for m in refusals(text) if "`absence`" in m]
    assert found == [
        f"<rules>:{line}: rule `r`: `{key}` cannot be combined with `absence` {hint}"
        for line, key in enumerate(
            ["threshold", "throttle", "schedule", "digest", "max_actions", "on_guard_trip"], 4
        )
    ]


def test_an_absence_rule_refuses_cancel_if_on_its_follow_ups() -> None:
    text = (
        "rules:\n  - id: r\n    absence: {for: 1h, per: endpoint.id}\n    actions:\n"
        "      - log: {}\n      - after: 1h\n        do: {log: {}}\n"
        "        cancel_if: {when: {type: 1}}\n"
    )
    assert refusals(text) == [
        "<rules>:6: rule `r`: `cancel_if` is not used on an absence rule's follow-ups (the key "
        "being seen again re-arms the rule; it does not cancel follow-ups)"
    ]


# --- schedule and digest -------------------------------------------------------------------


def test_a_digest_is_read_with_its_defaults_and_a_schedule_with_single_spaces() -> None:
    rule = rules(one_rule("schedule: ' 0  8 * *   * '\ndigest: {}\n")).rules[0]
    assert rule.schedule == "0 8 * * *"
    assert rule.digest is not None
    assert rule.digest.max_events == 100
    assert rule.digest.include is None
    assert rule.digest.send_empty is False
    assert rule.digest.timezone == "UTC"


def test_a_digest_is_read_whole() -> None:
    digest = (
        rules(
            one_rule(
                "schedule: '0 8 * * *'\n"
                "digest: {max_events: 10000, include: [id, sim.iccid], send_empty: true, "
                "timezone: Europe/Berlin}\n"
            )
        )
        .rules[0]
        .digest
    )
    assert digest is not None
    assert (digest.max_events, digest.include, digest.send_empty, digest.timezone) == (
        10_000,
        ("id", "sim.iccid"),
        True,
        "Europe/Berlin",
    )


def test_an_empty_digest_timezone_is_utc() -> None:
    digest = rules(one_rule("schedule: '0 8 * * *'\ndigest: {timezone: ''}\n")).rules[0].digest
    assert digest is not None and digest.timezone == "UTC"


def test_a_digest_refusal_points_at_the_line_of_its_key() -> None:
    text = one_rule(
        "schedule: '0 8 * * *'\ndigest:\n  send_empty: true\n  max_events: 10001\n"
        "  timezone: Mars/Base\n  include: 5\n"
    )
    assert [m.split(" → digest: ")[1][:14] for m in refusals(text)] == [
        "`max_events` m",
        "`timezone`: un",
        "`include` must",
    ]
    assert [m.split(" → digest: ")[0] for m in refusals(text)] == [
        "<rules>:6: rule `r`",
        "<rules>:7: rule `r`",
        "<rules>:8: rule `r`",
    ]


def test_a_digest_refused_for_its_own_settings_is_not_judged_further_as_a_digest() -> None:
    text = (
        "rules:\n  - id: r\n    schedule: '0 8 * * *'\n    digest: {timezone: Mars/Base}\n"
        "    actions: [{suspend_sim: {}}]\n"
    )
    assert refusals(text) == [
        "<rules>:4: rule `r` → digest: `timezone`: unknown time zone 'Mars/Base' (use an "
        "IANA name, e.g. Europe/Berlin)"
    ]


def test_a_schedule_is_checked_by_the_cron_check_given() -> None:
    seen: list[str] = []

    def cron(value: str) -> None:
        seen.append(value)
        raise ValueError("no such minute")

    with pytest.raises(RuleSetError) as caught:
        load_rules_text(one_rule("schedule: '99 8 * * *'\ndigest: {}\n"), cron=cron)
    assert seen == ["99 8 * * *"]
    assert [str(e) for e in caught.value.errors] == [
        "<rules>:3: rule `r`: `schedule` '99 8 * * *' is not valid: no such minute (five "
        'crontab fields: minute hour day month weekday, e.g. "0 8 * * *" or "0 8 * * 1-5")'
    ]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            "schedule: ' '\ndigest: {}\n",
            [
                "<rules>:3: rule `r`: `schedule` must be a cron expression, got the string ' ' "
                '(e.g. "0 8 * * *")'
            ],
        ),
        (
            "schedule: '0 8 * *'\ndigest: {}\n",
            [
                "<rules>:3: rule `r`: `schedule` '0 8 * *' is not valid: a schedule has 5 fields, "
                'got 4 (five crontab fields: minute hour day month weekday, e.g. "0 8 * * *" or '
                '"0 8 * * 1-5")'
            ],
        ),
        (
            "schedule: '0 8 * * *'\n"
            "digest: {max_events: 10001, timezone: Mars/Base, include: []}\n",
            [
                "<rules>:4: rule `r` → digest: `max_events` must be at most 10,000, got 10,001 "
                "(the digest's `count` still tells how many events there were)",
                "<rules>:4: rule `r` → digest: `include` must be a list of event fields, got a "
                "list (e.g. include: [id, timestamp, sim.iccid, endpoint.name])",
                "<rules>:4: rule `r` → digest: `timezone`: unknown time zone 'Mars/Base' (use an "
                "IANA name, e.g. Europe/Berlin)",
            ],
        ),
        (
            "schedule: '0 8 * * *'\ndigest:\n  include:\n    - sim.iccid\n    - 'a b'\n    - 5\n",
            [
                "<rules>:7: rule `r` → digest: `include` items must be dotted paths into the "
                "event, got the string 'a b' (e.g. sim.iccid)",
                "<rules>:8: rule `r` → digest: `include` items must be dotted paths into the "
                "event, got the number 5 (e.g. sim.iccid)",
            ],
        ),
        (
            "schedule: '0 8 * * *'\ndigest: {max_events: 0}\n",
            [
                "<rules>:4: rule `r` → digest: `max_events` must be a whole number of at least 1, "
                "got the number 0"
            ],
        ),
    ],
)
def test_schedule_and_digest_refusals(lines: str, expected: list[str]) -> None:
    assert refusals(one_rule(lines)) == expected


def test_a_digest_rule_refuses_actions_on_one_event_and_follow_ups() -> None:
    text = (
        "rules:\n  - id: r\n    schedule: '0 8 * * *'\n    digest: {}\n    actions:\n"
        "      - suspend_sim: {}\n      - webhook: {url: 'https://example.com/x'}\n"
        "      - after: 1h\n        do: {log: {}}\n"
    )
    assert refusals(text) == [
        "<rules>:6: rule `r`: `suspend_sim` needs one event's sim, but a digest acts on a list "
        "of events (use `webhook` or `log` in a digest rule)",
        "<rules>:8: rule `r`: a digest rule cannot have follow-up actions (`after:`) (digest "
        "actions run at the scheduled time)",
    ]


def test_a_digest_rule_refuses_what_counts_or_throttles_events() -> None:
    text = one_rule(
        "schedule: '0 8 * * *'\ndigest: {}\n"
        "threshold: {count: 1, within: 1h}\n"
        "throttle: {for: 1h}\n"
        "max_actions: {count: 1, within: 1h}\n"
        "on_guard_trip: [{log: {}}]\n"
    )
    hint = "(a digest acts once per schedule, not per event; use a separate rule)"
    assert refusals(text) == [
        f"<rules>:{line}: rule `r`: `{key}` cannot be combined with `digest` {hint}"
        for line, key in enumerate(["threshold", "throttle", "max_actions", "on_guard_trip"], 5)
    ]


def test_a_schedule_without_a_digest_and_a_digest_without_a_schedule_are_refused() -> None:
    assert refusals(one_rule("schedule: '0 8 * * *'\n")) == [
        "<rules>:3: rule `r`: `schedule` needs `digest`: a scheduled rule collects events and "
        "acts on the list (add e.g. `digest: {max_events: 50}`)"
    ]
    assert refusals(one_rule("digest: {}\n")) == [
        "<rules>:3: rule `r`: `digest` needs `schedule` (add `schedule:` with five crontab "
        'fields: minute hour day month weekday, e.g. "0 8 * * *" or "0 8 * * 1-5")'
    ]


def test_a_broken_schedule_or_digest_is_not_also_said_to_lack_the_other() -> None:
    assert refusals(one_rule("schedule: 5\ndigest: {}\n")) == [
        "<rules>:3: rule `r`: `schedule` must be a cron expression, got the number 5 "
        '(e.g. "0 8 * * *")'
    ]
    assert refusals(one_rule("schedule: '0 8 * * *'\ndigest: {max_events: 0}\n")) == [
        "<rules>:4: rule `r` → digest: `max_events` must be a whole number of at least 1, "
        "got the number 0"
    ]


# --- actions that need what the admitted events do not carry ---------------------------------


def _catalog(*types: tuple[int, str | None, list[str] | None]) -> EventTypeCatalog:
    names = {type_id: f"T{type_id}" for type_id, _, _ in types}
    typical = {
        type_id: TypicalOrigin(source, None, None if carries is None else frozenset(carries))
        for type_id, source, carries in types
    }
    return EventTypeCatalog(names, typical)


def _warnings(text: str, catalog: EventTypeCatalog | None = None) -> list[str]:
    return [str(w) for w in rules(text, catalog).warnings]


def test_an_action_needing_a_sim_is_warned_of_the_admitted_types_that_carry_none() -> None:
    catalog = _catalog(
        (1, "API", []),
        (2, "API", ["endpoint"]),
        (3, "API", ["sim", "endpoint"]),
        (4, "Network", []),
        (5, "Policy Control", None),
    )
    text = "rules:\n  - id: r\n    when: {source: api}\n    actions: [{suspend_sim: {}}]\n"
    assert _warnings(text, catalog) == [
        "<rules>:3: rule `r`: `suspend_sim` needs the event's sim, but `when` admits 1 (T1), "
        "2 (T2), whose events carry no sim: the action fails on every one of them (narrow "
        "`when` to the types that carry it, e.g. `type: [...]`, or leave them out with "
        "`not: {type: [1, 2]}`)"
    ]


def test_the_warning_shows_four_types_and_counts_the_rest_and_points_at_the_rule() -> None:
    catalog = _catalog(*((n, None, []) for n in range(1, 7)), (7, None, ["sim"]))
    text = "rules:\n  - id: r\n    actions: [{suspend_sim: {}}]\n"
    assert _warnings(text, catalog) == [
        "<rules>:2: rule `r`: `suspend_sim` needs the event's sim, but `when` admits 1 (T1), "
        "2 (T2), 3 (T3), 4 (T4) and 2 more, whose events carry no sim: the action fails on "
        "every one of them (narrow `when` to the types that carry it, e.g. `type: [...]`, or "
        "leave them out with `not: {type: [1, 2, 3, 4]}`)"
    ]
    four = _catalog(*((n, None, []) for n in range(1, 5)))
    assert "4 (T4), whose events" in _warnings(text, four)[0]
    five = _catalog(*((n, None, []) for n in range(1, 6)))
    assert "4 (T4) and 1 more, whose events" in _warnings(text, five)[0]


def test_the_warning_reads_the_types_when_names_and_leaves_out_its_not() -> None:
    catalog = _catalog((1, None, []), (2, None, []), (3, None, []), (4, None, ["sim"]))
    text = (
        "rules:\n  - id: r\n    when: {type: [4, 3, 1, 2], not: {type: 2}}\n"
        "    actions: [{suspend_sim: {}}, {log: {}}, {disable_endpoint: {}}]\n"
    )
    found = _warnings(text, catalog)
    assert [w.split(", whose")[0] for w in found] == [
        "<rules>:3: rule `r`: `suspend_sim` needs the event's sim, but `when` admits "
        "1 (T1), 3 (T3)",
        "<rules>:3: rule `r`: `disable_endpoint` needs the event's endpoint, but `when` admits "
        "1 (T1), 3 (T3), 4 (T4)",
    ]


def test_actions_whose_needs_every_admitted_type_carries_load_without_a_warning() -> None:
    catalog = _catalog((1, None, ["sim"]), (2, "API", []))
    assert (
        _warnings(
            "rules:\n  - id: r\n    when: {type: 1}\n    actions: [{suspend_sim: {}}]\n", catalog
        )
        == []
    )
    assert (
        _warnings(
            "rules:\n  - id: r\n    when: {source: network}\n    actions: [{suspend_sim: {}}]\n",
            catalog,
        )
        == []
    )
    assert (
        _warnings(
            "rules:\n  - id: r\n    when: {source: api}\n    actions: [{webhook: {url: 'https://e.x/y'}}]\n",
            catalog,
        )
        == []
    )


def test_follow_ups_and_guard_trip_actions_are_warned_of_too_but_not_digest_or_usage_rules() -> (
    None
):
    catalog = _catalog((1, None, []))
    text = (
        "rules:\n  - id: r\n    max_actions: {count: 1, within: 1h}\n"
        "    on_guard_trip: [{suspend_sim: {}}]\n    actions: [{log: {}}]\n"
    )
    assert len(_warnings(text, catalog)) == 1
    usage = (
        "rules:\n  - id: r\n    usage: {data: '>1MB', within: 1h}\n"
        "    actions: [{suspend_sim: {}}]\n"
    )
    assert _warnings(usage, catalog) == []


def test_an_id_refusal_points_at_the_id_line() -> None:
    text = "rules:\n  - " + LOG + "\n    id: 5\n  - " + LOG + "\n    id: a b\n"
    assert [m.split(": `id`")[0] for m in refusals(text)] == [
        "<rules>:3: rule #1",
        "<rules>:5: rule #2",
    ]


def test_refusals_inside_a_setting_point_at_the_line_of_their_key() -> None:
    text = one_rule(
        "threshold:\n  count: 2\n  within: 1h\n  per: 'a b'\n"
        "throttle:\n  for: 1h\n  per: 'a b'\n"
        "max_actions:\n  within: 1h\n  count: 0\n"
    )
    assert [m.split(": `")[0] for m in refusals(text)] == [
        "<rules>:6: rule `r` → threshold",
        "<rules>:9: rule `r` → throttle",
        "<rules>:12: rule `r` → max_actions",
    ]
    usage = one_rule("usage:\n  within: 1h\n  data: lots\n  per: 'a b'\n")
    assert [[m.split(": `")[0], m.split("`")[3]] for m in refusals(usage)] == [
        ["<rules>:5: rule `r` → usage", "data"],
        ["<rules>:6: rule `r` → usage", "per"],
    ]


def test_each_need_is_warned_of_even_after_one_every_admitted_type_carries() -> None:
    catalog = _catalog((1, None, ["sim"]), (2, None, ["sim", "endpoint"]))
    text = "rules:\n  - id: r\n    actions: [{suspend_sim: {}}, {disable_endpoint: {}}]\n"
    assert [w.split(", whose")[0] for w in _warnings(text, catalog)] == [
        "<rules>:2: rule `r`: `disable_endpoint` needs the event's endpoint, but `when` admits "
        "1 (T1)"
    ]


def test_a_rules_condition_and_guard_trip_follow_ups_are_read_with_the_catalog_given() -> None:
    catalog = EventTypeCatalog({901: "Own thing"})
    text = one_rule(
        "condition: {'==': [{var: event_type.id}, 999]}\n"
        "max_actions: {count: 1, within: 1h}\n"
        "on_guard_trip:\n"
        "  - after: 1h\n    do: {log: {}}\n    cancel_if: {when: {type: own thing}}\n"
    )
    found = rules(text, catalog)
    assert [str(w) for w in found.warnings] == [
        "<rules>:3: rule `r`: event type 999 is not in the catalog (`event-engine types` lists "
        "the known ones; an id the API added since is fine, and `event-engine types --config "
        "FILE` shows the API's own list)"
    ]
    rule = found.rules[0]
    cancel_if = rule.on_guard_trip[0].cancel_if
    assert cancel_if is not None and cancel_if.when is not None
    assert cancel_if.when.type_ids == frozenset({901})
    # Without `lookup`, the condition is judged with `when`, not after a lookup.
    assert rule.condition is not None and rule.lookup_condition is None
