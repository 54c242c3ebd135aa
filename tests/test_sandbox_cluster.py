"""`engine.sandbox.cluster`: engine processes on one PostgreSQL store, started as an operator
starts them, that a harness can kill, pause and cut off the database, and whose leader it
reads from the store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.sandbox.cluster import STREAMER_HEADER, Cluster, ClusterError
from engine.sandbox.postgres import PostgresServer

from helpers import write_rules

RULES = """
rules:
  - id: suspend-on-quota
    when: {type: 19}
    actions: [{suspend_sim: {}}]
"""


@pytest.fixture
def cluster(
    tmp_path: Path, simulator, postgres_server: PostgresServer, postgres_url: str
) -> Iterator[Cluster]:
    env = {"PGPASSWORD": postgres_server.password} if postgres_server.password else {}
    with Cluster(
        tmp_path / "cluster",
        store_url=postgres_url,
        api_url=simulator.base_url,
        rules=write_rules(tmp_path, RULES),
        size=2,
        lease_ttl="3s",
        env=env,
    ) as started:
        yield started


def test_instances_start_on_their_own_ports_and_one_of_them_leads(cluster):
    cluster.start()
    assert cluster.names == ["node-1", "node-2"]
    assert cluster.http_url("node-1") != cluster.http_url("node-2")
    leader, _ = cluster.wait_for_leader(timeout=10)
    assert leader in cluster.names
    for name in cluster.names:
        assert httpx.get(f"{cluster.http_url(name)}/healthz").status_code == 200
        assert cluster.connections(name) >= 1  # named event-engine/<name> in the database
        assert '"event": "engine started"' in cluster.log_path(name).read_text()


def test_a_killed_leader_is_replaced_by_the_other_instance(cluster):
    cluster.start()
    first, _ = cluster.wait_for_leader(timeout=10)
    cluster.kill(first)
    assert not cluster.alive(first)
    second, waited = cluster.wait_for_leader(timeout=10, not_=first)
    assert second != first and waited <= 3 * 4 / 3 + 1.5  # the lease's run, then one round
    cluster.start(first)
    assert cluster.alive(first) and cluster.leader() == second


def test_an_instance_cut_off_the_database_connects_again(cluster):
    cluster.start()
    assert cluster.cut_database("node-2") >= 1
    answers = []
    deadline = time.monotonic() + 15
    while not answers or answers[-1] != 200:  # 503 while its pool connects again
        assert time.monotonic() < deadline, answers
        delivery = httpx.post(
            f"{cluster.http_url('node-2')}/ingest/data-streamer",
            json=[{"id": 1, "timestamp": "2025-05-01T10:00:00Z", "event_type": {"id": 3}}],
            headers={STREAMER_HEADER: cluster.streamer_secret},
            timeout=10,
        )
        answers.append(delivery.status_code)
        time.sleep(0.2)
    assert set(answers) <= {200, 503}
    assert cluster.stop("node-2") == 0
    cluster.start("node-2")
    assert cluster.connections("node-2") >= 1


def test_a_paused_instance_is_alive_and_a_stopped_one_says_how_it_ended(cluster):
    cluster.start("node-1")
    cluster.pause("node-1")
    assert cluster.alive("node-1")
    cluster.resume("node-1")
    assert cluster.stop("node-1") == 0 and not cluster.alive("node-1")
    with pytest.raises(ClusterError, match="node-1 is not running"):
        cluster.pause("node-1")
    with pytest.raises(ClusterError, match="no instance 'node-9'"):
        cluster.http_url("node-9")
