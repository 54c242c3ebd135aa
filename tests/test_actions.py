"""Each action kind against the simulator and a local webhook receiver."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from structlog.testing import capture_logs

from engine.actions import ACTIONS, ActionContext, NoParams, PlannedAction, Target
from engine.actions.log import LogLine
from engine.dispatch import carry_out
from engine.emnify import ClientSettings, EmnifyClient
from engine.errors import ActionError, ConfigError, Location
from engine.events import normalize
from engine.outbound import HttpReceivers
from engine.simulator import SimulatorConfig, SimulatorServer
from engine.simulator.webhook_sink import WebhookSink

HERE = Location("rules.yaml", 3)


@pytest.fixture
async def context(simulator: SimulatorServer):
    settings = ClientSettings(base_url=simulator.base_url, action_rate_limit=100.0)
    async with (
        EmnifyClient(simulator.application_token, settings) as client,
        httpx.AsyncClient() as http,
    ):
        yield ActionContext(
            emnify=client,
            receivers=HttpReceivers(http),
            target=Target(),
            idempotency_key="1-rule-0",
            attempt=1,
            created_at=datetime.now(UTC),
        )


def _event(simulator: SimulatorServer, **extra) -> object:
    sim = simulator.state.sims()[0]
    (record,) = simulator.state.store_events(
        [{"event_type": {"id": 11}, "sim_id": sim["id"], **extra}]
    )
    return normalize(record)


async def _run(kind: str, params: dict, event, ctx: ActionContext) -> str:
    action = ACTIONS[kind].from_params(params, HERE)
    planned = action.plan(event, {"event": event.raw, "rule": {"id": "r"}})
    return await _attempt(planned, ctx)


async def _attempt(planned: PlannedAction, ctx: ActionContext) -> str:
    """One attempt as the dispatcher makes it, on the parameters as the outbox keeps them."""
    action = ACTIONS[planned.kind]
    params = action.decode(orjson.loads(orjson.dumps(planned.params)))
    return await carry_out(action, params, replace(ctx, target=Target.from_json(planned.target)))


@pytest.mark.parametrize(
    ("kind", "field", "before", "after"),
    [
        ("suspend_sim", "sim", 1, 2),
        ("disable_endpoint", "endpoint", 0, 1),
    ],
)
async def test_status_actions_change_the_status_once(
    simulator, context, kind, field, before, after
):
    event = _event(simulator)
    target = event.sim_id if field == "sim" else event.endpoint_id
    read = simulator.state.sim if field == "sim" else simulator.state.endpoint
    assert read(target)["status"]["id"] == before
    assert await _run(kind, {}, event, context) == "done"
    assert read(target)["status"]["id"] == after
    assert await _run(kind, {}, event, context) == "already"


async def test_activate_and_enable_restore_a_blocked_device(simulator, context):
    event = _event(simulator)
    await _run("suspend_sim", {}, event, context)
    await _run("disable_endpoint", {}, event, context)
    assert await _run("activate_sim", {}, event, context) == "done"
    assert await _run("enable_endpoint", {}, event, context) == "done"
    assert simulator.state.sim(event.sim_id)["status"]["id"] == 1
    assert simulator.state.endpoint(event.endpoint_id)["status"]["id"] == 0


async def test_send_sms_renders_its_payload_and_returns_the_new_sms_id(simulator, context):
    event = _event(simulator)
    outcome = await _run("send_sms", {"payload": "LIMIT {{ event.endpoint.name }}"}, event, context)
    (sms,) = simulator.state.sms()
    assert sms["payload"] == f"LIMIT {event.endpoint_name}"
    assert outcome == f"sent sms {sms['id']}"


@pytest.mark.parametrize("written", [145, {"id": 145}])
def test_send_sms_takes_the_source_address_type_as_an_id_or_as_the_api_writes_it(written):
    params = {"payload": "REBOOT", "source_address": 4915100, "source_address_type": written}
    action = ACTIONS["send_sms"].from_params(params, HERE)
    event = normalize({"id": 1, "timestamp": "2025-05-01T10:00:00Z", "endpoint": {"id": 5}})
    planned = action.plan(event, {"event": event.raw, "rule": {"id": "r"}})
    assert planned.params == {
        "payload": "REBOOT",
        "source_address": 4915100,
        "source_address_type": {"id": 145},
    }


async def test_send_sms_on_a_retry_finds_the_message_already_sent(simulator, context):
    event = _event(simulator)
    await _run("send_sms", {"payload": "REBOOT"}, event, context)
    retry = replace(context, attempt=2)
    (sms,) = simulator.state.sms()
    assert await _run("send_sms", {"payload": "REBOOT"}, event, retry) == f"already sms {sms['id']}"
    assert len(simulator.state.sms()) == 1


async def test_send_sms_on_a_retry_finds_its_message_past_the_first_page_of_the_list():
    # The API clamps the page size (here to 2): the SMS sent by the first attempt is on the
    # last page of the endpoint's list, behind older messages.
    config = SimulatorConfig(seed=3, endpoints=2, max_per_page=2, default_per_page=2)
    with SimulatorServer(config) as simulator:
        settings = ClientSettings(base_url=simulator.base_url, action_rate_limit=100.0)
        async with (
            EmnifyClient(simulator.application_token, settings) as client,
            httpx.AsyncClient() as http,
        ):
            receivers = HttpReceivers(http)
            context = ActionContext(client, receivers, Target(), "1-rule-0", 1, datetime.now(UTC))
            event = _event(simulator)
            for number in range(5):
                await client.send_sms(event.endpoint_id, {"payload": f"older {number}"})
            await _run("send_sms", {"payload": "REBOOT"}, event, context)
            sent = simulator.state.sms()[-1]
            retry = replace(context, attempt=2)
            outcome = await _run("send_sms", {"payload": "REBOOT"}, event, retry)
            assert outcome == f"already sms {sent['id']}"
            assert len(simulator.state.sms()) == 6


async def test_webhook_fills_secrets_at_call_time_and_sends_an_idempotency_key(
    simulator, context, sink: WebhookSink, monkeypatch
):
    monkeypatch.setenv("HOOK_TOKEN", "s3cret-hook-token")
    monkeypatch.setenv("HOOK_URL", f"{sink.base_url}/hooks/ops")
    event = _event(simulator, description="see ${HOOK_TOKEN}")
    params = {
        "url": "${HOOK_URL}",
        "headers": {"Authorization": "Bearer ${HOOK_TOKEN}"},
        "body": {"text": "{{ event.description }}"},
    }
    action = ACTIONS["webhook"].from_params(params, HERE)
    planned = action.plan(event, {"event": event.raw, "rule": {"id": "r"}})
    assert "s3cret" not in str(planned.params)  # the outbox never holds the value
    assert await _attempt(planned, context) == "delivered 200"
    (call,) = sink.calls("ops")
    assert call.headers["authorization"] == "Bearer s3cret-hook-token"
    assert call.headers["idempotency-key"] == "1-rule-0"
    # Text from the event is not a secret reference: it arrives as written.
    assert call.body == {"text": "see ${HOOK_TOKEN}"}


async def test_event_text_shaped_like_a_secret_reference_stays_text_in_webhook_headers(
    simulator, context, sink: WebhookSink, monkeypatch
):
    """A device's description is written by whoever controls the device: `${NAME}` in it
    must reach the receiver as text, never as the value of the engine's secret NAME."""
    monkeypatch.setenv("HOOK_TOKEN", "s3cret-hook-token")
    event = _event(simulator, description="${HOOK_TOKEN}")
    params = {"url": f"{sink.base_url}/hooks/ops", "headers": {"X-Note": "{{ event.description }}"}}
    assert await _run("webhook", params, event, context) == "delivered 200"
    (call,) = sink.calls("ops")
    assert call.headers["x-note"] == "%24{HOOK_TOKEN}"


