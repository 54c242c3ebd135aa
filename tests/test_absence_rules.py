"""Absence rules in the core: how a key's silence is judged as complete time moves, how the
pipeline plans and records a firing, and what the loader refuses (with `file:line`)."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from engine.absence import firing_event, identity, judge, listed_mark, new_mark, observe
from engine.cli import main
from engine.errors import RuleSetError
from engine.model import AbsenceMark
from engine.pipeline import Pipeline
from engine.rules import load_rules
from engine.rules.model import Absence
from engine.store import SqliteStore
from engine.store.memory import MemoryStore

HOUR = 3600.0
SIX_HOURS = Absence(timedelta(hours=6), "endpoint.id", timedelta(days=7))
T0 = datetime(2025, 5, 1, tzinfo=UTC)


def _seen(*hours: float) -> AbsenceMark:
    """A key seen at these hours, none of them yet known to be complete."""
    mark = new_mark("r", "5", hours[0] * HOUR, "{}")
    for hour in hours[1:]:
        mark = observe(mark, hour * HOUR, "{}", SIX_HOURS) or mark
    return mark


def _ends(complete_hours: float, mark: AbsenceMark) -> list[float]:
    _, silences = judge(mark, complete_hours * HOUR, SIX_HOURS, listed=False)
    return [silence.at / HOUR for silence in silences]


def test_a_key_fires_once_when_complete_time_reaches_its_last_event_plus_for() -> None:
    mark = _seen(0, 1)
    assert _ends(6.9, mark) == []
    after, silences = judge(mark, 7 * HOUR, SIX_HOURS, listed=False)
    assert [s.at / HOUR for s in silences] == [7.0]
    assert after is not None and after.fired
    assert judge(after, 20 * HOUR, SIX_HOURS, listed=False)[1] == []  # once, not again


def test_events_beyond_complete_time_wait_and_the_gap_before_them_is_still_judged() -> None:
    # Seen at 0h and at 10h; time is complete only up to 8h: the silence 0h-6h is proven.
    assert _ends(8, _seen(0, 10)) == [6.0]
    # Complete only up to 5h: nothing is proven yet, and the 10h event waits.
    after, silences = judge(_seen(0, 10), 5 * HOUR, SIX_HOURS, listed=False)
    assert silences == [] and after is not None and after.pending == (10 * HOUR,)


def test_a_key_seen_again_re_arms_and_its_next_silence_fires_again() -> None:
    assert _ends(30, _seen(0, 8, 9)) == [6.0, 15.0]


def test_a_key_quiet_past_forget_after_is_forgotten_but_a_listed_key_is_kept() -> None:
    fired, _ = judge(_seen(0), 6 * HOUR, SIX_HOURS, listed=False)
    assert fired is not None
    assert judge(fired, 7 * 24 * HOUR, SIX_HOURS, listed=False)[0] is None
    listed, silences = judge(listed_mark("r", "5", 0.0), 7 * 24 * HOUR, SIX_HOURS, listed=True)
    assert listed is not None and [s.seen for s in silences] == [False]


def test_many_events_read_ahead_of_complete_time_keep_every_long_silence_exact() -> None:
    # Every 10 minutes for two days, but one quiet stretch of 7h in the middle.
    hours = [h / 6 for h in range(0, 6 * 20)] + [h / 6 for h in range(6 * 27, 6 * 48)]
    mark = _seen(*hours)
    assert len(mark.pending) <= 40
    assert _ends(48, mark) == [hours[6 * 20 - 1] + 6]


def _write(folder: Path, text: str) -> Path:
    path = folder / "rules.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("absence: {per: endpoint.id}", "missing `for`"),
        ("absence: {for: 6h}", "missing `per`"),
        ("absence: {for: 6h, per: endpoint.id, forget_after: 1h}", "must be longer than `for`"),
        ("absence: {for: 6h, per: 'endpoint id'}", "dotted path"),
        ("absence: {for: 6h, per: sim.iccid, keys: 8988}", "`keys` must be a list"),
        ("absence: {for: 6h, per: sim.iccid, keys: [1.5]}", "text or whole numbers"),
        ("absence: {for: 6h, per: sim.iccid, until: 2h}", "unknown key `until`"),
    ],
)
def test_a_bad_absence_is_refused_at_its_line(tmp_path: Path, snippet: str, expected: str) -> None:
    path = _write(tmp_path, f"rules:\n  - id: r\n    {snippet}\n    actions: [{{log: {{}}}}]\n")
    with pytest.raises(RuleSetError) as caught:
        load_rules(path)
    (message,) = [str(error) for error in caught.value.errors]
    assert message.startswith(f"{path}:3: rule `r`"), message
    assert expected in message


def test_an_absence_rule_cannot_count_or_throttle_events(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        rules:
          - id: r
            absence: {for: 6h, per: endpoint.id}
            throttle: {for: 1h}
            actions: [{log: {}}]
        """,
    )
    with pytest.raises(RuleSetError) as caught:
        load_rules(path)
    (message,) = [str(error) for error in caught.value.errors]
    assert message.startswith(f"{path}:4:") and "cannot be combined with `absence`" in message


