"""`event-engine demo`: the simulator, a webhook receiver and the engine, together on loopback.

The simulator generates a live mix of events; a short scripted scenario on top makes sure
every example rule gets something to do (a quota used up, a critical policy-control event,
a SIM activated through the API, an endpoint blocked). At the end the demo prints what the
engine polled, matched and did, and the SIM statuses as the simulator now holds them.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from secrets import token_urlsafe
from typing import Any

from engine import logging as engine_logging
from engine import secrets
from engine.commands.state_file import DEMO_STORE
from engine.config import Config, UiSettings, load_config
from engine.console.app import console_pages
from engine.cron import check_crontab
from engine.daemon import Daemon, Summary, install_signal_handlers, stop_after
from engine.emnify import EmnifyClient
from engine.http.service import HttpService
from engine.http.settings import HttpSettings
from engine.rules import load_rules
from engine.simulator import SimulatorConfig, SimulatorServer
from engine.simulator.webhook_sink import WebhookSink, WebhookSinkServer
from engine.sources.poller import PollerSettings, PollerSource
from engine.sources.streamer import INGEST_PATH, StreamerSettings
from engine.startup import load_rules_and_services

_TOKEN_VARIABLE = "EMNIFY_APPLICATION_TOKEN"


def scenario(simulator: SimulatorServer) -> list[dict[str, Any]]:
    """Events that exercise each example rule once."""
    sims = simulator.state.sims()
    plain = [s for s in sims if "vip" not in _endpoint_tags(simulator, s)]
    first, second = plain[0], plain[1]
    return [
        {"event_type": {"id": 19}, "sim_id": first["id"]},  # quota used up → suspend + webhook
        {
            "event_type": {"id": 12},
            "event_source": 1,
            "event_severity": 2,
            "alert": True,
            "description": "Organisation blocked: monthly cost limit exceeded.",
        },
        {
            "event_type": {"id": 8},
            "event_source": 2,
            "sim_id": second["id"],
            "description": "Status of SIM changed from 'Suspended' to 'Activated'",
        },
        {"event_type": {"id": 11}, "sim_id": second["id"], "alert": True},
    ]


def _endpoint_tags(simulator: SimulatorServer, sim: dict[str, Any]) -> list[str]:
    """The whole tags of the SIM's endpoint (as the example rules test them)."""
    endpoint = sim.get("endpoint") or {}
    if not endpoint.get("id"):
        return []
    tags = simulator.state.endpoint(endpoint["id"]).get("tags")
    return [tag.strip() for tag in tags.split(",")] if isinstance(tags, str) else []


def run_demo(*, rules_path: Path, duration: timedelta, rate: float, seed: int) -> int:
    rules = load_rules(rules_path, cron=check_crontab)
    engine_logging.configure("info", "console" if sys.stderr.isatty() else "auto")
    # The engine's HTTP server (health, metrics, Data Streamer ingress) on a free port, bound
    # first so the simulator's Data Streamer can be pointed at it.
    streamer_secret = secrets.register(token_urlsafe(24))
    # The console, with a one-time operator login made for this run only.
    console_login = secrets.register(token_urlsafe(18))
    console = UiSettings(enabled=True, operator_token_env=_CONSOLE_LOGIN_VARIABLE)
    http = HttpService(
        HttpSettings(port=0),
        console_pages(console, env={_CONSOLE_LOGIN_VARIABLE: console_login}),
    )
    http.bind()
    ingest_url = http.base_url + INGEST_PATH
    # The store outlives the demo, so `event-engine why --sim ICCID` can explain it afterwards;
    # each demo starts from a fresh one (the simulator's event ids repeat from run to run).
    for leftover in (DEMO_STORE, *(DEMO_STORE.with_name(DEMO_STORE.name + s) for s in _SIDECARS)):
        leftover.unlink(missing_ok=True)
    simulated = SimulatorConfig(
        seed=seed,
        event_rate=rate,
        stream_url=ingest_url,
        stream_headers={"X-Emnify-Secret": streamer_secret},
        stream_interval=0.5,
    )
    with (
        SimulatorServer(simulated) as simulator,
        WebhookSinkServer() as sink_server,
    ):
        sink = sink_server.sink
        for name in ("OPS", "ONCALL", "CRM"):
            os.environ.setdefault(f"{name}_WEBHOOK_URL", f"{sink.base_url}/hooks/{name.lower()}")
        os.environ.setdefault("ONCALL_WEBHOOK_TOKEN", "demo-oncall-token")
        os.environ[_TOKEN_VARIABLE] = simulator.application_token
        config = _config(simulator, rules_path, streamer_secret)
        _say(f"simulator: {simulator.base_url}  webhooks: {sink.base_url}/hooks/…")
        _say(
            f"engine http: {http.base_url}/healthz /readyz /metrics; the simulator's Data "
            f"Streamer pushes to {ingest_url}; the poller backfills"
        )
        _say(f"console: {http.base_url}/ui  one-time login: {console_login}")
        _say(
            f"rules: {len(rules.rules)} from {rules_path}; running for "
            + (f"{duration.total_seconds():.0f}s" if duration else "ever (Ctrl-C stops)")
        )
        before = {s["id"]: s["status"]["description"] for s in simulator.state.sims()}
        summary, polls = asyncio.run(_run(config, rules, simulator, duration, http))
        _print_summary(summary, polls, simulator, sink, before)
    return 0