async def test_event_text_shaped_like_a_secret_reference_cannot_choose_a_webhooks_host(
    simulator, context, sink: WebhookSink, monkeypatch
):
    host = sink.base_url.removeprefix("http://")
    monkeypatch.setenv("PRIVATE_HOST", host)
    event = _event(simulator, description="${PRIVATE_HOST}")
    params = {"url": "http://{{ event.description }}/hooks/ops", "dynamic_host": True}
    with pytest.raises(ActionError):
        await _run("webhook", params, event, context)
    assert sink.calls("ops") == []


@pytest.mark.parametrize(
    ("status", "retryable"), [(500, True), (429, True), (404, False), (300, False)]
)
async def test_webhook_failures_say_whether_a_retry_can_help(
    simulator, context, sink, status, retryable
):
    sink.status = status
    event = _event(simulator)
    with pytest.raises(ActionError) as failed:
        await _run("webhook", {"url": f"{sink.base_url}/hooks/x"}, event, context)
    assert failed.value.retryable is retryable
    assert f"HTTP {status}" in str(failed.value)


def test_a_template_naming_a_missing_field_fails_that_action_with_a_reason(simulator):
    event = normalize({"id": 1, "timestamp": "2025-05-01T10:00:00Z", "event_type": {"id": 1}})
    action = ACTIONS["log"].from_params({"message": "{{ event.sim.iccid }}"}, HERE)
    with pytest.raises(ActionError, match="template error"):
        action.plan(event, {"event": event.raw, "rule": {"id": "r"}})


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("webhook", {"url": "ftp://x"}, "must be an http(s) URL"),
        ("webhook", {"url": "https://x", "methd": "POST"}, "did you mean `method`?"),
        ("webhook", {"url": "https://x", "method": "GET", "body": {}}, "cannot be sent with GET"),
        ("send_sms", {}, "needs the parameter `payload`"),
        ("send_sms", {"payload": "x", "source_address_type": "intl"}, "must be a type id: 145"),
        ("send_sms", {"payload": "x", "dcs": "8"}, "`send_sms.dcs` must be a number"),
        ("send_sms", {"payload": "x", "source_address": ["a"]}, "must be a string or a number"),
        ("suspend_sim", {"force": True}, "takes no parameters"),
        ("log", {"message": "{{ event.id "}, "`log.message`: template syntax error"),
    ],
)
def test_bad_action_parameters_are_config_errors_with_a_location(kind, params, message):
    with pytest.raises(ConfigError) as caught:
        ACTIONS[kind].from_params(params, HERE)
    assert message in str(caught.value)
    assert str(caught.value).startswith("rules.yaml:3:")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"url": 5}, "`webhook.url` must be a string, got int"),
        (
            {"url": None},
            "`webhook.url` must be an http(s) URL, got ''"
            " (write e.g. https://hooks.example.com/emnify or ${OPS_WEBHOOK_URL})",
        ),
        (
            {"url": "https://x", "dynamic_host": "yes"},
            "`webhook.dynamic_host` must be true or false",
        ),
        (
            {"url": "https://x", "method": 1},
            "`webhook.method` must be a string, got int",
        ),
        (
            {"url": "https://x", "method": "push"},
            "`webhook.method` 'PUSH' is not one of GET, POST, PUT, PATCH, DELETE",
        ),
        (
            {"url": "https://x", "headers": ["A: b"]},
            "`webhook.headers` must map header names to strings",
        ),
        (
            {"url": "https://x", "headers": {1: "b"}},
            "`webhook.headers` must map header names to strings",
        ),
        (
            {"url": "https://x", "headers": {"A": None}},
            "`webhook.headers` must map header names to strings",
        ),
        (
            {"url": "https://x", "timeout": 0},
            "`webhook.timeout` must be a positive number of seconds",
        ),
        (
            {"url": "https://x", "timeout": True},
            "`webhook.timeout` must be a positive number of seconds",
        ),
        (
            {"url": "https://x", "timeout": "5"},
            "`webhook.timeout` must be a positive number of seconds",
        ),
        (
            {"url": "https://x", "method": "DELETE", "body": None},
            "`webhook.body` cannot be sent with DELETE",
        ),
        (
            {"url": "ftp://" + "x" * 100},
            "`webhook.url` must be an http(s) URL, got 'ftp://" + "x" * 54 + "'"
            " (write e.g. https://hooks.example.com/emnify or ${OPS_WEBHOOK_URL})",
        ),
        (
            {"url": "https://ops:pa55@h.example/x"},
            "`webhook.url` holds a password written into the rule file (secrets never go into"
            " rule files: write ${NAME} and set the environment variable NAME (or NAME_FILE, a"
            " file holding it))",
        ),
        (
            {"url": "${HOOK_URL}?token=abc123"},
            "`webhook.url` holds a credential (`token=`) written into the rule file (secrets"
            " never go into rule files: write ${NAME} and set the environment variable NAME (or"
            " NAME_FILE, a file holding it))",
        ),
        (
            {"url": "https://x", "headers": {"Authorization": "Bearer abc"}},
            "`webhook.headers.Authorization` holds a credential written into the rule file"
            " (write e.g. `Authorization: ${OPS_HOOK_TOKEN}`; secrets never go into rule files:"
            " write ${NAME} and set the environment variable NAME (or NAME_FILE, a file holding"
            " it))",
        ),
    ],
)
def test_a_webhooks_refused_parameters_are_named_in_words_at_their_location(params, message):
    with pytest.raises(ConfigError) as caught:
        ACTIONS["webhook"].from_params(params, HERE)
    assert str(caught.value) == f"rules.yaml:3: {message}"


