"""N engine instances as child processes on one PostgreSQL store: what the cluster crash
harness, the cluster benchmarks and the tests run, and break on purpose.

Each instance is `python -m engine run --config <workdir>/<name>/config.yaml`, started as
an operator would start it, with its own HTTP port (health, metrics, the Data Streamer
ingress), its own log file (`<workdir>/<name>.log`, JSON lines, kept across restarts) and
its name as `cluster.instance_id`. The faults are the ones a cluster meets: a process
killed (SIGKILL), paused (SIGSTOP, as a stalled VM or a long GC) and resumed, stopped
(SIGTERM), or cut off the database (its connections ended by `pg_terminate_backend`; an
instance's connections carry `event-engine/<name>` as their `application_name`).

Who leads is read where the instances decide it, in the store's lease row, so a reader
never trusts an instance's own word about itself.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psycopg
import yaml

from engine.leadership import LEASE
from engine.store.postgres import application_name

# The simulator's application token (engine.simulator): instances log in with it unless
# `env` gives EMNIFY_APPLICATION_TOKEN.
SIMULATOR_TOKEN = "demo-application-token"
STREAMER_HEADER = "X-Emnify-Secret"
START_TIMEOUT = 30.0  # seconds an instance has to answer /healthz after its start
STOP_TIMEOUT = 15.0  # seconds a SIGTERM may take before the instance is killed


class ClusterError(RuntimeError):
    """An instance did not start, or the cluster was asked about one it does not have."""


class Cluster:
    """`size` engine instances ("node-1".."node-N") on the store at `store_url` (a
    postgresql:// URL without password: libpq takes it from PGPASSWORD in `env`), polling
    the emnify API at `api_url`, judging by the rule file `rules`. `extra_config` is merged
    into each instance's config (nested sections key by key), `env` into its environment,
    `instance_env[name]` into that one instance's (e.g. a webhook URL that says who calls).
    By default an instance runs the poller (on the leader only) and the Data Streamer
    ingress, whose secret is `streamer_secret` in the `STREAMER_HEADER` header."""

    def __init__(
        self,
        workdir: Path,
        *,
        store_url: str,
        api_url: str,
        rules: Path,
        size: int = 3,
        lease_ttl: str = "10s",
        extra_config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        instance_env: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one instance")
        self.workdir = workdir
        self.store_url = store_url
        self.names = [f"node-{n}" for n in range(1, size + 1)]
        self.streamer_secret = secrets.token_hex(16)
        self._env = {
            **os.environ,
            "EMNIFY_APPLICATION_TOKEN": SIMULATOR_TOKEN,
            "STREAMER_SECRET": self.streamer_secret,
            **(env or {}),
        }
        self._instance_env = {name: dict(values) for name, values in (instance_env or {}).items()}
        self._password = self._env.get("PGPASSWORD")
        self._ports = {name: _free_port() for name in self.names}
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._admin: psycopg.Connection[tuple[Any, ...]] | None = None
        self._admin_lock = threading.Lock()
        workdir.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            config = _merged(
                _base_config(name, store_url, api_url, rules.resolve(), lease_ttl),
                extra_config or {},
            )
            config.setdefault("http", {})["port"] = self._ports[name]
            folder = workdir / name
            folder.mkdir(exist_ok=True)
            (folder / "config.yaml").write_text(
                yaml.safe_dump(config, sort_keys=False), encoding="utf-8"
            )

    # -- the instances ----------------------------------------------------------------------

    def start(self, name: str | None = None) -> None:
        """Start every instance (or `name`) that is not running, and wait until each answers
        /healthz. ClusterError, with the end of its log, when one exits or stays silent."""
        starting = [n for n in self._named(name) if not self.alive(n)]
        for each in starting:
            with self.log_path(each).open("ab") as log:
                self._processes[each] = subprocess.Popen(
                    [sys.executable, "-m", "engine", "run", "--config", "config.yaml"],
                    cwd=self.workdir / each,
                    env={**self._env, **self._instance_env.get(each, {})},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        for each in starting:
            self._wait_healthy(each)

    def _wait_healthy(self, name: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        url = f"{self.http_url(name)}/healthz"
        while time.monotonic() < deadline:
            if not self.alive(name):
                raise ClusterError(f"{name} exited at its start:\n{self.log_tail(name)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise ClusterError(f"{name} did not answer {url} in {START_TIMEOUT:g}s")

    def http_url(self, name: str) -> str:
        """The instance's own HTTP server: /healthz, /readyz, /metrics, the ingress."""
        return f"http://127.0.0.1:{self._ports[self._known(name)]}"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{self._known(name)}.log"

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_path(name)
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def pid(self, name: str) -> int | None:
        process = self._processes.get(self._known(name))
        return process.pid if process is not None else None

    def alive(self, name: str) -> bool:
        """Whether its process runs (a paused one does)."""
        process = self._processes.get(self._known(name))
        return process is not None and process.poll() is None

    def kill(self, name: str) -> None:
        """SIGKILL: gone without a word, its lease left to run out."""
        process = self._running(name)
        process.kill()  # a paused one too
        process.wait()

    def pause(self, name: str) -> None:
        """SIGSTOP: the process stands still, holding its connections and its lease."""
        self._running(name).send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self._running(name).send_signal(signal.SIGCONT)

    def stop(self, name: str) -> int | None:
        """SIGTERM and wait; the exit code (None when it had to be killed)."""
        process = self._running(name)
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return None

    def close(self) -> None:
        """Stop every instance still running (SIGTERM, then SIGKILL) and let go of the store."""
        for name in self.names:
            if self.alive(name):
                self.stop(name)
        with self._admin_lock:
            if self._admin is not None:
                self._admin.close()
                self._admin = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- the store's view -------------------------------------------------------------------

    def leader(self) -> str | None:
        """The holder of the leader lease, as the store has it now: None while nobody holds
        a lease that has not run out."""
        row = self._query(
            "SELECT holder, expires_at FROM leases WHERE name = %s AND token > 0", (LEASE,)
        )
        if not row or row[0][0] is None:
            return None
        holder, expires_at = row[0]
        return str(holder) if expires_at >= datetime.now(UTC) else None

    def wait_for_leader(self, timeout: float, not_: str | None = None) -> tuple[str, float]:
        """Until an instance (other than `not_`) holds the lease, polled every 0.1 s: its
        name and the seconds waited. TimeoutError after `timeout` seconds."""
        began = time.monotonic()
        while True:
            with contextlib.suppress(psycopg.Error):
                holder = self.leader()
                if holder is not None and holder != not_:
                    return holder, time.monotonic() - began
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"no leader{f' but {not_}' if not_ else ''} in {timeout:g}s")
            time.sleep(0.1)

    def cut_database(self, name: str) -> int:
        """End every connection the instance has to the database (as a network cut or a
        database restart would); the number ended. Its pool connects again afterwards."""
        rows = self._query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND pid <> pg_backend_pid()",
            (application_name(self._known(name)),),
        )
        return sum(1 for (ended,) in rows if ended)

    def connections(self, name: str) -> int:
        """The instance's connections to the database now."""
        rows = self._query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name(self._known(name)),),
        )
        return int(rows[0][0])

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """One statement on the cluster's own connection (made again if it broke)."""
        with self._admin_lock:
            for attempt in (1, 2):
                if self._admin is None or self._admin.closed:
                    self._admin = psycopg.connect(
                        self.store_url,
                        password=self._password,
                        autocommit=True,
                        connect_timeout=5,
                        application_name="event-engine-sandbox",
                    )
                try:
                    return self._admin.execute(sql, params).fetchall()
                except psycopg.OperationalError:
                    self._admin.close()
                    self._admin = None
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    # -- names ------------------------------------------------------------------------------

    def _known(self, name: str) -> str:
        if name not in self.names:
            raise ClusterError(f"no instance {name!r} (the cluster has {', '.join(self.names)})")
        return name

    def _named(self, name: str | None) -> list[str]:
        return list(self.names) if name is None else [self._known(name)]

    def _running(self, name: str) -> subprocess.Popen[bytes]:
        process = self._processes.get(self._known(name))
        if process is None or process.poll() is not None:
            raise ClusterError(f"{name} is not running")
        return process


def _base_config(
    name: str, store_url: str, api_url: str, rules: Path, lease_ttl: str
) -> dict[str, Any]:
    return {
        "api": {"base_url": api_url, "application_token": "${EMNIFY_APPLICATION_TOKEN}"},
        "rules": str(rules),
        "store": {"url": store_url},
        "cluster": {"instance_id": name, "lease_ttl": lease_ttl},
        "sources": ["poller", "data_streamer"],
        "data_streamer": {"auth_header": STREAMER_HEADER, "secret": "${STREAMER_SECRET}"},
        "http": {"host": "127.0.0.1"},
        "log": {"level": "info", "format": "json"},
    }


def _merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, section by section (a value that is no section replaces)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
