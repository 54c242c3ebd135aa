"""`event-engine types` and finding an event type by name: the list rules resolve through,
did-you-mean that ignores word order, and a warning for an id the catalog does not know."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from engine.cli import main
from engine.simulator import SimulatorConfig, SimulatorServer

from helpers import TOKEN, write_rules


@pytest.fixture
def platform() -> Iterator[SimulatorServer]:
    """A simulator whose API lists an event type the engine's bundled list lacks."""
    config = SimulatorConfig(seed=3, endpoints=2, extra_event_types={90: "Satellite handover"})
    with SimulatorServer(config) as server:
        yield server


def test_types_lists_id_name_and_the_usual_source_and_severity(capsys: Any) -> None:
    assert main(["types"]) == 0
    out = capsys.readouterr().out
    header, _underline, *rows = out.splitlines()
    assert header.split() == ["id", "name", "usual", "source", "usual", "severity"]
    quota = next(row for row in rows if row.startswith("19 "))
    assert quota.split() == ["19", "Quota", "used", "up", "Policy", "Control", "Warn"]
    assert any(row.startswith("1 ") and "Update location" in row for row in rows)


def test_types_finds_types_by_words_in_any_order_or_by_id(capsys: Any) -> None:
    assert main(["types", "used", "QUOTA", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [(t["id"], t["name"]) for t in found] == [
        (19, "Quota used up"),
        (21, "SMS quota used up"),
    ]
    assert found[0]["source"] == "Policy Control" and found[0]["severity"] == "Warn"
    assert main(["types", "12"]) == 0
    assert "Organisation blocked" in capsys.readouterr().out
    assert main(["types", "no-such-type"]) == 0
    assert "no event type matches" in capsys.readouterr().out


def test_types_with_a_config_shows_the_types_only_the_api_knows(
    tmp_path: Any, platform: SimulatorServer, capsys: Any, monkeypatch: Any
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"api:\n  base_url: {platform.base_url}\n", encoding="utf-8")
    monkeypatch.setenv("EMNIFY_APPLICATION_TOKEN", TOKEN)
    assert main(["types", "--config", str(config), "--json"]) == 0
    found = {t["id"]: t for t in json.loads(capsys.readouterr().out)}
    assert found[90] == {
        "id": 90,
        "name": "Satellite handover",
        "source": None,
        "severity": None,
        "from": "api",
    }
    assert found[19]["from"] == "api, bundled"


def test_an_unknown_type_name_suggests_the_name_with_its_words_in_another_order(
    tmp_path: Any, capsys: Any
) -> None:
    path = write_rules(
        tmp_path,
        """\
        rules:
          - id: where-are-they
            when: {type: "Location update"}
            actions: [{log: {}}]
        """,
    )
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:3: rule `where-are-they` → when: unknown event type `Location update`" in err
    assert "(did you mean `Update location`?)" in err


def test_validate_warns_of_a_type_id_the_catalog_does_not_know_and_passes(
    tmp_path: Any, capsys: Any
) -> None:
    path = write_rules(
        tmp_path,
        """\
        rules:
          - id: typo
            when:
              type:
                - 19
                - 919
            actions: [{log: {}}]
          - id: in-a-condition
            condition: {"==": [{"var": "event_type.id"}, 77]}
            actions: [{log: {}}]
        """,
    )
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("warning:")] == [
        f"warning: {path}:6: rule `typo` → when: event type 919 is not in the catalog "
        "(`event-engine types` lists the known ones; an id the API added since is fine, and "
        "`event-engine types --config FILE` shows the API's own list)",
        f"warning: {path}:9: rule `in-a-condition`: event type 77 is not in the catalog "
        "(`event-engine types` lists the known ones; an id the API added since is fine, and "
        "`event-engine types --config FILE` shows the API's own list)",
    ]


def test_the_usual_source_and_severity_agree_with_the_simulators_events() -> None:
    # Two tables say what events of a type look like: the bundled catalog (for people) and
    # the simulator's profiles (for the events it makes). They must not drift apart.
    from engine.events import SEVERITIES, SOURCES
    from engine.rules import EventTypeCatalog
    from engine.simulator.catalog import _PROFILES

    catalog = EventTypeCatalog.bundled()
    for type_id, profile in _PROFILES.items():
        typical = catalog.typical(type_id)
        assert (typical.source, typical.severity) == (
            SOURCES[profile.source],
            SEVERITIES[profile.severity],
        ), type_id