def test_a_webhook_waits_ten_seconds_unless_its_timeout_says_otherwise():
    default = ACTIONS["webhook"].from_params({"url": "https://x"}, HERE)
    short = ACTIONS["webhook"].from_params({"url": "https://x", "timeout": 0.5}, HERE)
    assert default.timeout == 10.0
    assert short.timeout == 0.5


def test_webhook_header_values_written_as_numbers_are_sent_as_text(simulator):
    action = ACTIONS["webhook"].from_params({"url": "https://x", "headers": {"X-Count": 5}}, HERE)
    planned = action.plan(_event(simulator), {"event": {}, "rule": {"id": "r"}})
    assert planned.params["headers"] == {"X-Count": "5"}


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_webhook_without_a_body_may_use_get_or_delete(method):
    action = ACTIONS["webhook"].from_params({"url": "https://x", "method": method}, HERE)
    assert action.method == method


def test_a_webhook_names_the_secrets_of_its_url_and_headers_for_the_start_up_check():
    params = {"url": "${HOOK_URL}", "headers": {"Authorization": "Bearer ${HOOK_TOKEN}"}}
    action = ACTIONS["webhook"].from_params(params, HERE)
    assert action.secret_names() == ("HOOK_URL", "HOOK_TOKEN")


async def test_a_webhook_failure_names_the_receivers_path_but_not_its_query(
    simulator, context, sink
):
    sink.status = 404
    url = f"{sink.base_url}/hooks/x?note=private"
    with pytest.raises(ActionError) as failed:
        await _run("webhook", {"url": url}, _event(simulator), context)
    assert str(failed.value) == "webhook http://127.0.0.1/hooks/x: HTTP 404"


