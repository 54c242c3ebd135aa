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
from engine.actions._quota import expiry_date, matches, read_number
from engine.actions.top_up_data_quota import _mb, recorded_target
from engine.config import Config
from engine.daemon import Daemon
from engine.dispatch import CONFIRMED, RetryPolicy, carry_out
from engine.emnify import ClientSettings, EmnifyClient
from engine.errors import ActionError, ApiError, ConfigError, EventFormatError, Location
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
    with pytest.raises(ActionError) as refused:
        await attempt("top_up_data_quota", {"volume": 500}, crashed)
    assert str(refused.value) == (
        "top_up_data_quota: an earlier attempt may have topped the quota up and left no"
        " record of the volume it set; not added again (check the quota)"
    )
    assert refused.value.retryable is False
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


# -- the parts, one by one: what a rule may write, the body POSTed, a quota read back -----------


@pytest.mark.parametrize(
    ("params", "message", "hint"),
    [
        (
            {"volume": True},
            "`set_data_quota.volume` must be a number, 0 or more (MB for data, messages for SMS)",
            None,
        ),
        ({"volume": "5"}, "`set_data_quota.volume` must be a number, 0 or more", None),
        ({"volume": -0.5}, "`set_data_quota.volume` must be a number, 0 or more", None),
        (
            {"volume": 5, "expiry": 30},
            "`set_data_quota.expiry` must be a duration like `30d` or a timestamp",
            None,
        ),
        ({"volume": 5, "expiry": "0s"}, "`set_data_quota.expiry` must be longer than 0s", None),
        (
            {"volume": 5, "expiry": "soon"},
            "`set_data_quota.expiry` must be a duration like `30d` or an ISO 8601 timestamp,"
            " got 'soon'",
            None,
        ),
        (
            {"volume": 5, "auto_refill": "yes"},
            "`set_data_quota.auto_refill` must be true or false",
            None,
        ),
        (
            {"volume": 5, "threshold_percentage": True},
            "`set_data_quota.threshold_percentage` must be a whole number from 0 to 100",
            None,
        ),
        (
            {"volume": 5, "threshold_percentage": 50.0},
            "`set_data_quota.threshold_percentage` must be a whole number from 0 to 100",
            None,
        ),
        (
            {"volume": 5, "threshold_percentage": -1},
            "`set_data_quota.threshold_percentage` must be a whole number from 0 to 100",
            None,
        ),
        (
            {"volume": 5, "threshold_percentage": 101},
            "`set_data_quota.threshold_percentage` must be a whole number from 0 to 100",
            None,
        ),
        (
            {"volume": 5, "action_on_exhaustion": 2},
            "`set_data_quota.action_on_exhaustion` can only be `block`",
            "emnify decommissioned throttling on exhaustion in December 2024",
        ),
    ],
)
def test_each_refused_quota_parameter_is_named_in_words(params, message, hint):
    with pytest.raises(ConfigError) as refused:
        ACTIONS["set_data_quota"].from_params(params, HERE)
    assert refused.value.message.startswith(message) and refused.value.where == HERE
    assert refused.value.hint == hint


def test_a_quota_takes_a_volume_of_nothing_and_the_edges_of_its_threshold():
    for threshold in (0, 100):
        action = ACTIONS["set_sms_quota"].from_params(
            {"volume": 0, "threshold_percentage": threshold, "action_on_exhaustion": 1}, HERE
        )
        assert action.params_for({}).to_json() == {
            "volume": 0,
            "threshold_percentage": threshold,
            "action_on_exhaustion": 1,
        }
    # The outbox keeps only what the rule wrote.
    assert ACTIONS["set_data_quota"].from_params({"volume": 5}, HERE).params_for({}).to_json() == {
        "volume": 5
    }
    written = {"volume": 5, "expiry": "2026-06-01T00:00:00Z", "action_on_exhaustion": "block"}
    action = ACTIONS["set_data_quota"].from_params(written, HERE)
    assert action.params_for({}).to_json() == {**written, "action_on_exhaustion": 1}


