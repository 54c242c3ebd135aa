"""Property tests: whatever a rule file holds, loading it gives a rule set or a RuleSetError
whose every problem is a ConfigError with the file and line it is about."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.actions import ACTIONS
from engine.cli import main
from engine.errors import ConfigError, RuleSetError
from engine.rules import RuleSet, load_rules_text

FILE = "fuzz.yaml"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**66), max_value=2**66),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(
        [
            "10m",
            "24h",
            "1h30m",
            "0s",
            "-5s",
            "critical",
            "policy_control",
            "Quota used up",
            "${OPS_WEBHOOK_URL}",
            "https://hooks.example.com/x",
            "{{ event.sim.iccid }}",
            "{{ event.",
            "{% for x in y %}",
            "sim.iccid",
            "shadow",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=8), inner, max_size=3),
    ),
    max_leaves=8,
)
when_keys = st.sampled_from(["severity", "source", "type", "alert", "iccid", "tags", "typo"])
action_kinds = st.sampled_from([*sorted(ACTIONS), "after", "do", "suspend_simm"])
param_keys = st.sampled_from(["url", "payload", "body", "headers", "method", "level", "message"])
actions = st.lists(
    st.one_of(
        st.dictionaries(action_kinds, st.dictionaries(param_keys, values, max_size=3), max_size=2),
        st.fixed_dictionaries({"after": scalars, "do": st.dictionaries(action_kinds, values)}),
        values,
    ),
    max_size=3,
)
jsonlogic = st.recursive(
    st.one_of(scalars, st.fixed_dictionaries({"var": st.sampled_from(["sim.iccid", "alert"])})),
    lambda inner: st.dictionaries(
        st.sampled_from(["==", "!", "in", "and", "or", ">", "nope", "var"]),
        st.one_of(inner, st.lists(inner, max_size=3)),
        min_size=1,
        max_size=1,
    ),
    max_leaves=6,
)
valid_when = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from([19, [18, 19], "Quota used up"]),
        "source": st.sampled_from(["policy_control", "api", 1]),
        "severity": st.sampled_from(["critical", ["warn", "critical"]]),
        "tags": st.sampled_from(["vip", ["fleet", "berlin"]]),
    },
)
valid_actions = st.lists(
    st.sampled_from(
        [
            {"suspend_sim": {}},
            {"log": {"message": "{{ event.description }}"}},
            {"webhook": {"url": "${OPS_WEBHOOK_URL}", "body": {"t": "{{ event.id }}"}}},
            {"send_sms": {"payload": "hi {{ event.endpoint.name }}"}},
            {"after": "24h", "do": {"activate_sim": {}}},
        ]
    ),
    min_size=1,
    max_size=3,
)
# Each field is valid about half the time, so some rules load and the deeper checks run.
rules = st.fixed_dictionaries(
    {
        "id": st.one_of(st.sampled_from(["r1", "r2", "quota-1"]), scalars),
        "when": st.one_of(valid_when, st.dictionaries(when_keys, values, max_size=3)),
        "actions": st.one_of(valid_actions, actions),
    },
    optional={
        "condition": jsonlogic,
        "description": scalars,
        "enabled": scalars,
        "mode": st.sampled_from(["live", "shadow", "bogus"]),
        "threshold": values,
        "throttle": values,
        "max_actions": values,
        "schedule": values,
        "digest": values,
        "on_guard_trip": actions,
        "extra": values,
    },
)
documents = st.one_of(
    st.fixed_dictionaries({"rules": st.lists(rules, max_size=3)}),
    st.lists(rules, max_size=3),
    values,
)


def _check(text: str) -> None:
    try:
        loaded = load_rules_text(text, FILE)
    except RuleSetError as error:
        assert error.errors, "a RuleSetError without problems"
        for problem in error.errors:
            assert isinstance(problem, ConfigError)
            assert problem.where is not None, f"no location: {problem}"
            assert problem.where.file == FILE
            assert problem.where.line is None or problem.where.line >= 1
            assert str(problem).startswith(FILE)
    else:
        assert isinstance(loaded, RuleSet)


@FUZZ
@given(documents)
def test_any_rule_document_loads_or_fails_with_located_errors(document):
    _check(yaml.safe_dump(document, allow_unicode=True, sort_keys=False))


@FUZZ
@given(st.text(max_size=300))
def test_any_text_loads_or_fails_with_located_errors(text):
    _check(text)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "rules:",
                "  - id: a",
                "    actions:",
                "      - log: {}",
                "    when: {type: 19}",
                "  -",
                "    - x",
                ": :",
                "\t",
                "&a",
                "*a",
                "!!python/object:os.system",
                "'",
                "{",
                "- [",
                "%YAML 1.1",
                "---",
                "...",
                "  condition: {'==': [1]}",
            ]
        ),
        max_size=12,
    )
)
def test_yaml_fragments_load_or_fail_with_located_errors(lines):
    _check("\n".join(lines))


# -- the command line, as an attacker feeds it ---------------------------------------------

_FRAGMENTS = [
    "rules:",
    "  - id: a",
    "    actions: [{log: {message: '{{ event.id }}'}}]",
    "    when: {type: 19}",
    "    condition: {'==': [{var: alert}, true]}",
    "  - &x [*x]",
    "a: &a [1, 2, 3]",
    "b: [*a, *a, *a, *a, *a, *a, *a, *a]",
    "c: {<<: *a}",
    "<<: [*a, *a]",
    "d: !!int abc",
    "d: !!float x",
    "d: !!binary '!!!'",
    "d: !!python/object:os.system ls",
    "d: !foo bar",
    "d: !!set {a, b}",
    "d: !!timestamp 2025-02-30",
    "d: 0000-01-01",
    "d: 1" + ":0" * 200,
    "d: 0x" + "f" * 300,
    "d: " + "9" * 5000,
    "d: 1.0e+999999",
    "d: .nan",
    "[" * 200 + "]" * 200,
    "{" * 70 + "}" * 70,
    "- " * 80 + "x",
    "\t",
    "\ufeff",
    "%YAML 1.1",
    "---",
    "...",
    "'unterminated",
    "? [1, 2]\n: 3",
    "{[1]: 2}",
    "    after: 142857142w",
    "    throttle: {for: 99999999999999999999d, per: sim.iccid}",
    "    actions: [{log: {message: \"{{ 'a' * 10**9 }}\"}}]",
    '    actions: [{log: {message: "{{ (((((((((((((((1))))))))))))))) }}"}}]',
    "    condition: {reduce: [["
    + ",".join(["1"] * 40)
    + "], {cat: [{var: accumulator}, {var: accumulator}]}, ab]}",
]


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _check_cli_on(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rules.yaml"
        path.write_bytes(data)
        code, out, err = _cli(["validate", str(path)])
        assert "Traceback" not in out + err
        assert code in (0, 1)
        if code == 1:
            lines = err.splitlines()
            assert lines, "exit 1 without a message"
            for line in lines:
                assert line.startswith(f"error: {path}"), line
                assert "internal error" not in line, line
        code, out, err = _cli(["test", str(path)])
        assert "Traceback" not in out + err
        assert code == 1  # not a usable test file, or a failing one


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=10), st.sampled_from(["", "  ", "    "]))
def test_validate_and_test_never_print_a_traceback_for_yaml_like_text(lines, indent):
    _check_cli_on("\n".join(indent + line for line in lines).encode())


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400))
def test_validate_and_test_never_print_a_traceback_for_any_bytes(data):
    _check_cli_on(data)


def test_replay_refuses_a_bad_rule_file_with_a_located_message(tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text('{"id": 1, "timestamp": "2025-05-01T10:00:00Z", "event_type": {"id": 19}}\n')
    for text in ("rules: [" * 300 + "]" * 300, "a: &a [*a]", "rules:\n  - !!int abc\n"):
        rules = tmp_path / "rules.yaml"
        rules.write_text(text)
        code, out, err = _cli(["replay", "--rules", str(rules), "--events", str(events)])
        assert (code, out) == (1, "")
        assert err.startswith(f"error: {rules}:") and "Traceback" not in err
