"""The YAML loader's bounds at their edges (engine.yamlfile): what a document may cost to
build is measured before anything is built, and a document just within each bound loads."""

from __future__ import annotations

import pytest

from engine.errors import ConfigError
from engine.yamlfile import load_yaml

SHARED = "x" * 998  # an anchored list of it costs 1,000: one for the list, one for the text


def _aliases(count: int) -> str:
    return f'a: &x ["{SHARED}"]\nb: [{", ".join(["*x"] * count)}]\n'


def test_aliases_may_copy_up_to_a_million_characters() -> None:
    data, _ = load_yaml(_aliases(1000), "rules.yaml")
    assert len(data["b"]) == 1000 and data["b"][999] == [SHARED]


def test_aliases_copying_more_are_refused_naming_the_anchor() -> None:
    with pytest.raises(ConfigError) as caught:
        load_yaml(_aliases(1001), "rules.yaml")
    assert str(caught.value) == (
        "rules.yaml:1: aliases copy too much: with the alias of the anchor at line 1, their "
        "copies pass 1,000,000 characters (an alias may repeat a shared block, but aliases of "
        "aliases multiply it; write the data out instead)"
    )


def test_a_document_may_nest_63_collections_and_no_more() -> None:
    data, _ = load_yaml("[" * 63 + "1" + "]" * 63, "rules.yaml")
    assert data is not None
    with pytest.raises(ConfigError) as caught:
        load_yaml("\n" + "[" * 64 + "1" + "]" * 64, "rules.yaml")
    assert str(caught.value) == (
        "rules.yaml:2: nested more than 64 levels deep (flatten the structure)"
    )


def test_a_number_may_be_written_in_100_characters_and_no_more() -> None:
    data, _ = load_yaml("n: " + "1" * 100, "rules.yaml")
    assert data["n"] == int("1" * 100)
    with pytest.raises(ConfigError) as caught:
        load_yaml("m: 1\nn: " + "1" * 101, "rules.yaml")
    assert str(caught.value) == (
        "rules.yaml:2: a number of 101 characters (quote it if it is meant as text)"
    )
