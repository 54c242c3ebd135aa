"""`deploy/compose.yaml`: PostgreSQL and two engine instances with health checks. Docker is
not needed to check it: the file's wiring is read as compose would read it, and the config
its instances run with is run here, as two engine processes on a real PostgreSQL against
the simulator, until both are ready and one of them leads."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from engine.commands.status import collect
from engine.sandbox.postgres import PostgresServer
from engine.simulator import SimulatorServer
from engine.store import StoreSettings, open_store
from engine.store.settings import PostgresSettings

from helpers import TOKEN

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
CLUSTER_CONFIG = DEPLOY / "config.cluster.yaml"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def _engines(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def test_compose_runs_postgres_and_two_engine_instances_built_from_the_dockerfile() -> None:
    compose = _compose()
    engines = _engines(compose)
    assert sorted(engines) == ["engine-1", "engine-2"]
    assert compose["services"]["postgres"]["image"].startswith("postgres:")
    # Each instance has its own hostname (its instance id is hostname-pid) and host port.
    assert len({e["hostname"] for e in engines.values()}) == 2
    published = [port for e in engines.values() for port in e["ports"]]
    assert len(set(published)) == 2
    assert all(port.startswith("127.0.0.1:") for port in published)
    assert (DEPLOY / compose["services"]["engine-1"]["build"]["dockerfile"]).name == "Dockerfile"


def test_the_instances_start_once_postgres_is_healthy_and_check_their_readiness() -> None:
    compose = _compose()
    postgres = compose["services"]["postgres"]
    assert "pg_isready" in postgres["healthcheck"]["test"]
    for name, engine in _engines(compose).items():
        assert engine["depends_on"]["postgres"]["condition"] == "service_healthy", name
        check = " ".join(engine["healthcheck"]["test"])
        assert "http://127.0.0.1:8080/readyz" in check, name
        assert engine["healthcheck"]["start_period"]


def test_the_database_password_is_a_compose_secret_never_a_value_in_the_file() -> None:
    compose = _compose()
    secret = compose["secrets"]["engine-db-password"]["file"]
    assert secret == "./engine-db-password"
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        for key, value in environment.items():
            if "PASSWORD" in key:
                assert key.endswith("_FILE") and value.startswith("/run/secrets/"), (name, key)
        assert "engine-db-password" in service["secrets"], name
    config = yaml.safe_load(CLUSTER_CONFIG.read_text(encoding="utf-8"))
    assert config["store"]["password"] == "${ENGINE_DB_PASSWORD}"
    assert "@postgres:5432/" in config["store"]["url"]  # the compose service's name
    ignored = (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    assert "deploy/engine-db-password" in ignored and "deploy/event-engine.env" in ignored


def test_every_instance_mounts_the_cluster_config_where_the_image_reads_it() -> None:
    for name, engine in _engines(_compose()).items():
        mounts = engine["volumes"]
        assert "./config.cluster.yaml:/etc/event-engine/config.yaml:ro" in mounts, name
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert '"/etc/event-engine/config.yaml"' in dockerfile  # the image's CMD
    assert "EXPOSE 8080" in dockerfile


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_two_instances_on_the_cluster_config_share_postgres_and_one_of_them_leads(
    tmp_path: Path,
    simulator: SimulatorServer,
    postgres_server: PostgresServer,
    postgres_settings: PostgresSettings,
) -> None:
    text = CLUSTER_CONFIG.read_text(encoding="utf-8")
    text = text.replace("https://cdn.emnify.net", simulator.base_url)
    text = text.replace("/etc/event-engine/rules", str(ROOT / "rules"))
    text = text.replace("postgresql://engine@postgres:5432/engine", postgres_settings.url)
    text = text.replace("host: 0.0.0.0", "host: 127.0.0.1")
    password = postgres_server.password or "unused: the server trusts loopback"
    (tmp_path / "db-password").write_text(password + "\n", encoding="utf-8")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EMNIFY_APPLICATION")},
        "EMNIFY_APPLICATION_TOKEN": TOKEN,
        "ENGINE_DB_PASSWORD_FILE": str(tmp_path / "db-password"),
        **{f"{name}_WEBHOOK_URL": "http://127.0.0.1:9/hook" for name in ("OPS", "ONCALL", "CRM")},
        "ONCALL_WEBHOOK_TOKEN": "t",
    }
    processes: list[subprocess.Popen[bytes]] = []
    urls = []
    try:
        for number in (1, 2):
            port = _free_port()
            config = tmp_path / f"engine-{number}.yaml"
            config.write_text(text.replace("port: 8080", f"port: {port}"), encoding="utf-8")
            log = (tmp_path / f"engine-{number}.log").open("wb")
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "engine", "run", "--config", str(config)],
                    cwd=tmp_path,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
            urls.append(f"http://127.0.0.1:{port}/readyz")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(_ready(url) for url in urls):
            assert all(p.poll() is None for p in processes), _logs(tmp_path)
            time.sleep(0.2)
        assert all(_ready(url) for url in urls), _logs(tmp_path)
        store = open_store(StoreSettings(postgres=postgres_settings, migrate=False))
        try:
            members = collect(store, "shared", now=None)["members"]
        finally:
            store.close()
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=20) for process in processes]
    assert len(members) == 2, members
    assert [m["leader"] for m in members] == [True, False]
    assert codes == [0, 0], _logs(tmp_path)


def _logs(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.glob("engine-*.log")))
