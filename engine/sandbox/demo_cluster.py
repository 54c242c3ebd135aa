"""`make demo-cluster`: two engine instances and the simulator on a throw-away PostgreSQL;
the leader is killed halfway, the other takes over, and the summary shows how long nobody
polled and that no action ran twice.

    python -m engine.sandbox.demo_cluster [--duration 40] [--rate 10] [--seed 1]

The instances are real processes (`python -m engine run`) with the example rules, each
with its own log in the work folder; the simulator and a webhook receiver run in this
process. Before the kill a scenario gives every example rule something to do, and after
the takeover a second one lands on SIMs not touched before, so the new leader must poll
and act on it. PostgreSQL is the one `EVENT_ENGINE_TEST_POSTGRES` names, or else a
throw-away server started with the machine's initdb/pg_ctl (or one on 127.0.0.1:5432),
in a schema of its own that is dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from engine.commands.status import collect
from engine.demo import scenario
from engine.model import Intent, IntentStatus
from engine.sandbox.cluster import Cluster, ClusterError
from engine.sandbox.postgres import find
from engine.simulator import SimulatorConfig, SimulatorServer
from engine.simulator.webhook_sink import WebhookSink, WebhookSinkServer
from engine.store import StoreSettings, open_store
from engine.store.settings import PostgresSettings

REPO = Path(__file__).resolve().parents[2]
SIM_SUSPENDED, SIM_ACTIVATED, ENDPOINT_DISABLED = 9, 8, 43  # event types of status changes
API_SOURCE = 2
LOOKBACK = timedelta(seconds=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="demo-cluster",
        description="Two engine instances on a throw-away PostgreSQL; the leader is killed "
        "halfway and the other takes over. Prints the takeover time and checks that no "
        "action ran twice.",
    )
    parser.add_argument("--duration", type=float, default=40.0, help="seconds to run (default 40)")
    parser.add_argument(
        "--rate", type=float, default=10.0, help="generated events per second (default 10)"
    )
    parser.add_argument("--seed", type=int, default=1, help="the simulator's seed (default 1)")
    parser.add_argument("--rules", type=Path, default=REPO / "rules", help="rules (default rules/)")
    args = parser.parse_args(argv)
    if args.duration < 20:
        parser.error("--duration must be at least 20 seconds (a takeover takes up to ~13 s)")
    with tempfile.TemporaryDirectory(prefix="event-engine-demo-cluster-") as folder:
        try:
            return _run(Path(folder), args)
        except (ClusterError, TimeoutError) as error:
            _say(f"demo-cluster: {error}")
            return 1


def _run(folder: Path, args: argparse.Namespace) -> int:
    server = find(folder / "postgres")
    if isinstance(server, str):
        _say(f"demo-cluster: no PostgreSQL to run on: {server}")
        return 1
    try:
        with (
            server.fresh_schema() as url,
            SimulatorServer(SimulatorConfig(seed=args.seed, event_rate=args.rate)) as simulator,
            WebhookSinkServer() as sink_server,
        ):
            _say(f"PostgreSQL: {server.where}")
            return _demo(folder, url, server.password, simulator, sink_server.sink, args)
    finally:
        server.stop()


def _demo(
    folder: Path,
    url: str,
    password: str | None,
    simulator: SimulatorServer,
    sink: WebhookSink,
    args: argparse.Namespace,
) -> int:
    env = {f"{name}_WEBHOOK_URL": f"{sink.base_url}/hooks/{name.lower()}" for name in _HOOKS}
    env["ONCALL_WEBHOOK_TOKEN"] = "demo-oncall-token"
    env["EMNIFY_APPLICATION_TOKEN"] = simulator.application_token
    if password is not None:
        env["PGPASSWORD"] = password
    cluster = Cluster(
        folder / "cluster",
        store_url=url,
        api_url=simulator.base_url,
        rules=args.rules,
        size=2,
        extra_config={
            "sources": ["poller"],
            "poller": {"interval": "2s", "initial_lookback": f"{LOOKBACK.seconds}s"},
        },
        env=env,
    )
    half = args.duration / 2
    with cluster:
        began = time.monotonic()
        # What the first start acts on: events from `initial_lookback` before it (the
        # simulator stores some events late, with older times; those are left alone).
        since = datetime.now(UTC) - LOOKBACK + timedelta(seconds=1)
        cluster.start()
        first, _ = cluster.wait_for_leader(timeout=30)
        _say(f"{', '.join(cluster.names)} running; {first} leads (logs in {cluster.workdir})")
        simulator.state.store_events(scenario(simulator))
        _say("scenario 1 stored: a quota used up, a critical policy event, an activation, a block")
        _wait_until(began + half)
        _say(f"killing the leader {first} (SIGKILL)")
        cluster.kill(first)
        second, takeover = cluster.wait_for_leader(timeout=30, not_=first)
        _say(f"{second} took over after {takeover:.1f} s without a leader")
        fresh = _fresh_quota_events(simulator, already=scenario(simulator))
        simulator.state.store_events(fresh)
        _say(f"scenario 2 stored: {len(fresh)} quotas used up, for the new leader to act on")
        _wait_until(began + args.duration)
        # An action the killed leader had started is taken over once its claim runs out.
        _say("stopping the traffic; waiting for the last events and actions")
        unjudged = _settle(url, password, simulator, since, timeout=60)
        members = _members(url, password)
    return _summary(simulator, sink, url, password, (first, second, takeover), members, unjudged)


_HOOKS = ("OPS", "ONCALL", "CRM")


def _fresh_quota_events(
    simulator: SimulatorServer, already: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """ "Quota used up" for three active SIMs the first scenario did not touch."""
    touched = {event.get("sim_id") for event in already}
    active = [
        s for s in simulator.state.sims() if s["status"]["id"] == 1 and s["id"] not in touched
    ]
    return [{"event_type": {"id": 19}, "sim_id": sim["id"]} for sim in active[:3]]


def _wait_until(deadline: float) -> None:
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))


def _open(url: str, password: str | None) -> Any:
    if password is not None:
        os.environ["PGPASSWORD"] = password
    return open_store(StoreSettings(postgres=PostgresSettings(url), migrate=False))


def _settle(
    url: str, password: str | None, simulator: SimulatorServer, since: datetime, timeout: float
) -> int:
    """Until every event the simulator holds from `since` on was judged and no action is
    due undone (the survivor finishes what it took over); the simulator stops generating
    first. The number of those events not judged when `timeout` ran out."""
    simulator.state.set_event_rate(0)
    store = _open(url, password)
    try:
        deadline = time.monotonic() + timeout
        while True:
            ids = [
                int(e["id"])
                for e in simulator.state.events()
                if datetime.fromisoformat(e["timestamp"]) >= since
            ]
            unjudged = len(store.unseen(ids))
            done = not unjudged and not _unfinished(store.intents(limit=1_000_000))
            if done or time.monotonic() > deadline:
                return unjudged
            time.sleep(0.5)
    finally:
        store.close()


def _unfinished(intents: list[Intent]) -> list[Intent]:
    """The intents running, or pending and due by now (a follow-up waiting for its time is
    not unfinished; one the killed leader was running is, until its claim runs out)."""
    now = datetime.now(UTC)
    return [
        i
        for i in intents
        if i.status is IntentStatus.RUNNING
        or (i.status is IntentStatus.PENDING and (i.due_at is None or i.due_at <= now))
    ]


def _members(url: str, password: str | None) -> list[dict[str, Any]]:
    store = _open(url, password)
    try:
        members: list[dict[str, Any]] = collect(store, url)["members"]
        return members
    finally:
        store.close()


def _summary(
    simulator: SimulatorServer,
    sink: WebhookSink,
    url: str,
    password: str | None,
    failover: tuple[str, str, float],
    members: list[dict[str, Any]],
    unjudged: int,
) -> int:
    first, second, takeover = failover
    store = _open(url, password)
    try:
        audit = store.audit_rows(limit=1_000_000)
        intents = store.intents(limit=1_000_000)
    finally:
        store.close()
    judged = Counter(
        (row["event_id"], row["rule_id"]) for row in audit if row["outcome"] == "matched"
    )
    outcomes = Counter((intent.kind, intent.status.value) for intent in intents)
    unfinished = _unfinished(intents)
    changes = Counter(
        (event["event_type"]["id"], event["endpoint"]["id"])
        for event in simulator.state.events()
        if event["event_source"]["id"] == API_SOURCE
        and event["event_type"]["id"] in (SIM_SUSPENDED, SIM_ACTIVATED, ENDPOINT_DISABLED)
    )
    keys = sink.idempotency_keys()
    # An SMS is told apart by its endpoint and text (two blocks of one device send two).
    sms = Counter((m["endpoint"]["id"], m["payload"]) for m in simulator.state.sms())
    planned_sms = Counter(
        (i.target.get("endpoint_id"), i.params.get("payload"))
        for i in intents
        if i.kind == "send_sms" and i.status is IntentStatus.DONE
    )
    checks: list[tuple[str, bool, str]] = [
        ("every event judged", unjudged == 0, f"{unjudged} not judged"),
        (
            "each event judged once per rule",
            all(n == 1 for n in judged.values()),
            f"{len(judged)} matches, {sum(1 for n in judged.values() if n > 1)} judged twice",
        ),
        (
            "each SIM or endpoint status change made once",
            all(n == 1 for n in changes.values()),
            f"{sum(changes.values())} changes, "
            f"{sum(1 for n in changes.values() if n > 1)} repeated",
        ),
        (
            "webhooks: one Idempotency-Key per action",
            len(keys) == outcomes.get(("webhook", "done"), 0),
            f"{sum(keys.values())} calls, {len(keys)} distinct keys "
            f"({sum(n - 1 for n in keys.values())} redelivered with the same key)",
        ),
        (
            "SMS sent once per action",
            sms == planned_sms,
            f"{sum(sms.values())} sent for {sum(planned_sms.values())} actions, "
            f"{sum(max(0, n - planned_sms[key]) for key, n in sms.items())} more than planned",
        ),
        (
            "no action left behind",
            not unfinished and not any(status == "dead" for _, status in outcomes),
            ", ".join(f"{s} {n}" for s, n in _by_status(outcomes).items()),
        ),
        ("takeover within 15 s", takeover < 15, f"{takeover:.1f} s without a leader"),
    ]
    lines = ["", "── demo-cluster summary ─────────────────────────────────────────"]
    lines.append(f"leader {first} killed; {second} took over after {takeover:.1f} s")
    lines.append("members now: " + ", ".join(_member(m) for m in members))
    lines.append("actions (kind, outcome):")
    kinds = max((len(kind) for kind, _ in outcomes), default=0)
    for (kind, status), count in sorted(outcomes.items()):
        lines.append(f"  {kind:<{kinds}} {status:<10} {count}")
    for name, ok, detail in checks:
        lines.append(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    for intent in unfinished[:5]:
        lines.append(
            f"    unfinished: intent {intent.id} {intent.kind} {intent.status.value}, due "
            f"{intent.due_at:%H:%M:%S}, {intent.attempts} attempts, {intent.last_error or ''}"
            if intent.due_at is not None
            else f"    unfinished: intent {intent.id} {intent.kind} {intent.status.value}"
        )
    passed = all(ok for _, ok, _ in checks)
    lines.append("no action ran twice" if passed else "a check FAILED: see above")
    print("\n".join(lines), flush=True)
    return 0 if passed else 1


def _by_status(outcomes: Counter[tuple[str, str]]) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for (_, status), count in outcomes.items():
        totals[status] += count
    return dict(sorted(totals.items()))


def _member(member: dict[str, Any]) -> str:
    state = "leader" if member["leader"] else ("alive" if member["alive"] else "gone")
    return f"{member['instance']} ({state})"


_say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731


if __name__ == "__main__":
    sys.exit(main())
