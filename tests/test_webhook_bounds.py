"""A webhook receiver cannot hold the engine, and event data cannot choose where a webhook
goes. Receivers here misbehave on a real loopback socket (`raw_receiver`): they trickle their
answer a byte at a time, send hundreds of MB, or never answer; the dispatcher runs inside a
daemon against the simulator and a real SQLite file."""

from __future__ import annotations

import asyncio
import gzip
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from raw_receiver import RawReceiver, answer_never, answer_ok, endless_body, trickle

from engine.actions import ACTIONS, ActionContext, Target
from engine.actions.webhook import WebhookCall
from engine.config import load_config
from engine.daemon import Daemon
from engine.dispatch import carry_out
from engine.emnify import ClientSettings, EmnifyClient
from engine.errors import ActionError, ConfigError, Location
from engine.events import Event, normalize
from engine.model import IntentStatus
from engine.outbound import HttpReceivers
from engine.simulator import SimulatorServer

from helpers import TOKEN, engine_config, eventually, rules_from, running_daemon

HERE = Location("rules.yaml", 3)
MB = 1024 * 1024
HUGE = 200 * MB


@pytest.fixture
async def context() -> AsyncIterator[ActionContext]:
    # The emnify client is never called by a webhook; it points nowhere.
    settings = ClientSettings(base_url="http://127.0.0.1:9")
    async with EmnifyClient("unused-token", settings) as client, httpx.AsyncClient() as http:
        receivers = HttpReceivers(http)
        yield ActionContext(client, receivers, Target(), "7-rule-0", 1, datetime.now(UTC))


def _event(description: Any = "quota used up") -> Event:
    return normalize(
        {
            "id": 7,
            "timestamp": "2025-05-01T10:00:00Z",
            "event_type": {"id": 11},
            "description": description,
        }
    )


async def _call(params: dict[str, Any], ctx: ActionContext, event: Event | None = None) -> str:
    action = ACTIONS["webhook"].from_params(params, HERE)
    event = event or _event()
    planned = action.plan(event, {"event": event.raw, "rule": {"id": "rule"}})
    return await carry_out(type(action), type(action).decode(planned.params), ctx)


# -- a receiver cannot hold a call -------------------------------------------------------------

# An answer trickled a byte every 0.5 s: every read gets its byte well within a per-read
# timeout, and the whole would take a minute.
_PADDING = b"X-Padding: " + b"p" * 100 + b"\r\n"
TRICKLED = {
    "head": trickle(b"HTTP/1.1 200 OK\r\n" + _PADDING + b"Content-Length: 0\r\n\r\n", 0.5),
    "body": trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 120\r\n\r\n" + b"x" * 120, 0.5),
}


@pytest.mark.parametrize("part", sorted(TRICKLED))
async def test_webhook_timeout_bounds_the_whole_exchange(context, part):
    async with RawReceiver(TRICKLED[part]) as receiver:
        started = time.monotonic()
        with pytest.raises(ActionError) as failed:
            await _call({"url": f"{receiver.base_url}/hook", "timeout": 1}, context)
        took = time.monotonic() - started
    assert str(failed.value) == "webhook http://127.0.0.1/hook: timed out"
    assert failed.value.retryable
    assert took < 10  # unbounded, the answer would take 60 s


@contextmanager
def allocations() -> Iterator[list[int]]:
    """The peak of Python's allocations while the block runs, in bytes (`[peak]` after)."""
    peak: list[int] = []
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


@pytest.mark.parametrize(("status", "retryable"), [(200, None), (500, True)])
async def test_webhook_reads_only_a_small_part_of_a_huge_answer(context, status, retryable):
    async with RawReceiver(endless_body(status, HUGE)) as receiver:
        with allocations() as peak:
            if retryable is None:
                outcome = await _call({"url": f"{receiver.base_url}/hook"}, context)
                assert outcome == "delivered 200"
            else:
                with pytest.raises(ActionError, match=f"HTTP {status}") as failed:
                    await _call({"url": f"{receiver.base_url}/hook"}, context)
                assert failed.value.retryable is retryable
        await eventually(lambda: receiver.open_now == 0)
    # What loopback's socket buffers took before the engine hung up, not 200 MB.
    assert receiver.bytes_sent < 16 * MB
    assert peak[0] < 8 * MB


