"""The event-type catalog: fetched from `GET /api/v1/event/type` (the simulator), merged over
the bundled list, kept when the API fails, and what rule names resolve through."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from structlog.testing import capture_logs

from engine.catalog_refresh import META_KEY, CatalogRefresh
from engine.clock import FixedClock
from engine.daemon import Daemon
from engine.emnify import ClientSettings, EmnifyClient
from engine.errors import RuleSetError
from engine.rules import EventTypeCatalog, load_rules
from engine.simulator import SimulatorConfig, SimulatorServer
from engine.simulator.fault_rules import FaultRule
from engine.startup import load_rules_and_services
from engine.store import SqliteStore

from helpers import TOKEN, engine_config, write_rules

ONLY_THE_API_KNOWS = {90: "Satellite handover"}

HANDOVER_RULE = """
rules:
  - id: log-handovers
    when: {type: "Satellite handover"}
    actions: [{log: {message: "handover"}}]
"""


@pytest.fixture
def platform() -> Iterator[SimulatorServer]:
    """A simulator whose API lists an event type the engine's bundled list lacks."""
    config = SimulatorConfig(seed=3, endpoints=2, extra_event_types=ONLY_THE_API_KNOWS)
    with SimulatorServer(config) as server:
        yield server


def _api(simulator: SimulatorServer) -> ClientSettings:
    return ClientSettings(
        base_url=simulator.base_url, max_retries=1, backoff_initial=0.01, backoff_max=0.02
    )


def _fail_event_types(simulator: SimulatorServer) -> None:
    simulator.state.set_faults([FaultRule.parse({"path": "^/api/v1/event/type", "kind": "503"})])


def _type_requests(simulator: SimulatorServer) -> list[int | None]:
    """Statuses of the event-type calls, once the log settles (a request is logged just
    after its answer went out)."""
    seen = simulator.state.requests()
    for _ in range(20):
        time.sleep(0.02)
        now = simulator.state.requests()
        if len(now) == len(seen):
            break
        seen = now
    return [r.status for r in seen if r.path == "/api/v1/event/type"]


async def test_the_catalog_is_fetched_from_the_api_and_merged_over_the_bundled_one(platform):
    catalog = CatalogRefresh()
    assert catalog.catalog.id_of("Satellite handover") is None
    async with EmnifyClient(TOKEN, _api(platform)) as client:
        current = await catalog.refresh(client)
    assert current.id_of("satellite handover") == 90
    assert current.id_of("Quota used up") == 19  # the bundled names are still there
    assert len(current) == len(EventTypeCatalog.bundled()) + 1
    assert catalog.source == "api" and catalog.fetched_at is not None
    assert _type_requests(platform) == [200]


async def test_the_bundled_list_stays_when_the_api_fails(platform):
    _fail_event_types(platform)
    catalog = CatalogRefresh()
    with capture_logs() as logs:
        async with EmnifyClient(TOKEN, _api(platform)) as client:
            current = await catalog.refresh(client)
    assert current is catalog.catalog
    assert catalog.source == "bundled"
    assert current.id_of("Satellite handover") is None and current.id_of("Quota used up") == 19
    assert _type_requests(platform) == [503, 503]  # the first try and one retry
    (warning,) = [e for e in logs if e["log_level"] == "warning" and "catalog" in e["event"]]
    assert "using the bundled list" in warning["event"] and "HTTP 503" in warning["error"]


async def test_the_last_fetched_list_stays_when_a_later_refresh_fails(platform):
    catalog = CatalogRefresh()
    async with EmnifyClient(TOKEN, _api(platform)) as client:
        await catalog.refresh(client)
        _fail_event_types(platform)
        with capture_logs() as logs:
            current = await catalog.refresh(client)
    assert current.id_of("Satellite handover") == 90
    assert any("using the last fetched list" in e["event"] for e in logs)


async def test_rule_names_resolve_through_the_fetched_catalog(tmp_path, platform):
    path = write_rules(tmp_path, HANDOVER_RULE)
    with pytest.raises(RuleSetError, match="unknown event type `Satellite handover`"):
        load_rules(path)  # the bundled list alone does not know it
    rules, services = await load_rules_and_services(path, _api(platform), TOKEN, watch=False)
    rule = rules.get("log-handovers")
    assert rule is not None and rule.when.type_ids == {90}
    assert rule.when.type_labels == ("90 (Satellite handover)",)
    # A reload resolves through the same catalog.
    assert services.reloader.path == path
    daemon = Daemon(engine_config(tmp_path, platform), rules, TOKEN, services=services.all())
    try:
        services.reloader.attach(daemon.pipeline)
        changes = await services.reloader.reload("test")
    finally:
        await daemon.aclose()
    assert changes is not None and not changes.any


