"""Replay on two cores (a worker process reads, parses, normalizes and matches) gives exactly
what replay on one core gives: the same planned actions and cancellations in the same order,
the same problems with the same line numbers, the same counts."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.cli import main as cli_main
from engine.rules import load_rules
from engine.simulator import generate_events
from engine.sources import replay as replay_module
from engine.sources import replay_worker
from engine.sources.replay import replay
from engine.sources.replay_worker import ReplayWorkerError

from helpers import WINDOWED, write_rules

T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)

# Windows, throttles, a cancellable follow-up (the rules of test_replay_stateful), the guard
# with its notice, shadow mode, a JsonLogic condition, a rule for the generated fleet.
RULES = (
    WINDOWED
    + """
  - id: blocked-guarded
    when: {type: 11}
    max_actions: {count: 2, within: 10m}
    actions: [{disable_endpoint: {}}]
    on_guard_trip:
      - log: {message: "guard tripped: {{ guard.reason }}", level: error}
  - id: trial
    mode: shadow
    when: {type: 11}
    actions: [{log: {message: "would disable {{ event.endpoint.name }}"}}]
  - id: sms-traffic
    condition: {"==": [{var: detail.traffic_type.description}, "SMS"]}
    actions: [{log: {message: "SMS {{ event.sim.iccid }}"}}]
