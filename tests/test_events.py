"""The event normalizer accepts every dialect emnify sends (emnify-api.md §4.2–4.3)."""

import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from engine.errors import EventFormatError
from engine.events import ORGANISATION_KEY, format_timestamp, normalize

QUOTA_USED_UP = {
    "id": 412912410077392,
    "timestamp": "2025-05-01T16:05:03.000Z",
    "alert": True,
    "description": "Quota volume is completely used up and data access denied for endpoint.",
    "event_type": {"id": 19, "description": "Quota used up"},
    "event_source": {"id": 1, "description": "Policy Control"},
    "event_severity": {"id": 1, "description": "Warn"},
    "organisation": {"id": 731245, "name": "Acme Fleet GmbH"},
    "endpoint": {"id": 18345221, "name": "truck-0042", "tags": "fleet,berlin"},
    "sim": {"id": 9123344, "iccid": "8988303000012345678"},
    "imsi": {"id": 20553871, "imsi": "295050901234567"},
    "detail": {"quota": {"threshold_percentage": 20, "threshold_volume": 10, "volume": "0.0"}},
}

# Every field that holds an id: the event's own, and each nested object's.
ID_FIELDS = ("id", "sim", "endpoint", "event_type", "event_source", "event_severity")


def _with_id(field: str, value: object) -> dict[str, object]:
    """The documented event with `value` as the id of `field`."""
    if field == "id":
        return {**QUOTA_USED_UP, "id": value}
    return {**QUOTA_USED_UP, field: {**QUOTA_USED_UP[field], "id": value}}


def test_reads_the_typed_fields_of_a_documented_event():
    event = normalize(QUOTA_USED_UP)
    assert event.id == 412912410077392
    assert event.timestamp == datetime(2025, 5, 1, 16, 5, 3, tzinfo=UTC)
    assert (event.type_id, event.source_id, event.severity_id) == (19, 1, 1)
    assert event.alert is True
    assert event.description == QUOTA_USED_UP["description"]
    assert (event.sim_id, event.iccid) == (9123344, "8988303000012345678")
    assert (event.endpoint_id, event.endpoint_name) == (18345221, "truck-0042")
    assert event.tags == frozenset({"fleet", "berlin"})
    assert event.type_name == "Quota used up"
    assert event.raw["detail"]["quota"]["volume"] == "0.0"


def test_keeps_64_bit_event_ids_exact():
    event = normalize({**QUOTA_USED_UP, "id": 9_223_372_036_854_775_000})
    assert event.id == 9_223_372_036_854_775_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2022-03-27T23:20:49.298Z", datetime(2022, 3, 27, 23, 20, 49, 298000, tzinfo=UTC)),
        ("2017-10-26T07:28:00.000+0000", datetime(2017, 10, 26, 7, 28, tzinfo=UTC)),
        ("2019-01-21T09:36:17Z", datetime(2019, 1, 21, 9, 36, 17, tzinfo=UTC)),
        ("2021-10-06 10:42:58", datetime(2021, 10, 6, 10, 42, 58, tzinfo=UTC)),
        ("2021-10-06T12:42:58+02:00", datetime(2021, 10, 6, 10, 42, 58, tzinfo=UTC)),
    ],
)
def test_parses_every_timestamp_format_seen_as_utc(text, expected):
    assert normalize({**QUOTA_USED_UP, "timestamp": text}).timestamp == expected


def test_alert_as_one_or_zero_becomes_a_bool_in_raw_too():
    assert normalize({**QUOTA_USED_UP, "alert": 1}).raw["alert"] is True
    assert normalize({**QUOTA_USED_UP, "alert": 0}).alert is False


def test_source_with_name_instead_of_description_is_understood():
    record = {**QUOTA_USED_UP, "event_source": {"name": "Policy Control"}}
    event = normalize(record)
    assert event.source_id == 1
    assert event.raw["event_source"]["description"] == "Policy Control"


def test_severity_text_without_id_is_folded_to_its_id():
    event = normalize({**QUOTA_USED_UP, "event_severity": {"description": "CRITICAL"}})
    assert event.severity_id == 2


def test_detail_given_as_a_json_string_is_parsed():
    record = {**QUOTA_USED_UP, "detail": '{"quota": {"volume": 5}}'}
    assert normalize(record).raw["detail"] == {"quota": {"volume": 5}}


