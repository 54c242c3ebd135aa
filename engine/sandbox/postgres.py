"""A PostgreSQL server for the tests, the crash harnesses and the benchmarks, found or
started once per session.

In this order:
1. `EVENT_ENGINE_TEST_POSTGRES`, a DSN, when set (its password, if it holds one, is taken
   out of it and given to the stores the way the engine takes it: apart from the URL);
   `off` means none;
2. a throw-away server made with the machine's `initdb` and `pg_ctl` (on PATH, or Debian's
   `/usr/lib/postgresql/*/bin`) in a temp folder, on a free port, with password
   authentication over TCP, stopped at the end (as root, run as the `postgres` user, since
   initdb refuses root);
3. a server already listening on 127.0.0.1:5432 that lets `postgres` in without a password
   (a developer's, or the one a CI machine runs): a database of its own is made for the
   session and dropped at the end.
When none of these works, `find` says why, and the PostgreSQL tests are skipped (failed
under CI, where `CI` is set).

Each test gets a schema of its own in that database (`fresh_schema`), dropped after it: a
database per test would cost a second each.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
from psycopg.conninfo import conninfo_to_dict

ENV_DSN = "EVENT_ENGINE_TEST_POSTGRES"
_LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
_TEST_PASSWORD = "engine-tests-" + secrets.token_hex(8)


@dataclass
class PostgresServer:
    """Where the session's tests find PostgreSQL. `dsn` holds no password; `password` is
    given beside it. `checks_passwords`: whether a wrong password is refused (a server that
    trusts local connections takes any)."""

    dsn: str
    password: str | None
    where: str
    checks_passwords: bool
    stop: Callable[[], None] = field(default=lambda: None)
    # The server's data folder and pg_ctl, when the session started it (tests may stop it).
    pg_ctl: list[str] | None = None

    def connect(self, **extra: Any) -> psycopg.Connection[tuple[Any, ...]]:
        """An autocommit connection to the server's database (`extra`: libpq parameters)."""
        return psycopg.connect(self.dsn, password=self.password, autocommit=True, **extra)

    def address(self) -> tuple[str, int]:
        """The server's TCP host and port."""
        params = conninfo_to_dict(self.dsn)
        return str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)

    def url(self, **params: str) -> str:
        """The DSN, as a postgresql:// URL (as `store.url` takes it), with more parameters."""
        return _url({**conninfo_to_dict(self.dsn), **params})

    @contextlib.contextmanager
    def fresh_schema(self) -> Iterator[str]:
        """A DSN whose tables land in a new, empty schema, dropped afterwards."""
        name = "test_" + secrets.token_hex(6)
        with self.connect() as admin:
            admin.execute(f"CREATE SCHEMA {name}")
        try:
            yield self.url(options=f"-csearch_path={name}")
        finally:
            with self.connect() as admin:
                admin.execute(f"DROP SCHEMA {name} CASCADE")


def _url(params: dict[str, Any]) -> str:
    """Connection parameters as a postgresql:// URL."""
    rest = {k: str(v) for k, v in params.items() if v is not None}
    user = quote(rest.pop("user", "postgres"), safe="")
    host = quote(rest.pop("host", "127.0.0.1"), safe="")
    port = rest.pop("port", "5432")
    database = quote(rest.pop("dbname", "postgres"), safe="")
    query = urlencode(rest)
    return f"postgresql://{user}@{host}:{port}/{database}" + (f"?{query}" if query else "")


def find(folder: Path) -> PostgresServer | str:
    """A server for the session, or why there is none."""
    reasons: list[str] = []
    if os.environ.get(ENV_DSN) == "off":
        return f"{ENV_DSN}=off"
    if os.environ.get(ENV_DSN):
        return _given(os.environ[ENV_DSN])
    found = _throw_away(folder, reasons)
    if found is not None:
        return found
    found = _local(reasons)
    if found is not None:
        return found
    return "; ".join(reasons)


