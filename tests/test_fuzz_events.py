"""Property tests: whatever an event record looks like, the normalizer returns an Event or
raises EventFormatError naming the field, and a bad record never stops its batch."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import EventFormatError
from engine.events import normalize
from engine.pipeline import Pipeline
from engine.rules import load_rules_text
from engine.store import SqliteStore

FIELDS = [
    "id",
    "timestamp",
    "alert",
    "description",
    "event_type",
    "event_source",
    "event_severity",
    "endpoint",
    "sim",
    "imsi",
    "detail",
    "organisation",
    "user",
]
NESTED = ["id", "description", "name", "iccid", "tags", "imsi"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        [
            "2024-02-29T23:59:59Z",
            "2024-02-29T23:59:59.123+02:00",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "2024-13-01",
            "1709251199000",
            "",
            " 42 ",
            "{}",
            '{"quota": {"volume": "1.5"}}',
            "[1, 2",
            "vip,fleet",
        ]
    ),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(NESTED), st.text(max_size=8)), inner, max_size=4),
    ),
    max_leaves=12,
)
records = st.dictionaries(
    st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), json_values, max_size=10
)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(records)
def test_any_record_normalizes_or_fails_with_an_event_format_error_naming_the_field(record):
    try:
        event = normalize(record)
    except EventFormatError as error:
        assert error.field, f"no field named for {record!r}: {error}"
        assert str(error).startswith(error.field)
    else:
        assert isinstance(event.id, int)
        assert event.timestamp.tzinfo is not None


@FUZZ
@given(json_values)
def test_anything_that_is_not_an_object_is_refused_as_such(value):
    if isinstance(value, dict):
        return
    try:
        normalize(value)
    except EventFormatError as error:
        assert "an event must be a JSON object" in str(error)
    else:
        raise AssertionError(f"{value!r} was accepted as an event")


def _good(event_id: int) -> dict[str, Any]:
    return {
        "id": event_id,
        "timestamp": datetime(2024, 5, 1, 12, 0, tzinfo=UTC).isoformat(),
        "event_type": {"id": 1},
    }


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(records, json_values), max_size=6), st.randoms())
def test_a_malformed_record_is_quarantined_and_never_stops_its_batch(bad, rng):
    good = [_good(event_id) for event_id in (1001, 1002, 1003)]
    batch = [*good, *bad]
    rng.shuffle(batch)
    rules = load_rules_text("rules:\n  - id: all\n    actions: [{log: {}}]\n")
    store = SqliteStore(":memory:")
    try:
        result = Pipeline(rules, store).process(batch, source="fuzz")
        matched = {r["event_id"] for r in store.audit_rows() if r["outcome"] == "matched"}
        stored = store.quarantined(limit=1000)
    finally:
        store.close()
    assert {1001, 1002, 1003} <= matched
    assert result.received == len(batch)
    assert result.quarantined == len(result.rejected)
    assert all(row["reason"] and row["payload"] and row["source"] == "fuzz" for row in stored)
