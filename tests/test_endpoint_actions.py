"""The endpoint actions over loopback against the simulator: profiles, tags, connectivity,
the operator blacklist, the IMEI lock and the traffic-limit extension."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest

from engine.actions import ACTIONS, ActionContext, Target
from engine.daemon import Daemon
from engine.dispatch import CONFIRMED, carry_out
from engine.emnify import ClientSettings, EmnifyClient
from engine.errors import ActionError, ConfigError, Location
from engine.model import IntentStatus
from engine.outbound import HttpReceivers
from engine.simulator import FaultRule, SimulatorServer

from helpers import TOKEN, engine_config, eventually, poller_of, rules_from

HERE = Location("rules.yaml", 12)


@pytest.fixture
async def context(simulator: SimulatorServer):
    settings = ClientSettings(base_url=simulator.base_url, action_rate_limit=100.0, max_retries=0)
    async with (
        EmnifyClient(simulator.application_token, settings) as client,
        httpx.AsyncClient() as http,
    ):
        yield ActionContext(
            emnify=client,
            receivers=HttpReceivers(http),
            target=Target(endpoint_id=simulator.state.endpoints()[0]["id"]),
            idempotency_key="1-rule-0",
            attempt=1,
            created_at=datetime.now(UTC),
        )


async def attempt(
    kind: str, params: dict[str, Any], ctx: ActionContext, event: dict[str, Any] | None = None
) -> str:
    """One attempt as the dispatcher makes it, on the parameters as the outbox keeps them."""
    action = ACTIONS[kind]
    rendered = action.from_params(params, HERE).params_for({"event": event or {}})
    decoded = action.decode(orjson.loads(orjson.dumps(rendered.to_json())))
    return await carry_out(action, decoded, ctx)


def endpoint(simulator: SimulatorServer, ctx: ActionContext) -> dict[str, Any]:
    assert ctx.target.endpoint_id is not None
    return simulator.state.endpoint(ctx.target.endpoint_id)


def calls(simulator: SimulatorServer, method: str, path_part: str) -> int:
    return sum(1 for r in simulator.state.requests() if r.method == method and path_part in r.path)


def resets(simulator: SimulatorServer, ctx: ActionContext) -> int:
    return sum(
        1
        for e in simulator.state.events()
        if e["event_type"]["id"] == 68 and e["endpoint"]["id"] == ctx.target.endpoint_id
    )


# -- profiles ---------------------------------------------------------------------------------


async def test_a_service_profile_named_is_resolved_once_and_set_once(simulator, context):
    params = {"name": "Throttled 64 kbps"}
    assert await attempt("change_service_profile", params, context) == "set 102"
    assert endpoint(simulator, context)["service_profile"]["id"] == 102
    assert await attempt("change_service_profile", params, context) == "already"
    assert calls(simulator, "GET", "/api/v1/service_profile") == 1  # the name is cached
    assert calls(simulator, "PATCH", "/api/v1/endpoint/") == 1


async def test_a_profile_change_with_a_reset_makes_the_device_attach_again(simulator, context):
    params = {"id": 203, "reset_connectivity": True}
    assert await attempt("change_tariff_profile", params, context) == (
        "set 203, connectivity reset"
    )
    assert endpoint(simulator, context)["tariff_profile"]["id"] == 203
    assert resets(simulator, context) == 1
    # Already in place on a first attempt: neither changed nor reset again.
    assert await attempt("change_tariff_profile", params, context) == "already"
    assert resets(simulator, context) == 1


async def test_a_profile_change_whose_answer_was_lost_still_gets_its_reset(simulator, context):
    simulator.state.set_faults(
        [
            FaultRule.parse(
                {"path": r"^/api/v1/endpoint/\d+$", "method": "PATCH", "kind": "apply_then_fail"}
            )
        ]
    )
    params = {"name": "Data blocked", "reset_connectivity": True}
    with pytest.raises(ActionError) as lost:
        await attempt("change_service_profile", params, context)
    assert lost.value.retryable
    simulator.state.clear_faults()
    retry = replace(context, attempt=2, last_error=str(lost.value))
    assert await attempt("change_service_profile", params, retry) == "connectivity reset"
    assert endpoint(simulator, context)["service_profile"]["id"] == 103
    assert resets(simulator, context) == 1


async def test_a_follow_up_moves_the_device_back_to_its_standard_profile(simulator, context):
    await attempt("change_service_profile", {"id": 102}, context)
    later = replace(context, idempotency_key="1-rule-1")
    assert await attempt("change_service_profile", {"name": "Default Service Profile"}, later)
    assert endpoint(simulator, context)["service_profile"]["id"] == 101


async def test_an_unknown_profile_name_fails_without_changing_anything(simulator, context):
    with pytest.raises(ActionError, match="no service profile named 'Gold'") as failed:
        await attempt("change_service_profile", {"name": "Gold"}, context)
    assert not failed.value.retryable
    assert calls(simulator, "PATCH", "/api/v1/endpoint/") == 0


# -- tags ---------------------------------------------------------------------------------------


async def test_add_tags_keeps_the_other_tags_exactly_as_written(simulator, context):
    assert context.target.endpoint_id is not None
    simulator.state.change_endpoint(
        context.target.endpoint_id, tags="fleet, berlin ,Vip", set_tags=True, emit=False
    )
    assert await attempt("add_tags", {"tags": ["billing-q3", "berlin"]}, context) == "done"
    assert endpoint(simulator, context)["tags"] == "fleet, berlin ,Vip,billing-q3"
    assert await attempt("add_tags", {"tags": "billing-q3"}, context) == "already"
    assert calls(simulator, "PATCH", "/api/v1/endpoint/") == 1


async def test_remove_tags_takes_out_only_the_tags_named(simulator, context):
    assert context.target.endpoint_id is not None
    simulator.state.change_endpoint(
        context.target.endpoint_id, tags="fleet, berlin ,Vip", set_tags=True, emit=False
    )
    assert await attempt("remove_tags", {"tags": ["berlin"]}, context) == "done"
    assert endpoint(simulator, context)["tags"] == "fleet,Vip"
    assert await attempt("remove_tags", {"tags": ["berlin"]}, context) == "already"
    assert await attempt("remove_tags", {"tags": ["fleet", "Vip"]}, context) == "done"
    assert endpoint(simulator, context)["tags"] is None


# -- connectivity, network, IMEI lock, traffic-limit extension ---------------------------------


async def test_reset_connectivity_resets_what_it_is_asked_to(simulator, context):
    assert await attempt("reset_connectivity", {"pdp_context": False}, context) == "reset"
    (reset,) = [e for e in simulator.state.events() if e["event_type"]["id"] == 68]
    assert reset["description"] == "Reset connectivity: location"


def roaming_event(simulator: SimulatorServer, ctx: ActionContext) -> dict[str, Any]:
    """A location update of the context's endpoint on the network it roams on (the
    generator's own detail), the only event stored."""
    sim_id = endpoint(simulator, ctx)["sim"]["id"]
    events = simulator.state.generate(40)
    simulator.state.clear_events()  # only the one below is polled
    for event in events:
        detail = event.get("detail")
        if event["event_type"]["id"] in (1, 2) and isinstance(detail, dict):
            (stored,) = simulator.state.store_events(
                [{"event_type": {"id": 1}, "sim_id": sim_id, "detail": detail}]
            )
            return stored
    raise AssertionError("the generator made no location update")


