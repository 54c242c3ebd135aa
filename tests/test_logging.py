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
