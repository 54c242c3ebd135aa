"""`event-engine demo`: the simulator, a webhook receiver and the engine, together on loopback.

The simulator generates a live mix of events; a short scripted scenario on top makes sure
every example rule gets something to do (a quota used up, a critical policy-control event,
a SIM activated through the API, an endpoint blocked). At the end the demo prints what the
engine polled, matched and did, and the SIM statuses as the simulator now holds them.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from engine import logging as engine_logging
from engine.config import load_config
from engine.daemon import Daemon, Summary, install_signal_handlers, stop_after
from engine.rules import load_rules
from engine.simulator import SimulatorConfig, SimulatorServer
from engine.simulator.webhook_sink import WebhookSink, WebhookSinkServer

_TOKEN_VARIABLE = "EMNIFY_APPLICATION_TOKEN"


def _scenario(simulator: SimulatorServer) -> list[dict[str, Any]]:
    """Events that exercise each example rule once."""
    sims = simulator.state.sims()
    plain = [s for s in sims if "vip" not in str(_endpoint_tags(simulator, s))]
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


def _endpoint_tags(simulator: SimulatorServer, sim: dict[str, Any]) -> object:
    endpoint = sim.get("endpoint") or {}
    if not endpoint.get("id"):
        return None
    return simulator.state.endpoint(endpoint["id"]).get("tags")


def run_demo(*, rules_path: Path, duration: timedelta, rate: float, seed: int) -> int:
    rules = load_rules(rules_path)
    engine_logging.configure("info", "console" if sys.stderr.isatty() else "auto")
    with (
        tempfile.TemporaryDirectory(prefix="event-engine-demo-") as workdir,
        SimulatorServer(SimulatorConfig(seed=seed, event_rate=rate)) as simulator,
        WebhookSinkServer() as sink_server,
    ):
        sink = sink_server.sink
        for name in ("OPS", "ONCALL", "CRM"):
            os.environ.setdefault(f"{name}_WEBHOOK_URL", f"{sink.base_url}/hooks/{name.lower()}")
        os.environ.setdefault("ONCALL_WEBHOOK_TOKEN", "demo-oncall-token")
        os.environ[_TOKEN_VARIABLE] = simulator.application_token
        config = load_config(None)
        config = replace(
            config,
            api=replace(config.api, base_url=simulator.base_url),
            rules=rules_path,
            store_path=Path(workdir) / "engine.sqlite3",
            poller=replace(
                config.poller,
                interval=timedelta(seconds=2),
                initial_lookback=timedelta(seconds=30),
            ),
        )
        _say(f"simulator: {simulator.base_url}  webhooks: {sink.base_url}/hooks/…")
        _say(
            f"rules: {len(rules.rules)} from {rules_path}; running for "
            + (f"{duration.total_seconds():.0f}s" if duration else "ever (Ctrl-C stops)")
        )
        before = {s["id"]: s["status"]["description"] for s in simulator.state.sims()}
        summary = asyncio.run(_run(config, rules, simulator, duration))
        _print_summary(summary, simulator, sink, before)
    return 0


async def _run(config: Any, rules: Any, simulator: SimulatorServer, duration: timedelta) -> Summary:
    daemon = Daemon(config, rules, config.application_token())
    stop = asyncio.Event()
    install_signal_handlers(stop)

    async def inject_scenario() -> None:
        await asyncio.sleep(1.0)
        simulator.state.store_events(_scenario(simulator))

    scenario = asyncio.create_task(inject_scenario())
    timer = asyncio.create_task(stop_after(stop, duration or None))
    summary = await daemon.run(stop)
    timer.cancel()
    scenario.cancel()
    return summary


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _print_summary(
    summary: Summary, simulator: SimulatorServer, sink: WebhookSink, before: dict[int, str]
) -> None:
    lines = ["", "── demo summary ──────────────────────────────────────────────"]
    lines.append(
        f"polls: {summary.polls}   events polled: {summary.events_polled}   "
        f"new events evaluated: {summary.new_events}"
    )
    lines.append("rules matched:")
    for rule_id, count in sorted(summary.matches_by_rule.items()):
        lines.append(f"  {rule_id:<40} {count}")
    if not summary.matches_by_rule:
        lines.append("  (none)")
    lines.append("actions (kind, outcome):")
    for (kind, outcome), count in sorted(summary.actions.items()):
        lines.append(f"  {kind:<18} {outcome:<12} {count}")
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
    print("\n".join(lines), flush=True)