async def test_a_webhook_whose_secret_is_unset_when_it_runs_fails_naming_the_secret(
    simulator, context, sink, monkeypatch
):
    monkeypatch.delenv("HOOK_URL", raising=False)
    with pytest.raises(ActionError) as failed:
        await _run("webhook", {"url": "${HOOK_URL}"}, _event(simulator), context)
    assert str(failed.value).startswith("webhook: ")
    assert "HOOK_URL" in str(failed.value)


_TYPE_IDS = "145 international, 161 national, 208 alphanumeric"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"payload": ""}, "`send_sms.payload` must be a non-empty string"),
        ({"payload": 5}, "`send_sms.payload` must be a non-empty string"),
        ({"payload": "x" * 1601}, "`send_sms.payload` is longer than 1600 characters"),
        (
            {"payload": "x", "dcs": True},
            "`send_sms.dcs` must be a number (0 GSM-7, 8 UCS2), got True",
        ),
        (
            {"payload": "x", "source_address": True},
            "`send_sms.source_address` must be a string or a number, got True",
        ),
        (
            {"payload": "x", "expiry_date": 5},
            "`send_sms.expiry_date` must be an ISO 8601 timestamp, got 5",
        ),
        (
            {"payload": "x", "dcs": "y" * 100},
            "`send_sms.dcs` must be a number (0 GSM-7, 8 UCS2), got '" + "y" * 59,
        ),
        (
            {"payload": "x", "source_address_type": True},
            f"`send_sms.source_address_type` must be a type id: {_TYPE_IDS}",
        ),
        (
            {"payload": "x", "source_address_type": {"id": 145, "ton": 1}},
            f"`send_sms.source_address_type` must be a type id: {_TYPE_IDS}",
        ),
    ],
)
def test_an_smss_refused_parameters_are_named_in_words_at_their_location(params, message):
    with pytest.raises(ConfigError) as caught:
        ACTIONS["send_sms"].from_params(params, HERE)
    assert str(caught.value) == f"rules.yaml:3: {message}"