LISTED = """\
rules:
  - id: never-reported
    when: {type: 1}
    absence: {for: 2h, per: sim.iccid, keys: ["8988303000000000001", "8988303000000000002"]}
    actions: [{log: {message: "{{ absence.key }} {{ absence.seen }}"}}]
"""


SEEN_KEYS = """\
rules:
  - id: went-silent
    when: {type: 1}
    absence: {for: 2h, per: sim.iccid}
    actions: [{log: {}}]
"""


def _event(event_id: int, hours: float, iccid: str) -> dict[str, object]:
    return {
        "id": event_id,
        "timestamp": (T0 + timedelta(hours=hours)).isoformat(),
        "event_type": {"id": 1, "description": "Update location"},
        "sim": {"id": event_id, "iccid": iccid},
    }


def test_a_listed_key_that_never_reports_fires_and_one_that_reports_does_not(
    tmp_path: Path,
) -> None:
    pipeline = Pipeline(load_rules(_write(tmp_path, LISTED)), MemoryStore(), audit=False)
    first = pipeline.process(
        [_event(1, 0, "8988303000000000001")], source="test", complete_to_newest=True
    )
    assert first.planned == []
    later = pipeline.process(
        [_event(2, 1.5, "8988303000000000001")], source="test", complete_to_newest=True
    )
    assert later.planned == []
    end = pipeline.judge_absences(T0 + timedelta(hours=3))
    (fired,) = end.planned
    assert fired.absence is not None
    assert fired.absence["key"] == "8988303000000000002" and fired.absence["seen"] is False
    assert fired.as_json()["at"] == "2025-05-01T02:00:00Z"
    assert fired.action.params["message"] == "8988303000000000002 False"


def test_a_firing_is_recorded_once_across_a_restart_and_audited_with_its_reason(
    tmp_path: Path,
) -> None:
    rules = load_rules(
        _write(tmp_path, LISTED.replace('keys: ["8988303000000000001", "8988303000000000002"]', ""))
    )
    path = tmp_path / "state.sqlite3"
    store = SqliteStore(path)
    Pipeline(rules, store).process(
        [_event(1, 0, "8988303000000000001")], source="test", complete=T0
    )
    store.close()
    store = SqliteStore(path)  # a restart: what the rule knew comes back from the store
    restarted = Pipeline(rules, store)
    assert restarted.judge_absences(T0 + timedelta(hours=1)).planned == []
    assert len(restarted.judge_absences(T0 + timedelta(hours=2)).planned) == 1
    assert restarted.judge_absences(T0 + timedelta(hours=5)).planned == []
    rows = [r for r in store.audit_rows() if r["outcome"] == "absent"]
    store.close()
    assert [r["detail"] for r in rows] == [
        "no matching event for 2h since 2025-05-01T00:00:00Z (sim.iccid=8988303000000000001)"
    ]
    assert rows[0]["iccid"] == "8988303000000000001"


def test_replay_prints_absence_firings_at_their_own_time_up_to_until(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = _write(tmp_path, SEEN_KEYS)
    events = tmp_path / "events.jsonl"
    lines = [_event(1, 0, "8988303000000000001"), _event(2, 1, "8988303000000000002")]
    lines.append(_event(3, 5, "8988303000000000002"))  # 4h after the last: fired at 3h
    events.write_text("\n".join(orjson.dumps(line).decode() for line in lines) + "\n")
    until = "2025-05-01T08:00:00Z"
    assert main(["replay", "--rules", str(rules), "--events", str(events), "--until", until]) == 0
    printed = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p["absence"]["key"], p["at"]) for p in printed] == [
        ("8988303000000000001", "2025-05-01T02:00:00Z"),
        ("8988303000000000002", "2025-05-01T03:00:00Z"),
        ("8988303000000000002", "2025-05-01T07:00:00Z"),  # seen again at 5h: re-armed
    ]