async def test_a_compressed_answer_is_never_inflated(context):
    # 64 KB of gzip that inflates to 64 MB: the body is not read as content at all.
    bomb = gzip.compress(b"\0" * (64 * MB))

    async def answer(receiver: RawReceiver, head: bytes, writer: asyncio.StreamWriter) -> None:
        await receiver.send(
            writer,
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(bomb), bomb),
        )

    async with RawReceiver(answer) as receiver:
        with allocations() as peak:
            assert await _call({"url": f"{receiver.base_url}/hook"}, context) == "delivered 200"
    assert peak[0] < 8 * MB


# -- event data cannot choose where a webhook goes ---------------------------------------------

ATTACKS = [
    ("evil.com/", "evil.com%2F"),
    ("@evil.com", "%40evil.com"),
    (":8080", "%3A8080"),
    ("../", "..%2F"),
    ("..", "%2E%2E"),
    ("?x=1&y=2", "%3Fx%3D1%26y%3D2"),
    ("#top", "%23top"),
    ("%2e%2e", "%252e%252e"),
    ("\r\nHost: evil.com", "%0D%0AHost%3A%20evil.com"),
    ("ünï 😀", "%C3%BCn%C3%AF%20%F0%9F%98%80"),
    ("${HOOK_TOKEN}", "%24%7BHOOK_TOKEN%7D"),
]


@pytest.mark.parametrize(("value", "encoded"), ATTACKS)
async def test_values_rendered_into_a_webhook_url_stay_in_their_part(
    context, value, encoded, monkeypatch
):
    monkeypatch.setenv("HOOK_TOKEN", "hook-token-never-sent")
    async with RawReceiver(answer_ok) as receiver:
        field = "{{ event.description }}"
        url = f"{receiver.base_url}/hooks/{field}?sim={field}&v=1"
        assert await _call({"url": url}, context, _event(value)) == "delivered 200"
    assert receiver.targets() == [f"/hooks/{encoded}?sim={encoded}&v=1"]


@pytest.mark.parametrize(("value", "encoded"), ATTACKS[:4])
async def test_a_webhook_url_from_a_secret_keeps_its_host_whatever_the_event_holds(
    context, value, encoded, monkeypatch
):
    async with RawReceiver(answer_ok) as receiver:
        monkeypatch.setenv("HOOK_URL", f"{receiver.base_url}/hooks/ops")
        params = {"url": "${HOOK_URL}/{{ event.description }}?sim={{ event.description }}"}
        assert await _call(params, context, _event(value)) == "delivered 200"
    assert receiver.targets() == [f"/hooks/ops/{encoded}?sim={encoded}"]


@pytest.mark.parametrize("value", ["x", ".evil.example", "@evil.example"])
async def test_a_rendered_url_leading_to_another_host_than_the_rules_is_not_called(
    context, value, monkeypatch
):
    # The secret holds only scheme and host, the template follows at once: the encoding
    # alone cannot keep a value from extending the host; the check before the call does.
    monkeypatch.setenv("HOOK_HOST", "http://127.0.0.1")
    with pytest.raises(ActionError) as failed:
        await _call({"url": "${HOOK_HOST}{{ event.description }}/hook"}, context, _event(value))
    assert str(failed.value).startswith("webhook ${HOOK_HOST}")
    assert str(failed.value).endswith(
        "/hook: the URL rendered from the event leads to another"
        " scheme, host or port than the rule's; not called (set `dynamic_host: true` on the"
        " action if the host must come from the event)"
    )
    assert not failed.value.retryable


@pytest.mark.parametrize(
    "url",
    [
        "{{ event.callback_url }}",
        "https://{{ event.host }}/hook",
        "https://hooks.example.com{{ event.path }}",
        "https://hooks.example.com:{{ event.port }}/hook",
        "https://{{ event.user }}@hooks.example.com/hook",
        "https://hooks.{% if event.alert %}alerts.{% endif %}example.com/",
        "{% if event.alert %}https://a.example.com{% else %}https://b.example.com{% endif %}",
    ],
)
def test_a_template_in_a_webhooks_host_is_refused_at_load_unless_the_rule_opts_in(url):
    with pytest.raises(ConfigError) as refused:
        ACTIONS["webhook"].from_params({"url": url}, HERE)
    message = str(refused.value)
    assert message.startswith("rules.yaml:3: `webhook.url`")
    assert "event data would choose where the webhook goes" in message
    assert "dynamic_host: true" in message
    ACTIONS["webhook"].from_params({"url": url, "dynamic_host": True}, HERE)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (
            {"X-{{ event.description }}": "1"},
            "`webhook.headers`: the header name 'X-{{ event.description }}' is a template"
            " (write header names literally; values may use templates)",
        ),
        (
            {"X-" + "y" * 70 + "{{ event.description }}": "1"},
            "`webhook.headers`: the header name 'X-" + "y" * 58 + "' is a template"
            " (write header names literally; values may use templates)",
        ),
        (
            {"Host": "{{ event.description }}.example.com"},
            "`webhook.headers.Host` has a template: event data would choose where the webhook goes"
            " (write it literally, or set `dynamic_host: true` if it must come from the event)",
        ),
    ],
)
def test_event_data_cannot_name_a_header_or_set_the_host_header(headers, message):
    params = {"url": "https://hooks.example.com/emnify", "headers": headers}
    with pytest.raises(ConfigError) as refused:
        ACTIONS["webhook"].from_params(params, HERE)
    assert str(refused.value) == f"rules.yaml:3: {message}"