async def test_a_roaming_device_is_blocked_on_the_network_it_roams_on_then_unblocked(
    simulator, context
):
    event = roaming_event(simulator, context)
    operator = event["detail"]["id"]
    assert context.target.endpoint_id is not None
    outcome = await attempt("block_current_network", {}, context, event)
    assert outcome.startswith(f"blocked operator {operator}")
    assert simulator.state.operator_blacklist(context.target.endpoint_id) == [operator]
    assert await attempt("block_current_network", {}, context, event) == "already"
    assert await attempt("unblock_network", {}, context, event) == (
        outcome.replace("blocked", "unblocked", 1)
    )
    assert simulator.state.operator_blacklist(context.target.endpoint_id) == []


async def test_block_current_network_cannot_be_planned_for_an_event_without_a_network():
    action = ACTIONS["block_current_network"].from_params({}, HERE)
    with pytest.raises(ActionError, match="names no network"):
        action.params_for({"event": {"detail": {"quota": {"volume": 0}}}})


async def test_a_blacklisting_whose_answer_was_lost_is_read_back(simulator, context):
    simulator.state.set_faults(
        [
            FaultRule.parse(
                {
                    "path": r"^/api/v1/endpoint/\d+/operator_blacklist/",
                    "method": "PUT",
                    "kind": "apply_then_fail",
                }
            )
        ]
    )
    outcome = await attempt("block_current_network", {"operator_id": 5}, context)
    assert outcome == CONFIRMED  # read back at once after the unclear answer
    assert calls(simulator, "PUT", "operator_blacklist") == 1