def test_listed_keys_are_judged_in_the_very_batch_that_starts_watching_them(
    tmp_path: Path,
) -> None:
    pipeline = Pipeline(load_rules(_write(tmp_path, LISTED)), MemoryStore(), audit=False)
    other = [_event(n, hours, "8988303000000000009") for n, hours in ((1, 0), (2, 3))]
    for record in other:
        record["event_type"] = {"id": 9, "description": "SIM suspension"}  # not a sighting
    first = pipeline.process(other, source="test", complete_to_newest=True)
    # Watched from the batch's first event (0h), never seen through 3h: both fired at 2h.
    assert sorted((p.absence or {})["key"] for p in first.planned) == [
        "8988303000000000001",
        "8988303000000000002",
    ]
    assert {p.as_json()["at"] for p in first.planned} == {"2025-05-01T02:00:00Z"}


def test_a_gap_of_exactly_for_between_two_events_fires() -> None:
    # Seen at 0h and again at exactly 6h: the silence reached `for` as the event came.
    assert _ends(7, _seen(0, 6)) == [6.0]


def test_every_event_beyond_complete_time_waits_and_the_newest_counts_from_then() -> None:
    after, silences = judge(_seen(0, 10, 12), 8 * HOUR, SIX_HOURS, listed=False)
    assert [s.at / HOUR for s in silences] == [6.0]
    assert after is not None and after.pending == (10 * HOUR, 12 * HOUR)
    # Once time is complete past both, the next silence runs from the newest, 12h.
    assert [s.at / HOUR for s in judge(after, 20 * HOUR, SIX_HOURS, listed=False)[1]] == [18.0]


def test_an_older_event_read_after_a_keys_first_one_loses_none_of_its_later_sightings() -> None:
    mark = new_mark("r", "5", 5 * HOUR, "{}")
    mark = observe(mark, 4 * HOUR, "{}", SIX_HOURS) or mark  # read late, older
    mark = observe(mark, 20 * HOUR, "{}", SIX_HOURS) or mark
    assert _ends(30, mark) == [11.0, 26.0]


def test_a_listed_keys_event_older_than_the_start_of_watching_does_not_shorten_its_silence() -> (
    None
):
    mark = observe(listed_mark("r", "5", 10 * HOUR), 9 * HOUR, "{}", SIX_HOURS)
    assert mark is not None
    assert _ends(15.5, mark) == []  # watched from 10h: silent for 6h only at 16h
    assert _ends(16, mark) == [16.0]


def test_a_firing_names_the_newest_matching_event_whatever_order_they_were_read_in() -> None:
    def ident(event_id: int) -> str:
        return identity({"id": event_id, "sim": {"id": event_id}})

    mark = new_mark("r", "5", 0.0, ident(1))
    mark = observe(mark, 5 * HOUR, ident(5), SIX_HOURS) or mark
    mark = observe(mark, 3 * HOUR, ident(3), SIX_HOURS) or mark  # read after 5h's
    after, silences = judge(mark, 9 * HOUR, SIX_HOURS, listed=False)
    assert silences == [] and after is not None
    after = observe(after, 4 * HOUR, ident(4), SIX_HOURS) or after  # older than the last seen
    _, (silence,) = judge(after, 20 * HOUR, SIX_HOURS, listed=False)
    assert silence.at == 11 * HOUR
    assert firing_event(silence, SIX_HOURS).id == 5


def test_a_long_silence_before_the_newest_of_many_events_read_ahead_is_judged_exactly() -> None:
    # Every 10 minutes from 0h, then quiet until 13h: the 33rd time overflows pending.
    hours = [h / 6 for h in range(32)] + [13.0]
    mark = _seen(*hours)
    assert _ends(20, mark) == pytest.approx([31 / 6 + 6, 19.0])


