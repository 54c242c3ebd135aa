"""Secrets never reach a log line, the state store or an error message: a full daemon run
with a revoked token, failing webhooks, an unusable secret URL and a crashing action, then
a search of everything it wrote. And rule files cannot hold credentials at all."""

from __future__ import annotations

import io
import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import structlog

from engine import logging as engine_logging
from engine import secrets
from engine.daemon import Daemon
from engine.errors import RuleSetError
from engine.model import IntentStatus
from engine.rules import load_rules_text
from engine.simulator import FaultRule, SimulatorConfig, SimulatorServer
from engine.simulator.webhook_sink import WebhookSinkServer

from helpers import engine_config, poller_of, rules_from

APP_TOKEN = "app-token-5e1f9c3b7a2d4411"
HOOK_SECRET = "hook-secret-8c4d2e6f1a90"
URL_SECRET = "url-secret-3b9a7f5c2e61"
BAD_HOST = "bad-host-secret-6d2c0e"
SECRETS = (APP_TOKEN, HOOK_SECRET, URL_SECRET, BAD_HOST)

RULES = """\
rules:
  - id: quota
    when: {type: 19}
    actions:
      - suspend_sim: {}
      - webhook:
          url: ${HOOK_URL}
          headers: {Authorization: "Bearer ${HOOK_SECRET}"}
          body: {event: "{{ event.id }}"}
      - webhook:
          url: ${BAD_HOOK_URL}
          body: {event: "{{ event.id }}"}
      - send_sms: {payload: "quota used up"}
"""

CONFIG = """\
api:
  base_url: {base_url}
  read_timeout: 1
  max_retries: 1
  backoff_initial: 0.05
  backoff_max: 0.1
rules: rules.yaml
store: {{path: state/engine.sqlite3}}
poller: {{interval: 1s, initial_lookback: 60s}}
actions: {{max_attempts: 12, initial_backoff: 0.1, max_backoff: 0.3, settle_time: 0.5}}
http: {{port: 0}}
log: {{level: debug, format: json}}
"""


def _leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def _store_text(path: Path) -> str:
    """Every value of every row of every table, as text."""
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return "\n".join(
            " ".join(str(v) for v in row)
            for table in tables
            for row in db.execute(f'SELECT * FROM "{table}"')
        )
    finally:
        db.close()


def _open_intents(path: Path) -> int:
    if not path.exists():
        return -1
    db = sqlite3.connect(path)
    try:
        total = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        waiting = db.execute(
            "SELECT COUNT(*) FROM outbox WHERE status IN ('pending', 'running')"
        ).fetchone()[0]
    except sqlite3.Error:
        return -1
    finally:
        db.close()
    return int(waiting) if total else -1