def test_an_sms_payload_of_sixteen_hundred_characters_loads():
    ACTIONS["send_sms"].from_params({"payload": "x" * 1600}, HERE)


def test_an_sms_carries_every_parameter_the_rule_wrote():
    params = {
        "payload": "REBOOT {{ event.id }}",
        "source_address": "ops",
        "source_address_type": 208,
        "dcs": 8,
        "expiry_date": "2025-05-02T10:00:00Z",
    }
    action = ACTIONS["send_sms"].from_params(params, HERE)
    event = normalize({"id": 7, "timestamp": "2025-05-01T10:00:00Z", "endpoint": {"id": 5}})
    planned = action.plan(event, {"event": event.raw, "rule": {"id": "r"}})
    assert planned.params == {
        "payload": "REBOOT 7",
        "source_address": "ops",
        "source_address_type": {"id": 208},
        "dcs": 8,
        "expiry_date": "2025-05-02T10:00:00Z",
    }


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"url": "https://x/{{ event.id "}, "`webhook.url`"),
        ({"url": "https://x/", "headers": {"X-A": "{{ event.id "}}, "`webhook.headers.X-A`"),
        ({"url": "https://x/", "body": {"a": "{{ event.id "}}, "`webhook.body.a`"),
    ],
)
def test_a_broken_template_in_a_webhook_is_refused_naming_its_field_and_location(params, field):
    with pytest.raises(ConfigError) as caught:
        ACTIONS["webhook"].from_params(params, HERE)
    assert str(caught.value).startswith(f"rules.yaml:3: {field}: template syntax error: ")


async def test_an_sms_without_an_endpoint_to_send_to_fails_saying_so(context):
    action = ACTIONS["send_sms"]
    with pytest.raises(ActionError, match=r"^send_sms: no endpoint_id in the target$"):
        await action.run(action.decode({"payload": "REBOOT"}), context)


@pytest.mark.parametrize(("seconds_later", "found"), [(50, True), (70, False)])
async def test_an_sms_retry_takes_one_sent_up_to_a_minute_before_its_first_attempt_as_its_own(
    simulator, context, seconds_later, found
):
    """emnify's clock and ours may differ by up to a minute."""
    event = _event(simulator)
    earlier = simulator.state.send_sms(event.endpoint_id, {"payload": "REBOOT"})
    first = simulator.state.now() + timedelta(seconds=seconds_later)
    retry = replace(context, attempt=2, created_at=first - timedelta(hours=1))
    retry = replace(retry, first_attempt_at=first)
    outcome = await _run("send_sms", {"payload": "REBOOT"}, event, retry)
    assert (outcome == f"already sms {earlier['id']}") is found
    assert len(simulator.state.sms()) == (1 if found else 2)