@pytest.mark.parametrize("missing", ["endpoint", "sim", "imsi", "detail", "user"])
def test_null_or_missing_nested_objects_are_fine(missing):
    record = {**QUOTA_USED_UP, missing: None}
    assert normalize(record).id == QUOTA_USED_UP["id"]
    del record[missing]
    assert normalize(record).id == QUOTA_USED_UP["id"]


def test_event_without_sim_has_no_sim_target():
    event = normalize({**QUOTA_USED_UP, "sim": None})
    assert event.target() == {"sim_id": None, "endpoint_id": 18345221, "iccid": None}


def test_an_event_read_for_a_named_organisation_names_it_in_its_target():
    event = normalize({**QUOTA_USED_UP, "sim": None, ORGANISATION_KEY: "acme"})
    assert event.target() == {
        "sim_id": None,
        "endpoint_id": 18345221,
        "iccid": None,
        "organisation": "acme",
    }


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({**QUOTA_USED_UP, "id": None}, "id"),
        ({**QUOTA_USED_UP, "id": "abc"}, "id"),
        ({**QUOTA_USED_UP, "timestamp": "yesterday"}, "timestamp"),
        ({**QUOTA_USED_UP, "timestamp": None}, "timestamp"),
        ({**QUOTA_USED_UP, "sim": "9123344"}, "sim"),
        ({**QUOTA_USED_UP, "event_type": {"id": "nineteen"}}, "event_type.id"),
    ],
)
def test_malformed_records_raise_a_located_format_error(record, field):
    with pytest.raises(EventFormatError) as caught:
        normalize(record)
    assert caught.value.field == field


def test_a_missing_id_is_said_to_be_missing():
    with pytest.raises(EventFormatError) as caught:
        normalize({**QUOTA_USED_UP, "id": ""})
    assert str(caught.value) == "id: missing"


def test_a_record_that_is_not_an_object_is_rejected():
    with pytest.raises(EventFormatError):
        normalize([1, 2, 3])


def test_format_timestamp_writes_the_event_api_format():
    moment = datetime(2025, 5, 1, 10, 2, 11, 5000, tzinfo=UTC)
    assert format_timestamp(moment) == "2025-05-01T10:02:11.005Z"


# -- the lenient dialects, one behaviour each ------------------------------------------------


@pytest.mark.parametrize(
    ("severity", "expected"),
    [
        ({"description": "Info"}, 0),
        ({"description": " warning "}, 1),
        ({"name": "Warn"}, 1),
        ({"description": None, "name": "Warn"}, 1),
        ({"id": "2"}, 2),
        ({"description": "Catastrophic"}, None),
        ({"description": 7}, None),
        ({}, None),
    ],
)
def test_a_severity_given_by_name_or_as_text_is_folded_to_its_id(severity, expected):
    assert normalize({**QUOTA_USED_UP, "event_severity": severity}).severity_id == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"description": "Network"}, 0),
        ({"name": "policy_control"}, 1),
        ({"description": "API"}, 2),
        ({"description": "", "name": "api"}, 2),
        ({"id": " 1 "}, 1),
        ({"description": "Satellite"}, None),
    ],
)
def test_a_source_given_by_name_or_as_text_is_folded_to_its_id(source, expected):
    assert normalize({**QUOTA_USED_UP, "event_source": source}).source_id == expected


def test_a_severity_with_name_instead_of_description_shows_it_as_description():
    event = normalize({**QUOTA_USED_UP, "event_severity": {"id": 2, "name": "Critical"}})
    assert event.raw["event_severity"] == {"id": 2, "name": "Critical", "description": "Critical"}