"""
)


def _event(event_id: int, minute: int, sim: int, type_id: int) -> dict[str, Any]:
    return {
        "id": event_id,
        "timestamp": (T0 + timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "event_type": {"id": type_id},
        "event_source": {"id": 1},
        "event_severity": {"id": 1},
        "sim": {"id": sim, "iccid": f"89883030000000{sim:05d}"},
        "endpoint": {"id": 500 + sim, "name": f"truck-{sim}"},
    }


def _events_file(path: Path) -> Path:
    crafted = [
        _event(1, 0, 1, 19),
        _event(2, 1, 1, 19),
        _event(3, 2, 1, 19),  # 3 of 3 → suspend + follow-up
        _event(4, 3, 2, 11),
        _event(5, 4, 3, 11),
        _event(6, 5, 4, 11),  # the guard holds this one and switches the rule to shadow
        _event(7, 60, 1, 8),  # cancels event 3's follow-up
    ]
    lines = [orjson.dumps(record) for record in crafted]
    generated = list(generate_events(600, seed=3, endpoints=30, start=T0))
    for number, record in enumerate(generated):
        lines.append(orjson.dumps(record))
        if number % 97 == 0:
            lines.append(orjson.dumps(record))  # a repeated id: dropped
        if number == 150:
            lines.append(b'{"id": 12, "timestamp": "2025-05-01T')  # not JSON
            lines.append(b"")  # blank: skipped silently
            lines.append(orjson.dumps({"timestamp": "2025-05-01T10:00:00Z"}))  # no id
            lines.append(b'"just text"')
    # Valid JSON that orjson refuses (a number beyond a double, a lone surrogate): read as the
    # daemon reads it. One event a rule matches, one no rule matches.
    odd = {"description": orjson.Fragment(b'"x \\ud800"'), "detail": orjson.Fragment(b"1e400")}
    lines.append(orjson.dumps({**_event(40, 200, 9, 11), **odd}))
    lines.append(orjson.dumps({**_event(41, 201, 9, 2), **odd}))
    lines.append(orjson.dumps(crafted[2]))  # a repeat of a matched event, late in the file
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _run(events: Path, rules_path: Path, *, parallel: bool) -> tuple[Any, ...]:
    planned: list[dict[str, Any]] = []
    problems: list[tuple[int, str]] = []
    progress: list[int] = []
    stats = replay(
        events,
        load_rules(rules_path),
        on_planned=lambda item: planned.append(item.as_json()),
        on_problem=lambda line, reason: problems.append((line, reason)),
        on_progress=progress.append,
        parallel=parallel,
    )
    return planned, problems, stats, progress


@pytest.fixture
def small_chunks(monkeypatch):
    # Many chunks from a small file: state must carry across them in both modes.
    monkeypatch.setattr(replay_module, "BATCH_SIZE", 50)


@pytest.mark.skipif(not replay_worker.can_fork(), reason="the worker needs fork()")
def test_parallel_replay_gives_exactly_what_sequential_replay_gives(tmp_path, small_chunks):
    rules_path = write_rules(tmp_path, RULES)
    events = _events_file(tmp_path / "events.jsonl")

    sequential = _run(events, rules_path, parallel=False)
    parallel = _run(events, rules_path, parallel=True)

    assert parallel == sequential
    planned, problems, stats, progress = parallel
    # The file exercises what the worker must not get wrong.
    assert {"due", "cancels", "held", "on_guard_trip", "shadow"} <= {
        key for line in planned for key in line
    }
    assert any(line["rule"] == "sms-traffic" for line in planned)
    assert any("would disable truck-9" in str(line) for line in planned)  # read leniently
    assert [reason.split(":")[0] for _, reason in problems] == [
        "not valid JSON",
        "malformed event",
        "malformed event",
    ]
    assert stats.duplicates == 8
    assert len(progress) > 10


@pytest.mark.skipif(not replay_worker.can_fork(), reason="the worker needs fork()")
def test_the_worker_starts_with_small_chunks_and_plans_the_same(
    tmp_path, small_chunks, monkeypatch
):
    # The first chunks double from _FIRST_CHUNK up to the batch size, so judging starts
    # early; chunk sizes must not change what is planned.
    monkeypatch.setattr(replay_worker, "_FIRST_CHUNK", 5)
    rules_path = write_rules(tmp_path, RULES)
    events = _events_file(tmp_path / "events.jsonl")

    planned, problems, stats, progress = _run(events, rules_path, parallel=True)
    assert (planned, problems, stats) == _run(events, rules_path, parallel=False)[:3]
    assert progress[:6] == [5, 15, 35, 75, 125, 175]  # chunks of 5, 10, 20, 40, then 50


@pytest.mark.skipif(not replay_worker.can_fork(), reason="the worker needs fork()")
def test_a_failing_worker_is_reported_not_hidden(tmp_path, monkeypatch):
    rules_path = write_rules(tmp_path, RULES)
    events = _events_file(tmp_path / "events.jsonl")

    def broken(*args: Any) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(replay_worker, "_read", broken)
    with pytest.raises(ReplayWorkerError, match="reader process failed: OSError: disk went away"):
        _run(events, rules_path, parallel=True)

    def killed(*args: Any) -> None:
        os._exit(3)

    monkeypatch.setattr(replay_worker, "_read", killed)
    with pytest.raises(ReplayWorkerError, match=r"ended unexpectedly \(exit code 3\)"):
        _run(events, rules_path, parallel=True)


def test_the_cli_stops_quietly_when_its_reader_goes_away(tmp_path):
    # `event-engine replay ... | head`: a large file (read by the worker process), and a
    # reader that takes one line and leaves.
    rules_path = write_rules(tmp_path, RULES)
    events = tmp_path / "big.jsonl"
    with events.open("wb") as handle:
        for record in generate_events(6000, seed=1, endpoints=50, start=T0):
            handle.write(orjson.dumps(record) + b"\n")
    assert events.stat().st_size > replay_worker.MIN_PARALLEL_BYTES
    command = [sys.executable, "-m", "engine", "replay", "--rules", str(rules_path)]
    process = subprocess.Popen(
        [*command, "--events", str(events)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    assert orjson.loads(process.stdout.readline())["rule"]
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141
    assert "Traceback" not in stderr


def test_replay_uses_the_worker_where_it_pays_unless_told_not_to(tmp_path, monkeypatch):
    rules_path = write_rules(tmp_path, RULES)
    events = _events_file(tmp_path / "events.jsonl")
    used: list[Path] = []
    real = replay_module.judged_chunks

    def watched(path: Path, *args: Any) -> Any:
        used.append(path)
        return real(path, *args)

    monkeypatch.setattr(replay_module, "judged_chunks", watched)
    monkeypatch.setattr(replay_module, "parallel_possible", lambda path: True)  # any machine
    command = ["replay", "--rules", str(rules_path), "--events", str(events)]
    assert cli_main(command) == 0
    assert used == [events]
    assert cli_main([*command, "--single-process"]) == 0
    assert used == [events]  # not asked again