def test_a_url_refused_for_a_template_in_its_host_is_quoted_cut_to_80_characters():
    url = "https://{{ event.host }}/" + "x" * 100
    with pytest.raises(ConfigError) as refused:
        ACTIONS["webhook"].from_params({"url": url}, HERE)
    assert str(refused.value).startswith(f"rules.yaml:3: `webhook.url` {url[:80]!r} has a")


def test_a_rule_that_opts_in_to_dynamic_host_may_template_its_host_header():
    params = {
        "url": "https://hooks.example.com/emnify",
        "headers": {"Host": "{{ event.description }}.example.com"},
        "dynamic_host": True,
    }
    ACTIONS["webhook"].from_params(params, HERE)


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/{{ event.id }}",
        "https://hooks.example.com?sim={{ event.id }}",
        "https://hooks.example.com#{{ event.id }}",
        "${OPS_WEBHOOK_URL}",
        "${OPS_WEBHOOK_URL}/{{ event.id }}",
        "${OPS_WEBHOOK_URL}?sim={{ event.id }}",
        "https://${HOOKS_HOST}/emnify/{{ event.id }}",
        "https://hooks.example.com/r?next=http://{{ event.host }}",
    ],
)
def test_templates_after_a_literal_host_or_a_secret_url_load(url):
    ACTIONS["webhook"].from_params({"url": url}, HERE)


async def test_dynamic_host_lets_the_event_choose_the_host_when_the_rule_opts_in(context):
    async with RawReceiver(answer_ok) as receiver:
        params = {"url": "{{ event.description }}/hooks/x", "dynamic_host": True}
        assert await _call(params, context, _event(receiver.base_url)) == "delivered 200"
    assert receiver.targets() == ["/hooks/x"]


# -- a slow receiver cannot hold the dispatcher ------------------------------------------------

HOOKS_AND_SUSPEND = """
rules:
  - id: hook
    when: {type: 19}
    actions:
      - webhook: {url: "${SLOW_HOOK}", body: {event: "{{ event.id }}"}, timeout: 60}
  - id: suspend
    when: {type: 11}
    actions: [{suspend_sim: {}}]
"""

TWO_RECEIVERS = """
rules:
  - id: hooks
    when: {type: 19}
    actions:
      - webhook: {url: "${SLOW_HOOK}", body: {event: "{{ event.id }}"}, timeout: 60}
      - webhook: {url: "${QUICK_HOOK}", body: {event: "{{ event.id }}"}}
"""


def _quota_events(simulator: SimulatorServer, count: int) -> None:
    sim = simulator.state.sims()[0]
    simulator.state.store_events([{"event_type": 19, "sim_id": sim["id"]}] * count)


async def test_slow_webhooks_never_hold_the_slots_a_sim_suspension_needs(
    tmp_path, simulator, monkeypatch
):
    # More webhooks than a page of the outbox, each to a receiver that never answers, then
    # a suspension for another SIM.
    _quota_events(simulator, 250)
    other = simulator.state.sims()[1]
    rules = rules_from(tmp_path, HOOKS_AND_SUSPEND)

    def suspension(daemon: Daemon) -> IntentStatus | None:
        found = [i.status for i in daemon.store.intents() if i.kind == "suspend_sim"]
        return found[0] if found else None

    async with RawReceiver(answer_never) as receiver:
        monkeypatch.setenv("SLOW_HOOK", f"{receiver.base_url}/hook")
        daemon = Daemon(engine_config(tmp_path, simulator), rules, TOKEN)
        async with running_daemon(daemon):
            await eventually(lambda: receiver.open_now == 2)
            simulator.state.store_events([{"event_type": 11, "sim_id": other["id"]}])
            await eventually(lambda: suspension(daemon) is IntentStatus.DONE)
            hanging = receiver.open_now
            await receiver.hang_up()  # so the daemon stops without waiting for them
    assert simulator.state.sim(other["id"])["status"]["id"] == 2
    assert hanging == 2 and receiver.most_open == 2  # webhook_per_host