def _given(dsn: str) -> PostgresServer | str:
    params = conninfo_to_dict(dsn)
    password = params.pop("password", None)
    clean = _url(params)
    server = PostgresServer(clean, str(password) if password else None, f"${ENV_DSN}", False)
    try:
        with server.connect(connect_timeout=5):
            pass
    except psycopg.Error as error:
        return f"${ENV_DSN} does not connect: {str(error).splitlines()[0]}"
    return server


def _binaries() -> tuple[str, str] | None:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(f"{folder}/initdb", os.X_OK) and os.access(f"{folder}/pg_ctl", os.X_OK):
            return f"{folder}/initdb", f"{folder}/pg_ctl"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _throw_away(folder: Path, reasons: list[str]) -> PostgresServer | None:
    binaries = _binaries()
    if binaries is None:
        reasons.append("no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin")
        return None
    initdb, pg_ctl = binaries
    run_as: list[str] = []
    # Outside pytest's folder: the server's user must reach it, and a socket path is short.
    home = Path(tempfile.mkdtemp(prefix="event-engine-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            reasons.append("running as root and there is no `postgres` user to run initdb as")
            return None
        os.chown(home, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    password_file = home / "password"
    password_file.write_text(_TEST_PASSWORD + "\n")
    if run_as:
        os.chown(password_file, pwd.getpwnam("postgres").pw_uid, -1)
    data = home / "data"
    init = subprocess.run(
        [*run_as, initdb, "-D", str(data), "-U", "postgres", "-E", "UTF8", "--no-sync",
         "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={password_file}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if init.returncode != 0:
        reasons.append(f"initdb failed: {init.stderr.strip().splitlines()[-1:]}")
        shutil.rmtree(home, ignore_errors=True)
        return None
    port = _free_port()
    # Durability is not what the tests check: without fsync the server is much faster.
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off"
    control = [*run_as, pg_ctl, "-D", str(data), "-l", str(home / "log")]
    start = subprocess.run(
        [*control, "-o", options, "-w", "-t", "60", "start"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    if start.returncode != 0:
        log = (home / "log").read_text(errors="replace") if (home / "log").exists() else ""
        reasons.append(f"pg_ctl start failed: {(start.stderr or log).strip()[-300:]}")
        shutil.rmtree(home, ignore_errors=True)
        return None

    def stop() -> None:
        subprocess.run([*control, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)

    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    where = f"a throw-away server ({Path(initdb).parent}, port {port})"
    return PostgresServer(dsn, _TEST_PASSWORD, where, True, stop, [*control, "-o", options])


def _local(reasons: list[str]) -> PostgresServer | None:
    try:
        admin = psycopg.connect(_LOCAL_DSN, autocommit=True, connect_timeout=3)
    except psycopg.Error as error:
        reasons.append(f"nothing usable on 127.0.0.1:5432 ({str(error).splitlines()[0]})")
        return None
    name = f"event_engine_test_{os.getpid()}_{secrets.token_hex(3)}"
    with admin:
        admin.execute(f"CREATE DATABASE {name}")

    def stop() -> None:
        with psycopg.connect(_LOCAL_DSN, autocommit=True) as again:
            again.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    dsn = f"postgresql://postgres@127.0.0.1:5432/{name}"
    return PostgresServer(dsn, None, f"the server on 127.0.0.1:5432 (database {name})", False, stop)


class TcpProxy:
    """A TCP relay on loopback to the server, which a test can cut (every connection dropped
    and new ones refused, as when the database goes down) and restore."""

    def __init__(self, host: str, port: int):
        self._target = (host, port)
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = self._listen(0)
        self.port = int(self._listener.getsockname()[1])

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(16)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return listener

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        # shutdown, not only close: an accept() waiting in its thread would take one more.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            dropped, self._open = self._open, []
        for end in dropped:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def restore(self) -> None:
        self._listener = self._listen(self.port)

    def close(self) -> None:
        self.cut()
