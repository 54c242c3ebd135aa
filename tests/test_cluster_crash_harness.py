"""`scripts/cluster-crash-test`: the short version runs in `make test` (three faults, one of
them a leader kill, on the session's PostgreSQL); its own checks are shown to fail on what
they are there to catch."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from engine.sandbox.crash import Planned, Report
from engine.sandbox.postgres import PostgresServer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cluster-crash-test"


def _harness() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("cluster_crash_test", str(SCRIPT))
    spec = importlib.util.spec_from_loader("cluster_crash_test", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cluster_crash_test"] = module  # its dataclasses look their module up by name
    loader.exec_module(module)
    return module


harness = _harness()


def test_three_faults_on_three_instances_lose_nothing_and_double_nothing(
    postgres_server: PostgresServer,
):
    server_dsn = postgres_server.url(
        **({"password": postgres_server.password} if postgres_server.password else {})
    )
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--faults", "3", "--lease-ttl", "3s", "--events", "12",
         "--postgres", server_dsn],
        capture_output=True,
        text=True,
        timeout=150,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "leader SIGKILL 1" in out
    assert "FAIL" not in out and "cluster crash test PASSED" in out
    for figure in (
        "events evaluated exactly once",
        "every action executed",
        "SIM and endpoint states as the rules dictate",
        "each status change made once",
        "webhook Idempotency-Keys",
        "SMS sent once each",
        "longest time without a leader",
        "graceful stop on SIGTERM",
    ):
        assert f"ok   {figure}" in out


def test_the_full_run_kills_the_leader_at_least_five_times():
    kinds = harness.fault_plan(24, random.Random(1))
    assert len(kinds) == 24 and kinds.count(harness.LEADER_KILL) >= 5
    assert {harness.LEADER_PAUSE, harness.DATABASE_CUT, harness.ANY_KILL} <= set(kinds)
    three = harness.fault_plan(3, random.Random(2))
    assert sorted(three) == sorted(
        [harness.LEADER_KILL, harness.LEADER_PAUSE, harness.DATABASE_CUT]
    )


def test_bad_options_are_refused_with_a_message():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--lease-ttl", "2s"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "--lease-ttl must be at least 3s" in done.stderr


# -- the checks catch what they are for -------------------------------------------------------


def _planned_webhook(event_id: int) -> list[Planned]:
    return [Planned("notify", {"id": event_id}, 1, 1, False, False)]


def _call(key: str, instance: str, arrived: float, answered: float | None):
    return harness.Call(key, instance, True, arrived, answered)


def _receiver_with(*calls) -> object:
    receiver = harness.Receiver(0.0)
    receiver._calls.extend(calls)
    return receiver


def test_a_key_delivered_again_after_a_2xx_to_an_unharmed_sender_fails_the_webhook_check():
    key = "7-notify-device-1"
    receiver = _receiver_with(_call(key, "node-1", 1.0, 1.3), _call(key, "node-2", 40.0, 40.3))
    report = Report()
    harness.check_webhooks(report, receiver, _planned_webhook(7), faults=[])
    (check,) = report.checks
    assert not check.ok and "1 delivered again after a 2xx answer" in check.text


def test_a_key_delivered_by_two_unharmed_instances_at_once_fails_the_webhook_check():
    key = "7-notify-device-1"
    receiver = _receiver_with(_call(key, "node-1", 1.0, 1.3), _call(key, "node-2", 1.1, 1.4))
    report = Report()
    harness.check_webhooks(report, receiver, _planned_webhook(7), faults=[])
    assert not report.ok


def test_a_key_repeated_after_its_sender_was_killed_passes_the_webhook_check():
    key = "7-notify-device-1"
    receiver = _receiver_with(_call(key, "node-1", 1.0, 1.3), _call(key, "node-1", 40.0, 40.3))
    killed = harness.Fault(harness.LEADER_KILL, "node-1", 1.2, 3.0)
    report = Report()
    harness.check_webhooks(report, receiver, _planned_webhook(7), faults=[killed])
    (check,) = report.checks
    assert check.ok and "1 repeated where a fault cut the answer off" in check.text


def test_a_stretch_without_a_leader_of_15_seconds_fails_the_leader_check():
    watch = harness.Watch(cluster=None)
    watch.gaps, watch.changes = [2.0, 15.2], 3
    report = Report()
    harness.check_leaderless(report, watch)
    (check,) = report.checks
    assert not check.ok and check.text.startswith("15.2s (limit 15s; median 8.6s")
