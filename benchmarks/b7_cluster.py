"""B7 cluster: an outbox of webhook intents drained by 1, 2 and 3 instances on one
PostgreSQL, and the time without a leader when the leader is killed.

Drain: for each cluster size, on a fresh schema, the instances (`python -m engine run`
through `engine.sandbox`'s `Cluster`, the Data Streamer ingress their only source, so none
polls) start with an empty outbox; then this process plans `intents` webhook intents in one
batch (the real pipeline and store, one rule sending a webhook for every event) and waits
until none is open. The rate is the intents done over the span from the first attempt's
start to the last intent's finish, both read from the outbox, so neither the instances'
start nor their first idle tick (up to a second) counts. The receiver runs in a process of
its own (`benchmarks.receiver_process`) and answers 200 at once; its CPU per request is
reported beside the figures, to show it was not the bottleneck. The dispatch settings are
the engine's defaults (`actions.webhook_per_host` 2: every intent goes to the one
receiver) unless `per_host` is given. Target: 2 instances at least 1.6× one.

Failover: 3 instances with the engine's default lease settings, each running the poller
(on the leader) against the simulator; the leader is SIGKILLed `kills` times, each time at
a random point of its renewal cycle, and the time from the kill until another instance
holds the lease (read from the lease row every 0.1 s) is one sample; the killed instance
is started again as a standby. Targets: the longest ≤ 15 s, the median ≤ the lease TTL.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.b3_latency import cpu_seconds
from benchmarks.harness import Figure, Report, free_port, postgres
from benchmarks.receiver_process import receiver_process
from engine.leadership import DEFAULT_TTL
from engine.model import IntentStatus
from engine.pipeline import Pipeline
from engine.rules import load_rules
from engine.sandbox.cluster import Cluster
from engine.sandbox.postgres import PostgresServer
from engine.simulator import FIRST_EVENT_ID, SimulatorConfig, SimulatorServer, generate_events
from engine.store.postgres import PostgresStore

SCALING = 1.6
FAILOVER_MAX_S = 15.0
SIZES = (1, 2, 3)

_RULES = """\
rules:
  - id: every-event-to-the-receiver
    actions:
      - webhook:
          url: {receiver}/hooks/b7
          body: {{event_id: "{{{{ event.id }}}}"}}
"""
_OPEN = [IntentStatus.PENDING.value, IntentStatus.RUNNING.value]


@dataclass(frozen=True, slots=True)
class Drain:
    instances: int
    intents: int
    seconds: float
    receiver_cpu: float  # seconds of the receiver's CPU meanwhile
    instances_cpu: float  # seconds of the instances' CPU meanwhile, all together
    # Seconds of CPU of the instances' PostgreSQL server processes over their lives (None
    # when the server is not on this machine).
    database_cpu: float | None

    @property
    def rate(self) -> float:
        return self.intents / self.seconds


def fill_outbox(url: str, password: str | None, rules: Path, count: int, run: int) -> int:
    """Plan `count` webhook intents in one batch, as the pipeline plans them; how many.
    Each `run` has ids (and so Idempotency-Keys) of its own: the receiver counts them all."""
    store = PostgresStore(url, password=password)
    try:
        events = list(
            generate_events(
                count,
                seed=7,
                start=datetime.now(UTC),
                step_seconds=0.01,
                endpoints=1000,
                first_id=FIRST_EVENT_ID + 10**12 * run,
            )
        )
        result = Pipeline(load_rules(rules), store).process(events, source="data_streamer")
    finally:
        store.close()
    return result.intents_created


def drained(connection: psycopg.Connection[Any]) -> bool:
    row = connection.execute(
        "SELECT count(*) FROM outbox WHERE status = ANY(%s)", (_OPEN,)
    ).fetchone()
    return row is not None and row[0] == 0


def drain_span(connection: psycopg.Connection[Any]) -> tuple[int, float]:
    """(intents done, seconds from the first attempt's start to the last one's finish)."""
    row = connection.execute(
        "SELECT count(*), EXTRACT(EPOCH FROM max(o.updated_at)"
        " - (SELECT min(first_at) FROM intent_attempts)) FROM outbox o WHERE status = %s",
        (IntentStatus.DONE.value,),
    ).fetchone()
    assert row is not None
    return int(row[0]), float(row[1] or 0.0)


def drain(
    server: PostgresServer,
    workdir: Path,
    api_url: str,
    receiver_url: str,
    receiver_pid: int,
    *,
    instances: int,
    intents: int,
    per_host: int | None,
) -> Drain:
    rules = workdir / "rules.yaml"
    rules.write_text(_RULES.format(receiver=receiver_url), encoding="utf-8")
    extra: dict[str, Any] = {"sources": ["data_streamer"], "log": {"level": "warning"}}
    if per_host is not None:
        extra["actions"] = {"webhook_per_host": per_host}
    env = {"PGPASSWORD": server.password} if server.password else {}
    with (
        server.fresh_schema() as url,
        Cluster(
            workdir / f"drain-{instances}",
            store_url=url,
            api_url=api_url,
            rules=rules,
            size=instances,
            extra_config=extra,
            env=env,
        ) as cluster,
        psycopg.connect(url, password=server.password, autocommit=True) as connection,
    ):
        cluster.start()
        pids = [cluster.pid(name) for name in cluster.names]

        def instances_cpu() -> float:
            return sum(cpu_seconds(pid) or 0.0 for pid in pids if pid is not None)

        cpu_before = cpu_seconds(receiver_pid) or 0.0
        instances_before = instances_cpu()
        planned = fill_outbox(url, server.password, rules, intents, instances)
        if planned != intents:
            raise RuntimeError(f"B7: {planned:,} intents planned of {intents:,}")
        deadline = time.monotonic() + 60 + intents / 20
        while not drained(connection):
            if time.monotonic() > deadline:
                raise RuntimeError(f"B7: {instances} instance(s) did not drain the outbox")
            time.sleep(0.2)
        receiver_cpu = (cpu_seconds(receiver_pid) or 0.0) - cpu_before
        spent = instances_cpu() - instances_before
        database_cpu = _backends_cpu(connection)
        done, seconds = drain_span(connection)
    if done != intents:
        raise RuntimeError(f"B7: {done:,} of {intents:,} intents done")
    return Drain(instances, done, seconds, receiver_cpu, spent, database_cpu)


def _backends_cpu(connection: psycopg.Connection[Any]) -> float | None:
    """CPU seconds of the server processes serving the instances' connections."""
    rows = connection.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'event-engine/%'"
    ).fetchall()
    seconds = [cpu_seconds(int(pid)) for (pid,) in rows]
    if not seconds or any(s is None for s in seconds):
        return None
    return sum(s for s in seconds if s is not None)


