"""A YAML syntax error in a rule file or the config says where, what PyYAML found, and what
usually causes it: a tab, an indentation off by a space, an unquoted `: ` or template."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_config
from engine.errors import ConfigError, RuleSetError
from engine.rules import load_rules


@pytest.mark.parametrize(
    ("text", "line", "hint"),
    [
        (
            "rules:\n  - id: a\n\twhen: {type: 19}\n    actions: [{log: {}}]\n",
            3,
            "indent with spaces: YAML does not allow tabs for indentation",
        ),
        (
            "rules:\n  - id: a\n    when: {type: 19}\n     actions: [{log: {}}]\n",
            4,
            "check the indentation of this line against the lines above: the keys of one mapping "
            "line up, and so do the `- ` items of one list",
        ),
        (
            "rules:\n  - id: a\n    actions:\n    - log: {}\n   - log: {}\n",
            5,
            "check the indentation of this line against the lines above: the keys of one mapping "
            "line up, and so do the `- ` items of one list",
        ),
        (
            "rules:\n  - id: a\n    description: note: this\n    actions: [{log: {}}]\n",
            3,
            'a text holding ": " needs quotes, e.g. description: "note: this"; or the line is '
            "indented deeper than the key above it",
        ),
        (
            "rules:\n  - id: a\n    actions:\n      - log: {message: {{ event.id }}}\n",
            4,
            'quote a value that starts with a template: "{{ event.sim.iccid }}"',
        ),
        (
            'rules:\n  - id: "a\n    actions: [{log: {}}]\n',
            4,
            "a quote opened here or above is not closed",
        ),
    ],
)
def test_a_yaml_syntax_error_in_a_rule_file_hints_at_its_usual_cause(
    tmp_path: Path, text: str, line: int, hint: str
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RuleSetError) as raised:
        load_rules(path)
    (error,) = raised.value.errors
    assert str(error).startswith(f"{path}:{line}: invalid YAML: ")
    assert error.hint == hint


def test_a_tab_in_the_config_gets_the_same_hint(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("api:\n\tbase_url: http://127.0.0.1:9\n", encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}:2: invalid YAML: ")
    assert raised.value.hint == "indent with spaces: YAML does not allow tabs for indentation"
