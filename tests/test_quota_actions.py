"""The quota actions over loopback: `set_data_quota`, `set_sms_quota` and
`top_up_data_quota`, against the simulator's `/api/v1/endpoint/{id}/quota/*`."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from engine.actions import ACTIONS, ActionContext, Target
from engine.config import Config
from engine.daemon import Daemon
from engine.dispatch import CONFIRMED, RetryPolicy, carry_out
from engine.emnify import ClientSettings, EmnifyClient
from engine.errors import ActionError, ConfigError, Location
from engine.model import IntentStatus
from engine.outbound import HttpReceivers
from engine.simulator import FaultRule, SimulatorServer

from helpers import TOKEN, engine_config, eventually, poller_of, rules_from

HERE = Location("rules.yaml", 7)
QUOTA_PATH = r"^/api/v1/endpoint/\d+/quota/data$"


@pytest.fixture
async def context(simulator: SimulatorServer):
    endpoint_id = simulator.state.endpoints()[0]["id"]
    settings = ClientSettings(base_url=simulator.base_url, action_rate_limit=100.0, max_retries=0)
    async with (
        EmnifyClient(simulator.application_token, settings) as client,
        httpx.AsyncClient() as http,
    ):
        yield ActionContext(
            emnify=client,
            receivers=HttpReceivers(http),
            target=Target(endpoint_id=endpoint_id),
            idempotency_key="1-rule-0",
            attempt=1,
            created_at=datetime(2026, 5, 1, 12, 0, tzinfo=UTC),
        )


async def attempt(kind: str, params: dict[str, Any], ctx: ActionContext) -> str:
    """One attempt as the dispatcher makes it, on the parameters as the outbox keeps them."""
    action = ACTIONS[kind]
    rendered = action.from_params(params, HERE).params_for({})
    decoded = action.decode(orjson.loads(orjson.dumps(rendered.to_json())))
    return await carry_out(action, decoded, ctx)


def data_quota(simulator: SimulatorServer, ctx: ActionContext) -> dict[str, Any] | None:
    assert ctx.target.endpoint_id is not None
    return simulator.state.quota(ctx.target.endpoint_id, "data")


def quota_posts(simulator: SimulatorServer) -> int:
    return sum(1 for r in simulator.state.requests() if r.method == "POST" and "/quota/" in r.path)


# -- set_data_quota / set_sms_quota -----------------------------------------------------------


async def test_set_data_quota_sets_the_quota_once_and_then_finds_it_in_place(simulator, context):
    params = {"volume": 500, "expiry": "30d", "threshold_percentage": 20}
    assert await attempt("set_data_quota", params, context) == "set 500"
    quota = data_quota(simulator, context)
    assert quota is not None
    assert quota["volume"] == 500 and quota["status"]["id"] == 1
    assert quota["expiry_date"] == "2026-05-31T12:00:00Z"  # 30 days from the intent
    assert quota["threshold_percentage"] == 20
    assert await attempt("set_data_quota", params, context) == "already"
    assert quota_posts(simulator) == 1


async def test_set_data_quota_changes_a_quota_that_differs_in_any_field_it_names(
    simulator, context
):
    await attempt("set_data_quota", {"volume": 500, "threshold_percentage": 20}, context)
    assert await attempt("set_data_quota", {"volume": 500, "threshold_percentage": 50}, context)
    quota = data_quota(simulator, context)
    assert quota is not None and quota["threshold_percentage"] == 50
    assert quota_posts(simulator) == 2


async def test_set_sms_quota_sets_the_sms_quota_not_the_data_one(simulator, context):
    assert await attempt("set_sms_quota", {"volume": 100}, context) == "set 100"
    assert context.target.endpoint_id is not None
    sms = simulator.state.quota(context.target.endpoint_id, "sms")
    assert sms is not None and sms["volume"] == 100
    assert data_quota(simulator, context) is None


async def test_a_quota_set_whose_answer_was_lost_is_read_back_not_posted_again(simulator, context):
    simulator.state.set_faults(
        [FaultRule.parse({"path": QUOTA_PATH, "method": "POST", "kind": "apply_then_fail"})]
    )
    # The POST took effect but answered 504: the read-back confirms it at once.
    assert await attempt("set_data_quota", {"volume": 250}, context) == CONFIRMED
    quota = data_quota(simulator, context)
    assert quota is not None and quota["volume"] == 250
    assert quota_posts(simulator) == 1


# -- top_up_data_quota ------------------------------------------------------------------------


async def test_a_top_up_adds_its_volume_to_what_is_left_and_keeps_the_rest(simulator, context):
    await attempt("set_data_quota", {"volume": 500, "threshold_percentage": 20}, context)
    assert context.target.endpoint_id is not None
    simulator.state.quotas.use(context.target.endpoint_id, "data", 380)
    assert await attempt("top_up_data_quota", {"volume": 500}, context) == "topped up to 620 MB"
    quota = data_quota(simulator, context)
    assert quota is not None
    assert quota["volume"] == 620 and quota["threshold_percentage"] == 20


async def test_a_top_up_of_an_endpoint_without_a_quota_starts_from_nothing(simulator, context):
    assert await attempt("top_up_data_quota", {"volume": 50}, context) == "topped up to 50 MB"
    quota = data_quota(simulator, context)
    assert quota is not None and quota["volume"] == 50


@pytest.mark.parametrize("then", ["504", "drop"])
async def test_a_top_up_whose_answer_was_lost_is_not_added_again_on_retry(simulator, context, then):
    await attempt("set_data_quota", {"volume": 100}, context)
    simulator.state.set_faults(
        [
            FaultRule.parse(
                {"path": QUOTA_PATH, "method": "POST", "kind": "apply_then_fail", "then": then}
            )
        ]
    )
    with pytest.raises(ActionError) as lost:
        await attempt("top_up_data_quota", {"volume": 500}, context)
    assert lost.value.retryable
    simulator.state.clear_faults()
    retry = replace(context, attempt=2, last_error=str(lost.value))
    assert await attempt("top_up_data_quota", {"volume": 500}, retry) == (
        "already topped up to 600 MB"
    )
    quota = data_quota(simulator, context)
    assert quota is not None and quota["volume"] == 600


async def test_a_retried_top_up_sets_the_volume_it_fixed_even_after_the_device_used_some(
    simulator, context
):
    # The first POST landed, its answer was lost, the device used 30 MB meanwhile: the
    # retry sets the 600 MB it fixed again (a set, not an add), never 600 + 500.
    await attempt("set_data_quota", {"volume": 100}, context)
    simulator.state.set_faults(
        [FaultRule.parse({"path": QUOTA_PATH, "method": "POST", "kind": "apply_then_fail"})]
    )
    with pytest.raises(ActionError) as lost:
        await attempt("top_up_data_quota", {"volume": 500}, context)
    simulator.state.clear_faults()
    assert context.target.endpoint_id is not None
    simulator.state.quotas.use(context.target.endpoint_id, "data", 30)
    retry = replace(context, attempt=2, last_error=str(lost.value))
    assert await attempt("top_up_data_quota", {"volume": 500}, retry) == "topped up to 600 MB"
    quota = data_quota(simulator, context)
    assert quota is not None and quota["volume"] == 600


async def test_a_top_up_whose_read_failed_before_any_post_reads_again_on_retry(simulator, context):
    await attempt("set_data_quota", {"volume": 100}, context)
    simulator.state.set_faults(
        [FaultRule.parse({"path": QUOTA_PATH, "method": "GET", "kind": "503", "count": 1})]
    )
    with pytest.raises(ActionError) as failed:
        await attempt("top_up_data_quota", {"volume": 500}, context)
    retry = replace(context, attempt=2, last_error=str(failed.value))
    assert await attempt("top_up_data_quota", {"volume": 500}, retry) == "topped up to 600 MB"


async def test_a_top_up_retried_without_a_record_of_its_volume_refuses_to_add_again(
    simulator, context
):
    # A crash mid-call leaves no record of the volume the first attempt set.
    await attempt("set_data_quota", {"volume": 100}, context)
    crashed = replace(context, attempt=2, last_error="interrupted")
    with pytest.raises(ActionError, match="not added again") as refused:
        await attempt("top_up_data_quota", {"volume": 500}, crashed)
    assert not refused.value.retryable
    quota = data_quota(simulator, context)
    assert quota is not None and quota["volume"] == 100


# -- through the daemon: the outbox keeps the volume across attempts ---------------------------

TOP_UP = """
rules:
  - id: top-up
    when: {type: 19}
    actions: [{top_up_data_quota: {volume: 500}}]