def quota_context(created_at: datetime = datetime(2026, 5, 1, 12, 0, 0, 999, tzinfo=UTC)):
    return ActionContext(
        emnify=None,  # type: ignore[arg-type]
        receivers=None,  # type: ignore[arg-type]
        target=Target(endpoint_id=7),
        idempotency_key="1-rule-0",
        attempt=1,
        created_at=created_at,
    )


@pytest.mark.parametrize(
    ("params", "body"),
    [
        (
            {"volume": 2.5},
            {"status": {"id": 1}, "volume": 2.5, "action_on_exhaustion": {"id": 1}},
        ),
        (
            {
                "volume": 500.0,
                "expiry": "30d",
                "auto_refill": False,
                "threshold_percentage": 0,
                "action_on_exhaustion": "block",
            },
            {
                "status": {"id": 1},
                "volume": 500,
                "expiry_date": "2026-05-31T12:00:00Z",  # from the intent, to the second
                "auto_refill": 0,
                "threshold_percentage": 0,
                "action_on_exhaustion": {"id": 1},
            },
        ),
        (
            {"volume": 1, "expiry": "2026-06-01T08:00:00+02:00", "auto_refill": True},
            {
                "status": {"id": 1},
                "volume": 1,
                "expiry_date": "2026-06-01T06:00:00Z",
                "auto_refill": 1,
                "action_on_exhaustion": {"id": 1},
            },
        ),
    ],
)
def test_a_quota_is_posted_active_with_only_what_the_rule_gives(params, body):
    action = ACTIONS["set_data_quota"]
    planned = action.decode(action.from_params(params, HERE).params_for({}).to_json())
    wanted = action.wanted(planned, quota_context())
    assert wanted == body
    assert [type(v) for v in wanted.values()] == [type(v) for v in body.values()]


WANTED = {
    "status": {"id": 1},
    "volume": 500,
    "expiry_date": "2026-05-31T12:00:00Z",
    "auto_refill": 0,
    "threshold_percentage": 20,
    "action_on_exhaustion": {"id": 1},
}


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({}, True),
        ({"status": 1}, True),  # an id without its object
        ({"status": {"id": 2}}, False),  # exhausted
        ({"status": None}, False),
        ({"volume": "500.000000"}, True),  # as the API writes volumes
        ({"volume": "500.0000004"}, True),  # the same to six places
        ({"volume": 500.00001}, False),
        ({"volume": "lots"}, False),
        ({"volume": None}, False),
        ({"volume": True}, False),
        ({"expiry_date": None, "expiryDate": "2026-05-31T12:00:00Z"}, True),  # as events write it
        ({"expiry_date": "2026-05-31T14:00:00+02:00"}, True),
        ({"expiry_date": "2026-05-31T12:00:01Z"}, False),
        ({"expiry_date": "never"}, False),
        ({"expiry_date": None}, False),
        ({"auto_refill": None}, True),  # off
        ({"auto_refill": 1}, False),
        ({"auto_refill": None, "autoRefill": True}, False),
        ({"threshold_percentage": "20"}, True),
        ({"threshold_percentage": None, "thresholdPercentage": 30}, False),
        ({"threshold_percentage": None, "thresholdPercentage": 20}, True),
        ({"threshold_percentage": None}, False),
        ({"action_on_exhaustion": None}, True),  # not said: the only one left
        ({"action_on_exhaustion": 1}, True),
        ({"action_on_exhaustion": {"id": 2}}, False),
        ({"action_on_exhaustion": None, "actionOnExhaustion": {"id": 2}}, False),
    ],
)
def test_a_quota_read_back_is_the_one_wanted_only_in_every_field_the_rule_names(change, same):
    current = {**WANTED, **change}
    current = {k: v for k, v in current.items() if v is not None}
    assert matches(current, WANTED) is same


def test_a_quota_read_back_is_compared_only_in_the_fields_the_rule_names():
    wanted = {"status": {"id": 1}, "volume": 5, "action_on_exhaustion": {"id": 1}}
    current = {**WANTED, "volume": "5.0", "auto_refill": 1, "expiry_date": "never"}
    assert matches(current, wanted)


