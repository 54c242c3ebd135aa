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
from engine.actions._network import operator_of
from engine.actions._tags import with_tags
from engine.daemon import Daemon
from engine.dispatch import CONFIRMED, carry_out
from engine.emnify import ClientSettings, EmnifyClient
from engine.errors import ActionError, ApiError, ConfigError, Location
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


# -- each action's parts, one by one -------------------------------------------------------------


class NoCalls:
    """An emnify client that must not be called."""

    def __getattr__(self, name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"emnify called: {name}")

        return call


# Aimed at nothing (an intent whose event named neither SIM nor endpoint), with no emnify to
# call.
OFFLINE = ActionContext(
    emnify=NoCalls(),  # type: ignore[arg-type]
    receivers=NoCalls(),  # type: ignore[arg-type]
    target=Target(),
    idempotency_key="1-rule-0",
    attempt=1,
    created_at=datetime(2026, 5, 1, tzinfo=UTC),
)


@pytest.mark.parametrize(
    ("event", "operator"),
    [
        ({"detail": {"id": 5, "name": "Vodafone", "mnc": "02"}}, (5, "Vodafone")),
        ({"detail": {"id": 5, "mnc": "02"}}, (5, None)),  # a network without a name
        ({"detail": {"id": 5, "name": 7}}, (5, None)),  # a name that is no text is left out
        ({"detail": '{"id": 5, "name": "Vodafone"}'}, (5, "Vodafone")),  # detail as JSON text
        ({"detail": "{not json"}, None),
        ({"detail": ["id", 5]}, None),
        ({"detail": {"id": 5}}, None),  # an id that is no operator's (neither name nor mnc)
        ({"detail": {"id": "5", "name": "Vodafone"}}, None),
        ({"detail": {"id": True, "name": "Vodafone"}}, None),
        ({"detail": {"pdp_context": {"operator_id": "23"}}}, (23, None)),  # Create: a string
        ({"detail": {"pdp_context": {"operator_id": 23}, "name": "Telekom"}}, (23, "Telekom")),
        ({"detail": {"pdp_context": {"operator_id": "2x"}}}, None),
        ({"detail": {"pdp_context": {"operator_id": True}}}, None),
        ({"detail": {"pdp_context": "23"}}, None),
        ({}, None),
        (None, None),  # no event at all (a digest)
    ],
)
def test_the_network_an_event_names_is_its_operator_or_its_pdp_contexts(event, operator):
    assert operator_of(event) == operator


@pytest.mark.parametrize("operator_id", [True, 5.0, "5"])
def test_a_network_written_as_anything_but_a_whole_number_is_refused(operator_id):
    with pytest.raises(ConfigError) as refused:
        ACTIONS["unblock_network"].from_params({"operator_id": operator_id}, HERE)
    assert refused.value.message == "`unblock_network.operator_id` must be a whole number"


async def test_a_network_the_rule_names_is_blocked_whatever_the_event_says(simulator, context):
    event = {"detail": {"id": 9, "name": "Elsewhere"}}
    assert await attempt("block_current_network", {"operator_id": 5}, context, event) == (
        "blocked operator 5"
    )
    assert simulator.state.operator_blacklist(context.target.endpoint_id) == [5]
    assert await attempt("unblock_network", {}, context, event) == "already"
    assert await attempt("unblock_network", {"operator_id": 5}, context) == "unblocked operator 5"
    assert await attempt("block_current_network", {}, context, event) == (
        "blocked operator 9 (Elsewhere)"
    )
    assert simulator.state.operator_blacklist(context.target.endpoint_id) == [9]


async def test_an_event_without_a_network_to_block_fails_naming_it():
    with pytest.raises(ActionError) as failed:
        ACTIONS["unblock_network"].from_params({}, HERE).params_for({"event": {"detail": {}}})
    assert (
        str(failed.value) == "unblock_network: the event names no network (no operator in detail)"
    )


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("block_current_network", {"operator_id": 5}, "block_current_network: no endpoint_id"),
        ("unblock_network", {"operator_id": 5}, "unblock_network: no endpoint_id"),
        ("change_service_profile", {"id": 102}, "change_service_profile: no endpoint_id"),
        ("add_tags", {"tags": "x"}, "add_tags: no endpoint_id"),
        ("remove_tags", {"tags": "x"}, "remove_tags: no endpoint_id"),
        ("reset_connectivity", {}, "reset_connectivity: no endpoint_id"),
        ("set_imei_lock", {}, "set_imei_lock: no endpoint_id"),
        ("extend_traffic_limit", {"volume": 5}, "extend_traffic_limit: no endpoint_id"),
    ],
)
async def test_an_endpoint_action_without_an_endpoint_fails_saying_so(kind, params, message):
    action = ACTIONS[kind]
    decoded = action.from_params(params, HERE).params_for({"event": {}})
    steps = ("effect", "run") if action.looks_first else ("run",)
    for step in steps:
        with pytest.raises(ActionError) as failed:
            await getattr(action, step)(decoded, OFFLINE)
        assert str(failed.value) == f"{message} in the target"


