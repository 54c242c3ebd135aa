"""Log output: JSON lines for machines, readable lines on a terminal, secrets blanked."""

import io
import json
import re

import structlog

from engine import logging as engine_logging
from engine import secrets


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_are_json_when_the_stream_is_not_a_terminal():
    stream = io.StringIO()
    engine_logging.configure("info", "auto", stream=stream)
    structlog.get_logger("t").info("poll done", fetched=3)
    record = json.loads(stream.getvalue().splitlines()[-1])
    assert record["event"] == "poll done"
    assert record["fetched"] == 3
    assert record["level"] == "info"


def test_log_lines_are_readable_text_on_a_terminal():
    stream = _Terminal()
    engine_logging.configure("info", "auto", stream=stream)
    structlog.get_logger("t").info("poll done", fetched=3)
    line = re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue().splitlines()[-1])  # colours
    assert "poll done" in line and "fetched=3" in line
    assert not line.lstrip().startswith("{")


def test_a_registered_secret_never_reaches_a_log_line():
    stream = io.StringIO()
    engine_logging.configure("info", "json", stream=stream)
    secrets.register("tok-3f9a77c1-secret")
    structlog.get_logger("t").warning("login failed", detail="sent tok-3f9a77c1-secret")
    assert "tok-3f9a77c1-secret" not in stream.getvalue()
    assert "***" in stream.getvalue()


def test_a_secret_holding_another_is_blanked_whole():
    # A base URL and the same URL with a token, among other overlapping values: whichever
    # order they were registered in, no part of the longer one shows.
    for base in ("https://hooks.example.test", "https://crm.example.test"):
        for end in ("", "/x", "/x?", "/x?token", "/x?token=", "/x?token=tok-8e1d44"):
            secrets.register(base + end)
    for base in ("https://hooks.example.test", "https://crm.example.test"):
        shown = secrets.redact(f"cannot send {base}/x?token=tok-8e1d44 now")
        assert shown == "cannot send *** now"


def test_on_a_terminal_the_rule_action_and_outcome_come_first_then_the_rest_as_logged():
    stream = _Terminal()
    engine_logging.configure("info", "auto", stream=stream)
    structlog.get_logger("t").info(
        "action done",
        intent_id=12,
        rule="suspend-sim-on-quota-used-up",
        action="suspend_sim",
        event_id=412907744632430,
        outcome="done",
        sim_id=9123345,
        endpoint_id=18345222,
        iccid="8988303000019670679",
    )
    line = re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue().splitlines()[-1])
    keys = re.findall(r" (\w+)=", line)
    assert keys == [
        *("rule", "outcome", "action", "event_id", "iccid"),
        *("intent_id", "sim_id", "endpoint_id"),  # as logged
    ]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \[info", line), line  # as `why` prints times
    # On a 100-column terminal, the rule and how it ended are in sight.
    assert line.index("outcome=done") + len("outcome=done") <= 100, line


# -- what the running engine logs --------------------------------------------------------


def _records(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_every_line_is_json_and_a_poll_outlasting_its_interval_is_no_warning():
    import asyncio
    import logging

    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    stream = io.StringIO()
    engine_logging.configure("info", "json", stream=stream)

    async def slow_poll() -> None:
        await asyncio.sleep(0.35)

    scheduler = AsyncIOScheduler()
    scheduler.add_job(slow_poll, "interval", seconds=0.1, max_instances=1, id="poll")
    scheduler.start()
    await asyncio.sleep(0.6)
    scheduler.shutdown(wait=False)
    logging.getLogger("uvicorn.error").error("port %d in use", 8080)
    records = _records(stream)  # every line parses as JSON
    assert not [r for r in records if "maximum number of running" in r["event"]]
    assert {"event": "port 8080 in use", "logger": "uvicorn.error", "level": "error"}.items() <= (
        records[-1].items()
    )

    # At debug level the skipped run shows, as a debug line.
    debug = io.StringIO()
    engine_logging.configure("debug", "json", stream=debug)
    logging.getLogger("apscheduler").setLevel(logging.DEBUG)
    scheduler = AsyncIOScheduler()
    scheduler.add_job(slow_poll, "interval", seconds=0.1, max_instances=1, id="poll")
    scheduler.start()
    await asyncio.sleep(0.6)
    scheduler.shutdown(wait=False)
    skipped = [r for r in _records(debug) if "maximum number of running" in r["event"]]
    assert skipped and {r["level"] for r in skipped} == {"debug"}
    engine_logging.configure("info", "json", stream=io.StringIO())


async def test_run_logs_one_start_up_block_and_a_poll_with_nothing_new_only_at_debug(
    tmp_path, simulator
):
    from datetime import UTC, datetime, timedelta

    from engine.daemon import Daemon
    from engine.http.service import HttpService
    from engine.http.settings import HttpSettings

    from helpers import TOKEN, engine_config, poller_of, rules_from, running_daemon

    stream = io.StringIO()
    engine_logging.configure("info", "json", stream=stream)
    config = engine_config(tmp_path, simulator)
    rules = rules_from(
        tmp_path, "rules:\n  - id: r\n    when: {type: 19}\n    actions: [{log: {}}]\n"
    )
    http = HttpService(HttpSettings(port=0))
    http.bind()
    address = http.base_url
    daemon = Daemon(config, rules, TOKEN, services=[http])
    simulator.state.store_events(
        [{"event_type": {"id": 19}, "sim_id": simulator.state.sims()[0]["id"]}]
    )
    async with running_daemon(daemon):
        poller = poller_of(daemon)
        await poller.poll_once()  # finds the event
        poller.clock = lambda: datetime.now(UTC) + timedelta(seconds=3)
        await poller.poll_once()  # the overlap re-reads it: nothing new
    records = _records(stream)
    (started,) = [r for r in records if r["event"] == "engine started"]
    assert started["sources"].startswith("poller (every ")
    assert started["rules"] == f"1 loaded from {config.rules} (1 enabled)"
    assert started["store"] == str(config.store_path)
    assert started["http"].startswith(address)
    assert not [
        r for r in records if r["event"] in ("http server listening", "polling the Event API")
    ]
    polls = [r for r in records if r["event"] == "poll done"]
    assert [p["new"] for p in polls] == [1]
    engine_logging.configure("info", "json", stream=io.StringIO())