@pytest.mark.parametrize(
    ("field", "given"),
    [
        ("event_source", {"id": 1, "description": "Policy Control", "name": "pcrf"}),
        ("event_severity", {"id": 1, "description": "Warn", "name": "minor"}),
    ],
)
def test_a_description_already_given_is_not_replaced_by_the_name(field, given):
    event = normalize({**QUOTA_USED_UP, field: given})
    assert event.raw[field]["description"] == given["description"]


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        (1_746_115_503, datetime(2025, 5, 1, 16, 5, 3, tzinfo=UTC)),
        (1_746_115_503.5, datetime(2025, 5, 1, 16, 5, 3, 500000, tzinfo=UTC)),
        (1_746_115_503_250, datetime(2025, 5, 1, 16, 5, 3, 250000, tzinfo=UTC)),
        # The edge between seconds and milliseconds: 1e11 s is in the year 5138.
        (100_000_000_000, datetime(5138, 11, 16, 9, 46, 40, tzinfo=UTC)),
        (100_000_000_001, datetime(1973, 3, 3, 9, 46, 40, 1000, tzinfo=UTC)),
    ],
)
def test_an_epoch_timestamp_in_seconds_or_milliseconds_is_read_as_utc(stamp, expected):
    assert normalize({**QUOTA_USED_UP, "timestamp": stamp}).timestamp == expected


@pytest.mark.parametrize("stamp", [10**20, float("inf"), True, "", ["2025-05-01"]])
def test_a_timestamp_out_of_range_or_of_another_kind_is_a_format_error(stamp):
    with pytest.raises(EventFormatError) as caught:
        normalize({**QUOTA_USED_UP, "timestamp": stamp})
    assert caught.value.field == "timestamp"


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_timestamp_its_zone_moves_past_the_calendars_edge_is_a_format_error(stamp):
    with pytest.raises(EventFormatError) as caught:
        normalize({**QUOTA_USED_UP, "timestamp": stamp})
    assert str(caught.value) == f"timestamp: timestamp {stamp} is out of range in UTC"


def test_a_timestamp_with_a_zone_is_moved_to_utc_and_one_without_is_taken_as_utc():
    east = normalize({**QUOTA_USED_UP, "timestamp": "2025-05-01T18:05:03+02:00"}).timestamp
    bare = normalize({**QUOTA_USED_UP, "timestamp": "2025-05-01T16:05:03"}).timestamp
    assert east == bare == datetime(2025, 5, 1, 16, 5, 3, tzinfo=UTC)
    assert east.tzinfo is UTC and bare.tzinfo is UTC


@pytest.mark.parametrize(
    ("alert", "expected"),
    [
        ("true", True),
        (" Yes ", True),
        ("1", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("", False),
        (None, False),
        (2, True),
    ],
)
def test_alert_given_as_text_a_number_or_null_becomes_a_bool(alert, expected):
    event = normalize({**QUOTA_USED_UP, "alert": alert})
    assert event.alert is expected and event.raw["alert"] is expected


def test_a_missing_alert_is_false():
    record = dict(QUOTA_USED_UP)
    del record["alert"]
    assert normalize(record).alert is False


def test_tags_given_as_a_list_are_whole_tags_in_their_order_without_blanks_or_repeats():
    endpoint = {"id": 1, "name": "t", "tags": [" vip ", "berlin", "", "vip", 7]}
    event = normalize({**QUOTA_USED_UP, "endpoint": endpoint})
    assert event.tags == frozenset({"vip", "berlin", "7"})
    assert event.raw["endpoint"]["tag_list"] == ["vip", "berlin", "7"]


def test_tags_given_as_text_are_split_at_commas_and_listed_in_their_order():
    endpoint = {"id": 1, "tags": "b, a,,b , c"}
    event = normalize({**QUOTA_USED_UP, "endpoint": endpoint})
    assert event.tags == frozenset({"a", "b", "c"})
    assert event.raw["endpoint"]["tag_list"] == ["b", "a", "c"]
    assert "tag_list" not in QUOTA_USED_UP["endpoint"]  # the record itself is left alone


@pytest.mark.parametrize("tags", [None, "", 5])
def test_an_endpoint_without_readable_tags_has_none(tags):
    event = normalize({**QUOTA_USED_UP, "endpoint": {"id": 1, "tags": tags}})
    assert event.tags == frozenset()
    assert event.raw["endpoint"]["tag_list"] == []


def test_without_tag_list_the_endpoint_is_left_as_it_came_but_tags_are_still_read():
    event = normalize(QUOTA_USED_UP, tag_list=False)
    assert event.raw is QUOTA_USED_UP
    assert event.tags == frozenset({"fleet", "berlin"})


@pytest.mark.parametrize("alert", [True, False])
def test_a_record_already_normalized_is_its_own_raw(alert):
    once = normalize({**QUOTA_USED_UP, "alert": alert}).raw
    assert normalize(once).raw is once


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2**63 - 1, 2**63 - 1),
        (-(2**63), -(2**63)),
        (str(2**63 - 1), 2**63 - 1),
        (" 42 ", 42),
        (42.0, 42),
        (str(-(2**63)), -(2**63)),
        (2.0**53 - 1, 2**53 - 1),
        (-(2.0**53) + 1, -(2**53) + 1),
    ],
)
def test_ids_up_to_the_64_bit_edges_are_read_exactly(value, expected):
    for field in ID_FIELDS:
        event = normalize(_with_id(field, value))
        read = {"id": event.id, "sim": event.sim_id, "endpoint": event.endpoint_id}
        read |= {"event_type": event.type_id, "event_source": event.source_id}
        read["event_severity"] = event.severity_id
        assert read[field] == expected


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (2**63, "out of range for an id"),
        (-(2**63) - 1, "out of range for an id"),
        (str(2**63), "out of range for an id"),
        (str(-(2**63) - 1), "out of range for an id"),
        (2.0**53, "rounded by the JSON reader"),
        (-(2.0**53), "rounded by the JSON reader"),
        (1.5, "expected an integer"),
        (True, "expected an integer"),
        ("twelve", "expected an integer"),
    ],
)
def test_ids_past_the_64_bit_edges_or_rounded_are_format_errors(value, says):
    for field in ID_FIELDS:
        with pytest.raises(EventFormatError, match=says) as caught:
            normalize(_with_id(field, value))
        assert caught.value.field == ("id" if field == "id" else f"{field}.id")
        if "range" in says:
            assert str(value) in caught.value.reason  # the value as it came


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("x" * 100, f"expected an integer, got {'x' * 40!r}"),
        ("9" * 100, f"{'9' * 40} is out of range for an id"),
    ],
)
def test_a_bad_id_is_quoted_in_the_error_cut_to_40_characters(value, reason):
    with pytest.raises(EventFormatError) as caught:
        normalize({**QUOTA_USED_UP, "id": value})
    assert caught.value.reason == reason