# profiles


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"id": True}, "`change_tariff_profile.id` must be a whole number"),
        ({"id": 2.0}, "`change_tariff_profile.id` must be a whole number"),
        ({"name": ""}, "`change_tariff_profile.name` must be a profile's name"),
        ({"name": "  "}, "`change_tariff_profile.name` must be a profile's name"),
        ({"name": 203}, "`change_tariff_profile.name` must be a profile's name"),
        ({"id": 203, "reset_connectivity": 1}, "reset_connectivity` must be true or false"),
        ({}, "`change_tariff_profile` needs either `id` or `name` (one of them)"),
    ],
)
def test_a_profile_is_named_by_a_whole_number_or_a_name(params, message):
    with pytest.raises(ConfigError) as refused:
        ACTIONS["change_tariff_profile"].from_params(params, HERE)
    assert message in refused.value.message and refused.value.where == HERE
    assert refused.value.message.startswith("`change_tariff_profile")


async def test_a_profile_change_without_a_reset_by_default_only_sets_the_profile(
    simulator, context
):
    assert await attempt("change_tariff_profile", {"id": 203}, context) == "set 203"
    assert endpoint(simulator, context)["tariff_profile"]["id"] == 203
    assert endpoint(simulator, context)["service_profile"]["id"] != 203
    assert resets(simulator, context) == 0


async def test_an_unknown_tariff_profile_name_is_named_in_words(simulator, context):
    with pytest.raises(ActionError) as failed:
        await attempt("change_tariff_profile", {"name": "Gold"}, context)
    assert str(failed.value) == "change_tariff_profile: no tariff profile named 'Gold'"


async def test_a_profile_row_naming_no_profile_fails_without_a_call():
    action = ACTIONS["change_service_profile"]
    with pytest.raises(ActionError) as failed:  # an outbox row edited by hand
        await action.run(action.decode({}), replace(OFFLINE, target=Target(endpoint_id=5)))
    assert str(failed.value) == "change_service_profile: neither id nor name in the parameters"


async def test_a_profile_in_place_on_a_retry_is_not_changed_again(simulator, context):
    await attempt("change_service_profile", {"id": 102}, context)
    retry = replace(context, attempt=2)
    action = ACTIONS["change_service_profile"]
    params = action.decode({"id": 102})
    assert await action.run(params, retry) == "set 102"  # in place: nothing sent
    assert calls(simulator, "PATCH", "/api/v1/endpoint/") == 1
    with_reset = action.decode({"id": 102, "reset_connectivity": True})
    assert await action.effect(with_reset, retry) is None  # the reset may be missing
    assert await action.effect(with_reset, context) == "already"
    assert await action.run(with_reset, retry) == "connectivity reset"
    assert calls(simulator, "PATCH", "/api/v1/endpoint/") == 2  # the first change, the reset
    (reset,) = [e for e in simulator.state.events() if e["event_type"]["id"] == 68]
    assert reset["description"] == "Reset connectivity: location and PDP context"


async def test_a_first_profile_change_reads_the_endpoint_once(simulator, context):
    # The look before the attempt read it: the run itself sets the profile without reading.
    params = {"id": 102, "reset_connectivity": True}
    assert await attempt("change_service_profile", params, context) == (
        "set 102, connectivity reset"
    )
    assert context.target.endpoint_id is not None
    reads = [
        r
        for r in simulator.state.requests()
        if r.method == "GET" and r.path == f"/api/v1/endpoint/{context.target.endpoint_id}"
    ]
    assert len(reads) == 1


async def test_a_profile_read_back_without_its_object_is_not_the_one_wanted():
    class NoProfile:
        async def get_endpoint(self, endpoint_id: int) -> dict[str, Any]:
            return {"id": endpoint_id, "service_profile": 102}  # an id without its object

    action = ACTIONS["change_service_profile"]
    ctx = replace(OFFLINE, emnify=NoProfile(), target=Target(endpoint_id=5))
    assert await action.in_place(action.decode({"id": 102}), ctx) is False


