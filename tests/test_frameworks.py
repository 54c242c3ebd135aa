"""One of each small framework: the YAML loader and the section validator that rule files,
rule-test files and the config file share."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from engine.config import load_config
from engine.errors import ConfigError, RuleSetError
from engine.rules import load_rules
from engine.ruletests.spec import TestFileError, load_test_file
from engine.yamlfile import MAX_FILE_BYTES

# -- one loader -----------------------------------------------------------------------------

_LAUGHS = "".join(
    f"{name}: &{name} [{', '.join([f'*{below}'] * 9)}]\n"
    for below, name in zip("abcdefgh", "bcdefghi", strict=True)
)

YAML_PROBLEMS = {
    "a tab": "a:\n\tb: 1\n",
    "an unquoted ': '": "a: note: this\n",
    "an open quote": 'a: "x\nb: 1\n',
    "a misindented line": "a:\n  b: 1\n   c: 2\n",
    "a duplicate key": "a: 1\nb: 2\na: 3\n",
    "an alias bomb": 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    + _LAUGHS,
    "deep nesting": "a: " + "[" * 70 + "]" * 70 + "\n",
    "a number too long": "a: 1" + ":0" * 60 + "\n",
    "a value not of its tag": "a: !!int abc\n",
    "an alias inside its anchor": "a: &r\n  b: [*r]\n",
    "a control character": "a: b\nc: \x07\n",
    "a file too large": "a: 1\n" + "# padding\n" * (MAX_FILE_BYTES // 10 + 1),
}


def _config_problem(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    return raised.value


def _rule_file_problems(path: Path) -> list[ConfigError]:
    with pytest.raises(RuleSetError) as raised:
        load_rules(path)
    return raised.value.errors


def _rule_test_file_problems(path: Path) -> list[ConfigError]:
    with pytest.raises(TestFileError) as raised:
        load_test_file(path)
    return raised.value.errors


def _said(error: ConfigError) -> tuple[int | None, str, str | None]:
    return (error.where.line if error.where else None, error.message, error.hint)


@pytest.mark.parametrize("text", YAML_PROBLEMS.values(), ids=YAML_PROBLEMS.keys())
def test_a_yaml_problem_reads_the_same_in_a_rule_file_a_config_file_and_a_rule_test_file(
    tmp_path: Path, text: str
) -> None:
    paths = [tmp_path / name for name in ("config.yaml", "rules.yaml", "rule-test.yaml")]
    for path in paths:
        path.write_text(text, encoding="utf-8")
    in_config = _config_problem(paths[0])
    line, message, hint = _said(in_config)
    in_rules = [_said(e) for e in _rule_file_problems(paths[1])]
    in_tests = [_said(e) for e in _rule_test_file_problems(paths[2])]
    if message.startswith("larger than"):
        # The same refusal; rule files add where to put the rules instead.
        assert (line, message) in [(found[0], found[1]) for found in in_rules + in_tests]
    else:
        assert (line, message, hint) in in_rules
        assert (line, message, hint) in in_tests
    assert str(in_config).startswith(f"{paths[0]}:")


def test_a_control_character_in_the_config_is_a_located_error_not_a_traceback(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("log:\n  level: info\x07\n", encoding="utf-8")
    assert str(_config_problem(path)) == (
        f"{path}:2: invalid YAML: unacceptable character #x0007: control characters are not allowed"
    )


def test_the_config_keeps_yaml_types_where_rule_files_keep_json_ones(tmp_path):
    # An unquoted date: text in a rule (conditions compare it as JSON would), a date in the
    # config, where no option takes one: refused there as it always was.
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - id: r\n    description: 2025-05-01\n    actions: [{log: {}}]\n",
        encoding="utf-8",
    )
    assert load_rules(rules).rules[0].description == "2025-05-01"
    config = tmp_path / "config.yaml"
    config.write_text("store:\n  path: 2025-05-01\n", encoding="utf-8")
    assert str(_config_problem(config)) == (
        f"{config}:2: `store.path` must be a string, got date (quote it)"
    )


def test_shared_blocks_and_merge_keys_read_alike_in_the_config_and_rule_files(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "api: &api {base_url: 'http://127.0.0.1:9', per_page: 50}\n"
        "log:\n  level: debug\n"
        "http:\n  <<: {port: 9090, host: 0.0.0.0}\n  port: 9091\n",
        encoding="utf-8",
    )
    loaded = load_config(config)
    assert (loaded.api.base_url, loaded.api.per_page) == ("http://127.0.0.1:9", 50)
    assert (loaded.http.host, loaded.http.port) == ("0.0.0.0", 9091)  # its own key wins
    assert loaded.log_level == "debug"


# -- one section validator ------------------------------------------------------------------

RULE = "rules:\n  - id: r\n    when: {type: 19}\n    actions: [{log: {}}]\n"


@pytest.mark.parametrize(
    ("in_rule", "in_config", "said", "hint"),
    [
        (
            "    threshold: {count: 0, within: 10m}\n",
            "actions:\n  max_attempts: 0\n",
            "` must be a whole number of at least 1, got the number 0",
            None,
        ),
        (
            "    enabled: 'yes'\n",
            "dry_run: 'yes'\n",
            "` must be true or false, got the string 'yes'",
            None,
        ),
        ("    description: 5\n", "rules: 5\n", "` must be a string, got the number 5", "quote it"),
        (
            "    throttle: {for: 5 minutes}\n",
            "poller:\n  interval: 5 minutes\n",
            "` is not a duration: the string '5 minutes'",
            "write a whole number and a unit (s, m, h, d, w), e.g. 30s, 10m, 24h, 7d or 1h30m",
        ),
        (
            "    throttle: {for: 99999999w}\n",
            "actions:\n  deadline: 99999999w\n",
            "`: '99999999w' is longer than 10 years",
            "no window, throttle or delay needs more",
        ),
        ("    throttle: {fro: 1h}\n", "poller:\n  intervall: 10s\n", "`", "did you mean `"),
    ],
    ids=["count", "flag", "text", "duration", "too long", "misspelt key"],
)
def test_a_wrong_value_is_told_in_the_same_words_in_a_rule_file_and_the_config(
    tmp_path: Path, in_rule: str, in_config: str, said: str, hint: str | None
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE + in_rule, encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(in_config, encoding="utf-8")
    # (a misspelt key is also a missing one: the first problem is the one compared)
    in_rules = next(e for e in _rule_file_problems(rules) if e.where and e.where.line == 5)
    for error in (in_rules, _config_problem(config)):
        assert error.message.endswith(said)
        assert error.hint == hint if hint is None else (error.hint or "").startswith(hint)


def test_a_rule_test_file_is_told_in_the_rule_files_words(tmp_path):
    (tmp_path / "rules.yaml").write_text(RULE, encoding="utf-8")
    spec = tmp_path / "test.yaml"
    spec.write_text(
        "rules: rules.yaml\ntests:\n  - name: n\n    events: [{event_type: {id: 19}}]\n"
        "    expect: [{rule: r, times: 0}]\n    ordred: true\n",
        encoding="utf-8",
    )
    assert [str(e) for e in _rule_test_file_problems(spec)] == [
        f"{spec}:6: test `n`: unknown key `ordred` (did you mean `ordered`?)",
        f"{spec}:5: test `n` → expect: `times` must be a whole number of at least 1, got the "
        "number 0",
    ]


def test_a_number_option_refuses_nan_with_its_line_not_a_traceback(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("api:\n  read_timeout: .nan\n", encoding="utf-8")
    assert str(_config_problem(config)) == (
        f"{config}:2: `api.read_timeout` must be a number of at least 0.1, got the number nan"
    )


def test_an_option_left_empty_takes_its_default_but_a_rule_key_left_empty_is_refused(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("poller:\n  interval:\nlog:\n", encoding="utf-8")
    assert load_config(config).poller.interval == timedelta(seconds=10)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE + "    enabled:\n", encoding="utf-8")
    assert [e.message for e in _rule_file_problems(rules)] == [
        "rule `r`: `enabled` must be true or false, got nothing (null)"
    ]