def test_a_sim_without_iccid_has_none_and_a_numeric_one_is_read_as_text():
    assert normalize({**QUOTA_USED_UP, "sim": {"id": 5}}).iccid is None
    event = normalize({**QUOTA_USED_UP, "sim": {"id": 5, "iccid": 8988303000012345678}})
    assert event.iccid == "8988303000012345678"


def test_a_numeric_endpoint_name_is_read_as_text_and_a_missing_one_is_none():
    assert normalize({**QUOTA_USED_UP, "endpoint": {"id": 1, "name": 42}}).endpoint_name == "42"
    assert normalize({**QUOTA_USED_UP, "endpoint": {"id": 1}}).endpoint_name is None


def test_an_event_without_type_has_no_type_id_or_name():
    event = normalize({**QUOTA_USED_UP, "event_type": None})
    assert (event.type_id, event.type_name) == (None, None)
    assert normalize({**QUOTA_USED_UP, "event_type": {}}).type_id is None


def test_a_missing_or_non_text_description_reads_as_empty():
    assert normalize({**QUOTA_USED_UP, "description": None}).description == ""
    assert normalize({**QUOTA_USED_UP, "description": 5}).description == ""


def test_detail_text_that_is_not_json_stays_text():
    for detail in ("{not json", "plain words", "  [1, 2]  "):
        parsed = normalize({**QUOTA_USED_UP, "detail": detail}).raw["detail"]
        assert parsed == ([1, 2] if detail.strip() == "[1, 2]" else detail)


class _Record(dict):
    """A dict subclass, as some JSON readers build."""


def test_a_dict_subclass_is_read_like_a_dict_and_a_nested_non_object_is_named():
    record = _Record({**QUOTA_USED_UP, "endpoint": _Record(QUOTA_USED_UP["endpoint"])})
    assert normalize(record).endpoint_id == 18345221
    for key in ("event_type", "event_source", "event_severity", "endpoint"):
        with pytest.raises(EventFormatError) as caught:
            normalize({**QUOTA_USED_UP, key: [1]})
        assert caught.value.field == key


