"""The dispatcher over real loopback HTTP: retries per intent, the dead letter, and actions
whose answer was lost (status changes read back, SMS looked for, never repeated blindly)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from raw_receiver import RawReceiver, answer_never
from structlog.testing import capture_logs

from engine.actions.suspend_sim import SuspendSim
from engine.config import Config
from engine.daemon import Daemon
from engine.dispatch import CONFIRMED, RetryPolicy
from engine.errors import StoreError
from engine.model import Batch, Intent, IntentStatus
from engine.simulator import FaultRule, SimulatorServer
from engine.simulator.state import RequestRecord
from engine.simulator.webhook_sink import WebhookSink

from helpers import (
    TOKEN,
    engine_config,
    eventually,
    metric_value,
    poller_of,
    rules_from,
    running_daemon,
)

SETTLE = 0.3  # seconds; the settle time of the tests' retry policy
SMS_PATH = r"^/api/v1/endpoint/\d+/sms$"

SUSPEND = """
rules:
  - id: suspend
    when: {type: 19}
    actions: [{suspend_sim: {}}]
"""
DISABLE = """
rules:
  - id: disable
    when: {type: 19}
    actions: [{disable_endpoint: {}}]
"""
SMS = """
rules:
  - id: sms
    when: {type: 19}
    actions: [{send_sms: {payload: "REBOOT"}}]
"""
HOOK = """
rules:
  - id: hook
    when: {type: 19}
    actions:
      - webhook: {url: "${HOOK_URL}", body: {event: "{{ event.id }}"}}
"""

# Suspend, then a follow-up that activates the SIM again 5 s later.
CYCLE_RULES = """
rules:
  - id: cycle
    when: {type: 19}
    actions:
      - suspend_sim: {}
      - after: 5s
        do: {activate_sim: {}}