def test_a_volume_in_fractions_of_a_mb_is_compared_to_six_places():
    wanted = {"status": {"id": 1}, "volume": 2.5, "action_on_exhaustion": {"id": 1}}
    assert matches({"status": {"id": 1}, "volume": "2.500000"}, wanted)
    assert not matches({"status": {"id": 1}, "volume": "2.000000"}, wanted)
    assert not matches({"status": {"id": 1}, "volume": "3.000000"}, wanted)


@pytest.mark.parametrize("expiry", ["1s", "12h", "2026-06-01T00:00:00Z"])
def test_an_expiry_of_any_time_at_all_or_a_date_is_taken(expiry):
    action = ACTIONS["set_data_quota"].from_params({"volume": 1, "expiry": expiry}, HERE)
    assert action.params_for({}).to_json() == {"volume": 1, "expiry": expiry}


@pytest.mark.parametrize(
    ("value", "number"),
    [(3, 3.0), (2.5, 2.5), ("1.000000", 1.0), ("x", None), (True, None), ([1], None), (None, None)],
)
def test_a_volume_is_read_as_a_number_or_text_holding_one(value, number):
    read = read_number(value)
    assert read == number and (number is None or type(read) is float)


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("set_data_quota", {"volume": 5}),
        ("set_sms_quota", {"volume": 5}),
        ("top_up_data_quota", {"volume": 5}),
    ],
)
async def test_a_quota_action_without_an_endpoint_fails_saying_so(kind, params):
    action = ACTIONS[kind]
    planned = action.from_params(params, HERE).params_for({})
    aimless = replace(quota_context(), emnify=Quotas(), target=Target(sim_id=3))
    for step in ("effect", "run"):
        if step == "effect" and kind == "top_up_data_quota":
            aimless = replace(aimless, last_error=f"{kind}: setting the data quota to 5 MB: x")
        with pytest.raises(ActionError) as failed:
            await getattr(action, step)(planned, aimless)
        assert str(failed.value) == f"{kind}: no endpoint_id in the target"


# top-ups


class Quotas:
    """An emnify client with one endpoint's data quota; `failing` makes the next read or
    write raise it."""

    def __init__(self, quota: dict[str, Any] | None = None) -> None:
        self.quota = quota
        self.posted: list[dict[str, Any]] = []
        self.failing: dict[str, ApiError] = {}

    async def get_quota(self, endpoint_id: int, kind: str) -> dict[str, Any] | None:
        assert (endpoint_id, kind) == (7, "data")
        if "get" in self.failing:
            raise self.failing.pop("get")
        return self.quota

    async def set_quota(self, endpoint_id: int, kind: str, quota: dict[str, Any]) -> None:
        assert (endpoint_id, kind) == (7, "data")
        if "set" in self.failing:
            raise self.failing.pop("set")
        self.posted.append(quota)
        self.quota = quota


def top_up_context(quotas: Quotas, attempt: int = 1, last_error: str | None = None):
    return replace(quota_context(), emnify=quotas, attempt=attempt, last_error=last_error)


TOP_UP_ACTION = ACTIONS["top_up_data_quota"]
SETTING = "top_up_data_quota: setting the data quota to "


@pytest.mark.parametrize(
    ("recorded", "volume"),
    [
        (f"{SETTING}620 MB: HTTP 504", 620.0),
        (f"{SETTING}620.5 MB (reading it back): no response", 620.5),
        (f"{SETTING}620 MB", 620.0),
        (f"{SETTING}620 MBs", None),
        (f"{SETTING}620MB", None),
        (f"{SETTING}-5 MB", None),
        (f"retry: {SETTING}620 MB", None),  # only at the head of the error
        ("top_up_data_quota: nothing sent yet: HTTP 503", None),
        (None, None),
        ("", None),
    ],
)
def test_a_top_up_reads_the_volume_it_fixed_from_the_head_of_its_last_error(recorded, volume):
    assert recorded_target(recorded) == volume