async def test_an_sms_retry_without_a_first_attempt_time_counts_from_when_it_was_planned(
    simulator, context
):
    event = _event(simulator)
    simulator.state.send_sms(event.endpoint_id, {"payload": "REBOOT"})
    planned = simulator.state.now() + timedelta(seconds=70)
    retry = replace(context, attempt=2, created_at=planned)
    assert (await _run("send_sms", {"payload": "REBOOT"}, event, retry)).startswith("sent sms ")


async def test_an_sms_retry_leaves_an_sms_another_intent_accounted_for(simulator, context):
    event = _event(simulator)
    other = simulator.state.send_sms(event.endpoint_id, {"payload": "REBOOT"})
    retry = replace(context, attempt=2, sibling_outcomes=(f"already sms {other['id']}",))
    assert (await _run("send_sms", {"payload": "REBOOT"}, event, retry)).startswith("sent sms ")
    assert len(simulator.state.sms()) == 2


async def test_an_sms_retry_does_not_take_one_with_other_text_for_its_own(simulator, context):
    event = _event(simulator)
    simulator.state.send_sms(event.endpoint_id, {"payload": "REBOOT NOW"})
    retry = replace(context, attempt=2)
    assert (await _run("send_sms", {"payload": "REBOOT"}, event, retry)).startswith("sent sms ")


def test_a_planned_webhook_call_keeps_the_rules_method_timeout_and_body(simulator):
    params = {"url": "https://x", "method": "put", "timeout": 0.5, "body": {"id": "{{ event.id }}"}}
    action = ACTIONS["webhook"].from_params(params, HERE)
    event = _event(simulator)
    planned = action.plan(event, {"event": event.raw, "rule": {"id": "r"}})
    assert planned.params["method"] == "PUT"
    assert planned.params["timeout"] == 0.5
    assert planned.params["body"] == {"id": str(event.id)}


def test_a_broken_template_in_an_sms_payload_is_refused_naming_it_and_its_location():
    with pytest.raises(ConfigError) as caught:
        ACTIONS["send_sms"].from_params({"payload": "REBOOT {{ event.id "}, HERE)
    assert str(caught.value).startswith("rules.yaml:3: `send_sms.payload`: template syntax error")


async def test_an_sms_retry_finds_its_own_behind_one_another_intent_accounted_for(
    simulator, context
):
    event = _event(simulator)
    other = simulator.state.send_sms(event.endpoint_id, {"payload": "REBOOT"})
    own = simulator.state.send_sms(event.endpoint_id, {"payload": "REBOOT"})
    retry = replace(context, attempt=2, sibling_outcomes=(f"sent sms {other['id']}",))
    outcome = await _run("send_sms", {"payload": "REBOOT"}, event, retry)
    assert outcome == f"already sms {own['id']}"


async def test_an_sms_retry_finds_its_own_behind_an_older_one_of_the_same_text(
    simulator, context, monkeypatch
):
    """An SMS of the same text sent long before this intent was planned (yesterday's
    reboot) is listed first; the search goes on past it to the retry's own."""
    event = _event(simulator)
    now = simulator.state.now()
    yesterday = (now - timedelta(days=1)).timestamp()
    with monkeypatch.context() as then:
        then.setattr(simulator.state, "_clock", lambda: yesterday)
        simulator.state.send_sms(event.endpoint_id, {"payload": "REBOOT"})
    own = simulator.state.send_sms(event.endpoint_id, {"payload": "REBOOT"})
    retry = replace(context, attempt=2, created_at=now, first_attempt_at=now)
    outcome = await _run("send_sms", {"payload": "REBOOT"}, event, retry)
    assert outcome == f"already sms {own['id']}"
    assert len(simulator.state.sms()) == 2


# -- what every kind shares (engine.actions.base): parameters, plans, targets ------------------


class NoCalls:
    """An emnify client (or receivers) that must not be called."""

    def __getattr__(self, name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"called: {name}")

        return call


# For the parts of an action that call nobody.
OFFLINE = ActionContext(
    emnify=NoCalls(),  # type: ignore[arg-type]
    receivers=NoCalls(),  # type: ignore[arg-type]
    target=Target(),
    idempotency_key="1-rule-0",
    attempt=1,
    created_at=datetime(2026, 5, 1, tzinfo=UTC),
)


