"""Rule, config and rule-test files cost a bounded amount to load, whatever they hold: a few
hundred bytes never expand to gigabytes, and every refusal names `file:line`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from engine.cli import main
from engine.config import load_config
from engine.errors import ConfigError, RuleSetError
from engine.rules import load_rules, load_rules_text
from engine.rules.yaml_lines import MAX_FILE_BYTES
from engine.ruletests import TestFileError, load_test_file

# The classic "billion laughs": nine levels of nine aliases stand for 9**9 strings.
BILLION_LAUGHS = """\
rules:
  - id: laughs
    when: {type: 19}
    condition:
      in:
        - x
        - - &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
          - &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
          - &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
          - &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
          - &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
          - &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
          - &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
          - &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
          - &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
    actions: [{log: {}}]
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


def _problems(text: str) -> list[str]:
    with pytest.raises(RuleSetError) as caught:
        load_rules_text(text, "rules.yaml")
    return [str(problem) for problem in caught.value.errors]


# -- YAML aliases, nesting, size, numbers ---------------------------------------------------


def test_an_alias_bomb_is_refused_by_validate_with_file_and_line(tmp_path, capsys):
    path = _write(tmp_path / "laughs.yaml", BILLION_LAUGHS)
    assert path.stat().st_size < 1000
    code, err = _validate(path, capsys)
    assert code == 1
    assert err.startswith(f"error: {path}:12: aliases copy too much")
    assert "anchor at line 11" in err


def test_an_alias_bomb_in_the_config_file_is_refused_with_its_line(tmp_path):
    bomb = BILLION_LAUGHS.split("condition:")[1].split("actions:")[0]
    config = _write(tmp_path / "config.yaml", "extra:" + bomb)
    with pytest.raises(ConfigError, match=r"config\.yaml:\d+: aliases copy too much"):
        load_config(config)


def test_a_merge_key_bomb_is_refused():
    lines = ["rules:", "  - id: m", "    actions: [{log: {}}]"]
    lines.append("    a0: &a0 {k0: 1, k1: 2, k2: 3}")
    lines += [f"    a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 9)}]}}" for i in range(1, 10)]
    assert any("aliases copy too much" in p for p in _problems("\n".join(lines)))


def test_shared_blocks_by_alias_still_load():
    rules = load_rules_text(
        textwrap.dedent(
            """\
        rules:
          - id: first
            when: &quota {source: policy_control, type: 19}
            actions:
              - webhook: &hook
                  url: https://hooks.example.com/ops
                  body: {text: "{{ event.description }}", iccid: "{{ event.sim.iccid }}"}
          - id: second
            when: *quota
            throttle: {per: sim.iccid, for: 1h}
            actions: [{webhook: {<<: *hook, headers: {X-Team: ops}}}]
        """
        ),
        "rules.yaml",
    )
    second = rules.get("second")
    assert second is not None and second.when == rules.get("first").when  # type: ignore[union-attr]
    assert second.definition["actions"][0]["webhook"]["url"] == "https://hooks.example.com/ops"


def test_an_alias_inside_its_own_anchor_is_refused_with_its_line():
    found = _problems("rules:\n  - &r\n    id: x\n    actions: [*r]\n")
    assert found == ["rules.yaml:2: an alias refers to itself"]


@pytest.mark.parametrize("depth", [65, 999, 100_000])
def test_deep_nesting_is_refused_with_a_line_not_a_recursion_error(tmp_path, capsys, depth):
    path = _write(tmp_path / "deep.yaml", "rules: " + "[" * depth + "]" * depth + "\n")
    code, err = _validate(path, capsys)
    assert code == 1
    assert f"{path}:1: " in err
    assert "nested more than 64 levels deep" in err or "maximum nesting depth" in err


def test_deep_nesting_in_the_config_file_is_refused(tmp_path):
    for depth in (70, 990):
        config = _write(tmp_path / "config.yaml", "rules: " + "[" * depth + "]" * depth)
        with pytest.raises(ConfigError, match="nested more than 64 levels deep"):
            load_config(config)