def test_an_event_sorts_by_time_then_id_and_aims_at_its_sim_and_endpoint():
    early = normalize({**QUOTA_USED_UP, "id": 9, "timestamp": "2025-05-01T10:00:00Z"})
    late = normalize({**QUOTA_USED_UP, "id": 1, "timestamp": "2025-05-01T11:00:00Z"})
    assert early.sort_key() < late.sort_key()
    assert late.target() == {
        "sim_id": 9123344,
        "endpoint_id": 18345221,
        "iccid": "8988303000012345678",
    }


def test_events_at_the_same_moment_sort_by_id():
    first = normalize({**QUOTA_USED_UP, "id": 1})
    second = normalize({**QUOTA_USED_UP, "id": 2})
    assert first.sort_key() < second.sort_key()


@pytest.fixture
def machine_clock_three_hours_east(monkeypatch):
    """The machine's own time zone three hours east of UTC, as on a server in Moscow."""
    monkeypatch.setenv("TZ", "EAST-3")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("machine_clock_three_hours_east")
def test_a_timestamp_without_a_zone_is_utc_whatever_the_machines_zone():
    stamp = normalize({**QUOTA_USED_UP, "timestamp": "2025-05-01T16:05:03"}).timestamp
    assert stamp == datetime(2025, 5, 1, 16, 5, 3, tzinfo=UTC)


@pytest.mark.usefixtures("machine_clock_three_hours_east")
def test_format_timestamp_writes_utc_whatever_the_moments_or_the_machines_zone():
    moment = datetime(2025, 5, 1, 12, 2, 11, 5000, tzinfo=timezone(timedelta(hours=2)))
    assert format_timestamp(moment) == "2025-05-01T10:02:11.005Z"


def test_an_unreadable_timestamp_is_reported_with_its_text_cut_to_40_characters():
    with pytest.raises(EventFormatError) as caught:
        normalize({**QUOTA_USED_UP, "timestamp": "yesterday " * 10})
    assert caught.value.reason == f"unrecognised timestamp {('yesterday ' * 10)[:40]!r}"


def test_a_timestamp_of_no_known_kind_is_said_to_be_missing_or_not_text():
    with pytest.raises(EventFormatError) as caught:
        normalize({**QUOTA_USED_UP, "timestamp": None})
    assert str(caught.value) == "timestamp: missing or not a string"


def test_an_epoch_timestamp_out_of_range_is_reported_with_its_value():
    with pytest.raises(EventFormatError) as caught:
        normalize({**QUOTA_USED_UP, "timestamp": 10**20})
    assert caught.value.reason == f"timestamp {10**20!r} out of range"


def test_an_event_without_source_or_severity_has_neither_id():
    for missing in (None, {}):
        record = {**QUOTA_USED_UP, "event_source": missing, "event_severity": missing}
        event = normalize(record)
        assert (event.source_id, event.severity_id) == (None, None)


def test_an_event_without_endpoint_has_no_endpoint_id_name_or_tags():
    for tag_list in (True, False):
        event = normalize({**QUOTA_USED_UP, "endpoint": None}, tag_list=tag_list)
        assert (event.endpoint_id, event.endpoint_name, event.tags) == (None, None, frozenset())
        assert event.target()["endpoint_id"] is None


def test_without_tag_list_an_endpoint_without_tags_has_none():
    event = normalize({**QUOTA_USED_UP, "endpoint": {"id": 1}}, tag_list=False)
    assert event.tags == frozenset()


def test_a_dict_subclass_beside_a_null_object_is_read_like_a_dict():
    record = {**QUOTA_USED_UP, "endpoint": _Record(QUOTA_USED_UP["endpoint"]), "sim": None}
    event = normalize(record)
    assert (event.endpoint_id, event.sim_id) == (18345221, None)


def test_a_nested_part_that_is_not_an_object_is_reported_with_what_it_is():
    with pytest.raises(EventFormatError) as caught:
        normalize({**QUOTA_USED_UP, "sim": "9123344"})
    assert str(caught.value) == "sim: expected an object, got str"


def test_a_record_that_is_not_an_object_is_reported_with_what_it_is():
    with pytest.raises(EventFormatError) as caught:
        normalize([1, 2, 3])
    assert str(caught.value) == "an event must be a JSON object, got list"
