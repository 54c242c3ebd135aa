"""A daemon with the web console, and a store that already holds what the console's buttons
act on: a dead-lettered action and a rule its blast-radius guard switched to shadow."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import httpx

from engine.config import Config, UiSettings, UiUser
from engine.console.app import console_pages
from engine.daemon import Daemon
from engine.dispatch import RetryPolicy
from engine.http.service import HttpService
from engine.http.settings import HttpSettings
from engine.simulator import FaultRule, SimulatorServer

from helpers import TOKEN, engine_config, poller_of, rules_from, running_daemon, with_poller

OPERATOR_LOGIN = "operator-login-for-the-console-tests"
VIEWER_LOGIN = "viewer-login-for-the-console-tests"
# Named users beside the shared role logins: alice's token from a variable, bob's from a file.
ALICE_LOGIN = "alice-login-for-the-console-tests"
BOB_LOGIN = "bob-login-for-the-console-tests"
QUOTA_USED_UP = 19

RULES = """
rules:
  - id: quota
    when: {type: 19}
    condition: {"!=": [{"var": "sim.iccid"}, null]}
    threshold: {count: 1, within: 10m, per: sim.iccid}
    actions: [{suspend_sim: {}}]
  - id: guarded
    when: {type: 11}
    max_actions: {count: 1, within: 10m}
    actions: [{suspend_sim: {}}]
"""


@dataclass
class Console:
    url: str
    daemon: Daemon
    simulator: SimulatorServer


def _config(tmp_path: Path, simulator: SimulatorServer) -> Config:
    config = with_poller(engine_config(tmp_path, simulator), interval=timedelta(milliseconds=300))
    return replace(
        config,
        api=replace(config.api, max_retries=0),
        retry=RetryPolicy(
            max_attempts=1,
            initial_backoff=timedelta(milliseconds=1),
            max_backoff=timedelta(milliseconds=1),
        ),
    )


async def _dead_letter_and_tripped_guard(
    config: Config, tmp_path: Path, simulator: SimulatorServer
) -> None:
    """One `quota` action dead-lettered (every device call failed with 503) and the
    `guarded` rule's guard tripped by its second match."""
    sims = simulator.state.sims()
    simulator.state.store_events(
        [
            {"event_type": QUOTA_USED_UP, "sim_id": sims[0]["id"]},
            {"event_type": 11, "sim_id": sims[1]["id"]},
            {"event_type": 11, "sim_id": sims[2]["id"]},
        ]
    )
    simulator.state.set_faults(
        [FaultRule.parse({"path": "^/api/v1/(sim|endpoint)/", "kind": "503"})]
    )
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        for _ in range(20):
            await daemon.dispatcher.run_due()
            if daemon.store.counts().get("intents_dead", 0) >= 1:
                break
    finally:
        await daemon.aclose()
    simulator.state.clear_faults()


@asynccontextmanager
async def running_console(tmp_path: Path, simulator: SimulatorServer) -> AsyncIterator[Console]:
    config = _config(tmp_path, simulator)
    await _dead_letter_and_tripped_guard(config, tmp_path, simulator)
    bob_file = tmp_path / "ui-bob"
    bob_file.write_text(BOB_LOGIN + "\n", encoding="utf-8")
    users = (
        UiUser(name="alice", role="operator", token_reference="${UI_ALICE_TOKEN}"),
        UiUser(name="bob", role="viewer", token_file=bob_file),
    )
    pages = console_pages(
        UiSettings(enabled=True, users=users),
        env={
            "EVENT_ENGINE_UI_OPERATOR_TOKEN": OPERATOR_LOGIN,
            "EVENT_ENGINE_UI_VIEWER_TOKEN": VIEWER_LOGIN,
            "UI_ALICE_TOKEN": ALICE_LOGIN,
        },
    )
    service = HttpService(HttpSettings(port=0), pages)
    service.bind()
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN, services=[service])
    async with running_daemon(daemon):
        yield Console(url=service.base_url, daemon=daemon, simulator=simulator)


async def logged_in(client: httpx.AsyncClient, url: str, login: str) -> str:
    """Log `client` in (its cookie jar keeps the session); the session's CSRF token."""
    page = await client.get(url + "/ui/login")
    form_token = _hidden(page.text, "form_token")
    answer = await client.post(
        url + "/ui/login", data={"form_token": form_token, "password": login}
    )
    assert answer.status_code == 303, answer.text
    overview = await client.get(url + "/ui/overview")
    return _hidden(overview.text, "csrf")


def _hidden(html: str, name: str) -> str:
    marker = f'name="{name}" value="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]