def test_a_full_run_with_failures_leaves_no_secret_anywhere(tmp_path):
    config = SimulatorConfig(seed=4, endpoints=4, late_fraction=0.0, application_token=APP_TOKEN)
    with SimulatorServer(config) as simulator, WebhookSinkServer() as hooks:
        sink = hooks.sink
        sink.status = 500  # the receiver fails at first
        token_file = tmp_path / "token"
        token_file.write_text(APP_TOKEN + "\n", encoding="utf-8")
        (tmp_path / "rules.yaml").write_text(RULES, encoding="utf-8")
        (tmp_path / "config.yaml").write_text(
            CONFIG.format(base_url=simulator.base_url), encoding="utf-8"
        )
        env = {
            "PATH": "/usr/bin:/bin",
            "EMNIFY_APPLICATION_TOKEN_FILE": str(token_file),
            "HOOK_URL": f"{sink.base_url}/hooks/ops?signature={URL_SECRET}",
            "HOOK_SECRET": HOOK_SECRET,
            "BAD_HOOK_URL": f"http://[{BAD_HOST}]/hooks",
        }
        simulator.state.set_faults(
            FaultRule.parse(rule)
            for rule in (
                {"path": "^/api/v1/sim/", "method": "GET", "kind": "expire_token", "count": 1},
                {"path": "^/api/v1/sim/", "method": "GET", "kind": "503", "count": 2},
                {"path": "^/api/v1/endpoint/", "method": "POST", "kind": "apply_then_fail"},
            )
        )
        sims = simulator.state.sims()[:2]
        simulator.state.store_events([{"event_type": 19, "sim_id": s["id"]} for s in sims])
        log_path = tmp_path / "engine.log"
        with log_path.open("wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "engine", "run", "--config", "config.yaml"],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            store = tmp_path / "state" / "engine.sqlite3"
            deadline = time.monotonic() + 30
            while not _failures_met(simulator, sink.calls()) and time.monotonic() < deadline:
                time.sleep(0.1)
            sink.status = 200
            simulator.state.clear_faults()
            while _open_intents(store) != 0 and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=15)
        assert code == 0
        commands = [
            subprocess.run(
                [sys.executable, "-m", "engine", *args, "--config", "config.yaml"],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            for args in (["status"], ["dead-letters", "list"])
        ]
        token_calls = [c.headers.get("authorization") for c in sink.calls()]

    logged = log_path.read_text(encoding="utf-8")
    stored = _store_text(tmp_path / "state" / "engine.sqlite3")
    printed = "\n".join(c.stdout + c.stderr for c in commands)
    # The run met what it was meant to: a revoked token, a failing receiver, a broken URL,
    # an SMS whose answer was lost.
    assert "emnify refused the auth token; logging in again" in logged
    assert "webhook ${HOOK_URL}: HTTP 500" in stored
    assert "webhook ${BAD_HOOK_URL}: not a valid http(s) URL" in stored
    assert "the SMS may have gone out" in stored
    assert token_calls[-1] == f"Bearer {HOOK_SECRET}"  # the secrets did reach their target
    assert {"action done", "action failed, will retry"} <= set(_events(logged))
    assert _leaks(logged) == [] and _leaks(stored) == [] and _leaks(printed) == []


def _failures_met(simulator: SimulatorServer, hook_calls: list[object]) -> bool:
    """The receiver failed a few calls and an SMS's answer was lost (webhooks and emnify
    calls run in slots of their own, so either may come first)."""
    lost = any(r.fault == "apply_then_fail" for r in simulator.state.requests())
    return lost and len(hook_calls) >= 3


def _events(logged: str) -> list[str]:
    import orjson

    return [orjson.loads(line).get("event", "") for line in logged.splitlines() if line[:1] == "{"]


@pytest.mark.parametrize("fmt", ["json", "console"])
async def test_a_crashing_action_logs_its_traceback_without_the_secrets_it_quoted(
    tmp_path, simulator, sink, monkeypatch, fmt
):
    monkeypatch.setenv("HOOK_URL", f"{sink.base_url}/hooks/ops?signature={URL_SECRET}")
    monkeypatch.setenv("HOOK_SECRET", HOOK_SECRET)
    stream = io.StringIO()
    engine_logging.configure("debug", fmt, stream)
    simulator.state.store_events([{"event_type": 19, "sim_id": simulator.state.sims()[0]["id"]}])
    rules = rules_from(
        tmp_path,
        """
        rules:
          - id: quota
            when: {type: 19}
            actions:
              - webhook:
                  url: ${HOOK_URL}
                  headers: {Authorization: "Bearer ${HOOK_SECRET}"}
        """,
    )

    def broken_library(request: httpx.Request) -> httpx.Response:
        # A library bug that quotes its request, secrets and all, in its message.
        raise RuntimeError(f"cannot send {request.url} with {request.headers['authorization']}")

    daemon = Daemon(engine_config(tmp_path, simulator), rules, "demo-application-token")
    await daemon.http.aclose()
    daemon.http = httpx.AsyncClient(transport=httpx.MockTransport(broken_library))
    daemon.dispatcher.http = daemon.http
    try:
        await poller_of(daemon).poll_once()
        await daemon.dispatcher.run_due()
        (intent,) = daemon.store.intents()
        stored = _store_text(daemon.config.store_path)
    finally:
        await daemon.aclose()
    logged = stream.getvalue()
    assert "Traceback (most recent call last)" in logged and "action crashed" in logged
    assert "RuntimeError: cannot send" in logged and "***" in logged
    assert intent.status is IntentStatus.PENDING
    assert intent.last_error == "internal error: RuntimeError"
    assert _leaks(logged) == [] and _leaks(stored) == []


def test_library_loggers_are_redacted_too(monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh process
    stream = io.StringIO()
    secrets.register(HOOK_SECRET)
    engine_logging.configure("info", "json", stream)
    try:
        raise ValueError(f"bad header {HOOK_SECRET}")
    except ValueError:
        logging.getLogger("apscheduler.executors").exception("job failed: %s", HOOK_SECRET)
    structlog.get_logger("engine.test").error("seen", detail=f'quoted "{HOOK_SECRET}"')
    logged = stream.getvalue()
    assert "job failed: ***" in logged and "ValueError: bad header ***" in logged
    assert HOOK_SECRET not in logged


@pytest.mark.parametrize(
    ("webhook", "line", "what"),
    [
        ('{url: "https://h.example/x", headers: {Authorization: "Bearer abc123"}}', 5, "headers"),
        ('{url: "https://h.example/x", headers: {X-Api-Key: "k-123"}}', 5, "headers"),
        ('{url: "https://h.example/x?token=abc123"}', 5, "credential (`token=`)"),
        ('{url: "https://user:pa55@h.example/x"}', 5, "password"),
    ],
)
def test_a_credential_written_into_a_rule_file_is_refused(webhook, line, what):
    text = textwrap.dedent(
        f"""\
        rules:
          - id: hook
            when: {{type: 19}}
            actions:
              - webhook: {webhook}
        """
    )
    with pytest.raises(RuleSetError) as info:
        load_rules_text(text, "rules/hook.yaml")
    (problem,) = info.value.errors
    assert str(problem.where) == f"rules/hook.yaml:{line}"
    assert what in problem.message and "written into the rule file" in problem.message
    assert "${NAME}" in (problem.hint or "")


def test_credentials_by_reference_are_accepted():
    load_rules_text(
        textwrap.dedent(
            """\
            rules:
              - id: hook
                actions:
                  - webhook:
                      url: "https://h.example/x?token=${HOOK_TOKEN}"
                      headers: {Authorization: "Bearer ${HOOK_SECRET}", X-Team: ops}
            """
        )
    )