@pytest.mark.parametrize(("fault", "retryable"), [("403", False), ("500", True)])
async def test_a_profile_change_refused_before_its_reset_says_whether_a_retry_helps(
    simulator, context, fault, retryable
):
    simulator.state.set_faults(
        [FaultRule.parse({"path": r"^/api/v1/endpoint/\d+$", "method": "PATCH", "kind": fault})]
    )
    action = ACTIONS["change_service_profile"]
    params = action.decode({"id": 102, "reset_connectivity": True})
    with pytest.raises(ActionError) as failed:
        await action.run(params, context)
    assert failed.value.retryable is retryable
    assert str(failed.value).startswith("change_service_profile: ")
    assert resets(simulator, context) == 0


async def test_a_profile_change_without_a_reset_leaves_an_unclear_answer_to_the_dispatcher(
    simulator, context
):
    simulator.state.set_faults(
        [FaultRule.parse({"path": r"^/api/v1/endpoint/\d+$", "method": "PATCH", "kind": "500"})]
    )
    action = ACTIONS["change_service_profile"]
    with pytest.raises(ApiError) as failed:
        await action.run(action.decode({"id": 102}), context)
    assert failed.value.status == 500


# tags


@pytest.mark.parametrize(
    ("written", "tags"),
    [
        (" billing ", ("billing",)),
        (["a", " a ", "b", "a"], ("a", "b")),
        (["b", "a"], ("b", "a")),
    ],
)
def test_the_tags_of_a_rule_are_kept_trimmed_once_each_in_order(written, tags):
    assert ACTIONS["add_tags"].from_params({"tags": written}, HERE).tags == tags


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("a,b", "`add_tags.tags`: 'a,b' holds a comma, which separates tags"),
        ([""], "`add_tags.tags` holds a tag that is not text: ''"),
        (["a", "  "], "`add_tags.tags` holds a tag that is not text: '  '"),
        ([5], "`add_tags.tags` holds a tag that is not text: 5"),
        ({"a": 1}, "`add_tags.tags` must be a tag or a list of tags"),
        ([], "`add_tags.tags` must be a tag or a list of tags"),
        (5, "`add_tags.tags` must be a tag or a list of tags"),
    ],
)
def test_tags_that_are_not_text_or_hold_a_comma_are_refused(written, message):
    with pytest.raises(ConfigError) as refused:
        ACTIONS["add_tags"].from_params({"tags": written}, HERE)
    assert refused.value.message == message and refused.value.where == HERE


@pytest.mark.parametrize(
    ("current", "tags", "present", "wanted"),
    [
        (None, ["a"], True, "a"),
        ("", ["a", "b"], True, "a,b"),
        ("x, a", ["a"], True, "x, a"),
        ("x, a ", ["b"], True, "x, a ,b"),
        (" a ,b", ["a"], False, "b"),
        ("a", ["a"], False, None),
        (None, ["a"], False, None),
        ("a,b", ["c"], False, "a,b"),
    ],
)
def test_tags_are_added_at_the_end_or_taken_out_leaving_the_others_as_written(
    current, tags, present, wanted
):
    assert with_tags(current, tags, present) == wanted


async def test_tags_are_added_to_an_endpoint_without_any(simulator, context):
    assert context.target.endpoint_id is not None
    simulator.state.change_endpoint(
        context.target.endpoint_id, tags=None, set_tags=True, emit=False
    )
    assert await attempt("remove_tags", {"tags": "fleet"}, context) == "already"
    assert await attempt("add_tags", {"tags": "fleet"}, context) == "done"
    assert endpoint(simulator, context)["tags"] == "fleet"


async def test_tags_in_place_are_told_by_one_read_and_nothing_written(simulator, context):
    assert context.target.endpoint_id is not None
    simulator.state.change_endpoint(
        context.target.endpoint_id, tags="a,b", set_tags=True, emit=False
    )
    assert await attempt("add_tags", {"tags": "b"}, context) == "already"
    assert await attempt("remove_tags", {"tags": "c"}, context) == "already"
    path = f"/api/v1/endpoint/{context.target.endpoint_id}"
    requests = [(r.method, r.path) for r in simulator.state.requests() if "/endpoint/" in r.path]
    assert requests == [("GET", path), ("GET", path)]
    # A run (after a look that found them missing) that finds them in place writes nothing.
    for kind, tags in (("add_tags", ["b"]), ("remove_tags", ["c"])):
        action = ACTIONS[kind]
        assert await action.run(action.decode({"tags": tags}), context) == "already"
    assert calls(simulator, "PATCH", "/api/v1/endpoint/") == 0


