"""The event-type catalogue: names and ids both ways, read leniently, what events of a type
usually carry, and the suggestions for a name that resolves to none."""

from __future__ import annotations

import pytest

from engine.rules import EventTypeCatalog
from engine.rules.catalog import TypicalOrigin

NAMES = {
    6: "SMS quota used up",
    1: "Update location",
    2: "Location updated",
    3: "Update GPRS location",
    4: "Quota used up",
    5: "Purge location",
    7: "Location purged",
    8: "GPRS location update",
}


def test_names_resolve_whatever_their_case_spacing_dashes_or_spelling_of_organisation() -> None:
    catalog = EventTypeCatalog({12: "Organisation blocked", 7: "SIM activation"})
    for written in (
        "Organisation blocked",
        "  ORGANIZATION__blocked ",
        "organization-\tBlocked",
        "organisation - _ blocked",
    ):
        assert catalog.id_of(written) == 12, written
    assert catalog.id_of("sim_activation") == 7
    assert catalog.id_of("simactivation") is None
    assert catalog.name_of(12) == "Organisation blocked"
    assert catalog.name_of(13) is None


def test_two_types_of_one_name_resolve_to_the_lower_id_and_ids_iterate_in_order() -> None:
    catalog = EventTypeCatalog({20: "Thing", 10: "thing ", 15: "Other"})
    assert catalog.id_of("THING") == 10
    assert list(catalog) == [10, 15, 20]
    assert len(catalog) == 3
    assert 15 in catalog and 16 not in catalog and "15" not in catalog


def test_a_label_is_the_id_and_the_name_or_the_id_alone() -> None:
    catalog = EventTypeCatalog({19: "Quota used up"})
    assert catalog.label(19) == "19 (Quota used up)"
    assert catalog.label(20) == "20"


def test_records_read_the_name_or_the_description_stripped() -> None:
    catalog = EventTypeCatalog.from_records(
        [
            {"id": 19, "description": " Quota used up "},
            {"id": 99, "name": "Something new", "description": "ignored"},
            {"id": 98, "name": "", "description": "By description"},
        ]
    )
    assert catalog.name_of(19) == "Quota used up"
    assert catalog.name_of(99) == "Something new"
    assert catalog.name_of(98) == "By description"


def test_records_keep_the_usual_source_severity_and_what_events_carry() -> None:
    catalog = EventTypeCatalog.from_records(
        [
            {"id": 1, "name": "a", "source": "API", "severity": "Warn", "carries": ["sim", 2]},
            {"id": 2, "name": "b", "source": 5, "severity": "Info", "carries": "sim"},
            {"id": 3, "name": "c", "carries": []},
            {"id": 4, "name": "d", "source": "Network"},
            {"id": 5, "name": "e"},
            {"id": 6, "name": "f", "source": "API", "severity": 3},
        ]
    )
    assert catalog.typical(1) == TypicalOrigin("API", "Warn", frozenset({"sim", "2"}))
    assert catalog.typical(2) == TypicalOrigin(None, "Info", None)
    assert catalog.typical(3) == TypicalOrigin(None, None, frozenset())
    assert catalog.typical(4) == TypicalOrigin("Network", None, None)
    assert catalog.typical(5) == TypicalOrigin() == catalog.typical(77)
    assert catalog.typical(6) == TypicalOrigin("API", None, None)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"id": True, "name": "x"},
            "event type record without an integer id: {'id': True, 'name': 'x'}",
        ),
        (
            {"id": "7", "name": "x"},
            "event type record without an integer id: {'id': '7', 'name': 'x'}",
        ),
        (
            {"name": "x" * 100},
            "event type record without an integer id: {'name': '" + "x" * 70,
        ),
        ({"id": 7, "name": "  "}, "event type 7 has no name"),
        ({"id": 7, "name": 5}, "event type 7 has no name"),
        ({"id": 7}, "event type 7 has no name"),
    ],
)
def test_a_record_without_an_integer_id_or_a_name_is_refused(
    record: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        EventTypeCatalog.from_records([record])
    assert str(caught.value) == message


def test_a_merged_catalog_takes_the_newer_names_and_origins_and_keeps_the_rest() -> None:
    older = EventTypeCatalog({19: "Quota used up", 8: "SIM activation"}, {19: TypicalOrigin("API")})
    newer = EventTypeCatalog(
        {19: "Data quota used up", 90: "Satellite"}, {19: TypicalOrigin("Policy Control")}
    )
    merged = older.merged(newer)
    assert list(merged) == [8, 19, 90]
    assert merged.id_of("data quota used up") == 19
    assert merged.id_of("quota used up") is None
    assert merged.name_of(8) == "SIM activation"
    assert merged.typical(19) == TypicalOrigin("Policy Control")
    assert older.name_of(19) == "Quota used up"  # the older catalog is left as it was


def test_the_bundled_catalog_is_read_once_and_knows_the_engines_own_events() -> None:
    catalog = EventTypeCatalog.bundled()
    assert catalog is EventTypeCatalog.bundled()
    assert catalog.label(19) == "19 (Quota used up)"
    assert catalog.typical(19) == TypicalOrigin("Policy Control", "Warn")
    assert catalog.typical(12).carries == frozenset()  # an organisation's event
    assert catalog.id_of("poll_failing") == 1001
    assert catalog.typical(1001).source == "Engine"


@pytest.mark.parametrize(
    ("written", "suggested"),
    [
        # The same words in another order come first, then names spelt alike; three at most.
        ("location update", ["Update location", "Location updated", "GPRS location update"]),
        # Names spelt alike, then names alike once each one's words are sorted.
        ("locaton gprs update", ["Location updated", "GPRS location update", "Location purged"]),
        ("used up quota sms", ["SMS quota used up", "Quota used up"]),
        ("quota used", ["Quota used up", "SMS quota used up"]),
        ("Location", ["Purge location", "Update location", "Location purged"]),
        # Names of the same words stand for each other by the first (lowest id) of them.
        ("gprs update", ["GPRS location update", "Update GPRS location"]),
        ("xyz", []),
    ],
)
def test_suggestions_for_a_name_that_resolves_to_none(written: str, suggested: list[str]) -> None:
    assert EventTypeCatalog(NAMES).suggest(written) == suggested
