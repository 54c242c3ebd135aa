"""Shared fixtures: a simulator and a webhook receiver on loopback, and an engine wired to
them with a real SQLite file."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from engine.simulator import SimulatorConfig, SimulatorServer
from engine.simulator.webhook_sink import WebhookSink, WebhookSinkServer


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
