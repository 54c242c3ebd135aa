"""The config's lists of entries (`mute_windows`, `organisations`, `ui.users`) refuse a value
that is not a list of mappings in one way: the option's name, what it holds, file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_config
from engine.errors import ConfigError

CASES = [
    ("mute_windows: nightly\n", "`mute_windows` must be a list of windows", 1),
    ("organisations: acme\n", "`organisations` must be a list of organisations", 1),
    ("organisations: []\n", "`organisations` must be a list of organisations", 1),
    ("ui:\n  users: alice\n", "`ui.users` must be a list of logins", 2),
]


def _refusal(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    return str(refused.value)


@pytest.mark.parametrize(("text", "message", "line"), CASES)
def test_a_list_option_that_is_not_a_list_is_refused_at_its_line(tmp_path, text, message, line):
    refusal = _refusal(tmp_path, text)
    assert f"config.yaml:{line}: {message}" in refusal


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("mute_windows:\n  - just-a-name\n", "`mute_windows[0]` must be a mapping", 2),
        ("organisations:\n  - acme\n", "`organisations[0]` must be a mapping", 2),
        ("ui:\n  users:\n    - bob\n", "`ui.users[0]` must be a mapping", 3),
    ],
)
def test_an_entry_that_is_not_a_mapping_is_refused_at_its_own_line(tmp_path, text, message, line):
    refusal = _refusal(tmp_path, text)
    assert f"config.yaml:{line}: {message}" in refusal
