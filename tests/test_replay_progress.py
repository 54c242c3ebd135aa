"""`replay` shows a progress bar on a terminal and nothing when stderr is not one."""

from __future__ import annotations

import io
import re
import sys

import orjson

from engine.cli import main
from engine.simulator import generate_events

from helpers import write_rules

RULES = """
rules:
  - id: log-quota
    when: {type: "Quota used up"}
    actions: [{log: {}}]
"""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _events(tmp_path, count: int):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in generate_events(count, seed=2)))
    return path


def test_replay_draws_a_progress_bar_with_the_line_count_on_a_terminal(
    tmp_path, monkeypatch, capsysbinary
):
    events = _events(tmp_path, 5000)
    rules = write_rules(tmp_path, RULES)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["replay", "--rules", str(rules), "--events", str(events)]) == 0
    drawn = terminal.getvalue()
    assert "\rreplaying [" in drawn
    assert "5000/5000" in drawn
    assert "replayed 5000 records" in drawn


def test_replay_keeps_stderr_free_of_progress_when_it_is_not_a_terminal(
    tmp_path, monkeypatch, capsysbinary
):
    events = _events(tmp_path, 100)
    rules = write_rules(tmp_path, RULES)
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    assert main(["replay", "--rules", str(rules), "--events", str(events)]) == 0
    assert "\r" not in plain.getvalue()
    # How long it took and at what rate, for comparing runs by hand.
    assert re.match(r"replayed 100 records in \d+\.\d s \([\d,]+/s\): ", plain.getvalue())
