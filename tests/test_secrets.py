"""Secrets (engine.secrets): `${NAME}` read from the environment or from the file `NAME_FILE`
names, and every value read blanked from whatever the redactor is given afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import secrets
from engine.secrets import MissingSecretError


def test_a_secret_is_read_from_its_variable_before_its_file_and_is_blanked_from_then_on(
    tmp_path: Path,
) -> None:
    (tmp_path / "token").write_text("from-the-file-1234")
    env = {"OPS_TOKEN": "from-the-variable-5678", "OPS_TOKEN_FILE": str(tmp_path / "token")}
    assert secrets.read_secret("OPS_TOKEN", env) == "from-the-variable-5678"
    assert secrets.redact("sent from-the-variable-5678.") == "sent ***."


def test_a_secret_file_is_read_as_utf8_without_its_trailing_newline_and_blanked(
    tmp_path: Path,
) -> None:
    (tmp_path / "token").write_bytes("päss-wört-9c41\n".encode())
    env = {"OPS_TOKEN_FILE": str(tmp_path / "token")}
    assert secrets.read_secret("OPS_TOKEN", env) == "päss-wört-9c41"
    assert secrets.redact("Bearer päss-wört-9c41\n") == "Bearer ***\n"


def test_an_unreadable_secret_file_fails_naming_the_variable_the_file_and_why(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingSecretError) as info:
        secrets.read_secret("OPS_TOKEN", {"OPS_TOKEN_FILE": str(missing)})
    assert str(info.value) == f"cannot read OPS_TOKEN_FILE={missing}: No such file or directory"


def test_an_unset_secret_fails_naming_both_ways_to_set_it() -> None:
    with pytest.raises(MissingSecretError) as info:
        secrets.read_secret("OPS_TOKEN", {"OPS_TOKEN_FILE": ""})
    assert str(info.value) == "environment variable OPS_TOKEN (or OPS_TOKEN_FILE) is not set"


def test_secrets_are_read_from_the_environment_given_not_the_processs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPS_TOKEN", "the-process-value")
    monkeypatch.delenv("OPS_HOST", raising=False)
    given = {"OPS_TOKEN": "the-given-value", "OPS_HOST": "hooks.example.test"}
    assert secrets.read_secret("OPS_TOKEN", given) == "the-given-value"
    assert secrets.expand("https://${OPS_HOST}/x?t=${OPS_TOKEN}", given) == (
        "https://hooks.example.test/x?t=the-given-value"
    )
    assert secrets.read_secret("OPS_TOKEN") == "the-process-value"  # none given: the process's


def test_text_without_references_expands_to_itself() -> None:
    assert secrets.expand("https://h.example/$x/{y}", {}) == "https://h.example/$x/{y}"
    assert secrets.references("a ${A} b ${B_2} ${lower} ${9X} $C") == ["A", "B_2", "lower"]


@pytest.mark.parametrize(
    ("text", "only"),
    [("${A}", True), (" ${A}${B} ", True), ("${A}/x", False), ("plain", False), ("", False)],
)
def test_a_text_is_reference_only_when_it_holds_references_and_nothing_else(
    text: str, only: bool
) -> None:
    assert secrets.is_reference_only(text) is only


def test_values_shorter_than_four_characters_are_not_blanked() -> None:
    # Too short to be a credential; blanking them would blank ordinary words in log lines.
    for value in ("abc", "wxyz", "wxyz"):
        assert secrets.register(value) == value
    assert secrets.redact("abc wxyz abcd") == "abc *** abcd"


def test_a_secret_holding_another_anywhere_is_blanked_whole() -> None:
    # The token sorts after the URL that holds it: blanked first, it would leave the rest of
    # the URL showing around `***`.
    secrets.register("tok-5f0e2b")
    secrets.register("https://hooks.example.test/x?t=tok-5f0e2b")
    assert secrets.redact("to https://hooks.example.test/x?t=tok-5f0e2b: 500") == "to ***: 500"
