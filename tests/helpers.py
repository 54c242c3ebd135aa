"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import inspect
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from engine.config import Config, load_config
from engine.cron import check_crontab
from engine.daemon import Daemon, Summary
from engine.http.service import HttpService
from engine.rules import RuleSet, load_rules
from engine.simulator import SimulatorConfig, SimulatorServer
from engine.sources.poller import Poller, PollerSettings, PollerSource
from engine.sources.streamer import INGEST_PATH

TOKEN = SimulatorConfig().application_token  # what the simulator accepts


def write_rules(directory: Path, text: str, name: str = "rules.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def rules_from(directory: Path, text: str) -> RuleSet:
    """Rules loaded as the daemon loads them (schedules checked by the scheduler)."""
    return load_rules(write_rules(directory, text), cron=check_crontab)


def engine_config(tmp_path: Path, simulator: SimulatorServer) -> Config:
    config = load_config(None)
    return replace(
        config,
        api=replace(
            config.api,
            base_url=simulator.base_url,
            event_rate_limit=50.0,
            action_rate_limit=50.0,
            backoff_initial=0.01,
            backoff_max=0.05,
        ),
        store_path=tmp_path / "state" / "engine.sqlite3",
    ).with_source_settings(
        poller=replace(
            poller_settings(config),
            interval=timedelta(seconds=1),
            initial_lookback=timedelta(minutes=5),
        )
    )


def poller_settings(config: Config) -> PollerSettings:
    settings = config.source_settings[PollerSource.name]
    assert isinstance(settings, PollerSettings)
    return settings


def with_poller(config: Config, **changes: object) -> Config:
    """`config` with some of the poller's settings changed."""
    return config.with_source_settings(poller=replace(poller_settings(config), **changes))


def ingest_url(service: HttpService) -> str:
    """Where the Data Streamer source's route listens on `service`."""
    return service.base_url + INGEST_PATH


def poller_of(daemon: Daemon) -> Poller:
    """The daemon's poller, to poll once by hand (without running the daemon)."""
    source = daemon.source(PollerSource.name)
    assert isinstance(source, PollerSource)
    return source.poller


# -- the daemon with its HTTP server, for tests of /healthz, /readyz, /metrics, the ingress ----


@asynccontextmanager
async def running_daemon(daemon: Daemon) -> AsyncIterator[asyncio.Task[Summary]]:
    """Run `daemon` (with its services) in this loop until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        for service in daemon.services:
            url = getattr(service, "base_url", None)
            if url is not None:
                await eventually(lambda url=url: _answers(url + "/healthz"))
        yield task
    finally:
        stop.set()
        await task


async def _answers(url: str) -> bool:
    async with httpx.AsyncClient() as client:
        try:
            return (await client.get(url)).status_code == 200
        except httpx.TransportError:
            return False


async def eventually(
    condition: Callable[[], object], timeout: float = 10.0, every: float = 0.02
) -> None:
    """Wait until `condition()` (or the awaitable it returns) is truthy; fail after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition}")
        await asyncio.sleep(every)


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition (None when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


# Rules that count, wait and remember, for replay tests: a threshold with a throttle and a
# cancellable follow-up, and a throttled notice.
WINDOWED = """
rules:
  - id: quota-burst
    when: {type: 19}
    threshold: {count: 3, within: 10m, per: sim.iccid}
    throttle: {per: sim.iccid, for: 1h}
    actions:
      - suspend_sim: {}
      - after: 24h
        do: {activate_sim: {}}
        cancel_if: {when: {type: 8}}
  - id: blocked-notice
    when: {type: 11}
    throttle: {for: 30m}
    actions:
      - log: {message: "blocked {{ event.sim.iccid }}"}
"""


# A rule file of a few hundred bytes whose aliases would expand to 9**9 items ("billion
# laughs"); line 12 is where the expansion passes the bound.
BILLION_LAUGHS = """\
rules:
  - id: laughs
    when: {type: 19}
    condition:
      in:
        - x
        - - &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
          - &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
          - &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
          - &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
          - &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
          - &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
          - &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
          - &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
          - &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
    actions: [{log: {}}]
"""
