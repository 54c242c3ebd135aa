"""`event-engine replay` with rules that count, wait and remember: windows, throttles, the
blast-radius guard, shadow mode and follow-ups (with `"due"` and cancellations), judged on the
events' own clock exactly as `run` judges them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from engine.cli import main
from engine.pipeline import Pipeline
from engine.rules import load_rules
from engine.store import SqliteStore

from helpers import WINDOWED, write_rules

T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
A, B = "8988303000000000001", "8988303000000000002"
SIMS = {A: 1, B: 2}


def _event(event_id: int, minute: int, iccid: str | None, type_id: int) -> dict[str, Any]:
    moment = T0 + timedelta(minutes=minute)
    record: dict[str, Any] = {
        "id": event_id,
        "timestamp": moment.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "event_type": {"id": type_id},
        "event_source": {"id": 1},
        "event_severity": {"id": 1},
        "sim": None,
        "endpoint": None,
    }
    if iccid is not None:
        sim = SIMS.get(iccid, int(iccid[-2:]))
        record["sim"] = {"id": sim, "iccid": iccid}
        record["endpoint"] = {"id": 500 + sim, "name": f"truck-{sim}"}
    return record


def _target(iccid: str) -> dict[str, Any]:
    sim = SIMS.get(iccid, int(iccid[-2:]))
    return {"sim_id": sim, "endpoint_id": 500 + sim, "iccid": iccid}


def _write(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return path


def _replay(capsys: Any, *args: str) -> tuple[list[dict[str, Any]], str]:
    assert main(["replay", *args]) == 0
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.splitlines()], captured.err


# (id, minute after 10:00, iccid, type): 19 quota used up, 11 endpoint blocked, 8 activation
WINDOWED_EVENTS = [
    (1, 0, A, 19),  # A: 1 of 3
    (2, 1, B, 19),  # B: 1 of 3
    (3, 2, A, 19),  # A: 2 of 3
    (4, 3, A, 19),  # A: 3 of 3 → suspend, follow-up due 24h later; A throttled until 11:03
    (5, 4, B, 11),  # notice for SIM 2; throttled until 10:34
    (6, 20, B, 11),  # throttled
    (7, 5, A, 19),  # A's window starts over: 1 of 3 (a file need not be in time order)
    (8, 6, A, 19),  # 2 of 3
    (9, 7, A, 19),  # 3 of 3, but throttled until 11:03: nothing, window emptied
    (10, 8, B, 19),  # B: 2 of 3 (10:01, 10:08)
    (11, 12, B, 19),  # B: 10:01 left the window: 2 of 3 (10:08, 10:12)
    (12, 40, B, 11),  # notice again: 10:40 is past 10:34
    (13, 120, A, 8),  # A activated by hand: cancels event 4's follow-up
    (14, 121, A, 19),  # 1 of 3
    (15, 122, A, 19),  # 2 of 3
    (3, 2, A, 19),  # a repeated id: dropped as `run` drops it
    (16, 123, A, 19),  # 3 of 3, throttle long over → suspend + follow-up
    (17, 124, None, 19),  # no SIM: not counted
]


def test_replay_applies_windows_throttles_and_cancellations_exactly(tmp_path, capsys):
    rules = write_rules(tmp_path, WINDOWED)
    events = _write(tmp_path / "events.jsonl", [_event(*e) for e in WINDOWED_EVENTS])
    lines, err = _replay(capsys, "--rules", str(rules), "--events", str(events))
    assert lines == [
        {
            "event_id": 4,
            "rule": "quota-burst",
            "action": "suspend_sim",
            "target": _target(A),
            "params": {},
        },
        {
            "event_id": 4,
            "rule": "quota-burst",
            "action": "activate_sim",
            "target": _target(A),
            "params": {},
            "due": "2025-05-02T10:03:00Z",
        },
        {
            "event_id": 5,
            "rule": "blocked-notice",
            "action": "log",
            "target": _target(B),
            "params": {"message": f"blocked {B}", "level": "info"},
        },
        {
            "event_id": 12,
            "rule": "blocked-notice",
            "action": "log",
            "target": _target(B),
            "params": {"message": f"blocked {B}", "level": "info"},
        },
        {
            "event_id": 13,
            "rule": "quota-burst",
            "action": "cancel",
            "cancels": "4-quota-burst-1",
        },
        {
            "event_id": 16,
            "rule": "quota-burst",
            "action": "suspend_sim",
            "target": _target(A),
            "params": {},
        },
        {
            "event_id": 16,
            "rule": "quota-burst",
            "action": "activate_sim",
            "target": _target(A),
            "params": {},
            "due": "2025-05-02T12:03:00Z",
        },
    ]
    assert "1 duplicates dropped" in err
    assert "6 planned actions, 1 follow-ups cancelled" in err


GUARDED = """
rules:
  - id: suspend-on-quota
    when: {type: 19}
    max_actions: {count: 2, within: 10m}
    actions: [{suspend_sim: {}}]
    on_guard_trip:
      - log: {message: "guard tripped: {{ guard.reason }}", level: error}
  - id: trial-disable
    mode: shadow
    when: {type: 11}
    actions: [{disable_endpoint: {}}]