"""


def fast_config(tmp_path: Path, simulator: SimulatorServer) -> Config:
    config = engine_config(tmp_path, simulator)
    return replace(
        config,
        api=replace(config.api, max_retries=0, read_timeout=1.0),
        retry=RetryPolicy(
            initial_backoff=timedelta(milliseconds=20), max_backoff=timedelta(milliseconds=50)
        ),
    )


@pytest.mark.parametrize("then", ["504", "drop"])
async def test_repeated_quota_events_with_lost_answers_top_up_once_per_event(
    tmp_path, simulator, then
):
    sim = simulator.state.sims()[0]
    events = [
        simulator.state.store_events([{"event_type": {"id": 19}, "sim_id": sim["id"]}])[0]
        for _ in range(2)
    ]
    endpoint_id = events[0]["endpoint"]["id"]
    simulator.state.set_quota(endpoint_id, "data", {"volume": 0})
    simulator.state.set_faults(
        [
            FaultRule.parse(
                {
                    "path": QUOTA_PATH,
                    "method": "POST",
                    "kind": "apply_then_fail",
                    "then": then,
                    "count": 2,
                }
            ),
            FaultRule.parse({"path": QUOTA_PATH, "method": "GET", "kind": "503", "count": 1}),
        ]
    )
    daemon = Daemon(fast_config(tmp_path, simulator), rules_from(tmp_path, TOP_UP), TOKEN)
    try:
        await poller_of(daemon).poll_once()

        async def closed() -> bool:
            await daemon.dispatcher.run_due()
            intents = daemon.store.intents()
            return len(intents) == 2 and all(i.status is IntentStatus.DONE for i in intents)

        await eventually(closed, timeout=10.0, every=0.02)
        outcomes = sorted(
            r["outcome"] for r in daemon.store.audit_rows() if r["intent_id"] is not None
        )
        # Each event's first POST landed but lost its answer; its retry found it in place.
        assert outcomes.count("retry") >= 2
        assert [o for o in outcomes if o != "retry"] == [
            "already topped up to 1000 MB",
            "already topped up to 500 MB",
        ]
        # The same events polled again (a replay of the window) plan nothing new.
        await poller_of(daemon).poll_once()
        await daemon.dispatcher.run_due()
        assert len(daemon.store.intents()) == 2
    finally:
        await daemon.aclose()
    quota = simulator.state.quota(endpoint_id, "data")
    assert quota is not None and quota["volume"] == 1000  # two events, 500 MB each


# -- checked at load -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("set_data_quota", {}, "needs the parameter `volume`"),
        ("set_data_quota", {"volume": "lots"}, "must be a number"),
        ("set_data_quota", {"volume": 5, "expiry": "soon"}, "duration like `30d`"),
        ("set_data_quota", {"volume": 5, "threshold_percentage": 120}, "from 0 to 100"),
        ("set_data_quota", {"volume": 5, "action_on_exhaustion": "throttle"}, "only be `block`"),
        ("set_sms_quota", {"volume": 5, "auto_refil": True}, "did you mean `auto_refill`"),
        ("top_up_data_quota", {"volume": 0}, "more than 0"),
    ],
)
def test_bad_quota_parameters_are_config_errors_with_a_location(kind, params, message):
    with pytest.raises(ConfigError, match=message) as refused:
        ACTIONS[kind].from_params(params, HERE)
    assert refused.value.where == HERE


async def test_emnify_logs_a_quota_assigned_event_for_each_quota_set(simulator, context):
    await attempt("set_data_quota", {"volume": 500}, context)
    await attempt("set_sms_quota", {"volume": 20}, context)
    assigned = [e for e in simulator.state.events() if e["event_type"]["id"] in (56, 58)]
    assert [(e["event_type"]["id"], e["detail"]["quota"]["volume"]) for e in assigned] == [
        (56, 500),
        (58, 20),
    ]
