"""The event normalizer accepts every dialect emnify sends (emnify-api.md §4.2–4.3)."""

from datetime import UTC, datetime

import pytest

from engine.errors import EventFormatError
from engine.events import format_timestamp, normalize

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


def test_reads_the_typed_fields_of_a_documented_event():
    event = normalize(QUOTA_USED_UP)
    assert event.id == 412912410077392
    assert event.timestamp == datetime(2025, 5, 1, 16, 5, 3, tzinfo=UTC)
    assert (event.type_id, event.source_id, event.severity_id) == (19, 1, 1)
    assert event.alert is True
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


def test_a_record_that_is_not_an_object_is_rejected():
    with pytest.raises(EventFormatError):
        normalize([1, 2, 3])


def test_format_timestamp_writes_the_event_api_format():
    moment = datetime(2025, 5, 1, 10, 2, 11, 5000, tzinfo=UTC)
    assert format_timestamp(moment) == "2025-05-01T10:02:11.005Z"