@pytest.mark.parametrize(
    ("volume", "text"),
    [(620.0, "620"), (620.5, "620.5"), (0.1234567, "0.123457"), (1e21, "1" + "0" * 21)],
)
def test_a_top_ups_volume_is_written_without_an_exponent_so_it_reads_back(volume, text):
    assert _mb(volume) == text
    assert recorded_target(f"{SETTING}{_mb(volume)} MB: x") == float(text)


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(None, True), (400, False), (403, False), (429, True), (499, False), (500, True), (504, True)],
)
async def test_a_top_up_whose_post_failed_records_its_volume_retryable_unless_refused(
    status, retryable
):
    quotas = Quotas({"status": {"id": 1}, "volume": "100.000000"})
    quotas.failing["set"] = ApiError(status, "refused")
    with pytest.raises(ActionError) as failed:
        await TOP_UP_ACTION.run(TOP_UP_ACTION.decode({"volume": 500}), top_up_context(quotas))
    assert str(failed.value).startswith(f"{SETTING}600 MB: ")
    assert str(failed.value) == f"{SETTING}600 MB: {ApiError(status, 'refused')}"
    assert failed.value.retryable is retryable


async def test_a_top_up_whose_first_read_failed_says_nothing_was_sent_and_may_be_retried():
    quotas = Quotas({"status": {"id": 1}, "volume": 100})
    quotas.failing["get"] = ApiError(503, "busy")
    with pytest.raises(ActionError) as failed:
        await TOP_UP_ACTION.run(TOP_UP_ACTION.decode({"volume": 500}), top_up_context(quotas))
    assert str(failed.value) == f"top_up_data_quota: nothing sent yet: {ApiError(503, 'busy')}"
    assert failed.value.retryable
    quotas.failing["get"] = ApiError(403, "forbidden")
    with pytest.raises(ActionError) as refused:
        await TOP_UP_ACTION.run(TOP_UP_ACTION.decode({"volume": 500}), top_up_context(quotas))
    assert not refused.value.retryable and quotas.posted == []


async def test_a_retried_top_up_whose_read_fails_keeps_the_volume_it_fixed():
    quotas = Quotas({"status": {"id": 1}, "volume": 100})
    retry = top_up_context(quotas, attempt=2, last_error=f"{SETTING}600 MB: HTTP 504")
    for step, doing in (("effect", "reading it back"), ("run", "reading the quota")):
        quotas.failing["get"] = ApiError(None, "timed out")
        with pytest.raises(ActionError) as failed:
            await getattr(TOP_UP_ACTION, step)(TOP_UP_ACTION.decode({"volume": 500}), retry)
        assert str(failed.value).startswith(f"{SETTING}600 MB ({doing}): ")
        assert failed.value.retryable
    assert quotas.posted == []


@pytest.mark.parametrize(
    ("quota", "outcome"),
    [
        (None, None),
        ({"status": {"id": 2}, "volume": 600}, None),  # exhausted: set it again
        ({"status": {"id": 1}, "volume": "599.5"}, None),
        ({"status": {"id": 1}, "volume": None}, None),
        ({"status": {"id": 1}, "volume": "600.000000"}, "already topped up to 600 MB"),
        ({"status": 1, "volume": 700}, "already topped up to 600 MB"),
    ],
)
async def test_a_retried_top_up_is_done_when_the_quota_holds_what_it_fixed(quota, outcome):
    retry = top_up_context(Quotas(quota), attempt=2, last_error=f"{SETTING}600 MB: HTTP 504")
    assert await TOP_UP_ACTION.effect(TOP_UP_ACTION.decode({"volume": 500}), retry) == outcome


async def test_a_first_top_up_does_not_look_for_an_earlier_one():
    quotas = Quotas({"status": {"id": 1}, "volume": 10_000})
    assert (
        await TOP_UP_ACTION.effect(TOP_UP_ACTION.decode({"volume": 500}), top_up_context(quotas))
        is None
    )
    retry = top_up_context(quotas, attempt=2, last_error="top_up_data_quota: nothing sent yet: x")
    assert (
        await TOP_UP_ACTION.run(TOP_UP_ACTION.decode({"volume": 0.5}), retry)
        == "topped up to 10000.5 MB"
    )


