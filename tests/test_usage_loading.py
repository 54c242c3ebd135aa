"""`usage:` rules as operators write them, their `file:line` errors, and the pure parts under
them: limits with units, reading a usage record, summing a window."""

from __future__ import annotations

import textwrap
from datetime import timedelta

import pytest

from engine.errors import EventFormatError, RuleSetError
from engine.reload import compare
from engine.rules import RuleSet, load_rules_text
from engine.state import USAGE_SLICES, sum_usage
from engine.usage import (
    UsageLimit,
    is_usage_event_id,
    is_usage_record,
    parse_limit,
    read_usage,
    record_id_of,
    usage_event_id,
)

RECORD = {
    "id": 351732524384257,
    "traffic_type": {"id": 5, "description": "Data"},
    "start_timestamp": "2026-01-01T10:00:00Z",
    "end_timestamp": "2026-01-01T10:00:45Z",
    "volume": {"rx": 1.5, "tx": 0.5, "total": 2.0},
    "endpoint": {"id": 7, "name": "truck-0007", "tags": "fleet,berlin"},
    "sim": {"id": 9, "iccid": "8988303000000000009"},
}


def load(text: str) -> RuleSet:
    return load_rules_text(textwrap.dedent(text), "rules.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(RuleSetError) as caught:
        load(text)
    return [str(error) for error in caught.value.errors]


def usage_rule(usage: str, extra: str = "") -> str:
    return f"""
    rules:
      - id: heavy
        usage: {usage}{extra}
        actions: [{{log: {{}}}}]
    """


# --- rules -------------------------------------------------------------------------------


def test_a_data_usage_rule_loads_with_its_limit_in_bytes_and_endpoint_as_key() -> None:
    (rule,) = load(usage_rule('{data: ">200MB", within: 24h, per: endpoint}'))
    assert rule.usage == UsageLimit("data", 200e6, False, "MB", timedelta(hours=24), "endpoint.id")


def test_sim_and_iccid_name_their_keys_and_endpoint_is_the_default() -> None:
    rules = load(
        """
        rules:
          - {id: a, usage: {sms: ">100", within: 1h, per: sim}, actions: [{log: {}}]}
          - {id: b, usage: {sms: ">=100", within: 1h, per: iccid}, actions: [{log: {}}]}
          - {id: c, usage: {data: ">1GiB", within: 7d}, actions: [{log: {}}]}
          - {id: d, usage: {data: ">5 kb", within: 1h, per: imsi}, actions: [{log: {}}]}
        """
    )
    limits = {rule.id: rule.usage for rule in rules}
    assert limits["a"] == UsageLimit("sms", 100.0, False, "SMS", timedelta(hours=1), "sim.id")
    assert limits["b"] == UsageLimit("sms", 100.0, True, "SMS", timedelta(hours=1), "sim.iccid")
    assert limits["c"] == UsageLimit(
        "data", float(1024**3), False, "GiB", timedelta(days=7), "endpoint.id"
    )
    assert limits["d"] == UsageLimit("data", 5000.0, False, "KB", timedelta(hours=1), "imsi")


def test_a_usage_rule_is_kept_out_of_event_matching() -> None:
    rules = load(
        """
        rules:
          - {id: usage, usage: {data: ">1MB", within: 1h}, actions: [{log: {}}]}
          - {id: events, actions: [{log: {}}]}
        """
    )
    assert [rule.id for rule in rules.usage_rules] == ["usage"]
    event = read_usage({**RECORD, "event_type": None})
    assert [rule.id for rule in rules.match(event)] == ["events"]
    assert [rule.id for rule in rules.match_usage(event)] == ["usage"]


def test_a_data_rule_counts_data_records_and_an_sms_rule_sms_records() -> None:
    rules = load(
        """
        rules:
          - {id: data, usage: {data: ">1MB", within: 1h}, actions: [{log: {}}]}
          - {id: sms, usage: {sms: ">10", within: 1h}, actions: [{log: {}}]}
        """
    )
    sms = {**RECORD, "traffic_type": {"id": 6, "description": "SMS"}}
    assert [rule.id for rule in rules.match_usage(read_usage(RECORD))] == ["data"]
    assert [rule.id for rule in rules.match_usage(read_usage(sms))] == ["sms"]


def test_a_usage_rules_condition_picks_the_records_it_counts() -> None:
    rules = load(
        usage_rule(
            '{data: ">1MB", within: 1h}',
            '\n        condition: {"==": [{var: operator.name}, "Telekom"]}',
        )
    )
    assert rules.match_usage(read_usage({**RECORD, "operator": {"name": "Telekom"}}))
    assert not rules.match_usage(read_usage({**RECORD, "operator": {"name": "Vodafone"}}))


@pytest.mark.parametrize(
    ("usage", "message"),
    [
        (
            '{data: ">200XB", within: 24h}',
            "rules.yaml:4: rule `heavy` → usage: `data` unknown unit 'XB' in '>200XB': use B, KB,"
            " MB, GB, TB (1000s) or KiB, MiB, GiB, TiB (1024s)",
        ),
        (
            '{data: ">200", within: 24h}',
            "rules.yaml:4: rule `heavy` → usage: `data` '>200' needs a unit: B, KB, MB, GB"
            " (1000s) or KiB, MiB, GiB (1024s)",
        ),
        (
            "{data: 200MB, within: 24h}",
            "rules.yaml:4: rule `heavy` → usage: `data` '200MB' is not a comparison like"
            ' ">200MB"',
        ),
        (
            '{sms: ">100MB", within: 24h}',
            "rules.yaml:4: rule `heavy` → usage: `sms` '>100MB': SMS are counted, without a"
            ' unit (e.g. ">100")',
        ),
        (
            "{data: 200, within: 24h}",
            "rules.yaml:4: rule `heavy` → usage: `data` must be a quoted comparison like"
            ' ">200MB", got 200',
        ),
        (
            '{data: ">200MB"}',
            "rules.yaml:4: rule `heavy` → usage: missing `within` (e.g. within: 24h)",
        ),
        (
            '{data: ">200MB", sms: ">1", within: 1h}',
            "rules.yaml:4: rule `heavy` → usage: `usage` needs one of `data` or `sms`, not both"
            ' (e.g. data: ">200MB" or sms: ">100"; a rule of its own for the other)',
        ),
        (
            '{data: ">200MB", within: 1h, per: "end point"}',
            "rules.yaml:4: rule `heavy` → usage: `per` must be endpoint, sim, iccid or a dotted"
            " path into the usage record, got the string 'end point' (e.g. per: endpoint)",
        ),
        (
            '{data: ">200MB", within: 1h, every: 1h}',
            "rules.yaml:4: rule `heavy` → usage: unknown key `every` (known keys: `data`, `sms`,"
            " `within`, `per`)",
        ),
    ],
)
def test_a_bad_usage_limit_is_a_load_error_at_its_line(usage: str, message: str) -> None:
    assert problems(usage_rule(usage)) == [message]


@pytest.mark.parametrize(
    ("extra", "key", "line"),
    [
        ("\n        when: {type: 19}", "when", 5),
        ("\n        threshold: {count: 3, within: 1h}", "threshold", 5),
        ("\n        lookup: [quota.data]", "lookup", 5),
    ],
)
def test_usage_with_what_picks_or_counts_events_is_a_load_error(
    extra: str, key: str, line: int
) -> None:
    found = problems(usage_rule('{data: ">1MB", within: 1h}', extra))
    assert found == [
        f"rules.yaml:{line}: rule `heavy`: `{key}` cannot be combined with `usage` (a usage rule"
        " is fed by the Data Streamer's usage records, not by events; use `condition` to pick"
        " records, or a separate rule for events)"
    ]


# --- limits, records, windows ----------------------------------------------------------------


def test_units_are_decimal_and_the_binary_ones_are_1024s() -> None:
    assert parse_limit("data", ">1KB") == (1000.0, False, "KB")
    assert parse_limit("data", ">= 1.5 GB") == (1.5e9, True, "GB")
    assert parse_limit("data", ">1MiB") == (1024.0**2, False, "MiB")
    assert parse_limit("data", ">10B") == (10.0, False, "B")


def test_a_limit_is_crossed_past_its_amount_or_at_it_when_written_with_ge() -> None:
    above = UsageLimit("sms", 100.0, False, "SMS", timedelta(hours=1), "endpoint.id")
    at_least = UsageLimit("sms", 100.0, True, "SMS", timedelta(hours=1), "endpoint.id")
    assert [above.crossed(n) for n in (99, 100, 101)] == [False, False, True]
    assert [at_least.crossed(n) for n in (99, 100, 101)] == [False, True, True]


def test_a_limit_shows_amounts_in_the_unit_it_was_written_in() -> None:
    data = UsageLimit("data", 200e6, False, "MB", timedelta(hours=24), "endpoint.id")
    sms = UsageLimit("sms", 100.0, False, "SMS", timedelta(hours=1), "endpoint.id")
    assert (data.shown(212_400_000), data.shown(3e6), sms.shown(101)) == (
        "212.4 MB",
        "3 MB",
        "101 SMS",
    )


def test_a_data_record_reads_as_an_event_of_its_endpoint_with_its_volume_in_bytes() -> None:
    event = read_usage(RECORD)
    assert event.id == usage_event_id(RECORD["id"]) < 0
    assert event.timestamp.isoformat() == "2026-01-01T10:00:45+00:00"
    assert (event.endpoint_id, event.sim_id, event.iccid) == (7, 9, "8988303000000000009")
    assert event.raw["usage"] == {"traffic": "data", "amount": 2e6, "record_id": RECORD["id"]}


@pytest.mark.parametrize(
    ("traffic_type", "traffic"),
    [
        ({"id": 5}, "data"),
        ({"id": 6}, "sms"),
        ({"description": " SMS "}, "sms"),
        ({"id": "6", "description": "Data"}, "data"),  # the id counts only as a number
    ],
)
def test_a_traffic_type_is_known_by_its_id_or_else_by_its_description(
    traffic_type: dict, traffic: str
) -> None:
    record = {**RECORD, "traffic_type": traffic_type}
    assert read_usage(record).raw["usage"]["traffic"] == traffic


@pytest.mark.parametrize(("total", "amount"), [(0, 0.0), (0.5, 500_000.0), (" 1.25 ", 1_250_000.0)])
def test_a_data_record_of_any_volume_from_zero_is_read_in_bytes(
    total: object, amount: float
) -> None:
    record = {**RECORD, "volume": {"total": total}}
    assert read_usage(record).raw["usage"]["amount"] == amount


def test_a_record_without_an_end_is_timed_by_its_start() -> None:
    record = {k: v for k, v in RECORD.items() if k != "end_timestamp"}
    assert read_usage(record).timestamp.isoformat() == "2026-01-01T10:00:00+00:00"


def test_an_sms_record_counts_one_message() -> None:
    sms = {**RECORD, "traffic_type": {"id": 6, "description": "SMS"}, "volume": None}
    assert read_usage(sms).raw["usage"]["amount"] == 1.0


def test_a_usage_record_says_what_it_counts_and_lists_its_endpoints_tags() -> None:
    sms = {**RECORD, "traffic_type": {"id": 6}, "volume": None}
    assert (read_usage(RECORD).description, read_usage(sms).description) == (
        "data usage 2 MB",
        "SMS usage",
    )
    assert read_usage(RECORD).raw["endpoint"]["tag_list"] == ["fleet", "berlin"]


def test_a_usage_record_is_told_by_its_traffic_or_volume_and_no_event_type() -> None:
    assert is_usage_record({"id": 1, "volume": {"total": 1.0}})  # read, then refused
    assert is_usage_record({"id": 1, "traffic_type": {"id": 5}})
    assert not is_usage_record({"id": 1, "event_type": {"id": 1}, "volume": {"total": 1.0}})
    assert not is_usage_record({"id": 1}) and not is_usage_record([RECORD])


def test_a_usage_record_is_judged_under_an_id_below_zero_and_zero_is_no_records_id() -> None:
    assert usage_event_id(0) == -1 and record_id_of(-1) == 0
    assert is_usage_event_id(-1) and not is_usage_event_id(0) and not is_usage_event_id(None)


def test_an_sms_limit_may_name_its_unit_in_any_case() -> None:
    assert parse_limit("sms", ">100 SMS") == (100.0, False, "SMS")
    assert parse_limit("sms", ">=100sms") == (100.0, True, "SMS")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"traffic_type": {"id": 9}},
            "traffic_type: unknown traffic type 9 (known: 5 Data, 6 SMS)",
        ),
        (
            {"traffic_type": {"id": 7, "description": "Voice"}},
            "traffic_type: unknown traffic type 7 Voice (known: 5 Data, 6 SMS)",
        ),
        ({"traffic_type": {}}, "traffic_type: unknown traffic type {} (known: 5 Data, 6 SMS)"),
        (
            {"traffic_type": {"id": "9" * 50}},
            f"traffic_type: unknown traffic type {'9' * 40} (known: 5 Data, 6 SMS)",
        ),
        ({"traffic_type": None}, "traffic_type: missing or not an object"),
        ({"volume": {"total": -1}}, "volume.total: must be a volume in MB, 0 or more, got -1"),
        ({"id": -1}, "id: expected a positive integer id, got '-1'"),
        ({"id": "7" * 50}, f"id: expected a positive integer id, got {'7' * 40!r}"),
        ({"id": 2**63}, f"id: expected a positive integer id, got '{2**63}'"),
        ({"volume": {"total": "x" * 50}}, f"volume.total: not a number: {'x' * 40!r}"),
        ({"volume": {"total": True}}, "volume.total: missing or not a number"),
        ({"id": "x"}, "id: expected a positive integer id, got 'x'"),
        ({"end_timestamp": "yesterday"}, "end_timestamp: unrecognised timestamp 'yesterday'"),
        ({"end_timestamp": None, "start_timestamp": ""}, "end_timestamp: missing"),
        ({"endpoint": {"id": "seven"}}, "endpoint.id: expected an integer, got 'seven'"),
    ],
)
def test_a_malformed_usage_record_names_the_field(change: dict, reason: str) -> None:
    with pytest.raises(EventFormatError) as caught:
        read_usage({**RECORD, **change})
    assert str(caught.value) == reason


