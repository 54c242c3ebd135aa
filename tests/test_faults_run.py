"""A fifth of all API requests faulted, of every kind the simulator has: the engine still
finishes all its work with nothing lost and nothing doubled, within the event API's rate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "crash-test"


def test_twenty_percent_faults_lose_nothing_double_nothing_and_keep_the_rate():
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *("--kills", "0", "--faults", "0.2", "--event-rate-limit", "5"),
            *("--events", "18", "--duration", "6", "--seed", "4"),
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "20% of API requests faulted" in out
    for figure in (
        "events evaluated exactly once",
        "every action executed",
        "each status change made once",
        "webhook Idempotency-Keys",
        "SMS sent once each",
        "event API rate at the simulator",
        "faults injected",
    ):
        assert f"ok   {figure}" in out
    assert "(limit 5)" in out