@pytest.mark.parametrize("per_host", [None, 1])
async def test_a_slow_receiver_holds_only_its_share_of_the_webhook_slots(
    tmp_path, simulator, monkeypatch, per_host
):
    _quota_events(simulator, 10)
    config_file = tmp_path / "config.yaml"
    setting = f"actions: {{webhook_per_host: {per_host}}}\n" if per_host else ""
    config_file.write_text(setting, encoding="utf-8")
    config = load_config(config_file)
    config = replace(
        engine_config(tmp_path, simulator),
        webhook_concurrency=config.webhook_concurrency,
        webhook_per_host=config.webhook_per_host,
    )
    rules = rules_from(tmp_path, TWO_RECEIVERS)
    async with RawReceiver(answer_never) as slow, RawReceiver(answer_ok) as quick:
        monkeypatch.setenv("SLOW_HOOK", f"{slow.base_url}/hook")
        monkeypatch.setenv("QUICK_HOOK", f"{quick.base_url}/hook")
        daemon = Daemon(config, rules, TOKEN)
        async with running_daemon(daemon):
            await eventually(lambda: len(quick.heads) == 10)
            hanging = slow.open_now
            await slow.hang_up()
    assert hanging == slow.most_open == (per_host or 2)


async def test_no_more_webhooks_are_in_flight_at_once_than_webhook_concurrency_allows(
    tmp_path, simulator, monkeypatch
):
    # Two receivers that never answer, each with slots to spare (two per host), but two
    # webhook slots in all.
    _quota_events(simulator, 3)
    config = replace(engine_config(tmp_path, simulator), webhook_concurrency=2, webhook_per_host=2)
    rules = rules_from(tmp_path, TWO_RECEIVERS)
    async with RawReceiver(answer_never) as first, RawReceiver(answer_never) as second:
        monkeypatch.setenv("SLOW_HOOK", f"{first.base_url}/hook")
        monkeypatch.setenv("QUICK_HOOK", f"{second.base_url}/hook")
        daemon = Daemon(config, rules, TOKEN)
        async with running_daemon(daemon):
            await eventually(lambda: first.open_now + second.open_now == 2)
            await asyncio.sleep(0.3)  # time for a third to start, were there a slot
            hanging = first.open_now + second.open_now
            await first.hang_up()
            await second.hang_up()
    assert hanging == 2


@pytest.mark.parametrize(
    ("url", "origin", "destination"),
    [
        ("https://Hooks.Example.com:8443/a/b?c=d#e", None, "https://hooks.example.com:8443"),
        ("https://ops:pw@x@hooks.example.com/a", None, "https://hooks.example.com"),
        ("https://hooks.example.com?next=http://other.example", None, "https://hooks.example.com"),
        ("https://hooks.example.com#http://other.example", None, "https://hooks.example.com"),
        ("${OPS_HOOK}/emnify/7", "${OPS_HOOK}/emnify/", "${ops_hook}"),
        (
            "https://hooks.example.com/emnify/7",
            "https://hooks.example.com/emnify/",
            "https://hooks.example.com",
        ),
    ],
)
def test_a_webhook_is_shared_out_by_the_scheme_host_and_port_the_rule_wrote(
    url, origin, destination
):
    call = WebhookCall("POST", url, url_origin=origin)
    assert ACTIONS["webhook"].destination(call) == destination


async def test_a_webhook_whose_secret_url_is_not_a_url_fails_without_a_call(context, monkeypatch):
    monkeypatch.setenv("HOOK_HOST", "http://[::1")
    with pytest.raises(ActionError) as failed:
        await _call({"url": "${HOOK_HOST}/{{ event.description }}"}, context)
    assert str(failed.value) == "webhook ${HOOK_HOST}/quota%20used%20up: not a valid http(s) URL"
    assert not failed.value.retryable


async def test_a_webhook_url_that_cannot_be_parsed_is_shown_as_such(context):
    params = {"url": "{{ event.description }}/hooks/x", "dynamic_host": True}
    with pytest.raises(ActionError) as failed:
        await _call(params, context, _event("http://[::1"))
    assert str(failed.value).startswith("webhook (unparsable URL): ")