def test_a_usage_window_sums_the_amounts_within_it_and_empties_when_it_fires() -> None:
    within = 3600.0
    over = 100.0
    first = sum_usage([], 1000.0, 60.0, within, lambda total: total > over)
    assert (first.fired, first.total, first.entries) == (False, 60.0, [1000.0, 60.0])
    gone = sum_usage(first.entries, 5000.0, 50.0, within, lambda total: total > over)
    assert (gone.fired, gone.total, gone.entries) == (False, 50.0, [5000.0, 50.0])
    fired = sum_usage(gone.entries, 5100.0, 50.1, within, lambda total: total > over)
    assert (fired.fired, fired.total, fired.entries) == (True, 100.1, [])


def test_a_usage_window_sums_a_record_exactly_its_span_old() -> None:
    edge = sum_usage([1000.0, 30.0], 4600.0, 20.0, 3600.0, lambda total: False)
    assert (edge.total, edge.entries) == (50.0, [1000.0, 30.0, 4600.0, 20.0])


def test_a_late_record_is_summed_without_the_newer_ones() -> None:
    window = [100.0, 10.0, 300.0, 80.0]
    late = sum_usage(window, 200.0, 15.0, 3600.0, lambda total: total > 50.0)
    assert (late.fired, late.total) == (False, 25.0)
    assert late.entries == [100.0, 10.0, 200.0, 15.0, 300.0, 80.0]