"""


def _fleet(count: int) -> list[str]:
    return [f"89883030000000001{n:02d}" for n in range(10, 10 + count)]


def test_replay_shows_held_actions_the_guard_notice_and_shadow_rules(tmp_path, capsys):
    iccids = _fleet(4)
    events = [_event(n + 1, n, iccid, 19) for n, iccid in enumerate(iccids)]
    events.append(_event(5, 4, iccids[0], 11))
    lines, _ = _replay(
        capsys,
        "--rules",
        str(write_rules(tmp_path, GUARDED)),
        "--events",
        str(_write(tmp_path / "events.jsonl", events)),
    )
    suspend = {"rule": "suspend-on-quota", "action": "suspend_sim", "params": {}}
    assert lines == [
        {"event_id": 1, **suspend, "target": _target(iccids[0])},
        {"event_id": 2, **suspend, "target": _target(iccids[1])},
        {"event_id": 3, **suspend, "target": _target(iccids[2]), "held": True},
        {
            "event_id": 3,
            "rule": "suspend-on-quota",
            "action": "log",
            "target": _target(iccids[2]),
            "params": {
                "message": "guard tripped: blast-radius guard: 3 destructive actions within "
                "10m > 2",
                "level": "error",
            },
            "on_guard_trip": True,
        },
        {"event_id": 4, **suspend, "target": _target(iccids[3]), "shadow": True},
        {
            "event_id": 5,
            "rule": "trial-disable",
            "action": "disable_endpoint",
            "target": _target(iccids[0]),
            "params": {},
            "shadow": True,
        },
    ]


def test_replay_takes_the_global_guard_from_the_config(tmp_path, capsys):
    rules = write_rules(
        tmp_path, "rules: [{id: r, when: {type: 19}, actions: [{suspend_sim: {}}]}]"
    )
    config = tmp_path / "config.yaml"
    config.write_text("guard:\n  max_actions: {count: 1, within: 1h}\n", encoding="utf-8")
    iccids = _fleet(3)
    events = _write(
        tmp_path / "events.jsonl", [_event(n + 1, n, i, 19) for n, i in enumerate(iccids)]
    )
    lines, _ = _replay(capsys, "--rules", str(rules), "--events", str(events), "-c", str(config))
    assert [(line["event_id"], line.get("held"), line.get("shadow")) for line in lines] == [
        (1, None, None),
        (2, True, None),
        (3, None, True),
    ]


def test_replay_plans_what_run_plans_batch_by_batch(tmp_path, capsys):
    rules_path = write_rules(tmp_path, WINDOWED)
    records = [_event(*e) for e in WINDOWED_EVENTS]
    replayed, _ = _replay(
        capsys, "--rules", str(rules_path), "--events", str(_write(tmp_path / "e.jsonl", records))
    )
    store = SqliteStore(tmp_path / "state.sqlite3")
    pipeline = Pipeline(load_rules(rules_path), store)
    ran: list[dict[str, Any]] = []
    for record in records:  # one poll per event, each its own committed batch
        result = pipeline.process([record], source="poller")
        ran.extend(line.as_json() for line in result.in_order())
    store.close()
    assert ran == replayed


def test_replay_carries_windows_throttles_and_follow_ups_across_its_batches(
    tmp_path, capsys, monkeypatch
):
    """Windows, throttle marks and follow-ups carry from one batch to the next: batches of
    two events plan exactly what one batch of the whole file plans."""
    rules = write_rules(tmp_path, WINDOWED)
    events = _write(tmp_path / "events.jsonl", [_event(*e) for e in WINDOWED_EVENTS])
    args = ("--single-process", "--rules", str(rules), "--events", str(events))
    whole, _ = _replay(capsys, *args)
    monkeypatch.setattr("engine.sources.replay.BATCH_SIZE", 2)
    in_pairs, err = _replay(capsys, *args)
    assert in_pairs == whole
    assert len(whole) == 7 and "1 follow-ups cancelled" in err
