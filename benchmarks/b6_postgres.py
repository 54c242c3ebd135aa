"""B6 PostgreSQL: catch-up and push ingestion with the store on PostgreSQL against SQLite.

Both stores are measured in the same run, round after round, each round running every
measure once (B1's reasoning: a machine whose speed drifts weighs on both alike), and each
ratio is the best round's, both of its rates from that round.
- catch-up: B2's, the real poller, client and pipeline polling a backlog from the simulator
  in its own process, every window committed under the leader lease's fence as the daemon
  commits it; the store a fresh SQLite file or a fresh PostgreSQL schema each round.
- push: the daemon (`python -m engine run`, its own process, through `engine.sandbox`'s
  `Cluster` of one) with only the Data Streamer ingress on, the 50 rules of B1 in dry run
  (each planned action is recorded in the outbox as a shadow intent, as every decision is
  audited, but nothing is dispatched: this measures taking events in, not calling out), fed
  deliveries of `records` events each by two senders over keep-alive connections (the
  ingress judges one delivery at a time; two keep it busy while the next one travels), from
  the first send to the last answer, every event answered as new.
Target: PostgreSQL at least half SQLite's events/s, for each.

PostgreSQL is `$EVENT_ENGINE_TEST_POSTGRES` or one `engine.sandbox.postgres.find` starts
(a throw-away server made with the machine's `initdb`, run without fsync) or finds on
127.0.0.1:5432; the line says which, and the server's fsync and synchronous_commit, since
they weigh on every commit. SQLite runs as the engine runs it: WAL, synchronous=NORMAL
(no fsync per commit either).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.b1_matching import best_round
from benchmarks.b2_catchup import engine_catch_up
from benchmarks.harness import Figure, Report, at_least, postgres, rules_file
from benchmarks.simulator_process import simulator_process
from engine.ports import Store
from engine.rules import RuleSet, load_rules
from engine.sandbox.cluster import STREAMER_HEADER, Cluster
from engine.sandbox.postgres import PostgresServer
from engine.simulator import FIRST_EVENT_ID, SimulatorConfig, SimulatorServer, generate_events
from engine.sources.streamer import INGEST_PATH
from engine.store import SqliteStore
from engine.store.postgres import PostgresStore

SHARE = 0.5
ROUNDS = 2
SENDERS = 2
STORES = ("SQLite", "PostgreSQL")


def server_settings(server: PostgresServer) -> str:
    """Where PostgreSQL runs and how it commits, for the report."""
    with server.connect() as connection:
        fsync = connection.execute("SHOW fsync").fetchone()
        synchronous = connection.execute("SHOW synchronous_commit").fetchone()
    assert fsync is not None and synchronous is not None
    return f"{server.where}, fsync={fsync[0]}, synchronous_commit={synchronous[0]}"


# -- catch-up ------------------------------------------------------------------------------


async def _catch_up_rounds(
    server: PostgresServer, backlog: int, days: float, rounds: int
) -> list[tuple[float, float]]:
    """(SQLite, PostgreSQL) events/s of each round's catch-up."""
    rules = load_rules(rules_file(50))
    rates: list[tuple[float, float]] = []
    with simulator_process(backlog, days) as base_url, tempfile.TemporaryDirectory() as tmp:
        for number in range(rounds):
            on_sqlite = SqliteStore(Path(tmp) / f"engine-{number}.sqlite3")
            sqlite_rate = await _one_catch_up(base_url, rules, days, backlog, on_sqlite)
            with server.fresh_schema() as url:
                on_postgres = PostgresStore(url, password=server.password)
                postgres_rate = await _one_catch_up(base_url, rules, days, backlog, on_postgres)
            rates.append((sqlite_rate, postgres_rate))
    return rates


async def _one_catch_up(
    base_url: str, rules: RuleSet, days: float, backlog: int, store: Store
) -> float:
    committed, seconds = await engine_catch_up(base_url, rules, days, store)
    if committed != backlog:
        raise RuntimeError(f"B6: the catch-up committed {committed:,} of {backlog:,} events")
    return committed / seconds


# -- push ----------------------------------------------------------------------------------


