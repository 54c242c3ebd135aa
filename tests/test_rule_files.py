"""Rule files and folders: which files a rule set is read from, the shape of a file, and
the refusals about files (not about one rule) word for word."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import yamlfile
from engine.errors import RuleSetError
from engine.rules import EventTypeCatalog, RuleSet, load_rules, load_rules_text, loader
from engine.rules.catalog import TypicalOrigin

RULE = "rules:\n  - id: {}\n    actions: [{{log: {{}}}}]\n"
NO_RULES_HINT = "(add rules under `rules:`, each with an `id` and `actions`)"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def refusals(load: object) -> list[str]:
    with pytest.raises(RuleSetError) as caught:
        load()  # type: ignore[operator]
    return [str(error) for error in caught.value.errors]


def text_refusals(text: str) -> list[str]:
    return refusals(lambda: load_rules_text(text))


# --- which files -----------------------------------------------------------------------------


def test_a_folder_is_read_in_name_order_skipping_other_files_and_folders(tmp_path: Path) -> None:
    write(tmp_path / "b.yml", RULE.format("b"))
    write(tmp_path / "a.yaml", RULE.format("a"))
    write(tmp_path / "c.txt", RULE.format("c"))
    write(tmp_path / "sub" / "d.yaml", RULE.format("d"))
    (tmp_path / "folder.yaml").mkdir()
    assert [rule.id for rule in load_rules(tmp_path)] == ["a", "b"]
    assert [rule.id for rule in load_rules(str(tmp_path / "b.yml"))] == ["b"]


def test_a_folder_without_rule_files_and_a_path_that_is_not_there_are_refused(
    tmp_path: Path,
) -> None:
    write(tmp_path / "notes.txt", "rules: []\n")
    (tmp_path / "x.yaml").mkdir()
    assert refusals(lambda: load_rules(tmp_path)) == [
        f"no rule files (*.yaml, *.yml) in {tmp_path}"
    ]
    assert refusals(lambda: load_rules(tmp_path / "nope")) == [
        f"{tmp_path / 'nope'} does not exist (give a rule file or folder)"
    ]


CANNOT_READ_HINT = (
    "(the user the engine runs as needs to read the rules and enter their folders: see "
    "docs/service.md)"
)


def test_a_path_that_cannot_be_read_is_refused_with_the_reason(tmp_path: Path) -> None:
    long = tmp_path / ("n" * 300)
    assert refusals(lambda: load_rules(long)) == [
        f"{str(long)[:200]}...: cannot read: File name too long {CANNOT_READ_HINT}"
    ]


def test_a_path_refused_is_shown_whole_up_to_200_characters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forbidden(path: Path) -> bool:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "is_dir", forbidden)
    exact = "/" + "n" * 199
    assert refusals(lambda: load_rules(exact)) == [
        f"{exact}: cannot read: Permission denied {CANNOT_READ_HINT}"
    ]
    assert refusals(lambda: load_rules(exact + "x")) == [
        f"{exact}...: cannot read: Permission denied {CANNOT_READ_HINT}"
    ]

    def odd(path: Path) -> bool:
        raise OSError("no reason given")

    monkeypatch.setattr(Path, "is_dir", odd)
    assert refusals(lambda: load_rules("/r")) == [
        f"/r: cannot read: no reason given {CANNOT_READ_HINT}"
    ]


def test_the_rules_of_an_organisations_folder_judge_its_events_alone(tmp_path: Path) -> None:
    write(tmp_path / "shared" / "a.yaml", RULE.format("shared"))
    write(
        tmp_path / "acme" / "own.yaml",
        "rules:\n  - id: own\n    actions: [{log: {}}]\n"
        "  - id: named\n    organisation: acme\n    actions: [{log: {}}]\n",
    )
    found = load_rules(
        tmp_path / "shared", organisations={"acme": tmp_path / "acme", "globex": None}
    )
    assert [(rule.id, rule.organisation) for rule in found] == [
        ("shared", None),
        ("own", "acme"),
        ("named", "acme"),
    ]


def test_a_rule_in_an_organisations_folder_naming_another_organisation_is_refused(
    tmp_path: Path,
) -> None:
    write(tmp_path / "shared.yaml", RULE.format("shared"))
    own = write(
        tmp_path / "acme" / "own.yaml",
        "rules:\n  - id: ok\n    actions: [{log: {}}]\n"
        "  - id: r\n    organisation: globex\n    actions: [{log: {}}]\n",
    )
    assert refusals(
        lambda: load_rules(
            tmp_path / "shared.yaml", organisations={"acme": own.parent, "globex": None}
        )
    ) == [
        f"{own}:4: rule `r` names organisation 'globex', but is in the rule folder of "
        "organisation 'acme' (move it to the shared rules or that organisation's folder, or "
        "drop `organisation:`)"
    ]


def test_organisation_names_a_configured_one_when_the_config_lists_them(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        "rules:\n  - id: r\n    organisation: acmee\n    actions: [{log: {}}]\n"
        "  - id: s\n    organisation: zzz\n    actions: [{log: {}}]\n",
    )
    assert refusals(lambda: load_rules(path, organisations={"acme": None, "globex": None})) == [
        f"{path}:3: rule `r`: unknown organisation 'acmee' (did you mean `acme`?)",
        f"{path}:6: rule `s`: unknown organisation 'zzz' (configured: acme, globex)",
    ]
    assert refusals(lambda: load_rules(path, organisations={})) == [
        f"{path}:3: rule `r`: unknown organisation 'acmee' (the config lists no "
        "`organisations:`; drop `organisation:` or add it there)",
        f"{path}:6: rule `s`: unknown organisation 'zzz' (the config lists no "
        "`organisations:`; drop `organisation:` or add it there)",
    ]
    ok = write(
        tmp_path / "ok.yaml",
        RULE.format("o").replace("    actions", "    organisation: acme\n    actions"),
    )
    assert [r.organisation for r in load_rules(ok, organisations={"acme": None})] == ["acme"]


# --- the shape of a file -----------------------------------------------------------------


def test_a_file_holds_rules_and_a_list_or_is_a_list() -> None:
    assert [rule.id for rule in load_rules_text("- id: a\n  actions: [{log: {}}]\n")] == ["a"]
    assert text_refusals("rules: {a: 1}\nrule: 1\nxyzzy: 2\n") == [
        "<rules>:1: a rule file holds `rules:` and a list of rules, got a mapping",
        "<rules>:2: unknown top-level key `rule` (did you mean `rules`?)",
        "<rules>:3: unknown top-level key `xyzzy` (a rule file holds `rules:` and a list)",
    ]
    assert text_refusals("5") == [
        "<rules>:1: a rule file holds `rules:` and a list of rules, got the number 5"
    ]


@pytest.mark.parametrize("text", ["", "[]", "{}", "# rules\n\nrules:\n", "rules: []\n"])
def test_a_file_without_rules_is_refused_at_its_rules_key(text: str) -> None:
    line = 3 if text.startswith("#") else 1
    assert text_refusals(text) == [f"<rules>:{line}: no rules found in <rules> {NO_RULES_HINT}"]


def test_load_rules_text_names_the_file_it_stands_for() -> None:
    with pytest.raises(RuleSetError) as caught:
        load_rules_text("[]", "inline.yaml")
    assert [str(e) for e in caught.value.errors] == [
        f"inline.yaml:1: no rules found in inline.yaml {NO_RULES_HINT}"
    ]


def test_rules_are_numbered_from_one_and_placed_at_their_item(tmp_path: Path) -> None:
    text = "rules:\n  - id: a\n    actions: [{log: {}}]\n\n  - {}\n  - 7\n"
    assert text_refusals(text) == [
        "<rules>:5: rule #2: missing `id` (add e.g. `id: block-sim-on-quota-exhausted`)",
        "<rules>:5: rule #2: missing `actions` (e.g. actions: [{suspend_sim: {}}])",
        "<rules>:6: rule #3 must be a mapping with `id`, `when`, `actions`, ..., got the number 7",
    ]


def test_a_duplicate_id_is_refused_where_it_is_written_again() -> None:
    text = (
        "rules:\n  - id: a\n    actions: [{log: {}}]\n"
        "  - actions: [{log: {}}]\n    id: a\n"
        "  - id: 'b c'\n    actions: [{log: {}}]\n  - id: 'b c'\n    actions: [{log: {}}]\n"
    )
    assert text_refusals(text) == [
        "<rules>:5: duplicate rule id `a`, first defined at <rules>:2 (rule ids must be unique "
        "across all rule files: state is keyed on them)",
        "<rules>:6: rule #3: `id` 'b c' may only use letters, digits, `_`, `.` and `-` (e.g. "
        "block-sim-on-quota-exhausted)",
        "<rules>:8: rule #4: `id` 'b c' may only use letters, digits, `_`, `.` and `-` (e.g. "
        "block-sim-on-quota-exhausted)",
    ]


def test_the_problems_of_a_set_are_listed_by_file_then_line(tmp_path: Path) -> None:
    write(
        tmp_path / "b.yaml",
        "rules:\n  - id: b\n    mode: x\n    enabled: 2\n    actions: [{log: {}}]\n  - 5\n",
    )
    write(tmp_path / "a.yaml", "rules:\n  - id: a\n    actions: []\n")
    write(tmp_path / "c.yaml", "[")
    found = refusals(lambda: load_rules(tmp_path))
    assert [m.split(": ")[0] for m in found] == [
        f"{tmp_path / 'a.yaml'}:3",
        f"{tmp_path / 'b.yaml'}:3",
        f"{tmp_path / 'b.yaml'}:4",
        f"{tmp_path / 'b.yaml'}:6",
        f"{tmp_path / 'c.yaml'}:2",
    ]


def test_a_file_that_cannot_be_read_is_refused_and_the_others_still_judged(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "a.yaml"
    bad.write_bytes(b"rules: \xff\n")
    write(tmp_path / "b.yaml", "rules:\n  - id: b\n    mode: x\n    actions: [{log: {}}]\n")
    assert refusals(lambda: load_rules(tmp_path)) == [
        f"{bad}: not UTF-8 text (invalid start byte)",
        f"{tmp_path / 'b.yaml'}:3: rule `b`: `mode` must be `live` or `shadow`, got the string 'x'",
    ]


def test_problems_past_a_hundred_in_a_file_are_cut_with_a_note_where_they_stop() -> None:
    text = "rules:\n" + "".join(f"  - {n}\n" for n in range(150))
    found = text_refusals(text)
    assert len(found) == 101
    assert found[99].startswith("<rules>:101: rule #100 must be a mapping")
    assert found[100] == "<rules>:102: more problems after these 100, not listed (fix these first)"
    # A file whose rules give 100 problems exactly lists them all.
    assert len(text_refusals("rules:\n" + "".join(f"  - {n}\n" for n in range(100)))) == 100


def test_a_bug_while_loading_one_file_is_reported_with_the_file_and_the_others_judged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(data: object, *args: object) -> object:
        if isinstance(data, dict) and data.get("id") == "boom":
            raise ValueError("x" * 300)
        if isinstance(data, dict) and data.get("id") == "deep":
            raise RecursionError("too deep")
        if isinstance(data, dict) and data.get("id") == "big":
            raise MemoryError
        return real(data, *args)

    real = loader.parse_rule
    monkeypatch.setattr(loader, "parse_rule", broken)
    # The problem found before the bug stays; the file's own problem is listed first.
    a = write(tmp_path / "a.yaml", "[5, {id: boom, actions: [{log: {}}]}]\n")
    b = write(tmp_path / "b.yaml", RULE.format("deep"))
    c = write(tmp_path / "c.yaml", RULE.format("big"))
    d = write(tmp_path / "d.yaml", "rules:\n  - id: d\n    mode: x\n    actions: [{log: {}}]\n")
    assert refusals(lambda: load_rules(tmp_path)) == [
        f"{a}: internal error while loading: ValueError: {'x' * 200} (this is a bug in the "
        "engine; please report it with the file)",
        f"{a}:1: rule #1 must be a mapping with `id`, `when`, `actions`, ..., got the number 5",
        f"{b}: too costly to load (RecursionError)",
        f"{c}: too costly to load (MemoryError)",
        f"{d}:3: rule `d`: `mode` must be `live` or `shadow`, got the string 'x'",
    ]


def test_rules_are_judged_against_the_catalog_given() -> None:
    catalog = EventTypeCatalog({901: "Own thing"}, {901: TypicalOrigin(carries=frozenset())})
    found = load_rules_text(
        "rules:\n  - id: r\n    when: {type: own thing}\n    actions: [{suspend_sim: {}}]\n",
        catalog=catalog,
    )
    assert isinstance(found, RuleSet)
    assert found.rules[0].when.type_ids == frozenset({901})
    assert len(found.warnings) == 1


def test_a_file_over_the_size_cap_is_refused_with_the_advice_to_split_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(yamlfile, "MAX_FILE_BYTES", 2048)
    big = write(tmp_path / "big.yaml", RULE.format("b") + "#" * 2048 + "\n")
    assert refusals(lambda: load_rules(big)) == [
        f"{big}: larger than 2 KiB, too large to load (split the rules over several files in "
        "one folder)"
    ]


def test_an_empty_rules_key_is_pointed_at_where_it_is_written() -> None:
    assert text_refusals("# shared\nrules: []\n")[-1] == (
        f"<rules>:2: no rules found in <rules> {NO_RULES_HINT}"
    )
    assert text_refusals("rulez: 1\nrules:\n") == [
        "<rules>:1: unknown top-level key `rulez` (did you mean `rules`?)",
        f"<rules>:2: no rules found in <rules> {NO_RULES_HINT}",
    ]