@pytest.mark.parametrize(
    ("kind", "params", "message", "hint"),
    [
        ("suspend_sim", ["force"], "`suspend_sim` takes a mapping of parameters, got list", None),
        (
            "suspend_sim",
            {"force": True},
            "`suspend_sim` has no parameter `force`",
            "this action takes no parameters: write `{}`",
        ),
        (
            "set_data_quota",
            {"volum": 5},
            "`set_data_quota` has no parameter `volum`",
            "did you mean `volume`?",
        ),
        (
            "change_service_profile",
            {"zzz": 1},
            "`change_service_profile` has no parameter `zzz`",
            "allowed: `id`, `name`, `reset_connectivity`",
        ),
        (
            "change_service_profile",
            {7: 1},
            "`change_service_profile` has no parameter `7`",
            "allowed: `id`, `name`, `reset_connectivity`",
        ),
        ("add_tags", {}, "`add_tags` needs the parameter `tags`", None),
        (
            "webhook",
            {"url": "${hook_url}/x"},
            "`${hook_url}`: secret names are upper-case environment variables",
            None,
        ),
        ("log", {"message": 5}, "`log.message` must be a string, got int", None),
    ],
)
def test_a_refused_parameter_is_named_with_how_to_fix_it(kind, params, message, hint):
    with pytest.raises(ConfigError) as refused:
        ACTIONS[kind].from_params(params, HERE)
    assert (refused.value.message, refused.value.hint, refused.value.where) == (message, hint, HERE)


def test_an_action_written_without_parameters_takes_none():
    assert ACTIONS["suspend_sim"].from_params(None, HERE).params_for({}).to_json() == {}  # type: ignore[arg-type]
    assert ACTIONS["webhook"].from_params({"url": "${HOOK_URL}/x"}, HERE).secret_names() == (
        "HOOK_URL",
    )
    assert ACTIONS["suspend_sim"].from_params({}, HERE).secret_names() == ()


@pytest.mark.parametrize(
    ("kind", "record", "message"),
    [
        ("suspend_sim", {"endpoint": {"id": 5}}, "suspend_sim: the event has no sim.id to act on"),
        ("add_tags", {"sim": {"id": 3}}, "add_tags: the event has no endpoint.id to act on"),
    ],
)
def test_an_action_is_not_planned_for_an_event_without_what_it_needs(kind, record, message):
    event = normalize(
        {"id": 1, "timestamp": "2025-05-01T10:00:00Z", "event_type": {"id": 1}, **record}
    )
    params = {"tags": "x"} if kind == "add_tags" else {}
    with pytest.raises(ActionError) as refused:
        ACTIONS[kind].from_params(params, HERE).plan(event, {"event": event.raw})
    assert str(refused.value) == message


def test_a_planned_action_carries_its_kind_its_rendered_parameters_and_the_events_target():
    event = normalize(
        {
            "id": 1,
            "timestamp": "2025-05-01T10:00:00Z",
            "event_type": {"id": 1},
            "sim": {"id": 3, "iccid": "8988"},
            "endpoint": {"id": 5},
        }
    )
    log = ACTIONS["log"].from_params({"message": "on {{ event.endpoint.id }}"}, HERE)
    planned = log.plan(event, {"event": event.raw})
    assert planned == PlannedAction("log", {"message": "on 5", "level": "info"}, event.target())
    assert Target.from_json(planned.target) == Target(3, 5, "8988")
    digest = ACTIONS["suspend_sim"].from_params({}, HERE)
    assert digest.plan(event, {}).params == {}


@pytest.mark.parametrize(
    ("written", "target"),
    [
        ({"sim_id": 3, "endpoint_id": 5, "iccid": "8988"}, Target(3, 5, "8988")),
        ({"sim_id": "3", "endpoint_id": 5.0, "iccid": 8988}, Target()),
        ({}, Target()),
    ],
)
def test_a_target_read_back_keeps_only_ids_and_an_iccid_of_their_types(written, target):
    assert Target.from_json(written) == target