def deliveries(count: int, records: int, round_number: int) -> list[bytes]:
    """`count` events as Data Streamer bodies of `records` each; each round's ids apart
    from the others' (the daemon would drop a repeated id as seen)."""
    events = generate_events(
        count,
        seed=6,
        start=datetime.now(UTC),
        step_seconds=0.01,
        endpoints=1000,
        first_id=FIRST_EVENT_ID + 10**12 * (round_number + 1),
    )
    bodies: list[bytes] = []
    chunk: list[dict[str, Any]] = []
    for event in events:
        chunk.append(event)
        if len(chunk) == records:
            bodies.append(orjson.dumps(chunk))
            chunk = []
    if chunk:
        bodies.append(orjson.dumps(chunk))
    return bodies


async def push(base_url: str, secret: str, bodies: list[bytes], senders: int) -> tuple[int, float]:
    """(events answered as new, seconds) to POST every body, `senders` at a time."""
    queue = iter(bodies)
    headers = {STREAMER_HEADER: secret, "Content-Type": "application/json"}
    new = 0

    async def sender() -> None:
        nonlocal new
        async with httpx.AsyncClient(base_url=base_url, timeout=120.0) as http:
            for body in queue:
                response = await http.post(INGEST_PATH, content=body, headers=headers)
                response.raise_for_status()
                new += int(response.json()["new"])

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(senders)))
    return new, time.perf_counter() - started


@contextlib.contextmanager
def _daemons(server: PostgresServer, workdir: Path, api_url: str) -> Iterator[dict[str, Cluster]]:
    """One daemon on a SQLite file and one on a fresh PostgreSQL schema, both running."""
    rules = rules_file(50)
    config = {
        "sources": ["data_streamer"],
        "dry_run": True,
        "log": {"level": "warning"},
    }
    env = {"PGPASSWORD": server.password} if server.password else {}
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(server.fresh_schema())
        clusters = {
            "SQLite": Cluster(
                workdir / "sqlite",
                store_url=f"sqlite:{workdir / 'engine.sqlite3'}",
                api_url=api_url,
                rules=rules,
                size=1,
                extra_config=config,
            ),
            "PostgreSQL": Cluster(
                workdir / "postgres",
                store_url=url,
                api_url=api_url,
                rules=rules,
                size=1,
                extra_config=config,
                env=env,
            ),
        }
        for cluster in clusters.values():
            stack.callback(cluster.close)
            cluster.start()
        yield clusters


def _push_rounds(
    server: PostgresServer, events: int, records: int, rounds: int
) -> list[tuple[float, float]]:
    """(SQLite, PostgreSQL) events/s of each round's pushes."""
    rates: list[tuple[float, float]] = []
    simulator_config = SimulatorConfig(seed=6, endpoints=50, late_fraction=0.0)
    with (
        tempfile.TemporaryDirectory() as tmp,
        SimulatorServer(simulator_config) as simulator,
        _daemons(server, Path(tmp), simulator.base_url) as clusters,
    ):
        for number in range(rounds):
            bodies = deliveries(events, records, number)
            row: list[float] = []
            for name in STORES:
                cluster = clusters[name]
                # Each store's own ids within the round: both start from a store without them.
                new, seconds = asyncio.run(
                    push(cluster.http_url("node-1"), cluster.streamer_secret, bodies, SENDERS)
                )
                if new != events:
                    raise RuntimeError(f"B6: {name} took {new:,} of {events:,} pushed events")
                row.append(new / seconds)
            rates.append((row[0], row[1]))
    return rates


# -- the figures ---------------------------------------------------------------------------


def run(report: Report, *, backlog: int, days: float, pushed: int, records: int = 500) -> None:
    with postgres() as server:
        where = server_settings(server)
        caught_up = asyncio.run(_catch_up_rounds(server, backlog, days, ROUNDS))
        pushes = _push_rounds(server, pushed, records, ROUNDS)
    report.note(f"B6: PostgreSQL was {where}")
    for what, rates in (
        (f"catch-up of {backlog:,} events over {days:g} days", caught_up),
        (f"push, {pushed:,} events in deliveries of {records}, {SENDERS} senders", pushes),
    ):
        best = best_round([(on_postgres, on_sqlite) for on_sqlite, on_postgres in rates])
        report.add(
            Figure(
                "B6",
                f"{what} on PostgreSQL vs SQLite, {best.described()}",
                best.value,
                "events/s",
                "on SQLite",
                best.reference,
                f"≥ {SHARE:.0%} of SQLite's",
                at_least(best.value, best.reference, SHARE),
            )
        )
