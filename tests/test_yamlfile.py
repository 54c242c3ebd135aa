"""The YAML loader (engine.yamlfile): its bounds at their edges (what a document may cost to
build is measured before anything is built, and a document just within each bound loads),
the types each kind of file keeps, and its errors as they read, each at its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.yamlfile import load_yaml, read_yaml_file

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


def test_a_document_may_nest_64_levels_counting_its_innermost_values() -> None:
    data, _ = load_yaml("[" * 63 + "1" + "]" * 63, "rules.yaml")
    assert data is not None
    data, _ = load_yaml("[" * 64 + "]" * 64, "rules.yaml")  # the innermost holds no level
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


def test_a_document_that_is_one_long_number_is_refused_with_its_file() -> None:
    with pytest.raises(ConfigError) as caught:
        load_yaml("1" * 101, "rules.yaml")
    assert str(caught.value).startswith("rules.yaml:1: a number of 101 characters")


def test_one_alias_of_a_block_larger_than_a_million_characters_is_refused() -> None:
    with pytest.raises(ConfigError, match="aliases copy too much"):
        load_yaml(f'a: &x ["{"x" * 1_000_000}"]\nb: *x\n', "rules.yaml")


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (
            "a: 1\n---\nb: 2\n",
            "rules.yaml:2: invalid YAML: expected a single document in the stream, but found "
            "another document",
        ),
        (
            "a: [1, 2\n",
            "rules.yaml:2: invalid YAML: did not find expected ',' or ']' (while parsing a flow "
            "sequence)",
        ),
    ],
)
def test_a_yaml_error_reads_as_one_sentence_with_its_line(text: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_yaml(text, "rules.yaml")
    assert str(caught.value) == said


TAB_HINT = "indent with spaces: YAML does not allow tabs for indentation"
INDENT_HINT = (
    "check the indentation of this line against the lines above: the keys of one mapping line "
    "up, and so do the `- ` items of one list"
)
TEMPLATE_HINT = 'quote a value that starts with a template: "{{ event.sim.iccid }}"'


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (
            "\tkey: x\n",
            "rules.yaml:1: invalid YAML: found character that cannot start any token (while "
            f"scanning for the next token) ({TAB_HINT})",
        ),
        (
            "a:\n  b: 1\n\t c: 2\n",
            "rules.yaml:3: invalid YAML: found a tab character that violates indentation (while "
            f"scanning a plain scalar) ({TAB_HINT})",
        ),
        (  # a tab inside a value is no indentation
            'a: "x\tb" c: d\n',
            "rules.yaml:1: invalid YAML: did not find expected key (while parsing a block "
            f"mapping) ({INDENT_HINT})",
        ),
        (
            "x: {a: {{ b }}}\n",
            "rules.yaml:1: invalid YAML: found an unhashable key (while constructing a mapping) "
            f"({TEMPLATE_HINT})",
        ),
        (
            "x: [{{ a }} }\n",
            "rules.yaml:1: invalid YAML: did not find expected ',' or ']' (while parsing a flow "
            f"sequence) ({TEMPLATE_HINT})",
        ),
        (  # a quote that is closed: no hint about quotes
            'a: "\\q"\n',
            "rules.yaml:1: invalid YAML: found unknown escape character (while parsing a quoted "
            "scalar)",
        ),
    ],
)
def test_a_syntax_error_hints_at_its_usual_cause_from_the_line_it_is_on(
    text: str, said: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_yaml(text, "rules.yaml")
    assert str(caught.value) == said


def test_the_config_keeps_yamls_own_sets_and_ordered_maps_where_rule_files_refuse_them() -> None:
    data, _ = load_yaml(
        "x: !!set {a: null}\ny: !!omap [{a: 1}]\n", "config.yaml", json_values=False
    )
    assert data == {"x": {"a"}, "y": [("a", 1)]}
    with pytest.raises(ConfigError) as caught:
        load_yaml("x: !!set {a: null}\n", "rules.yaml")
    assert str(caught.value) == (
        "rules.yaml:1: invalid YAML: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:set'"
    )


def test_an_unhashable_key_is_refused_at_its_own_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_yaml("a: 1\n? [a, b]\n: 1\n", "rules.yaml")
    assert str(caught.value) == (
        "rules.yaml:2: invalid YAML: found an unhashable key (while constructing a mapping)"
    )


def test_a_character_yaml_does_not_allow_is_refused_at_its_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_yaml("\na: 1\nb: \x07\n", "rules.yaml")
    assert str(caught.value) == (
        "rules.yaml:3: invalid YAML: unacceptable character #x0007: control characters are not "
        "allowed"
    )


def test_a_duplicate_key_is_quoted_whole_up_to_60_characters() -> None:
    text = "k" * 60 + ": 1\n" + "k" * 60 + ": 2\n" + "j" * 61 + ": 1\n" + "j" * 61 + ": 2\n"
    _, duplicates = load_yaml(text, "rules.yaml")
    again = "(YAML would keep only the last one; remove or rename one of them)"
    assert [str(error) for error in duplicates] == [
        f"rules.yaml:2: duplicate key `{'k' * 60}` (first at line 1) {again}",
        f"rules.yaml:4: duplicate key `{'j' * 60}...` (first at line 3) {again}",
    ]


def test_a_lists_items_know_their_lines_and_any_other_index_is_the_lists_line() -> None:
    data, _ = load_yaml("a: [\n  x,\n  y]\n", "rules.yaml")
    items = data["a"]
    assert [items.line_of(index) for index in (0, 1, 2, -1)] == [2, 3, 1, 1]


def test_a_file_is_read_up_to_512_kib(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("#" * (512 << 10))
    assert read_yaml_file(path) == "#" * (512 << 10)
    path.write_text("#" * ((512 << 10) + 1))
    with pytest.raises(ConfigError) as caught:
        read_yaml_file(path, "split it")
    assert str(caught.value) == f"{path}: larger than 512 KiB, too large to load (split it)"
    with pytest.raises(ConfigError) as caught:
        read_yaml_file(tmp_path / "nowhere.yaml")
    assert (
        str(caught.value) == f"{tmp_path / 'nowhere.yaml'}: cannot read: No such file or directory"
    )


def test_duplicate_keys_after_a_merge_key_are_found_too() -> None:
    _, duplicates = load_yaml("base: &b {y: 1}\nm:\n  <<: *b\n  x: 1\n  x: 2\n", "rules.yaml")
    assert [error.message for error in duplicates] == ["duplicate key `x` (first at line 4)"]


def test_a_hundred_duplicate_keys_are_reported_and_no_more() -> None:
    text = "".join(f"k{i}: 1\nk{i}: 2\n" for i in range(101))
    _, duplicates = load_yaml(text, "rules.yaml")
    assert len(duplicates) == 100
    assert duplicates[-1].message == "duplicate key `k99` (first at line 199)"