def test_a_reload_that_changes_the_usage_limit_resets_its_window() -> None:
    before = load(usage_rule('{data: ">200MB", within: 24h}'))
    same = load(usage_rule('{data: ">200MB", within: 24h}', "\n        description: same"))
    after = load(usage_rule('{data: ">300MB", within: 24h}'))
    assert compare(before, same).windows_reset == {}
    assert compare(before, after).windows_reset == {"heavy": ["usage"]}


def test_a_busy_usage_window_stays_small_and_keeps_its_sum() -> None:
    within = 86_400.0
    entries: list[float] = []
    for record in range(2000):  # a record every 45 s for a day
        verdict = sum_usage(entries, record * 45.0, 0.5, within, lambda total: False)
        entries = verdict.entries
    assert len(entries) <= 2 * (USAGE_SLICES + 1)
    assert verdict.total == pytest.approx(0.5 * 1921, abs=0.5 * 20)  # within one slice


def test_a_usage_window_keeps_every_record_apart_up_to_its_slice_count() -> None:
    within = 86_400.0  # a slice is 15 min: these records all fall in the first one
    entries = [number for record in range(USAGE_SLICES - 1) for number in (record * 1.0, 1.0)]
    verdict = sum_usage(entries, 100.0, 1.0, within, lambda total: False)
    assert verdict.entries == [*entries, 100.0, 1.0]  # USAGE_SLICES records, none merged
    merged = sum_usage(verdict.entries, 101.0, 1.0, within, lambda total: False)
    assert merged.entries == [101.0, USAGE_SLICES + 1.0]  # one more: one slice, summed