def test_a_rule_file_over_the_size_cap_is_refused_without_reading_it_all(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text("rules:\n" + "# padding\n" * (MAX_FILE_BYTES // 10 + 1), encoding="utf-8")
    code, err = _validate(path, capsys)
    assert code == 1
    assert f"error: {path}: larger than 512 KiB, too large to load" in err
    assert "split the rules over several files" in err


def test_a_number_too_long_to_be_a_number_is_refused_with_its_line():
    # Sexagesimal (YAML 1.1 `1:0:0`) conversion is quadratic: a long one takes minutes.
    found = _problems("rules:\n  - id: a\n    description: 1" + ":0" * 60_000 + "\n")
    assert found == [
        "rules.yaml:3: a number of 120,001 characters (quote it if it is meant as text)"
    ]


def test_a_value_that_does_not_fit_its_tag_is_a_located_error(tmp_path):
    assert _problems("rules:\n  - id: a\n    description: !!int abc\n") == [
        "rules.yaml:3: invalid YAML: not a valid int: invalid literal for int() with base 10: 'abc'"
    ]
    config = _write(tmp_path / "config.yaml", "log:\n  level: !!float x\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:2: YAML value error"):
        load_config(config)


def test_the_problems_of_one_file_are_capped_not_listed_by_the_hundred_thousand(tmp_path, capsys):
    path = _write(tmp_path / "rules.yaml", "rules: [" + ", ".join(["1"] * 100_000) + "]\n")
    code, err = _validate(path, capsys)
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 101
    assert (
        lines[-1] == f"error: {path}:1: more problems after these 100, not listed (fix these first)"
    )


# -- durations ------------------------------------------------------------------------------


def test_durations_beyond_ten_years_are_refused_at_load(tmp_path):
    found = _problems(
        "rules:\n  - id: a\n    when: {type: 19}\n    actions:\n"
        "      - after: 142857142w\n        do: {activate_sim: {}}\n"
    )
    assert found == [
        "rules.yaml:5: rule `a`: `after`: '142857142w' is longer than 10 years "
        "(no window, throttle or delay needs more)"
    ]
    config = _write(tmp_path / "config.yaml", "poller:\n  initial_lookback: 1.0e+300\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:2: `poller.initial_lookback` must be"):
        load_config(config)


# -- rule test files ------------------------------------------------------------------------


def test_a_rule_test_file_is_bounded_like_a_rule_file(tmp_path):
    _write(tmp_path / "rules.yaml", "rules:\n  - id: a\n    actions: [{log: {}}]\n")
    spec = _write(
        tmp_path / "test.yaml",
        """\
        rules: rules.yaml
        start: "9999-12-31T23:00:00Z"
        tests:
          - name: a billion expectations
            events: [{event_type: {id: 19}, at: 2h}]
            expect: [{rule: a, times: 1000000000}]
        """,
    )
    with pytest.raises(TestFileError) as caught:
        load_test_file(spec)
    assert [str(e) for e in caught.value.errors] == [
        f"{spec}:5: test `a billion expectations`: `start` plus `at` is past the year 9999",
        f"{spec}:6: test `a billion expectations` → expect: `times` must be at most 10,000, "
        "got 1,000,000,000",
    ]
    bomb = _write(tmp_path / "bomb.yaml", BILLION_LAUGHS.replace("rules:", "tests:"))
    with pytest.raises(TestFileError, match="aliases copy too much"):
        load_test_file(bomb)


def test_a_folder_is_read_one_file_at_a_time_and_reports_every_file(tmp_path):
    folder = tmp_path / "rules"
    folder.mkdir()
    _write(folder / "a.yaml", BILLION_LAUGHS)
    (folder / "b.yaml").write_bytes(b"rules: \xff\n")
    _write(folder / "c.yaml", "rules:\n  - id: c\n    actions: [{log: {}}]\n")
    with pytest.raises(RuleSetError) as caught:
        load_rules(folder)
    assert [str(e).split(": ")[0] for e in caught.value.errors] == [
        f"{folder / 'a.yaml'}:12",
        f"{folder / 'b.yaml'}",
    ]