"""


def fast_config(tmp_path: Path, simulator: SimulatorServer, **policy: Any) -> Config:
    """The client gives up at once (its failures reach the dispatcher) and times out after
    one second; the dispatcher retries within tens of milliseconds."""
    config = engine_config(tmp_path, simulator)
    settings: dict[str, Any] = {
        "initial_backoff": timedelta(milliseconds=20),
        "max_backoff": timedelta(milliseconds=50),
        "settle_time": timedelta(seconds=SETTLE),
        **policy,
    }
    return replace(
        config,
        api=replace(config.api, max_retries=0, read_timeout=1.0),
        retry=RetryPolicy(**settings),
    )


def set_faults(simulator: SimulatorServer, *rules: dict[str, Any]) -> None:
    simulator.state.set_faults(FaultRule.parse(rule) for rule in rules)


def requests(simulator: SimulatorServer, method: str, path_part: str) -> list[RequestRecord]:
    return [r for r in simulator.state.requests() if r.method == method and path_part in r.path]


async def calls_in_order(simulator: SimulatorServer, path_end: str) -> list[tuple[str, str | None]]:
    """(method, fault) of the requests to paths ending in `path_end`, in the order they came
    in, once the slow one among them has been logged (a request is logged when it ends)."""
    await eventually(
        lambda: any(r.fault == "slow" for r in simulator.state.requests()), timeout=5.0
    )
    records = [r for r in simulator.state.requests() if r.path.endswith(path_end)]
    return [(r.method, r.fault) for r in sorted(records, key=lambda r: r.monotonic_time)]


def quota_event(simulator: SimulatorServer, index: int = 0) -> dict[str, Any]:
    sim = simulator.state.sims()[index]
    (event,) = simulator.state.store_events([{"event_type": {"id": 19}, "sim_id": sim["id"]}])
    return event


async def run_until(daemon: Daemon, done: Callable[[list[Intent]], bool], timeout=10.0) -> None:
    """Poll once, then dispatch whatever is due until `done(intents)` holds."""
    await poller_of(daemon).poll_once()

    async def finished() -> bool:
        await daemon.dispatcher.run_due()
        return done(daemon.store.intents())

    await eventually(finished, timeout=timeout, every=0.02)


def all_closed(intents: list[Intent]) -> bool:
    return bool(intents) and all(
        i.status not in (IntentStatus.PENDING, IntentStatus.RUNNING) for i in intents
    )


def outcomes(daemon: Daemon) -> list[str]:
    return [r["outcome"] for r in daemon.store.audit_rows() if r["intent_id"] is not None]


def planned(kind: str, key: str, params: dict[str, Any], **target: Any) -> Intent:
    """An intent as the pipeline plans it, for the outbox directly."""
    return Intent(
        idempotency_key=key,
        event_id=1,
        rule_id="planned",
        action_index=0,
        kind=kind,
        params=params,
        target=target,
    )


def commit(daemon: Daemon, intents: list[Intent]) -> None:
    daemon.store.commit_batch(Batch(intents=intents), datetime.now(UTC))


async def stop_dispatching(dispatching: asyncio.Task[None]) -> None:
    """A shutdown whose grace ran out: attempts still running are cancelled (left due)."""
    dispatching.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await dispatching


async def outcomes_when_all_closed(tmp_path, simulator, rules: str) -> list[str]:
    """Run a daemon with `rules` against the simulator until every intent is closed; the
    outcomes its attempts recorded."""
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, rules), TOKEN)
    try:
        await run_until(daemon, all_closed)
        return outcomes(daemon)
    finally:
        await daemon.aclose()


# -- retries and the dead letter ------------------------------------------------------------


async def test_a_transient_failure_is_retried_with_backoff_until_it_succeeds(tmp_path, simulator):
    event = quota_event(simulator)
    set_faults(simulator, {"path": "^/api/v1/sim/", "method": "GET", "kind": "503", "count": 2})
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await run_until(daemon, all_closed)
        (intent,) = daemon.store.intents()
        recorded = outcomes(daemon)
    finally:
        await daemon.aclose()
    assert intent.status is IntentStatus.DONE and intent.attempts == 3
    assert recorded[-3:] == ["retry", "retry", "done"]
    assert simulator.state.sim(event["sim"]["id"])["status"]["id"] == 2


async def test_a_permanent_failure_fails_at_once_with_its_reason(tmp_path, simulator):
    event = quota_event(simulator)
    simulator.state.change_sim_status(event["sim"]["id"], 0, emit=False)  # Issued: no suspend
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await run_until(daemon, all_closed)
        (intent,) = daemon.store.intents()
    finally:
        await daemon.aclose()
    assert intent.status is IntentStatus.FAILED and intent.attempts == 1
    assert "HTTP 422" in (intent.last_error or "")
    assert len(requests(simulator, "PATCH", "/api/v1/sim/")) == 1


async def test_retries_that_run_out_dead_letter_the_intent_with_its_last_error(tmp_path, simulator):
    quota_event(simulator)
    set_faults(simulator, {"path": "^/api/v1/sim/", "method": "GET", "kind": "502"})
    config = fast_config(tmp_path, simulator, max_attempts=3)
    daemon = Daemon(config, rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await run_until(daemon, all_closed)
        (intent,) = daemon.store.intents()
        counts = daemon.store.counts()
        recorded = outcomes(daemon)
        details = [r["detail"] for r in daemon.store.audit_rows() if r["intent_id"] is not None]
    finally:
        await daemon.aclose()
    assert recorded == ["retry", "retry", "dead"]
    assert details[0].startswith("attempt 1: GET /api/v1/sim/") and "HTTP 502" in details[0]
    assert details[1].startswith("attempt 2: GET /api/v1/sim/")
    assert details[2] == intent.last_error
    assert intent.status is IntentStatus.DEAD and intent.attempts == 3
    assert intent.last_error is not None
    assert intent.last_error.startswith("gave up after 3: GET /api/v1/sim/")
    assert "HTTP 502" in intent.last_error
    assert counts["intents_dead"] == 1
    assert len(requests(simulator, "GET", "/api/v1/sim/")) == 3


async def test_the_deadline_counts_from_the_first_attempt_not_from_planning(tmp_path, simulator):
    quota_event(simulator)
    set_faults(simulator, {"path": "^/api/v1/sim/", "method": "GET", "kind": "503"})
    config = fast_config(tmp_path, simulator, deadline=timedelta(hours=1))
    daemon = Daemon(config, rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        # Planned two hours ago (a follow-up `after: 2h` now due): its deadline has not begun.
        daemon.store._db.execute("UPDATE outbox SET created_at = created_at - 7200")
        await daemon.dispatcher.run_due()
        (first,) = daemon.store.intents()
        # An hour and more after the first attempt, the next failure is the last.
        daemon.store._db.execute("UPDATE intent_attempts SET deadline_from = deadline_from - 3700")
        await asyncio.sleep(0.06)
        await daemon.dispatcher.run_due()
        (last,) = daemon.store.intents()
        recorded = outcomes(daemon)
    finally:
        await daemon.aclose()
    assert first.status is IntentStatus.PENDING and first.attempts == 1
    assert last.status is IntentStatus.DEAD and "(deadline 1h passed)" in (last.last_error or "")
    assert recorded == ["retry", "dead"]


async def test_a_retry_after_header_sets_the_earliest_next_attempt(tmp_path, simulator):
    quota_event(simulator)
    set_faults(
        simulator,
        {"path": "^/api/v1/sim/", "method": "GET", "kind": "429", "retry_after": 30, "count": 1},
    )
    config = fast_config(tmp_path, simulator, max_backoff=timedelta(minutes=5))
    daemon = Daemon(config, rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        before = datetime.now(UTC)
        await daemon.dispatcher.run_due()
        (intent,) = daemon.store.intents()
    finally:
        await daemon.aclose()
    assert intent.status is IntentStatus.PENDING and "HTTP 429" in (intent.last_error or "")
    assert intent.due_at is not None and intent.due_at >= before + timedelta(seconds=29)


async def test_a_retry_after_longer_than_the_longest_backoff_waits_only_the_longest_backoff(
    tmp_path, simulator
):
    quota_event(simulator)
    set_faults(
        simulator,
        {"path": "^/api/v1/sim/", "method": "GET", "kind": "429", "retry_after": 3600, "count": 1},
    )
    config = fast_config(tmp_path, simulator, max_backoff=timedelta(minutes=5))
    daemon = Daemon(config, rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        before = datetime.now(UTC)
        await daemon.dispatcher.run_due()
        after = datetime.now(UTC)
        (intent,) = daemon.store.intents()
    finally:
        await daemon.aclose()
    assert intent.status is IntentStatus.PENDING and intent.due_at is not None
    assert before + timedelta(minutes=5) <= intent.due_at <= after + timedelta(minutes=5)


def test_the_backoff_doubles_with_each_attempt_up_to_the_longest_jittered_in_its_upper_half():
    policy = RetryPolicy(initial_backoff=timedelta(seconds=2), max_backoff=timedelta(seconds=60))
    now = datetime(2025, 5, 1, tzinfo=UTC)
    rng = random.Random(7)
    for attempt, ceiling in [(1, 2), (2, 4), (3, 8), (5, 32), (6, 60), (30, 60)]:
        waits = [(policy.next_try(attempt, now, rng) - now).total_seconds() for _ in range(200)]
        assert ceiling / 2 <= min(waits) and max(waits) <= ceiling
        assert max(waits) - min(waits) > ceiling / 4  # jittered, not one fixed wait


async def test_a_token_refused_even_after_a_fresh_login_is_retried_later_not_failed(
    tmp_path, simulator
):
    quota_event(simulator)
    # Every token is revoked before each of the first two SIM reads: the read is refused,
    # and refused again after the client's fresh login.
    set_faults(
        simulator, {"path": "^/api/v1/sim/", "method": "GET", "kind": "expire_token", "count": 2}
    )
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        await daemon.dispatcher.run_due()
        (first,) = daemon.store.intents()
        await run_until(daemon, all_closed)
        (last,) = daemon.store.intents()
    finally:
        await daemon.aclose()
    assert first.status is IntentStatus.PENDING and "HTTP 401" in (first.last_error or "")
    assert last.status is IntentStatus.DONE


async def test_no_more_emnify_calls_run_at_once_than_the_concurrency_allows(tmp_path, simulator):
    for index in range(5):
        quota_event(simulator, index)
    set_faults(simulator, {"path": "^/api/v1/sim/", "method": "GET", "kind": "slow", "delay": 0.3})
    config = replace(fast_config(tmp_path, simulator), concurrency=2)
    daemon = Daemon(config, rules_from(tmp_path, SUSPEND), TOKEN)
    most = 0

    def running() -> bool:
        nonlocal most
        counted = daemon.store.counts().get("intents_running", 0)
        most = max(most, counted)
        return all_closed(daemon.store.intents())

    try:
        await poller_of(daemon).poll_once()
        dispatching = asyncio.create_task(daemon.dispatcher.run_due())
        await eventually(running, timeout=10.0, every=0.02)
        await dispatching
        statuses = [i.status for i in daemon.store.intents()]
    finally:
        await daemon.aclose()
    assert most == 2
    assert statuses == [IntentStatus.DONE] * 5


async def test_actions_on_one_endpoint_run_one_after_another_in_their_planned_order(
    tmp_path, simulator
):
    # A late event: the disable and its `after: 5s` enable are due at once, on one endpoint.
    # The disable's endpoint read is slow; the enable must not overtake it.
    sim = simulator.state.sims()[0]
    endpoint = sim["endpoint"]["id"]
    late = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()
    simulator.state.store_events([{"event_type": 19, "sim_id": sim["id"], "timestamp": late}])
    set_faults(
        simulator,
        {"path": "^/api/v1/endpoint/", "method": "GET", "kind": "slow", "delay": 0.5, "count": 1},
    )
    rules = """
    rules:
      - id: cycle
        when: {type: 19}
        actions:
          - disable_endpoint: {}
          - after: 5s
            do: {enable_endpoint: {}}
    """
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, rules), TOKEN)
    try:
        await run_until(daemon, all_closed)
    finally:
        await daemon.aclose()
    patches = [r for r in simulator.state.requests() if r.method == "PATCH"]
    assert len(patches) == 2
    assert simulator.state.endpoint(endpoint)["status"]["id"] == 0  # enabled again, last


async def test_a_failing_webhook_receiver_gets_every_retry_with_the_same_idempotency_key(
    tmp_path, simulator, sink: WebhookSink, monkeypatch
):
    monkeypatch.setenv("HOOK_URL", f"{sink.base_url}/hooks/ops")
    event = quota_event(simulator)
    sink.status = 500
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, HOOK), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        await eventually(lambda: _dispatch_until(daemon, lambda: len(sink.calls()) >= 2))
        sink.status = 200
        await run_until(daemon, all_closed)
        recorded = outcomes(daemon)
    finally:
        await daemon.aclose()
    keys = sink.idempotency_keys()
    assert list(keys) == [f"{event['id']}-hook-0"] and keys[f"{event['id']}-hook-0"] >= 3
    assert recorded[-1] == "delivered 200"


async def test_an_intent_committed_while_another_is_in_flight_does_not_wait_for_it(
    tmp_path, simulator
):
    slow, quick = simulator.state.sims()[:2]
    set_faults(
        simulator,
        {"path": f"^/api/v1/sim/{slow['id']}$", "method": "GET", "kind": "slow", "delay": 3},
    )
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)

    def status(sim: dict[str, Any]) -> IntentStatus | None:
        found = [i.status for i in daemon.store.intents() if i.target.get("sim_id") == sim["id"]]
        return found[0] if found else None

    async with running_daemon(daemon):
        simulator.state.store_events([{"event_type": 19, "sim_id": slow["id"]}])
        await eventually(lambda: status(slow) is IntentStatus.RUNNING)
        simulator.state.store_events([{"event_type": 19, "sim_id": quick["id"]}])
        await eventually(lambda: status(quick) is not None)
        await eventually(lambda: status(quick) is IntentStatus.DONE)
        still_running = status(slow)
    assert still_running is IntentStatus.RUNNING


async def test_a_backlog_of_webhooks_to_one_receiver_is_read_a_page_at_a_time_not_per_attempt(
    tmp_path, simulator, sink: WebhookSink, monkeypatch
):
    # 600 intents wait for the receiver's two slots: the outbox is read again when what was
    # read runs low, not after every attempt (each read would be the same 200 intents).
    monkeypatch.setenv("HOOK_URL", f"{sink.base_url}/hooks/ops")
    sims = simulator.state.sims()
    simulator.state.store_events(
        [{"event_type": 19, "sim_id": sims[n % len(sims)]["id"]} for n in range(600)]
    )
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, HOOK), TOKEN)
    reads = 0
    read_due = daemon.store.due_intents

    def counted(*args: Any, **kwargs: Any) -> list[Intent]:
        nonlocal reads
        reads += 1
        return read_due(*args, **kwargs)

    monkeypatch.setattr(daemon.store, "due_intents", counted)
    try:
        await run_until(daemon, all_closed, timeout=60.0)
        done = [i for i in daemon.store.intents() if i.status is IntentStatus.DONE]
    finally:
        await daemon.aclose()
    assert len(done) == 600 and len(sink.idempotency_keys()) == 600
    # Two reads a look (emnify calls, calls out); a look per 150 or so intents started.
    assert reads <= 40


async def test_a_follow_up_cancelled_while_it_waits_for_its_lane_is_not_run(tmp_path, simulator):
    # A late event: its `after: 5s` follow-up is due at once, behind the suspension, whose
    # SIM read is slow. A later event cancels the follow-up while it waits for the lane.
    sim = simulator.state.sims()[0]
    late = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()
    simulator.state.store_events([{"event_type": 19, "sim_id": sim["id"], "timestamp": late}])
    set_faults(
        simulator,
        {"path": "^/api/v1/sim/", "method": "GET", "kind": "slow", "delay": 0.5, "count": 1},
    )
    rules = rules_from(tmp_path, CYCLE_RULES)
    daemon = Daemon(fast_config(tmp_path, simulator), rules, TOKEN)
    try:
        await poller_of(daemon).poll_once()
        dispatching = asyncio.create_task(daemon.dispatcher.run_due())
        await eventually(lambda: daemon.store.counts().get("intents_running") == 1)
        daemon.store._db.execute(
            "UPDATE outbox SET status = 'cancelled' WHERE kind = 'activate_sim'"
        )
        await dispatching
        statuses = {i.kind: i.status for i in daemon.store.intents()}
        (follow_up,) = [i for i in daemon.store.intents() if i.kind == "activate_sim"]
    finally:
        await daemon.aclose()
    assert statuses == {"suspend_sim": IntentStatus.DONE, "activate_sim": IntentStatus.CANCELLED}
    assert follow_up.attempts == 0
    assert len([r for r in simulator.state.requests() if r.method == "PATCH"]) == 1


async def _dispatch_until(daemon: Daemon, condition: Callable[[], bool]) -> bool:
    await daemon.dispatcher.run_due()
    return condition()


async def test_a_webhook_answering_404_fails_at_once(tmp_path, simulator, sink, monkeypatch):
    monkeypatch.setenv("HOOK_URL", f"{sink.base_url}/nowhere")
    quota_event(simulator)
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, HOOK), TOKEN)
    try:
        await run_until(daemon, all_closed)
        (intent,) = daemon.store.intents()
    finally:
        await daemon.aclose()
    assert intent.status is IntentStatus.FAILED and intent.attempts == 1
    assert intent.last_error == "webhook ${HOOK_URL}: HTTP 404"


# -- answers lost after the change was made ---------------------------------------------------


@pytest.mark.parametrize("then", ["504", "drop"])
@pytest.mark.parametrize(
    ("rules", "path", "field", "wanted", "event_type"),
    [
        (SUSPEND, "^/api/v1/sim/", "sim", 2, 9),  # SIM suspension
        (DISABLE, "^/api/v1/endpoint/", "endpoint", 1, 43),  # Endpoint disabled
    ],
)
async def test_a_status_change_whose_answer_was_lost_is_read_back_and_not_repeated(
    tmp_path, simulator, then, rules, path, field, wanted, event_type
):
    event = quota_event(simulator)
    target = event[field]["id"]
    set_faults(
        simulator,
        {"path": path, "method": "PATCH", "kind": "apply_then_fail", "then": then, "count": 1},
    )
    recorded = await outcomes_when_all_closed(tmp_path, simulator, rules)
    resource = simulator.state.sim(target) if field == "sim" else simulator.state.endpoint(target)
    assert resource["status"]["id"] == wanted
    assert len(requests(simulator, "PATCH", "/api/v1/")) == 1
    assert recorded == [CONFIRMED]
    changes = [
        e
        for e in simulator.state.events()
        if e["event_type"]["id"] == event_type and e["endpoint"]["id"] == event["endpoint"]["id"]
    ]
    assert len(changes) == 1


async def test_a_status_change_that_timed_out_is_read_back_before_it_is_sent_again(
    tmp_path, simulator
):
    event = quota_event(simulator)
    set_faults(
        simulator,
        {"path": "^/api/v1/sim/", "method": "PATCH", "kind": "slow", "delay": 2, "count": 1},
    )
    recorded = await outcomes_when_all_closed(tmp_path, simulator, SUSPEND)
    calls = await calls_in_order(simulator, f"/api/v1/sim/{event['sim']['id']}")
    # GET, PATCH (no answer in time), GET at once to read back, then the retry: GET, PATCH.
    assert calls[:2] == [("GET", None), ("PATCH", "slow")]
    assert calls[2:] == [("GET", None), ("GET", None), ("PATCH", None)]
    assert simulator.state.sim(event["sim"]["id"])["status"]["id"] == 2
    assert recorded == ["retry", "done"]


@pytest.mark.parametrize("then", ["504", "drop"])
async def test_an_sms_whose_answer_was_lost_is_found_after_the_settle_time_not_resent(
    tmp_path, simulator, then
):
    event = quota_event(simulator)
    endpoint = event["endpoint"]["id"]
    set_faults(
        simulator,
        {"path": SMS_PATH, "method": "POST", "kind": "apply_then_fail", "then": then, "count": 1},
    )
    recorded = await outcomes_when_all_closed(tmp_path, simulator, SMS)
    (sms,) = simulator.state.sms(endpoint)
    assert recorded == ["retry", f"already sms {sms['id']}"]
    (post,) = requests(simulator, "POST", "/sms")
    (look,) = requests(simulator, "GET", "/sms")
    # The settle time runs from the attempt's start, a login's length before the POST.
    assert look.monotonic_time - post.monotonic_time >= SETTLE - 0.1


async def test_an_sms_that_timed_out_unsent_is_looked_for_then_sent_once(tmp_path, simulator):
    event = quota_event(simulator)
    set_faults(
        simulator,
        {"path": SMS_PATH, "method": "POST", "kind": "slow", "delay": 2, "count": 1},
    )
    recorded = await outcomes_when_all_closed(tmp_path, simulator, SMS)
    calls = await calls_in_order(simulator, "/sms")
    assert calls == [("POST", "slow"), ("GET", None), ("POST", None)]
    (sms,) = simulator.state.sms(event["endpoint"]["id"])
    assert recorded == ["retry", f"sent sms {sms['id']}"]


async def test_an_sms_with_the_same_text_as_another_is_not_mistaken_for_it(tmp_path, simulator):
    # Two events, one device, one text. The first POST fails with a 503 (it may have gone
    # out, so it is not resent blindly), the second is sent; the first's retry must not take
    # the second's SMS for its own.
    first, second = quota_event(simulator), quota_event(simulator)
    assert first["endpoint"]["id"] == second["endpoint"]["id"]
    set_faults(simulator, {"path": SMS_PATH, "method": "POST", "kind": "503", "count": 1})
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SMS), TOKEN)
    try:
        await run_until(daemon, all_closed)
        by_event = {i.event_id: i for i in daemon.store.intents()}
    finally:
        await daemon.aclose()
    sent = simulator.state.sms(first["endpoint"]["id"])
    assert [s["payload"] for s in sent] == ["REBOOT", "REBOOT"]
    assert {by_event[first["id"]].status, by_event[second["id"]].status} == {IntentStatus.DONE}
    assert len(requests(simulator, "POST", "/sms")) == 3


async def test_an_sms_interrupted_by_a_crash_waits_the_settle_time_then_finds_its_message(
    tmp_path, simulator
):
    event = quota_event(simulator)
    endpoint = event["endpoint"]["id"]
    config = fast_config(tmp_path, simulator)
    rules = rules_from(tmp_path, SMS)
    crashed = Daemon(config, rules, TOKEN)
    try:
        await poller_of(crashed).poll_once()
        (intent,) = crashed.store.intents()
        assert intent.id is not None
        crashed.store.start_attempt(intent.id, datetime.now(UTC))  # the attempt began...
        simulator.state.send_sms(endpoint, {"payload": "REBOOT"})  # ...and its SMS went out
    finally:
        await crashed.aclose()

    restarted = Daemon(config, rules, TOKEN)
    try:
        await restarted.dispatcher.run_due()
        waiting = restarted.store.get_intent(intent.id)
        assert requests(simulator, "GET", "/sms") == []
        started = time.monotonic()
        await eventually(lambda: _dispatch_until(restarted, lambda: bool(outcomes(restarted))))
        recorded = outcomes(restarted)
    finally:
        await restarted.aclose()
    assert waiting is not None and waiting.status is IntentStatus.PENDING
    assert time.monotonic() - started < SETTLE + 1.0
    (sms,) = simulator.state.sms(endpoint)
    assert recorded == [f"already sms {sms['id']}"]
    assert requests(simulator, "POST", "/sms") == []


async def test_a_follow_up_never_overtakes_the_action_it_follows_while_that_one_retries(
    tmp_path, simulator
):
    # A late event: its `after: 5s` follow-up is due at once, together with the suspension.
    # The suspension fails first; the activation must wait for it, not find the SIM still
    # active, call that done, and leave it suspended for good.
    sim = simulator.state.sims()[0]
    late = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()
    simulator.state.store_events([{"event_type": 19, "sim_id": sim["id"], "timestamp": late}])
    set_faults(simulator, {"path": "^/api/v1/sim/", "method": "GET", "kind": "503", "count": 1})
    rules = rules_from(tmp_path, CYCLE_RULES)
    daemon = Daemon(fast_config(tmp_path, simulator), rules, TOKEN)
    try:
        await run_until(daemon, all_closed)
    finally:
        await daemon.aclose()
    patches = [r for r in simulator.state.requests() if r.method == "PATCH"]
    assert len(patches) == 2
    changes = [
        e["event_type"]["id"]
        for e in simulator.state.events()
        if e["event_source"]["id"] == 2 and e["endpoint"]["id"] == sim["endpoint"]["id"]
    ]
    assert changes == [9, 8]  # suspended, then activated again
    assert simulator.state.sim(sim["id"])["status"]["id"] == 1


async def test_a_long_attempt_keeps_its_claim_renewed_while_it_runs_and_drops_it_at_the_end(
    tmp_path, simulator
):
    quota_event(simulator)
    set_faults(
        simulator,
        {"path": "^/api/v1/sim/", "method": "GET", "kind": "slow", "delay": 1.2, "count": 1},
    )
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    daemon.dispatcher.claim_for = timedelta(seconds=0.3)

    def claim() -> tuple[str | None, float | None]:
        row = daemon.store._db.execute("SELECT claimed_by, claimed_until FROM outbox").fetchone()
        return (row[0], row[1]) if row else (None, None)

    stop = asyncio.Event()
    try:
        await poller_of(daemon).poll_once()
        dispatching = asyncio.create_task(daemon.dispatcher.run_forever(stop, idle=0.05))
        await eventually(lambda: claim()[0] is not None)
        owner, first = claim()
        await asyncio.sleep(0.6)
        _, later = claim()
        await eventually(lambda: all_closed(daemon.store.intents()), timeout=5.0)
        after = claim()
        stop.set()
        await dispatching
    finally:
        stop.set()
        await daemon.aclose()
    assert owner == daemon.dispatcher.owner
    assert first is not None and later is not None and later > first + 0.3
    assert after == (None, None)


async def test_a_retry_runs_when_it_falls_due_not_at_the_next_idle_tick(tmp_path, simulator):
    quota_event(simulator)
    set_faults(simulator, {"path": "^/api/v1/sim/", "method": "GET", "kind": "503", "count": 1})
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    stop = asyncio.Event()
    try:
        await poller_of(daemon).poll_once()
        dispatching = asyncio.create_task(daemon.dispatcher.run_forever(stop, idle=30.0))
        await eventually(lambda: all_closed(daemon.store.intents()), timeout=3.0)
        (intent,) = daemon.store.intents()
        stop.set()
        await dispatching
    finally:
        stop.set()
        await daemon.aclose()
    assert intent.status is IntentStatus.DONE and intent.attempts == 2
    failed, retried = [r for r in requests(simulator, "GET", "/api/v1/sim/")][:2]
    # Due 20-50 ms after the failure: not held back by a floor on the dispatcher's wait.
    assert retried.monotonic_time - failed.monotonic_time < 0.9


async def test_each_closed_intent_is_logged_once_with_what_it_was_and_how_it_ended(
    tmp_path, simulator
):
    event = quota_event(simulator)
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        with capture_logs() as logs:
            await run_until(daemon, all_closed)
        (intent,) = daemon.store.intents()
    finally:
        await daemon.aclose()
    (line,) = [entry for entry in logs if entry["event"] == "action done"]
    assert line["log_level"] == "info"
    assert (line["intent_id"], line["rule"], line["action"]) == (
        intent.id,
        "suspend",
        "suspend_sim",
    )
    assert (line["event_id"], line["outcome"]) == (event["id"], "done")
    assert line["sim_id"] == event["sim"]["id"] and line["iccid"] == event["sim"]["iccid"]
    assert "error" not in line


async def test_a_dead_lettered_intent_is_logged_as_a_warning_with_its_last_error(
    tmp_path, simulator
):
    quota_event(simulator)
    set_faults(simulator, {"path": "^/api/v1/sim/", "method": "GET", "kind": "502"})
    config = fast_config(tmp_path, simulator, max_attempts=2)
    daemon = Daemon(config, rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        with capture_logs() as logs:
            await run_until(daemon, all_closed)
    finally:
        await daemon.aclose()
    (line,) = [entry for entry in logs if entry["event"] == "action dead-lettered"]
    assert line["log_level"] == "warning" and line["outcome"] == "dead"
    assert line["error"].startswith("gave up after 2: ")


async def test_an_intent_of_an_action_kind_no_longer_known_fails_with_that_reason(
    tmp_path, simulator
):
    quota_event(simulator)
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        daemon.store._db.execute("UPDATE outbox SET kind = 'retired_kind'")
        await daemon.dispatcher.run_due()
        (intent,) = daemon.store.intents()
        recorded = outcomes(daemon)
    finally:
        await daemon.aclose()
    assert intent.status is IntentStatus.FAILED
    assert intent.last_error == "unknown action 'retired_kind'"
    assert recorded == ["failed"]
    assert requests(simulator, "GET", "/api/v1/sim/") == []


async def test_each_attempts_audit_row_names_its_event_rule_action_intent_and_target(
    tmp_path, simulator
):
    event = quota_event(simulator)
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await run_until(daemon, all_closed)
        (intent,) = daemon.store.intents()
        (row,) = [r for r in daemon.store.audit_rows() if r["intent_id"] is not None]
    finally:
        await daemon.aclose()
    assert (row["event_id"], row["rule_id"], row["action"]) == (
        event["id"],
        "suspend",
        "suspend_sim",
    )
    assert (row["outcome"], row["detail"], row["intent_id"]) == ("done", None, intent.id)
    assert (row["sim_id"], row["endpoint_id"], row["iccid"]) == (
        event["sim"]["id"],
        event["endpoint"]["id"],
        event["sim"]["iccid"],
    )


async def test_a_webhook_is_delivered_while_every_emnify_slot_is_busy(
    tmp_path, simulator, sink: WebhookSink, monkeypatch
):
    # One emnify slot, held by a suspension whose SIM read is slow; the webhook of an event
    # that comes meanwhile has slots of its own and does not wait for it.
    monkeypatch.setenv("HOOK_URL", f"{sink.base_url}/hooks/ops")
    slow, other = simulator.state.sims()[:2]
    set_faults(
        simulator,
        {"path": f"^/api/v1/sim/{slow['id']}$", "method": "GET", "kind": "slow", "delay": 3},
    )
    rules = """
    rules:
      - id: suspend
        when: {type: 19}
        actions: [{suspend_sim: {}}]
      - id: hook
        when: {type: 11}
        actions:
          - webhook: {url: "${HOOK_URL}", body: {event: "{{ event.id }}"}}
    """
    config = replace(engine_config(tmp_path, simulator), concurrency=1)
    daemon = Daemon(config, rules_from(tmp_path, rules), TOKEN)

    def status(kind: str) -> IntentStatus | None:
        found = [i.status for i in daemon.store.intents() if i.kind == kind]
        return found[0] if found else None

    async with running_daemon(daemon):
        simulator.state.store_events([{"event_type": 19, "sim_id": slow["id"]}])
        await eventually(lambda: status("suspend_sim") is IntentStatus.RUNNING)
        simulator.state.store_events([{"event_type": 11, "sim_id": other["id"]}])
        await eventually(lambda: status("webhook") is IntentStatus.DONE)
        suspension = status("suspend_sim")
    assert suspension is IntentStatus.RUNNING
    assert len(sink.calls("ops")) == 1


@pytest.mark.parametrize("status", ["429", "403"])
async def test_a_status_change_refused_outright_is_not_read_back(tmp_path, simulator, status):
    # A 429 or a 4xx means the change surely was not made: nothing to read back at once
    # (a 429 is retried after its wait, a 403 fails).
    event = quota_event(simulator)
    sim_path = f"/api/v1/sim/{event['sim']['id']}"
    set_faults(simulator, {"path": "^/api/v1/sim/", "method": "PATCH", "kind": status, "count": 1})
    recorded = await outcomes_when_all_closed(tmp_path, simulator, SUSPEND)
    records = sorted(simulator.state.requests(), key=lambda r: r.monotonic_time)
    calls = [(r.method, r.fault) for r in records if r.path == sim_path]
    assert calls[:2] == [("GET", None), ("PATCH", status)]
    if status == "429":
        assert calls[2:] == [("GET", None), ("PATCH", None)]  # the retry: looks, then sends
        assert recorded == ["retry", "done"]
    else:
        assert calls[2:] == []
        assert recorded == ["failed"]


async def test_a_status_change_answered_500_is_read_back_at_once_then_retried(tmp_path, simulator):
    # A server-side failure may have come after the change was made: it is read back at
    # once (not made, here), then retried.
    event = quota_event(simulator)
    sim_path = f"/api/v1/sim/{event['sim']['id']}"
    set_faults(simulator, {"path": "^/api/v1/sim/", "method": "PATCH", "kind": "500", "count": 1})
    recorded = await outcomes_when_all_closed(tmp_path, simulator, SUSPEND)
    records = sorted(simulator.state.requests(), key=lambda r: r.monotonic_time)
    calls = [(r.method, r.fault) for r in records if r.path == sim_path]
    assert calls == [("GET", None), ("PATCH", "500"), ("GET", None), ("GET", None), ("PATCH", None)]
    assert recorded == ["retry", "done"]


async def test_a_quota_expiry_counts_from_when_the_action_was_planned_not_from_its_attempt(
    tmp_path, simulator
):
    event = quota_event(simulator)
    rules = """
    rules:
      - id: quota
        when: {type: 19}
        actions: [{set_data_quota: {volume: 500, expiry: 30d}}]
    """
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, rules), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        # Planned two days ago (a follow-up `after: 2d` now due).
        daemon.store._db.execute("UPDATE outbox SET created_at = created_at - 172800")
        (planned,) = daemon.store.intents()
        await run_until(daemon, all_closed)
    finally:
        await daemon.aclose()
    assert planned.created_at is not None
    quota = simulator.state.quota(event["endpoint"]["id"], "data")
    assert quota is not None
    expiry = (planned.created_at + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert quota["expiry_date"] == expiry


async def test_a_failed_attempt_that_will_be_retried_is_logged_with_when_and_why(
    tmp_path, simulator
):
    quota_event(simulator)
    set_faults(simulator, {"path": "^/api/v1/sim/", "method": "GET", "kind": "503", "count": 1})
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        with capture_logs() as logs:
            await daemon.dispatcher.run_due()
        (intent,) = daemon.store.intents()
    finally:
        await daemon.aclose()
    (line,) = [entry for entry in logs if entry["event"] == "action failed, will retry"]
    assert line["log_level"] == "warning"
    assert (line["intent_id"], line["action"], line["attempt"]) == (intent.id, "suspend_sim", 1)
    assert intent.due_at is not None and line["retry_at"] == intent.due_at.isoformat()
    assert line["reason"] == intent.last_error and "HTTP 503" in line["reason"]


async def test_each_attempt_is_timed_by_kind_and_result_in_the_metrics(tmp_path, simulator):
    quota_event(simulator)
    set_faults(
        simulator,
        {"path": "^/api/v1/sim/", "method": "GET", "kind": "503", "count": 1},
        {"path": "^/api/v1/sim/", "method": "GET", "kind": "slow", "delay": 0.2, "count": 1},
    )
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await run_until(daemon, all_closed)
        text = daemon.metrics.render().decode()
    finally:
        await daemon.aclose()
    name = "event_engine_action_duration_seconds"
    for result in ("ok", "error"):
        assert metric_value(text, f"{name}_count", kind="suspend_sim", result=result) == 1
    took = metric_value(text, f"{name}_sum", kind="suspend_sim", result="ok")
    assert took is not None and 0.2 <= took < 5.0
    # Without `organisations:`, no action is counted as any organisation's.
    assert "event_engine_organisation_actions_total{" not in text


async def test_an_sms_retried_before_its_settle_time_waits_for_it_keeping_its_last_error(
    tmp_path, simulator
):
    quota_event(simulator)
    set_faults(
        simulator,
        {"path": SMS_PATH, "method": "POST", "kind": "apply_then_fail", "then": "504", "count": 1},
    )
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SMS), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        await daemon.dispatcher.run_due()
        (failed,) = daemon.store.intents()
        assert failed.id is not None and failed.due_at is not None
        await asyncio.sleep(max((failed.due_at - datetime.now(UTC)).total_seconds(), 0) + 0.02)
        await daemon.dispatcher.run_due()  # its retry is due, but not settled yet
        (waiting,) = daemon.store.intents()
        history = daemon.store.attempt_history(failed.id)
    finally:
        await daemon.aclose()
    assert history is not None
    assert waiting.status is IntentStatus.PENDING and waiting.attempts == 1
    assert waiting.due_at == history.last_at + timedelta(seconds=SETTLE)
    assert waiting.last_error == failed.last_error and "HTTP 504" in (waiting.last_error or "")
    assert (waiting.last_error or "").endswith(
        "; the SMS may have gone out, so it will be looked for before any resend"
    )
    assert requests(simulator, "GET", "/sms") == []


async def test_an_action_that_crashes_is_logged_with_its_intent_and_retried_as_an_internal_error(
    tmp_path, simulator, monkeypatch
):
    quota_event(simulator)
    crashes = iter([True])

    async def run_once_crashing(cls: type[SuspendSim], params: Any, ctx: Any) -> str:
        if next(crashes, False):
            raise RuntimeError("a bug")
        return await original(params, ctx)

    original = SuspendSim.run
    monkeypatch.setattr(SuspendSim, "run", classmethod(run_once_crashing))
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        with capture_logs() as logs:
            await daemon.dispatcher.run_due()
        (crashed,) = daemon.store.intents()
        await run_until(daemon, all_closed)
        (intent,) = daemon.store.intents()
        recorded = outcomes(daemon)
        text = daemon.metrics.render().decode()
    finally:
        await daemon.aclose()
    timed = "event_engine_action_duration_seconds_count"
    for result in ("ok", "error"):  # the crash counts as an attempt that failed
        assert metric_value(text, timed, kind="suspend_sim", result=result) == 1
    (line,) = [entry for entry in logs if entry["event"] == "action crashed"]
    assert line["log_level"] == "error" and line["exc_info"] is True
    assert (line["intent_id"], line["action"]) == (crashed.id, "suspend_sim")
    assert crashed.status is IntentStatus.PENDING
    assert crashed.last_error == "internal error: RuntimeError"
    assert intent.status is IntentStatus.DONE and recorded == ["retry", "done"]


async def test_a_stopped_dispatcher_returns_at_once_not_at_its_next_idle_tick(tmp_path, simulator):
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    stop = asyncio.Event()
    try:
        dispatching = asyncio.create_task(daemon.dispatcher.run_forever(stop, idle=30.0))
        await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(dispatching, timeout=2.0)
    finally:
        stop.set()
        await daemon.aclose()


async def test_run_due_says_how_many_attempts_it_started(tmp_path, simulator):
    quota_event(simulator, 0)
    quota_event(simulator, 1)
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        first = await daemon.dispatcher.run_due()
        again = await daemon.dispatcher.run_due()
    finally:
        await daemon.aclose()
    assert (first, again) == (2, 0)


async def test_intents_waiting_for_a_slot_when_the_dispatcher_stops_stay_pending(
    tmp_path, simulator
):
    # One emnify slot: the first suspension runs (slowly), the second waits for the slot.
    # Stopped meanwhile, the first finishes and the second is left for the next start.
    first, second = simulator.state.sims()[:2]
    for sim in (first, second):
        simulator.state.store_events([{"event_type": 19, "sim_id": sim["id"]}])
    set_faults(
        simulator,
        {"path": f"^/api/v1/sim/{first['id']}$", "method": "GET", "kind": "slow", "delay": 0.5},
    )
    config = replace(fast_config(tmp_path, simulator), concurrency=1)
    daemon = Daemon(config, rules_from(tmp_path, SUSPEND), TOKEN)
    stop = asyncio.Event()

    def status(sim: dict[str, Any]) -> IntentStatus | None:
        found = [i.status for i in daemon.store.intents() if i.target.get("sim_id") == sim["id"]]
        return found[0] if found else None

    try:
        await poller_of(daemon).poll_once()
        dispatching = asyncio.create_task(daemon.dispatcher.run_forever(stop, idle=0.05))
        await eventually(lambda: status(first) is IntentStatus.RUNNING)
        stop.set()
        await dispatching
        (left,) = [i for i in daemon.store.intents() if i.target.get("sim_id") == second["id"]]
        done = status(first)
    finally:
        stop.set()
        await daemon.aclose()
    assert done is IntentStatus.DONE
    assert left.status is IntentStatus.PENDING and left.attempts == 0


async def test_a_look_put_off_while_every_slot_was_busy_is_made_once_a_slot_frees(
    tmp_path, simulator, monkeypatch
):
    # One emnify slot, held by a slow suspension, and one webhook slot, held by a receiver
    # that never answers: a suspension committed then is read once the slow one ends, not
    # at the next idle look (30 s away).
    slow, later, hooked = simulator.state.sims()[:3]
    set_faults(
        simulator,
        {"path": f"^/api/v1/sim/{slow['id']}$", "method": "GET", "kind": "slow", "delay": 2},
    )
    rules = """
    rules:
      - id: suspend
        when: {type: 19}
        actions: [{suspend_sim: {}}]
      - id: hook
        when: {type: 11}
        actions:
          - webhook: {url: "${HOOK_URL}", body: {event: "{{ event.id }}"}, timeout: 60}
    """
    config = replace(fast_config(tmp_path, simulator), concurrency=1, webhook_concurrency=1)
    config = replace(config, api=replace(config.api, read_timeout=10.0))
    stop = asyncio.Event()

    def status(daemon: Daemon, sim: dict[str, Any]) -> IntentStatus | None:
        found = [
            i.status
            for i in daemon.store.intents()
            if i.target.get("sim_id") == sim["id"] and i.kind == "suspend_sim"
        ]
        return found[0] if found else None

    async with RawReceiver(answer_never) as receiver:
        monkeypatch.setenv("HOOK_URL", f"{receiver.base_url}/hook")
        daemon = Daemon(config, rules_from(tmp_path, rules), TOKEN)
        try:
            simulator.state.store_events(
                [
                    {"event_type": 19, "sim_id": slow["id"]},
                    {"event_type": 11, "sim_id": hooked["id"]},
                ]
            )
            await poller_of(daemon).poll_once()
            dispatching = asyncio.create_task(daemon.dispatcher.run_forever(stop, idle=30.0))
            await eventually(lambda: receiver.open_now == 1)
            await asyncio.sleep(1.1)  # the poller reads up to the last whole second
            simulator.state.store_events([{"event_type": 19, "sim_id": later["id"]}])
            await poller_of(daemon).poll_once()
            await eventually(lambda: status(daemon, later) is not None)
            assert status(daemon, slow) is IntentStatus.RUNNING  # every slot is busy
            await eventually(lambda: status(daemon, later) is IntentStatus.DONE, timeout=5.0)
            await receiver.hang_up()
            stop.set()
            await dispatching
        finally:
            stop.set()
            await daemon.aclose()


async def test_an_sms_retried_after_an_unclear_failure_does_not_take_an_earlier_ones_for_its_own(
    tmp_path, simulator
):
    # One device, one text, two events. The first SMS is sent; the second's POST fails with
    # a 503 (it may have gone out), so its retry looks first: the SMS it finds is the first
    # intent's (its recorded outcome says so), not its own, and it is sent.
    first = quota_event(simulator)
    endpoint = first["endpoint"]["id"]
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SMS), TOKEN)
    try:
        await run_until(daemon, all_closed)
        await asyncio.sleep(1.1)  # the poller reads up to the last whole second
        second = quota_event(simulator)
        set_faults(simulator, {"path": SMS_PATH, "method": "POST", "kind": "503", "count": 1})
        await run_until(daemon, lambda intents: len(intents) == 2 and all_closed(intents))
        by_event = {i.event_id: i for i in daemon.store.intents()}
        recorded = outcomes(daemon)
    finally:
        await daemon.aclose()
    sent = simulator.state.sms(endpoint)
    assert [s["payload"] for s in sent] == ["REBOOT", "REBOOT"]
    assert by_event[second["id"]].status is IntentStatus.DONE
    assert recorded == [f"sent sms {sent[0]['id']}", "retry", f"sent sms {sent[1]['id']}"]


async def test_only_a_failed_action_says_action_failed_and_only_a_dead_one_says_dead_lettered(
    tmp_path, simulator
):
    _done, refused, dying = (quota_event(simulator, index) for index in range(3))
    simulator.state.change_sim_status(refused["sim"]["id"], 0, emit=False)  # Issued: 422
    set_faults(
        simulator,
        {"path": f"^/api/v1/sim/{dying['sim']['id']}$", "method": "GET", "kind": "502"},
    )
    rules = (
        SUSPEND
        + """
  - id: failed
    when: {source: engine, type: action_failed}
    actions: [{log: {message: "failed: {{ event.detail.reason }}"}}]
  - id: dead
    when: {source: engine, type: action_dead_lettered}
    actions: [{log: {message: "dead: {{ event.detail.reason }}"}}]