@pytest.mark.parametrize(
    ("current", "params", "body"),
    [
        (
            None,
            {"volume": 50},
            {"status": {"id": 1}, "volume": 50, "action_on_exhaustion": {"id": 1}},
        ),
        (
            {
                "status": {"id": 2},
                "volume": "0.000000",
                "expiryDate": "2026-06-01T00:00:00Z",
                "autoRefill": True,
                "thresholdPercentage": 20.0,
                "actionOnExhaustion": {"id": 2},  # kept as it was
            },
            {"volume": 50.5},
            {
                "status": {"id": 1},
                "volume": 50.5,
                "expiry_date": "2026-06-01T00:00:00Z",
                "auto_refill": 1,
                "threshold_percentage": 20,
                "action_on_exhaustion": {"id": 2},
            },
        ),
        (
            {
                "volume": 10,
                "expiry_date": "2026-06-01T00:00:00Z",
                "auto_refill": 0,
                "threshold_percentage": "20",
                "action_on_exhaustion": "block",
            },
            {"volume": 50, "expiry": "1d"},
            {
                "status": {"id": 1},
                "volume": 60,
                "expiry_date": "2026-05-02T12:00:00Z",  # the rule's, from the intent
                "auto_refill": 0,
                "action_on_exhaustion": {"id": 1},
            },
        ),
        (
            {"volume": 10, "expiry_date": "2026-06-01T00:00:00Z"},
            {"volume": 50},
            {
                "status": {"id": 1},
                "volume": 60,
                "expiry_date": "2026-06-01T00:00:00Z",
                "action_on_exhaustion": {"id": 1},
            },
        ),
        (
            {"volume": 10, "threshold_percentage": True, "action_on_exhaustion": {"id": 3}},
            {"volume": 50},
            {"status": {"id": 1}, "volume": 60, "action_on_exhaustion": {"id": 3}},
        ),
    ],
)
async def test_a_top_up_posts_the_whole_quota_active_with_the_rest_as_it_was(current, params, body):
    quotas = Quotas(current)
    assert await TOP_UP_ACTION.run(TOP_UP_ACTION.decode(params), top_up_context(quotas))
    assert quotas.posted == [body]
    assert [type(v) for v in quotas.posted[0].values()] == [type(v) for v in body.values()]


def test_a_top_up_takes_a_positive_volume_and_an_expiry():
    with pytest.raises(ConfigError) as refused:
        ACTIONS["top_up_data_quota"].from_params({"volume": -1}, HERE)
    assert refused.value.message.startswith("`top_up_data_quota.volume` must be a number")
    assert refused.value.where == HERE
    with pytest.raises(ConfigError) as refused:
        ACTIONS["top_up_data_quota"].from_params({"volume": 1, "expiry": "-1d"}, HERE)
    assert "`top_up_data_quota.expiry`" in refused.value.message
    assert refused.value.where == HERE
    action = ACTIONS["top_up_data_quota"].from_params({"volume": 0.5, "expiry": "7d"}, HERE)
    assert action.params_for({}).to_json() == {"volume": 0.5, "expiry": "7d"}


def test_an_expiry_the_outbox_holds_that_is_no_date_fails_naming_the_expiry():
    # A row edited by hand: the rule's expiry was checked at load.
    with pytest.raises(EventFormatError) as failed:
        expiry_date("soon", datetime(2026, 5, 1, tzinfo=UTC))
    assert str(failed.value) == "expiry: unrecognised timestamp 'soon'"


async def test_a_top_up_sets_the_sum_to_the_six_places_the_api_writes():
    quotas = Quotas({"status": {"id": 1}, "volume": "0.0000004"})  # below the API's places
    run = TOP_UP_ACTION.run(TOP_UP_ACTION.decode({"volume": 1}), top_up_context(quotas))
    assert await run == "topped up to 1 MB"
    assert quotas.posted[0]["volume"] == 1 and type(quotas.posted[0]["volume"]) is int
