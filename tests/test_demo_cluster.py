"""`make demo-cluster`: two instances on PostgreSQL, the leader killed halfway; the demo
itself checks that the other took over within 15 s and that no action ran twice."""

from __future__ import annotations

import os
import subprocess
import sys

from psycopg.conninfo import make_conninfo

from engine.sandbox.postgres import ENV_DSN, PostgresServer


def test_the_cluster_demo_shows_the_takeover_and_that_no_action_ran_twice(
    postgres_server: PostgresServer,
) -> None:
    dsn = postgres_server.dsn
    if postgres_server.password is not None:
        dsn = make_conninfo(dsn, password=postgres_server.password)
    done = subprocess.run(
        [sys.executable, "-m", "engine.sandbox.demo_cluster", "--duration", "20"],
        env={**os.environ, ENV_DSN: dsn},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "took over after" in done.stderr
    assert "no action ran twice" in done.stdout
    for check in ("judged once", "status change made once", "Idempotency-Key", "SMS sent"):
        line = next(line for line in done.stdout.splitlines() if check in line)
        assert line.strip().startswith("ok"), line