"""
    )
    config = fast_config(tmp_path, simulator, max_attempts=2)
    daemon = Daemon(config, rules_from(tmp_path, rules), TOKEN)
    try:
        with capture_logs() as logs:
            await run_until(daemon, lambda intents: len(intents) == 5 and all_closed(intents))
        rows = daemon.store.audit_rows()
    finally:
        await daemon.aclose()
    said = {r["rule_id"]: r["sim_id"] for r in rows if r["outcome"] == "logged"}
    assert said == {"failed": refused["sim"]["id"], "dead": dying["sim"]["id"]}
    lines = [str(entry["event"]) for entry in logs]
    (failed,) = [line for line in lines if line.startswith("failed: ")]
    (dead,) = [line for line in lines if line.startswith("dead: ")]
    assert "HTTP 422" in failed and dead.startswith("dead: gave up after 2: ")


async def test_an_intent_read_again_while_its_attempt_runs_is_not_attempted_again_at_once(
    tmp_path, simulator
):
    # A look made while the first suspension's slow attempt runs (for a second event) reads
    # that intent again. When the attempt then fails, the intent waits for its backoff
    # (30 s or more here): the look that read it again does not start it once more.
    slow, other = simulator.state.sims()[:2]
    set_faults(
        simulator,
        {"path": f"^/api/v1/sim/{slow['id']}$", "method": "GET", "kind": "slow", "delay": 3},
    )
    config = fast_config(
        tmp_path,
        simulator,
        initial_backoff=timedelta(seconds=60),
        max_backoff=timedelta(seconds=60),
    )
    config = replace(config, api=replace(config.api, read_timeout=2.0))
    daemon = Daemon(config, rules_from(tmp_path, SUSPEND), TOKEN)
    stop = asyncio.Event()

    def intent_of(sim: dict[str, Any]) -> Intent | None:
        found = [i for i in daemon.store.intents() if i.target.get("sim_id") == sim["id"]]
        return found[0] if found else None

    def waits_for_retry() -> bool:
        intent = intent_of(slow)
        return intent is not None and intent.status is IntentStatus.PENDING and intent.attempts > 0

    try:
        simulator.state.store_events([{"event_type": 19, "sim_id": slow["id"]}])
        await poller_of(daemon).poll_once()
        dispatching = asyncio.create_task(daemon.dispatcher.run_forever(stop, idle=0.05))
        await asyncio.sleep(1.1)  # the poller reads up to the last whole second
        simulator.state.store_events([{"event_type": 19, "sim_id": other["id"]}])
        await poller_of(daemon).poll_once()
        await eventually(waits_for_retry, timeout=5.0)
        await asyncio.sleep(0.3)
        retrying = intent_of(slow)
        stop.set()
        await dispatching
    finally:
        stop.set()
        await daemon.aclose()
    assert (
        retrying is not None and retrying.attempts == 1 and retrying.status is IntentStatus.PENDING
    )
    assert retrying.due_at is not None
    assert retrying.due_at >= datetime.now(UTC) + timedelta(seconds=20)
    assert simulator.state.sim(other["id"])["status"]["id"] == 2


async def test_an_sms_looked_for_ignores_one_with_its_text_sent_before_its_first_attempt(
    tmp_path, simulator
):
    # Planned two hours ago (a follow-up now due); half an hour ago someone else sent the
    # device the same text. The POST fails unclearly (503): the retry looks for an SMS sent
    # since its first attempt, finds none of its own, and sends.
    event = quota_event(simulator)
    endpoint = event["endpoint"]["id"]
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SMS), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        daemon.store._db.execute("UPDATE outbox SET created_at = created_at - 7200")
        real_clock = simulator.state._clock
        simulator.state._clock = lambda: real_clock() - 1800
        foreign = simulator.state.send_sms(endpoint, {"payload": "REBOOT"})
        simulator.state._clock = real_clock
        set_faults(simulator, {"path": SMS_PATH, "method": "POST", "kind": "503", "count": 1})
        await run_until(daemon, all_closed)
        recorded = outcomes(daemon)
    finally:
        await daemon.aclose()
    sent = simulator.state.sms(endpoint)
    assert [s["id"] for s in sent[:1]] == [foreign["id"]] and len(sent) == 2
    assert recorded == ["retry", f"sent sms {sent[1]['id']}"]


async def test_a_running_attempts_claim_never_runs_out_while_it_runs(
    tmp_path, simulator, monkeypatch
):
    # Every slot busy (one for emnify calls, held by a 1 s suspension; one for webhooks,
    # held by a receiver that never answers), so no look re-reads the running intents: their
    # claims, 0.3 s at a time, are renewed as they run. Sampled every 10 ms, a claim always
    # reaches past the moment it is read, so no other instance could take an intent over.
    slow, hooked = simulator.state.sims()[:2]
    set_faults(
        simulator,
        {"path": f"^/api/v1/sim/{slow['id']}$", "method": "GET", "kind": "slow", "delay": 1.0},
    )
    rules = """
    rules:
      - id: suspend
        when: {type: 19}
        actions: [{suspend_sim: {}}]
      - id: hook
        when: {type: 11}
        actions:
          - webhook: {url: "${HOOK_URL}", body: {event: "{{ event.id }}"}, timeout: 60}
    """
    config = replace(engine_config(tmp_path, simulator), concurrency=1, webhook_concurrency=1)
    stop = asyncio.Event()
    lapsed: list[float] = []

    async with RawReceiver(answer_never) as receiver:
        monkeypatch.setenv("HOOK_URL", f"{receiver.base_url}/hook")
        daemon = Daemon(config, rules_from(tmp_path, rules), TOKEN)
        daemon.dispatcher.claim_for = timedelta(seconds=0.3)

        def sample() -> bool:
            rows = daemon.store._db.execute(
                "SELECT kind, claimed_until FROM outbox WHERE status = 'running'"
            ).fetchall()
            lapsed.extend(time.time() - until for _, until in rows if until <= time.time())
            return simulator.state.sim(slow["id"])["status"]["id"] == 2

        try:
            simulator.state.store_events(
                [
                    {"event_type": 19, "sim_id": slow["id"]},
                    {"event_type": 11, "sim_id": hooked["id"]},
                ]
            )
            await poller_of(daemon).poll_once()
            dispatching = asyncio.create_task(daemon.dispatcher.run_forever(stop, idle=0.05))
            await eventually(lambda: receiver.open_now == 1)
            await eventually(sample, timeout=5.0, every=0.01)
            await receiver.hang_up()
            stop.set()
            await dispatching
        finally:
            stop.set()
            await daemon.aclose()
    assert lapsed == []


async def test_a_backlog_larger_than_a_page_is_read_on_as_it_runs_low_not_at_idle_ticks(
    tmp_path, simulator, sink: WebhookSink, monkeypatch
):
    # 250 webhooks and 250 log actions: more than one page (200) of the outbox of each kind
    # of slot. The rest is read as soon as what was read runs low, not at the dispatcher's
    # next idle look (30 s away).
    monkeypatch.setenv("HOOK_URL", f"{sink.base_url}/hooks/ops")
    sims = simulator.state.sims()
    simulator.state.store_events(
        [{"event_type": 19, "sim_id": sims[n % len(sims)]["id"]} for n in range(250)]
    )
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, HOOK), TOKEN)
    stop = asyncio.Event()
    try:
        commit(daemon, [planned("log", f"log-{n}", {"message": "noted"}) for n in range(250)])
        await poller_of(daemon).poll_once()
        dispatching = asyncio.create_task(daemon.dispatcher.run_forever(stop, idle=30.0))
        await eventually(lambda: all_closed(daemon.store.intents()), timeout=20.0)
        stop.set()
        await dispatching
        done = Counter(i.kind for i in daemon.store.intents() if i.status is IntentStatus.DONE)
    finally:
        stop.set()
        await daemon.aclose()
    assert done == {"webhook": 250, "log": 250} and len(sink.idempotency_keys()) == 250


async def test_an_sms_waiting_for_its_settle_time_is_looked_for_once_settled_not_at_idle(
    tmp_path, simulator
):
    event = quota_event(simulator)
    set_faults(
        simulator,
        {"path": SMS_PATH, "method": "POST", "kind": "apply_then_fail", "then": "504", "count": 1},
    )
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SMS), TOKEN)
    stop = asyncio.Event()
    try:
        await poller_of(daemon).poll_once()
        dispatching = asyncio.create_task(daemon.dispatcher.run_forever(stop, idle=30.0))
        await eventually(lambda: all_closed(daemon.store.intents()), timeout=3.0)
        stop.set()
        await dispatching
        recorded = outcomes(daemon)
    finally:
        stop.set()
        await daemon.aclose()
    (sms,) = simulator.state.sms(event["endpoint"]["id"])
    assert recorded == ["retry", f"already sms {sms['id']}"]


async def test_an_intent_whose_parameters_its_action_cannot_read_fails_at_once_saying_so(
    tmp_path, simulator
):
    endpoint = simulator.state.sims()[0]["endpoint"]["id"]
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SMS), TOKEN)
    unreadable = Intent(
        idempotency_key="unreadable",
        event_id=1,
        rule_id="sms",
        action_index=0,
        kind="send_sms",
        params={},  # no payload
        target={"endpoint_id": endpoint},
    )
    try:
        daemon.store.commit_batch(Batch(intents=[unreadable]), datetime.now(UTC))
        started = await daemon.dispatcher.run_due()
        (intent,) = daemon.store.intents()
        rows = [r for r in daemon.store.audit_rows() if r["intent_id"] == intent.id]
    finally:
        await daemon.aclose()
    reason = "the outbox holds parameters send_sms cannot read: "
    assert started == 1 and intent.status is IntentStatus.FAILED
    assert intent.last_error is not None and intent.last_error.startswith(reason)
    assert "payload" in intent.last_error
    assert [(r["outcome"], r["detail"]) for r in rows] == [("failed", intent.last_error)]
    assert requests(simulator, "POST", "/sms") == []


async def test_intents_read_but_waiting_for_a_slot_are_claimed_a_short_while_for_this_instance(
    tmp_path, simulator
):
    # One slot for emnify calls, held by a slow suspension: the second SIM's suspension is
    # read at the same look but waits. It is claimed for this instance meanwhile, so that
    # another instance of a cluster reads other intents, and only for the claim time (capped
    # at a few seconds): an instance that dies leaves it to the others soon.
    slow, other = simulator.state.sims()[:2]
    set_faults(
        simulator,
        {"path": f"^/api/v1/sim/{slow['id']}$", "method": "GET", "kind": "slow", "delay": 1.0},
    )
    config = replace(engine_config(tmp_path, simulator), concurrency=1)
    daemon = Daemon(config, rules_from(tmp_path, SUSPEND), TOKEN)
    daemon.dispatcher.claim_for = timedelta(seconds=2)
    simulator.state.store_events(
        [{"event_type": 19, "sim_id": slow["id"]}, {"event_type": 19, "sim_id": other["id"]}]
    )

    def waiting() -> list[tuple[str | None, float | None]]:
        return daemon.store._db.execute(
            "SELECT claimed_by, claimed_until FROM outbox WHERE status = 'pending'"
        ).fetchall()

    stop = asyncio.Event()
    try:
        await poller_of(daemon).poll_once()
        dispatching = asyncio.create_task(daemon.dispatcher.run_forever(stop, idle=30.0))
        await eventually(
            lambda: (
                daemon.store._db.execute("SELECT 1 FROM outbox WHERE status = 'running'").fetchone()
                is not None
            )
        )
        [(owner, until)] = waiting()
        read_at = time.time()
        await eventually(lambda: all_closed(daemon.store.intents()), timeout=5.0)
        stop.set()
        await dispatching
    finally:
        stop.set()
        await daemon.aclose()
    assert owner == daemon.dispatcher.owner
    assert until is not None and 0 < until - read_at <= 2.0


async def test_webhooks_waiting_for_their_receiver_are_claimed_and_hide_no_emnify_call(
    tmp_path, simulator
):
    # More webhooks than a page of the outbox (200) wait for a receiver that never answers,
    # two at a time; a log action planned after them is read at the same look, in a page
    # of its own, and runs. The webhooks read but waiting are claimed for this instance.
    async with RawReceiver(answer_never) as receiver:
        call = {"method": "POST", "url": f"{receiver.base_url}/hook", "timeout": 60.0}
        daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
        commit(daemon, [planned("webhook", f"hook-{n}", call) for n in range(201)])
        commit(daemon, [planned("log", "logged", {"message": "noted"})])
        dispatching = asyncio.create_task(daemon.dispatcher.run_forever(asyncio.Event(), 30.0))
        try:
            await eventually(lambda: outcomes(daemon) == ["logged"], timeout=5.0)
            waiting = daemon.store._db.execute(
                "SELECT claimed_by, COUNT(*) FROM outbox WHERE kind = 'webhook'"
                " AND status = 'pending' GROUP BY claimed_by"
            ).fetchall()
            calls = receiver.open_now
        finally:
            await stop_dispatching(dispatching)
            await daemon.aclose()
    assert calls == 2  # the receiver's two slots, held
    # A page read: two running, the other 198 claimed; the 201st is on the next page.
    assert dict(waiting) == {daemon.dispatcher.owner: 198, None: 1}


async def test_webhooks_are_read_past_a_backlog_of_emnify_calls_waiting_for_their_slot(
    tmp_path, simulator, sink: WebhookSink
):
    # One emnify slot, held by a slow suspension; more than a page of log actions wait for
    # it. A webhook planned after them is read at the same look, in a page of its own, and
    # delivered while the suspension still runs.
    slow = simulator.state.sims()[0]
    set_faults(
        simulator,
        {"path": f"^/api/v1/sim/{slow['id']}$", "method": "GET", "kind": "slow", "delay": 3},
    )
    config = replace(engine_config(tmp_path, simulator), concurrency=1)
    daemon = Daemon(config, rules_from(tmp_path, SUSPEND), TOKEN)
    commit(daemon, [planned("suspend_sim", "slow", {}, sim_id=slow["id"])])
    commit(daemon, [planned("log", f"log-{n}", {"message": "noted"}) for n in range(200)])
    hook = {"method": "POST", "url": f"{sink.base_url}/hooks/ops"}
    commit(daemon, [planned("webhook", "hook", hook)])
    dispatching = asyncio.create_task(daemon.dispatcher.run_forever(asyncio.Event(), 30.0))
    try:
        await eventually(lambda: len(sink.calls("ops")) == 1, timeout=5.0)
        running = [i.kind for i in daemon.store.intents() if i.status is IntentStatus.RUNNING]
    finally:
        await stop_dispatching(dispatching)
        await daemon.aclose()
    assert running == ["suspend_sim"]


async def test_an_attempt_the_store_failed_to_record_is_logged_and_made_again_later(
    tmp_path, simulator, monkeypatch
):
    event = quota_event(simulator)
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    start_attempt = daemon.store.start_attempt
    failures = [StoreError("cannot commit to the state store: database or disk is full")]

    def failing_once(*args: Any, **kwargs: Any) -> int | None:
        if failures:
            raise failures.pop()
        return start_attempt(*args, **kwargs)

    monkeypatch.setattr(daemon.store, "start_attempt", failing_once)
    try:
        with capture_logs() as logs:
            await run_until(daemon, all_closed)
        (intent,) = daemon.store.intents()
    finally:
        await daemon.aclose()
    assert [entry for entry in logs if entry["log_level"] == "error"] == [
        {
            "event": "the state store failed; the action runs again later",
            "intent_id": intent.id,
            "error": "cannot commit to the state store: database or disk is full",
            "log_level": "error",
        }
    ]
    assert intent.status is IntentStatus.DONE and intent.attempts == 1
    assert simulator.state.sim(event["sim"]["id"])["status"]["id"] == 2  # suspended


async def test_an_action_falling_due_on_an_endpoint_while_a_later_one_runs_there_waits_for_it(
    tmp_path, simulator
):
    # A log action planned for 0.3 s from now, then a disabling of the same endpoint due at
    # once, whose endpoint read is slow: the log falls due while the disabling runs, and
    # runs after it, never beside it.
    endpoint = simulator.state.sims()[0]["endpoint"]["id"]
    set_faults(
        simulator,
        {"path": "^/api/v1/endpoint/", "method": "GET", "kind": "slow", "delay": 1.0, "count": 1},
    )
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, DISABLE), TOKEN)
    later = planned("log", "logged", {"message": "noted"}, endpoint_id=endpoint)
    later.due_at = datetime.now(UTC) + timedelta(seconds=0.3)
    commit(daemon, [later])
    commit(daemon, [planned("disable_endpoint", "disabled", {}, endpoint_id=endpoint)])
    stop = asyncio.Event()
    try:
        dispatching = asyncio.create_task(daemon.dispatcher.run_forever(stop, idle=30.0))
        await eventually(lambda: all_closed(daemon.store.intents()), timeout=5.0)
        stop.set()
        await dispatching
        actions = [r["action"] for r in daemon.store.audit_rows() if r["intent_id"] is not None]
    finally:
        stop.set()
        await daemon.aclose()
    assert actions == ["disable_endpoint", "log"]