async def test_rules_that_need_the_api_names_fail_to_load_when_it_is_down(tmp_path, platform):
    _fail_event_types(platform)
    path = write_rules(tmp_path, HANDOVER_RULE)
    with pytest.raises(RuleSetError) as caught:
        await load_rules_and_services(path, _api(platform), TOKEN, watch=False)
    assert str(caught.value).startswith(f"{path}:4: rule `log-handovers` → when: unknown event")


async def test_the_daemon_looks_hourly_and_does_not_fetch_a_list_fetched_at_start_up_again(
    tmp_path, platform
):
    path = write_rules(tmp_path, "rules:\n  - id: r\n    actions: [{log: {}}]\n")
    config = engine_config(tmp_path, platform)
    config = replace(config, api=replace(config.api, max_retries=1))
    rules, services = await load_rules_and_services(path, config.api, TOKEN, watch=False)
    daemon = Daemon(config, rules, TOKEN, services=services.all())
    try:
        await services.catalog.start(daemon)  # fetched at start-up already: no second fetch
        await services.reloader.start(daemon)
        assert _type_requests(platform) == [200]
        job = daemon.scheduler.get_job("event-type-catalog")
        assert job is not None and job.trigger.interval == timedelta(hours=1)
        with capture_logs() as logs:
            await job.func()  # what the hourly look does: the list is fresh, nothing changes
            assert not any(e["event"].startswith("rules reloaded") for e in logs)
    finally:
        await services.reloader.stop()
        await services.catalog.stop()
        await daemon.aclose()
    assert _type_requests(platform) == [200]
    shared = orjson.loads(SqliteStore(config.store_path).get_meta(META_KEY))
    assert {"id": 90, "description": "Satellite handover"} in shared["types"]


# -- once per cluster: the leader fetches, the others take its list from the store ----------


@dataclass
class _Instance:
    """What the refresh needs of its daemon: the shared store, a client, whether it leads."""

    store: SqliteStore
    client: EmnifyClient
    leading: bool
    scheduler: AsyncIOScheduler = field(default_factory=AsyncIOScheduler)


async def _look(catalog: CatalogRefresh, instance: _Instance) -> None:
    """Start the refresh on `instance` and run its hourly job once."""
    await catalog.start(instance)
    job = instance.scheduler.get_job("event-type-catalog")
    await job.func()


async def test_an_instance_that_does_not_lead_takes_the_leaders_list_from_the_store(
    tmp_path, platform
):
    store = SqliteStore(tmp_path / "shared.sqlite3")
    clock = FixedClock(datetime(2026, 12, 5, 8, tzinfo=UTC))
    async with EmnifyClient(TOKEN, _api(platform)) as client:
        leader = CatalogRefresh(clock=clock)
        await leader.refresh(client)
        await _look(leader, _Instance(store, client, leading=True))
        follower = CatalogRefresh(clock=clock)
        heard: list[EventTypeCatalog] = []
        follower.on_change(heard.append)
        await _look(follower, _Instance(store, client, leading=False))
    assert _type_requests(platform) == [200]  # the leader's one fetch
    assert follower.catalog.name_of(90) == "Satellite handover"
    assert follower.fetched_at == clock.now and follower.source == "api"
    assert len(heard) == 1