_SIDECARS = ("-wal", "-shm")
_CONSOLE_LOGIN_VARIABLE = "EVENT_ENGINE_DEMO_CONSOLE_LOGIN"


def _config(simulator: SimulatorServer, rules_path: Path, streamer_secret: str) -> Config:
    """Both sources: the simulator's Data Streamer pushes, the poller backfills."""
    config = load_config(None)
    poller = config.source_settings[PollerSource.name]
    assert isinstance(poller, PollerSettings)
    return replace(
        config,
        api=replace(config.api, base_url=simulator.base_url),
        rules=rules_path,
        store_path=DEMO_STORE,
        sources=("poller", "data_streamer"),
    ).with_source_settings(
        poller=replace(
            poller, interval=timedelta(seconds=2), initial_lookback=timedelta(seconds=30)
        ),
        data_streamer=StreamerSettings(secret=streamer_secret),
    )


async def _run(
    config: Any, rules: Any, simulator: SimulatorServer, duration: timedelta, http: HttpService
) -> tuple[Summary, int]:
    # The catalog from the simulator's API, the rule reloader (edit a file in rules/ while the
    # demo runs, or send SIGHUP) and the digest schedules run beside the poller.
    token = config.application_token()
    client = EmnifyClient(token, config.api)  # the catalog's fetch and the daemon: one login
    rules, rule_services = await load_rules_and_services(
        config.rules, config.api, token, client=client
    )
    daemon = Daemon(config, rules, token, services=[http, *rule_services.all()], client=client)
    stop = asyncio.Event()
    install_signal_handlers(stop)

    async def inject_scenario() -> None:
        await asyncio.sleep(1.0)
        simulator.state.store_events(scenario(simulator))

    injecting = asyncio.create_task(inject_scenario())
    timer = asyncio.create_task(stop_after(stop, duration or None))
    summary = await daemon.run(stop)
    timer.cancel()
    injecting.cancel()
    poller = daemon.source(PollerSource.name)
    return summary, poller.polls if isinstance(poller, PollerSource) else 0


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _print_summary(
    summary: Summary,
    polls: int,
    simulator: SimulatorServer,
    sink: WebhookSink,
    before: dict[int, str],
) -> None:
    lines = ["", "── demo summary ──────────────────────────────────────────────"]
    lines.append(
        f"polls: {polls}   events polled: {summary.received_by_source[PollerSource.name]}   "
        f"new events evaluated: {summary.new_events}"
    )
    by_source = summary.new_events_by_source
    lines.append(
        "first delivered by: "
        + ", ".join(f"{source} {by_source[source]}" for source in ("data_streamer", "poller"))
        + "   (an event is evaluated once, whichever came first)"
    )
    lines.append("rules matched:")
    width = max((len(rule_id) for rule_id in summary.matches_by_rule), default=0)
    for rule_id, count in sorted(summary.matches_by_rule.items()):
        lines.append(f"  {rule_id:<{width}}  {count}")
    if not summary.matches_by_rule:
        lines.append("  (none)")
    lines.append("actions (kind, outcome):")
    width = max((len(kind) for kind, _ in summary.actions), default=0)
    for (kind, outcome), count in sorted(summary.actions.items()):
        lines.append(f"  {kind:<{width}}  {outcome:<12} {count}")
    if not summary.actions:
        lines.append("  (none)")
    received = sink.calls()
    lines.append(
        f"webhooks received by the local receiver: {len(received)} "
        f"({len(sink.idempotency_keys())} distinct Idempotency-Keys)"
    )
    changed = [
        (s, before.get(s["id"]))
        for s in simulator.state.sims()
        if before.get(s["id"]) != s["status"]["description"]
    ]
    lines.append("SIM status in the simulator now:")
    for sim, was in changed:
        lines.append(f"  SIM {sim['iccid']}: {was} → {sim['status']['description']}")
    if not changed:
        lines.append("  (no SIM changed)")
    suspended = sum(1 for s in simulator.state.sims() if s["status"]["id"] == 2)
    lines.append(f"SIMs suspended: {suspended}   SMS sent: {len(simulator.state.sms())}")
    command = shell_command()
    if changed:
        lines.append("why did that happen? (both read the demo's store, from this directory)")
        lines.append(f"  {command} why --sim {changed[0][0]['iccid']}")
        lines.append(f"  {command} status --store {DEMO_STORE}")
    print("\n".join(lines), flush=True)


def shell_command() -> str:
    """How to run `event-engine` from a shell in this directory, as it can be typed: the
    bare name when the shell would find this very installation, else the console script's
    path (`make demo` installs it in .venv/bin, which is not on PATH), else `python -m`."""
    executable = Path(sys.executable)
    script = executable.parent / "event-engine"
    if not script.is_file():
        return f"{shlex.quote(str(executable))} -m engine"
    found = shutil.which("event-engine")
    if found is not None and Path(found).resolve() == script.resolve():
        return "event-engine"
    try:
        shown = script.relative_to(Path.cwd())
    except ValueError:
        shown = script
    return shlex.quote(str(shown))