async def test_tags_read_back_as_anything_but_text_count_as_none():
    written: list[dict[str, Any]] = []

    class OddTags:
        async def get_endpoint(self, endpoint_id: int) -> dict[str, Any]:
            return {"id": endpoint_id, "tags": ["fleet"]}

        async def update_endpoint(self, endpoint_id: int, change: dict[str, Any]) -> None:
            written.append(change)

    ctx = replace(OFFLINE, emnify=OddTags(), target=Target(endpoint_id=5))
    assert await attempt("add_tags", {"tags": "billing"}, ctx) == "done"
    assert await attempt("remove_tags", {"tags": "fleet"}, ctx) == "already"
    assert written == [{"tags": "billing"}]


# connectivity, IMEI lock, traffic-limit extension


async def test_reset_connectivity_resets_both_unless_told_otherwise(simulator, context):
    assert await attempt("reset_connectivity", {}, context) == "reset"
    assert await attempt("reset_connectivity", {"location": False}, context) == "reset"
    descriptions = [
        e["description"] for e in simulator.state.events() if e["event_type"]["id"] == 68
    ]
    assert descriptions == [
        "Reset connectivity: location and PDP context",
        "Reset connectivity: PDP context",
    ]


@pytest.mark.parametrize("params", [{"location": "yes"}, {"pdp_context": 0}, {"location": None}])
def test_what_a_reset_resets_is_true_or_false(params):
    with pytest.raises(ConfigError) as refused:
        ACTIONS["reset_connectivity"].from_params(params, HERE)
    assert refused.value.message == (
        "`reset_connectivity.location` and `.pdp_context` are true or false"
    )
    assert refused.value.where == HERE


def test_a_reset_that_resets_nothing_is_refused_in_words():
    with pytest.raises(ConfigError) as refused:
        ACTIONS["reset_connectivity"].from_params({"location": False, "pdp_context": False}, HERE)
    assert refused.value.message == "`reset_connectivity` resets nothing with both set to false"


async def test_an_imei_lock_is_off_only_when_it_is_false(simulator, context):
    assert await attempt("set_imei_lock", {"locked": False}, context) == "already"
    assert endpoint(simulator, context)["imei_lock"] is False
    assert await attempt("set_imei_lock", {"locked": True}, context) == "locked"
    assert await attempt("set_imei_lock", {"locked": True}, context) == "already"
    with pytest.raises(ConfigError) as refused:
        ACTIONS["set_imei_lock"].from_params({"locked": 1}, HERE)
    assert refused.value.message == "`set_imei_lock.locked` must be true or false"


async def test_a_traffic_limit_extension_of_another_volume_is_set_again(simulator, context):
    assert await attempt("extend_traffic_limit", {"volume": 200}, context) == "extended"
    assert await attempt("extend_traffic_limit", {"volume": 200.0000001}, context) == "already"
    assert await attempt("extend_traffic_limit", {"volume": 250.5}, context) == "extended"
    assert context.target.endpoint_id is not None
    assert simulator.state.traffic_limit_extension(context.target.endpoint_id) == {"volume": 250.5}


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        (0, "`extend_traffic_limit.volume` must be more than 0"),
        (0.0, "`extend_traffic_limit.volume` must be more than 0"),
        (
            -1,
            "`extend_traffic_limit.volume` must be a number, 0 or more"
            " (MB for data, messages for SMS)",
        ),
    ],
)
def test_a_traffic_limit_extension_of_nothing_is_refused(volume, message):
    with pytest.raises(ConfigError) as refused:
        ACTIONS["extend_traffic_limit"].from_params({"volume": volume}, HERE)
    assert (refused.value.message, refused.value.where) == (message, HERE)


@pytest.mark.parametrize("volume", [0.5, 1])
def test_a_traffic_limit_extension_of_any_volume_above_nothing_is_taken(volume):
    action = ACTIONS["extend_traffic_limit"].from_params({"volume": volume}, HERE)
    assert action.params_for({}).to_json() == {"volume": volume}
