"""Shared fixtures: a simulator and a webhook receiver on loopback, an engine wired to them
with a real SQLite file, and a real PostgreSQL server for the session
(engine/sandbox/postgres.py)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from engine import secrets
from engine.sandbox.postgres import PostgresServer, find
from engine.simulator import SimulatorConfig, SimulatorServer
from engine.simulator.webhook_sink import WebhookSink, WebhookSinkServer
from engine.store.settings import PostgresSettings

# What the session's PostgreSQL tests ran on, or why they did not (for the summary's line).
_postgres_note: list[str] = []


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Commands configure logging process-wide; give every test the defaults back."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    yield
    structlog.reset_defaults()
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)


@pytest.fixture(autouse=True)
def _fresh_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The redactor remembers every secret read, process-wide: give every test the ones
    known before it, so that a value one test read (a loopback URL) is not blanked in
    another's messages, whatever order the tests run in."""
    monkeypatch.setattr(secrets, "_known", set(secrets._known))
    monkeypatch.setattr(secrets, "_by_length", secrets._by_length)


@pytest.fixture
def simulator() -> Iterator[SimulatorServer]:
    with SimulatorServer(SimulatorConfig(seed=3, endpoints=6, late_fraction=0.0)) as server:
        yield server


@pytest.fixture
def sink() -> Iterator[WebhookSink]:
    with WebhookSinkServer() as server:
        yield server.sink


@pytest.fixture
def hook_env(monkeypatch: pytest.MonkeyPatch, sink: WebhookSink) -> WebhookSink:
    """Point the webhook secrets the example rules use at the local receiver."""
    for name in ("OPS", "ONCALL", "CRM"):
        monkeypatch.setenv(f"{name}_WEBHOOK_URL", f"{sink.base_url}/hooks/{name.lower()}")
    monkeypatch.setenv("ONCALL_WEBHOOK_TOKEN", "oncall-secret-token-123")
    return sink


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL (engine/sandbox/postgres.py says where it comes from). None to be
    had: the tests that need one are skipped, or fail under CI, which must run them."""
    found = find(Path.cwd())
    if isinstance(found, str):
        _postgres_note.append(f"SKIPPED, no PostgreSQL: {found}")
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL tests cannot run under CI: {found}", pytrace=False)
        pytest.skip(f"no PostgreSQL: {found} (set EVENT_ENGINE_TEST_POSTGRES to a DSN)")
    _postgres_note.append(f"ran on {found.where}")
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A DSN whose tables land in a fresh, empty schema (dropped after the test); the
    password, if the server needs one, is `postgres_server.password`."""
    with postgres_server.fresh_schema() as url:
        yield url


# The variable a test's config names in `store.password: ${...}`.
PASSWORD_VARIABLE = "EVENT_ENGINE_TEST_STORE_PASSWORD"


@pytest.fixture
def postgres_settings(
    postgres_server: PostgresServer, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> PostgresSettings:
    """The config's `store:` for a fresh schema, its password in the environment as an
    operator would give it (`store.password: ${NAME}`)."""
    if postgres_server.password is None:
        return PostgresSettings(postgres_url)
    monkeypatch.setenv(PASSWORD_VARIABLE, postgres_server.password)
    return PostgresSettings(postgres_url, password_reference=f"${{{PASSWORD_VARIABLE}}}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line saying whether the PostgreSQL tests ran, and where or why not."""
    if _postgres_note:
        terminalreporter.write_line(f"PostgreSQL tests: {_postgres_note[0]}")