def failover(
    server: PostgresServer, workdir: Path, api_url: str, kills: int, seed: int = 7
) -> list[float]:
    """Seconds without a leader after each of `kills` leader kills."""
    rules = workdir / "rules.yaml"
    rules.write_text(_RULES.format(receiver="http://127.0.0.1:9"), encoding="utf-8")
    ttl = DEFAULT_TTL.total_seconds()
    env = {"PGPASSWORD": server.password} if server.password else {}
    rng = random.Random(seed)
    gaps: list[float] = []
    with (
        server.fresh_schema() as url,
        Cluster(
            workdir / "failover",
            store_url=url,
            api_url=api_url,
            rules=rules,
            size=3,
            lease_ttl=f"{ttl:g}s",
            extra_config={"log": {"level": "warning"}},
            env=env,
        ) as cluster,
    ):
        cluster.start()
        for _ in range(kills):
            leader, _ = cluster.wait_for_leader(timeout=4 * ttl)
            # At a random point of the leader's renewal cycle (it renews every TTL / 3).
            time.sleep(rng.uniform(0, ttl / 3))
            killed_at = time.monotonic()
            cluster.kill(leader)
            cluster.wait_for_leader(timeout=4 * ttl, not_=leader)
            gaps.append(time.monotonic() - killed_at)
            cluster.start(leader)
    return gaps


def run(report: Report, *, intents: int, kills: int, per_host: int | None = None) -> None:
    """B7's drain figures, then the failover's."""
    with (
        postgres() as server,
        tempfile.TemporaryDirectory() as tmp,
        SimulatorServer(SimulatorConfig(seed=7, endpoints=50, late_fraction=0.0)) as simulator,
        receiver_process(free_port()) as receiver,
    ):
        drains = {
            n: drain(
                server,
                Path(tmp),
                simulator.base_url,
                receiver.url,
                receiver.pid,
                instances=n,
                intents=intents,
                per_host=per_host,
            )
            for n in SIZES
        }
        gaps = failover(server, Path(tmp), simulator.base_url, kills) if kills else []
    one = drains[1]
    slots = f"webhook_per_host {per_host}" if per_host else "default dispatch settings"
    for n in SIZES[1:]:
        drained_by = drains[n]
        report.add(
            Figure(
                "B7",
                f"{intents:,} webhook intents drained by {n} instances vs 1 ({slots})",
                drained_by.rate,
                "intents/s",
                "1 instance",
                one.rate,
                f"≥ {SCALING:g}× one instance" if n == 2 else None,
                drained_by.rate >= SCALING * one.rate if n == 2 else None,
            )
        )
    for drained_by in drains.values():
        report.add(
            Figure(
                "B7",
                f"instances' CPU per intent with {drained_by.instances} instance(s), "
                f"all together ({drained_by.instances_cpu / drained_by.seconds:.0%} of a core)",
                drained_by.instances_cpu / drained_by.intents * 1000,
                "ms",
            )
        )
        if drained_by.database_cpu is not None:
            report.add(
                Figure(
                    "B7",
                    f"PostgreSQL's CPU per intent with {drained_by.instances} instance(s) "
                    f"(their connections' server processes, start-up included)",
                    drained_by.database_cpu / drained_by.intents * 1000,
                    "ms",
                )
            )
    busiest = max(drains.values(), key=lambda d: d.rate)
    per_request = busiest.receiver_cpu / busiest.intents * 1000
    report.add(
        Figure(
            "B7",
            f"receiver CPU per request ({per_request * busiest.rate / 10:.0f}% of a core "
            f"at {busiest.instances} instances' {busiest.rate:,.0f}/s)",
            per_request,
            "ms",
        )
    )
    if receiver.counts and receiver.counts.get("keys") != receiver.counts.get("requests"):
        report.note(
            f"B7: the receiver got {receiver.counts['requests']:,} requests with "
            f"{receiver.counts['keys']:,} distinct Idempotency-Keys"
        )
    if gaps:
        ttl = DEFAULT_TTL.total_seconds()
        longest, median = max(gaps), statistics.median(gaps)
        each = ", ".join(f"{gap:.1f}" for gap in gaps)
        report.add(
            Figure(
                "B7",
                f"failover: longest time without a leader over {len(gaps)} leader kills "
                f"(SIGKILL), lease TTL {ttl:g} s (each: {each} s)",
                longest,
                "s",
                target=f"≤ {FAILOVER_MAX_S:g} s",
                passed=longest <= FAILOVER_MAX_S,
            )
        )
        report.add(
            Figure(
                "B7",
                f"failover: median time without a leader over {len(gaps)} leader kills",
                median,
                "s",
                "lease TTL",
                ttl,
                "≤ the lease TTL",
                median <= ttl,
            )
        )