def test_a_firing_event_is_the_last_matching_event_at_the_moment_the_silence_reached_for() -> None:
    raw = {
        "id": 77,
        "timestamp": "2025-05-01T00:00:00Z",
        "event_type": {"id": 1, "description": "Update location"},
        "description": "not kept",
        "sim": {"id": "12", "iccid": "8988303000000000001"},  # an id as text, as emnify may
        "endpoint": {"id": 7, "name": 7},  # a name as a number: read as text
        "tags": "a,b",
    }
    mark = new_mark("r", "7", T0.timestamp(), identity(raw))
    _, (silence,) = judge(mark, T0.timestamp() + 7 * HOUR, SIX_HOURS, listed=False)
    event = firing_event(silence, SIX_HOURS)
    reason = "no matching event for 6h since 2025-05-01T00:00:00Z (endpoint.id=7)"
    assert (event.id, event.timestamp) == (77, T0 + timedelta(hours=6))
    assert (event.sim_id, event.iccid) == (12, "8988303000000000001")
    assert (event.endpoint_id, event.endpoint_name) == (7, "7")
    assert (event.description, event.raw["description"]) == (reason, reason)
    assert event.alert is False and event.tags == frozenset()
    assert event.raw["event_type"] == raw["event_type"] and "tags" not in event.raw


@pytest.mark.parametrize(
    ("per", "key", "raw"),
    [
        ("endpoint.id", "42", {"endpoint": {"id": 42}}),
        ("sim.iccid", "8988303000000000001", {"sim": {"iccid": "8988303000000000001"}}),
        ("endpoint.name", "pump-7", {"endpoint": {"name": "pump-7"}}),
        ("detail.site.id", "7", {"detail": {"site": {"id": 7}}}),
    ],
)
def test_a_listed_key_never_seen_fires_with_only_its_key_at_the_per_path(
    per: str, key: str, raw: dict[str, object]
) -> None:
    absence = Absence(timedelta(hours=6), per, timedelta(days=7), keys=(key,))
    _, (silence,) = judge(listed_mark("r", key, 0.0), 6 * HOUR, absence, listed=True)
    event = firing_event(silence, absence)
    reason = f"never seen for 6h since 1970-01-01T00:00:00Z ({per}={key})"
    assert {k: v for k, v in event.raw.items() if k != "description"} == raw
    assert event.id == 0 and event.description == reason
    assert event.endpoint_id == (42 if per == "endpoint.id" else None)
    assert event.endpoint_name == ("pump-7" if per == "endpoint.name" else None)
    assert event.iccid == ("8988303000000000001" if per == "sim.iccid" else None)


def test_a_firings_templates_read_the_silence_and_a_late_first_report_fires_as_never_seen(
    tmp_path: Path,
) -> None:
    message = (
        "{{ absence.key }} {{ absence.per }} {{ absence.for }} {{ absence.since }}"
        " {{ absence.at }} {{ absence.seen }}: {{ event.description }}"
    )
    rules = LISTED.replace('"{{ absence.key }} {{ absence.seen }}"', repr(message))
    pipeline = Pipeline(load_rules(_write(tmp_path, rules)), MemoryStore(), audit=False)
    other = _event(1, 0, "8988303000000000009")
    other["event_type"] = {"id": 9, "description": "SIM suspension"}  # not a sighting
    assert pipeline.process([other], source="test", complete_to_newest=True).planned == []
    # The first listed key reports for the first time at 3h, after 2h of silence.
    late = pipeline.process(
        [_event(2, 3, "8988303000000000001")], source="test", complete_to_newest=True
    )
    messages = sorted(p.action.params["message"] for p in late.planned)
    assert messages == [
        f"{key} sim.iccid 2h 2025-05-01T00:00:00Z 2025-05-01T02:00:00Z False: never seen for 2h"
        f" since 2025-05-01T00:00:00Z (sim.iccid={key})"
        for key in ("8988303000000000001", "8988303000000000002")
    ]


def test_listed_keys_are_watched_from_the_rules_first_judgement_across_a_restart(
    tmp_path: Path,
) -> None:
    rules = load_rules(_write(tmp_path, LISTED))
    path = tmp_path / "state.sqlite3"
    store = SqliteStore(path)
    other = _event(1, 0, "8988303000000000009")
    other["event_type"] = {"id": 9, "description": "SIM suspension"}  # not a sighting
    Pipeline(rules, store).process([other], source="test", complete=T0)
    store.close()
    store = SqliteStore(path)
    try:
        fired = Pipeline(rules, store).judge_absences(T0 + timedelta(hours=2)).planned
    finally:
        store.close()
    assert sorted((p.absence or {})["since"] for p in fired) == ["2025-05-01T00:00:00Z"] * 2