async def test_the_leader_fetches_again_once_the_list_is_a_day_old_and_the_others_follow(
    tmp_path, platform
):
    store = SqliteStore(tmp_path / "shared.sqlite3")
    clock = FixedClock(datetime(2026, 12, 5, 8, tzinfo=UTC))
    async with EmnifyClient(TOKEN, _api(platform)) as client:
        leader, follower = CatalogRefresh(clock=clock), CatalogRefresh(clock=clock)
        await leader.refresh(client)
        await follower.refresh(client)  # each fetches once as it starts
        leading, standing_by = _Instance(store, client, True), _Instance(store, client, False)
        await _look(leader, leading)
        await _look(follower, standing_by)
        clock.advance(timedelta(hours=23))
        await leading.scheduler.get_job("event-type-catalog").func()
        await standing_by.scheduler.get_job("event-type-catalog").func()
        assert _type_requests(platform) == [200, 200]  # not a day old yet
        clock.advance(timedelta(hours=1))
        await standing_by.scheduler.get_job("event-type-catalog").func()  # stale, not leading
        assert _type_requests(platform) == [200, 200]
        await leading.scheduler.get_job("event-type-catalog").func()
        await standing_by.scheduler.get_job("event-type-catalog").func()
    assert _type_requests(platform) == [200, 200, 200]
    assert leader.fetched_at == follower.fetched_at == clock.now
    stored = orjson.loads(store.get_meta(META_KEY))
    assert datetime.fromisoformat(stored["fetched_at"]) == clock.now


async def test_a_leader_whose_fetch_failed_at_start_up_fetches_at_its_first_look(
    tmp_path, platform
):
    store = SqliteStore(tmp_path / "shared.sqlite3")
    _fail_event_types(platform)
    async with EmnifyClient(TOKEN, _api(platform)) as client:
        leader = CatalogRefresh()
        await leader.refresh(client)
        assert leader.source == "bundled"
        platform.state.set_faults([])
        instance = _Instance(store, client, leading=True)
        await leader.start(instance)
        job = instance.scheduler.get_job("event-type-catalog")
        assert job.next_run_time <= datetime.now(UTC)  # at once, not in an hour
        await job.func()
    assert leader.source == "api" and leader.catalog.name_of(90) == "Satellite handover"
    assert store.get_meta(META_KEY) is not None


async def test_an_unreadable_shared_list_is_passed_over_with_a_warning(tmp_path, platform):
    store = SqliteStore(tmp_path / "shared.sqlite3")
    store.set_meta(META_KEY, '{"fetched_at": "yesterday", "types": [')
    async with EmnifyClient(TOKEN, _api(platform)) as client:
        follower = CatalogRefresh()
        with capture_logs() as logs:
            await _look(follower, _Instance(store, client, leading=False))
        leader = CatalogRefresh()
        await _look(leader, _Instance(store, client, leading=True))
    assert follower.source == "bundled"
    assert any("unreadable" in e["event"] for e in logs)
    assert leader.source == "api"  # it fetched anew, and shared its list over the broken one
    assert "Satellite handover" in store.get_meta(META_KEY)


async def test_a_refresh_with_new_names_tells_its_listeners(platform):
    catalog = CatalogRefresh()
    heard: list[EventTypeCatalog] = []
    catalog.on_change(heard.append)
    async with EmnifyClient(TOKEN, _api(platform)) as client:
        await catalog.refresh(client)
        await catalog.refresh(client)  # the same names again: nothing to tell
    assert [c.id_of("Satellite handover") for c in heard] == [90]


def test_run_starts_with_a_rule_that_names_a_type_only_the_api_knows_and_logs_in_once(
    tmp_path, platform
):
    rules = write_rules(tmp_path, HANDOVER_RULE)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"api:\n  base_url: {platform.base_url}\nrules: {rules}\n"
        f"store:\n  path: {tmp_path / 'state.sqlite3'}\n"
        # At debug: a poll that finds nothing new says "poll done" only there.
        "log:\n  format: json\n  level: debug\n"
        "http:\n  port: 0\npoller:\n  initial_lookback: 60s\n",
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "run", "--config", str(config)],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "EMNIFY_APPLICATION_TOKEN": TOKEN},
    )
    assert process.stderr is not None
    started = False
    deadline = time.monotonic() + 30
    lines: list[str] = []
    try:
        while time.monotonic() < deadline and process.poll() is None:
            line = process.stderr.readline()
            lines.append(line)
            started = started or '"engine started"' in line
            if '"poll done"' in line:  # the poll has fetched events, logged in
                break
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=15)
    output = "".join(lines) + rest
    assert started, output
    assert '"event-type catalog fetched"' in output
    assert process.returncode == 0, output
    # The catalog is fetched with the daemon's own client: one login for both.
    logins = [r for r in platform.state.requests() if r.path == "/api/v1/authenticate"]
    assert len(logins) == 1, logins