async def test_set_imei_lock_locks_and_unlocks_once_each(simulator, context):
    assert await attempt("set_imei_lock", {}, context) == "locked"
    assert endpoint(simulator, context)["imei_lock"] is True
    assert await attempt("set_imei_lock", {}, context) == "already"
    assert await attempt("set_imei_lock", {"locked": False}, context) == "unlocked"
    assert endpoint(simulator, context)["imei_lock"] is False


async def test_extend_traffic_limit_sets_the_extension_once(simulator, context):
    assert await attempt("extend_traffic_limit", {"volume": 200}, context) == "extended"
    assert context.target.endpoint_id is not None
    assert simulator.state.traffic_limit_extension(context.target.endpoint_id) == {"volume": 200}
    assert await attempt("extend_traffic_limit", {"volume": 200}, context) == "already"
    assert calls(simulator, "POST", "traffic_limit_extension") == 1


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("change_service_profile", {}, "either `id` or `name`"),
        ("change_service_profile", {"id": 1, "name": "x"}, "either `id` or `name`"),
        ("change_tariff_profile", {"id": "203"}, "whole number"),
        ("change_tariff_profile", {"id": 1, "reset_connectivity": "yes"}, "true or false"),
        ("add_tags", {"tags": ["a,b"]}, "holds a comma"),
        ("remove_tags", {"tags": []}, "a tag or a list"),
        ("reset_connectivity", {"location": False, "pdp_context": False}, "resets nothing"),
        ("block_current_network", {"operator_id": "x"}, "whole number"),
        ("set_imei_lock", {"locked": "on"}, "true or false"),
        ("extend_traffic_limit", {"volume": -1}, "must be a number"),
    ],
)
def test_bad_endpoint_action_parameters_are_config_errors_with_a_location(kind, params, message):
    with pytest.raises(ConfigError, match=message) as refused:
        ACTIONS[kind].from_params(params, HERE)
    assert refused.value.where == HERE


# -- through the daemon: a roaming device blocked on the network it roams on -------------------

BLOCK_ROAMING = """
rules:
  - id: stay-home
    when: {type: 1}
    actions: [{block_current_network: {}}]
"""


async def test_the_daemon_blocks_a_roaming_device_on_the_network_its_event_names(
    tmp_path, simulator, context
):
    event = roaming_event(simulator, context)
    assert context.target.endpoint_id is not None
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, BLOCK_ROAMING), TOKEN)
    try:
        await poller_of(daemon).poll_once()

        async def blocked() -> bool:
            await daemon.dispatcher.run_due()
            return any(i.status is IntentStatus.DONE for i in daemon.store.intents())

        await eventually(blocked, timeout=10.0, every=0.02)
    finally:
        await daemon.aclose()
    assert simulator.state.operator_blacklist(context.target.endpoint_id) == [event["detail"]["id"]]