def test_parameters_go_to_the_outbox_without_empty_fields_and_come_back_without_unknown_ones():
    params = ACTIONS["log"].decode({"message": "m", "level": "error", "later": 1})
    assert params == LogLine("m", "error")
    assert ACTIONS["log"].decode({"message": "m"}) == LogLine("m", "info")
    assert ACTIONS["set_data_quota"].decode({"volume": 5}).to_json() == {"volume": 5}
    with pytest.raises(TypeError, match="expected an object, got str"):
        ACTIONS["log"].decode("m")  # type: ignore[arg-type]


def test_an_action_that_calls_nobody_outside_emnify_is_its_own_destination():
    assert ACTIONS["suspend_sim"].destination(NoParams()) == "suspend_sim"


# -- log ---------------------------------------------------------------------------------------


def test_a_log_line_says_the_events_type_and_description_at_info_unless_told():
    event = normalize(
        {
            "id": 1,
            "timestamp": "2025-05-01T10:00:00Z",
            "event_type": {"id": 1, "description": "Update location"},
            "description": "New location",
        }
    )
    planned = ACTIONS["log"].from_params({}, HERE).plan(event, {"event": event.raw})
    assert planned.params == {"message": "Update location: New location", "level": "info"}
    loud = ACTIONS["log"].from_params({"message": "x", "level": "WARNING"}, HERE)
    assert loud.params_for({}) == LogLine("x", "warning")


@pytest.mark.parametrize("level", ["verbose", "critical", 3])
def test_a_log_level_is_one_of_four(level):
    with pytest.raises(ConfigError) as refused:
        ACTIONS["log"].from_params({"level": level}, HERE)
    assert refused.value.where == HERE
    assert refused.value.message in (
        "`log.level` must be one of debug, info, warning, error",
        "`log.level` must be a string, got int",
    )


@pytest.mark.parametrize(
    ("level", "logged_at"), [("debug", "debug"), ("error", "error"), ("loud", "info")]
)
async def test_a_log_line_is_written_at_its_level_with_the_ids_of_its_target(level, logged_at):
    target = Target(sim_id=3, endpoint_id=5, iccid="8988")
    with capture_logs() as logs:
        outcome = await ACTIONS["log"].run(LogLine("hello", level), replace(OFFLINE, target=target))
    assert outcome == "logged"
    assert [e for e in logs if e["event"] == "hello"] == [
        {"event": "hello", "log_level": logged_at, "sim_id": 3, "endpoint_id": 5, "iccid": "8988"}
    ]


# -- status changes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("suspend_sim", "suspend_sim: no sim_id in the target"),
        ("activate_sim", "activate_sim: no sim_id in the target"),
        ("disable_endpoint", "disable_endpoint: no endpoint_id in the target"),
        ("enable_endpoint", "enable_endpoint: no endpoint_id in the target"),
    ],
)
async def test_a_status_change_without_its_target_fails_saying_which_id_is_missing(kind, message):
    # Only the other id: a SIM's action has the endpoint's, an endpoint's the SIM's.
    other = Target(endpoint_id=5) if "sim" in kind else Target(sim_id=3)
    for step in ("effect", "run"):
        with pytest.raises(ActionError) as failed:
            await getattr(ACTIONS[kind], step)(NoParams(), replace(OFFLINE, target=other))
        assert str(failed.value) == message


async def test_a_status_read_back_without_its_object_is_not_the_status_wanted():
    class Reads:
        async def get_endpoint(self, endpoint_id: int) -> dict:
            return {"status": 1}

        async def get_sim(self, sim_id: int) -> dict:
            return {"status": {"id": 1}}

    ctx = replace(OFFLINE, emnify=Reads(), target=Target(sim_id=3, endpoint_id=5))
    assert await ACTIONS["disable_endpoint"].effect(NoParams(), ctx) is None
    assert await ACTIONS["activate_sim"].effect(NoParams(), ctx) == "already"
    assert await ACTIONS["suspend_sim"].effect(NoParams(), ctx) is None
