"""The engine's health as engine events, over loopback HTTP against the simulator with its
faults and a real SQLite store: each condition is said once on the transition, after its
time, and once more when it is over; the heartbeat pings only while the engine is ready;
the data stream watchdog says and restarts a stream in Error."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from engine.clock import FixedClock
from engine.config import Config, load_config
from engine.daemon import Daemon
from engine.engine_events import KINDS
from engine.errors import ConfigError
from engine.health import (
    HealthSettings,
    HealthWatch,
    Heartbeat,
    HeartbeatSettings,
    StreamWatchdog,
)
from engine.leadership import ClusterSettings
from engine.simulator import FaultRule, SimulatorServer
from engine.simulator.webhook_sink import WebhookSink
from engine.sources.streamer import StreamerSettings, StreamerSource
from engine.store import StoreSettings

from helpers import TOKEN, engine_config, eventually, poller_of, rules_from, running_daemon

ROUTES = """
rules:
  - id: page-on-engine-health
    when: {source: engine}
    actions: [{log: {message: "{{ event.event_type.description }}"}}]
"""


def _said(daemon: Daemon) -> list[str]:
    """The engine events said so far, in order, by kind."""
    rows = daemon.store.audit_rows(limit=10_000)
    by_meaning = {k.meaning: name for name, k in KINDS.items()}
    kinds = []
    for row in sorted(rows, key=lambda r: r["id"]):
        if row["outcome"] != "engine_event":
            continue
        text = str(row["detail"])
        kinds.append(next(n for m, n in by_meaning.items() if text.startswith(m)))
    return kinds


def _daemon(
    tmp_path: Path, simulator: SimulatorServer, clock: FixedClock, **health: timedelta
) -> Daemon:
    config = engine_config(tmp_path, simulator)
    config = replace(config, health=replace(HealthSettings(), **health))
    config = replace(config, api=replace(config.api, max_retries=0))
    return Daemon(config, rules_from(tmp_path, ROUTES), TOKEN, clock=clock)


async def _watching(daemon: Daemon) -> tuple[HealthWatch, HealthWatch]:
    """The daemon's two health watches, started (their checks are run by hand)."""
    watches = [s for s in daemon.services if isinstance(s, HealthWatch)]
    for watch in watches:
        await watch.start(daemon)
    [cluster] = [w for w in watches if w.leader_only]
    [instance] = [w for w in watches if not w.leader_only]
    return cluster, instance


def _check(*watches: HealthWatch) -> None:
    for watch in watches:
        watch.check_now()


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(datetime.now(UTC).replace(microsecond=0))


async def test_poll_failing_is_said_once_after_its_time_and_once_when_polls_succeed_again(
    tmp_path: Path, simulator: SimulatorServer, clock: FixedClock
):
    simulator.state.set_faults([FaultRule.parse({"path": "^/api/v1/event$", "kind": "500"})])
    daemon = _daemon(tmp_path, simulator, clock, poll_failing_after=timedelta(minutes=5))
    try:
        cluster, _ = await _watching(daemon)
        poller = daemon.source("poller")
        await poller.poll()  # type: ignore[attr-defined]
        _check(cluster)
        clock.advance(timedelta(minutes=4))
        await poller.poll()  # type: ignore[attr-defined]
        _check(cluster)
        assert _said(daemon) == []  # failing, but not for 5 minutes yet
        clock.advance(timedelta(minutes=1))
        await poller.poll()  # type: ignore[attr-defined]
        _check(cluster)
        _check(cluster)
        assert _said(daemon) == ["poll_failing"]
        simulator.state.clear_faults()
        await poller.poll()  # type: ignore[attr-defined]
        _check(cluster)
        _check(cluster)
        assert _said(daemon) == ["poll_failing", "poll_failing_recovered"]
        # Rules match them like any event: one intent each.
        intents = daemon.store.audit_rows(limit=1000)
        planned = [r for r in intents if r["rule_id"] == "page-on-engine-health"]
        assert len({r["event_id"] for r in planned}) == 2
    finally:
        await daemon.aclose()


async def test_api_unreachable_names_the_instance_and_recovers_when_the_api_answers(
    tmp_path: Path, simulator: SimulatorServer, clock: FixedClock
):
    simulator.state.set_faults([FaultRule.parse({"path": "^/api/", "kind": "drop"})])
    daemon = _daemon(tmp_path, simulator, clock, api_unreachable_after=timedelta(minutes=1))
    try:
        _, instance = await _watching(daemon)
        await poller_of(daemon).poll_once()
        _check(instance)
        clock.advance(timedelta(minutes=1))
        _check(instance)
        assert _said(daemon) == ["api_unreachable"]
        [row] = [r for r in daemon.store.audit_rows(limit=100) if r["outcome"] == "engine_event"]
        [intent] = daemon.store.intents_for_events([int(row["event_id"])])
        assert "did not respond" in str(row["detail"])
        simulator.state.clear_faults()
        await poller_of(daemon).poll_once()
        _check(instance)
        assert _said(daemon) == ["api_unreachable", "api_unreachable_recovered"]
        assert intent.rule_id == "page-on-engine-health"
    finally:
        await daemon.aclose()


async def test_a_refused_token_is_auth_failed_at_once_and_recovers_at_the_next_good_login(
    tmp_path: Path, simulator: SimulatorServer, clock: FixedClock
):
    simulator.state.logins_refused = True
    daemon = _daemon(tmp_path, simulator, clock)
    try:
        _, instance = await _watching(daemon)
        await poller_of(daemon).poll_once()
        _check(instance)
        assert _said(daemon) == ["auth_failed"]
        simulator.state.logins_refused = False
        clock.advance(timedelta(minutes=6))  # the poller pauses 5 minutes after a refusal
        await poller_of(daemon).poll_once()
        _check(instance)
        assert _said(daemon) == ["auth_failed", "auth_failed_recovered"]
    finally:
        await daemon.aclose()


async def test_poll_lag_is_said_when_the_cursor_falls_behind_and_recovers_on_catch_up(
    tmp_path: Path, simulator: SimulatorServer, clock: FixedClock
):
    daemon = _daemon(tmp_path, simulator, clock, poll_lag=timedelta(minutes=15))
    try:
        cluster, _ = await _watching(daemon)
        await poller_of(daemon).poll_once()
        _check(cluster)
        clock.advance(timedelta(minutes=10))
        _check(cluster)
        assert _said(daemon) == []
        clock.advance(timedelta(minutes=10))
        _check(cluster)
        assert _said(daemon) == ["poll_lag_exceeded"]
        await poller_of(daemon).poll_once()
        _check(cluster)
        assert _said(daemon) == ["poll_lag_exceeded", "poll_lag_exceeded_recovered"]
    finally:
        await daemon.aclose()


async def test_stream_silent_when_the_poller_finds_what_the_stream_did_not_deliver(
    tmp_path: Path, simulator: SimulatorServer, clock: FixedClock
):
    config = engine_config(tmp_path, simulator)
    config = replace(
        config,
        sources=("poller", "data_streamer"),
        health=replace(HealthSettings(), stream_silent_after=timedelta(minutes=15)),
    ).with_source_settings(data_streamer=StreamerSettings(secret="s3cret-stream-header"))
    daemon = Daemon(config, rules_from(tmp_path, ROUTES), TOKEN, clock=clock)
    try:
        cluster, _ = await _watching(daemon)
        streamer = daemon.source(StreamerSource.name)
        assert isinstance(streamer, StreamerSource)
        # The stream delivers, the poller finds nothing new: healthy.
        delivered = simulator.state.generate(3)
        streamer._ingest(delivered, source=StreamerSource.name)
        await poller_of(daemon).poll_once()
        _check(cluster)
        # The stream goes quiet while events keep coming: the poller finds them.
        clock.advance(timedelta(seconds=30))
        simulator.state.generate(3)
        await poller_of(daemon).poll_once()
        _check(cluster)
        clock.advance(timedelta(minutes=15))
        await poller_of(daemon).poll_once()  # nothing newer: the poller keeps up
        _check(cluster)
        assert _said(daemon) == ["stream_silent"]
        # A delivery again: over.
        clock.advance(timedelta(seconds=10))
        streamer._ingest(simulator.state.generate(1), source=StreamerSource.name)
        _check(cluster)
        assert _said(daemon) == ["stream_silent", "stream_silent_recovered"]
    finally:
        await daemon.aclose()


async def test_a_condition_said_before_a_restart_is_not_said_again_and_its_recovery_is(
    tmp_path: Path, simulator: SimulatorServer, clock: FixedClock
):
    simulator.state.set_faults([FaultRule.parse({"path": "^/api/v1/event$", "kind": "500"})])
    daemon = _daemon(tmp_path, simulator, clock, poll_failing_after=timedelta(0))
    try:
        cluster, _ = await _watching(daemon)
        await daemon.source("poller").poll()  # type: ignore[attr-defined]
        _check(cluster)
        assert _said(daemon) == ["poll_failing"]
    finally:
        await daemon.aclose()
    again = _daemon(tmp_path, simulator, clock, poll_failing_after=timedelta(0))
    try:
        cluster, _ = await _watching(again)
        await again.source("poller").poll()  # type: ignore[attr-defined]
        _check(cluster)
        assert _said(again) == ["poll_failing"]  # still failing: not said twice
        simulator.state.clear_faults()
        await again.source("poller").poll()  # type: ignore[attr-defined]
        _check(cluster)
        assert _said(again) == ["poll_failing", "poll_failing_recovered"]
    finally:
        await again.aclose()


async def test_the_watchdog_says_and_restarts_a_stream_in_error_and_the_poller_backfills(
    tmp_path: Path, simulator: SimulatorServer, clock: FixedClock
):
    config = engine_config(tmp_path, simulator).with_source_settings(
        data_streamer=StreamerSettings(watch=True, watch_every=timedelta(seconds=5))
    )
    daemon = Daemon(config, rules_from(tmp_path, ROUTES), TOKEN, clock=clock)
    try:
        [watchdog] = [s for s in daemon.services if isinstance(s, StreamWatchdog)]
        await watchdog.start(daemon)
        await watchdog.watch_once()
        assert _said(daemon) == [] and watchdog.restarts == 0  # Running: nothing to do
        simulator.state.data_streams.fail(1, "destination answered 502", simulator.state.now())
        missed = simulator.state.generate(2)  # what the stream did not deliver meanwhile
        await watchdog.watch_once()
        assert _said(daemon) == ["data_stream_error"]
        assert simulator.state.data_streams.restarts(1) == 1
        await watchdog.watch_once()  # back to Running
        await watchdog.watch_once()
        assert _said(daemon) == ["data_stream_error", "data_stream_error_recovered"]
        [row] = [
            r
            for r in daemon.store.audit_rows(limit=100)
            if r["outcome"] == "engine_event" and "502" in str(r["detail"])
        ]
        assert row["event_id"] is not None
        # A stream that fails again after each restart (misconfigured) is restarted again
        # after 1, 2, 4, ... rounds, and said once.
        simulator.state.data_streams.fail(1, "permission denied", simulator.state.now())
        restarted = []
        for _ in range(8):
            await watchdog.watch_once()
            restarted.append(simulator.state.data_streams.restarts(1))
            simulator.state.data_streams.fail(1, "permission denied", simulator.state.now())
            clock.advance(timedelta(seconds=5))
        assert restarted == [2, 3, 3, 4, 4, 4, 4, 5]
        assert _said(daemon)[2:] == ["data_stream_error"]
        clock.advance(timedelta(minutes=1))  # past the events' own (wall-clock) time
        await poller_of(daemon).poll_once()
        assert not daemon.store.unseen([m["id"] for m in missed])
    finally:
        await daemon.aclose()


async def test_the_heartbeat_pings_only_while_the_engine_is_ready(
    tmp_path: Path, simulator: SimulatorServer, sink: WebhookSink
):
    config = replace(
        engine_config(tmp_path, simulator),
        heartbeat=HeartbeatSettings(
            f"{sink.base_url}/hooks/alive", timedelta(seconds=0.2), timedelta(seconds=0.1)
        ),
    )
    config = replace(config, api=replace(config.api, max_retries=0))
    daemon = Daemon(config, rules_from(tmp_path, ROUTES), TOKEN)
    [heartbeat] = [s for s in daemon.services if isinstance(s, Heartbeat)]
    async with running_daemon(daemon):
        for _ in range(100):
            if len(sink.calls("alive")) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(sink.calls("alive")) >= 2
        simulator.state.set_faults([FaultRule.parse({"path": "^/api/", "kind": "503"})])
        for _ in range(100):  # the next poll fails: /readyz says the API is not there
            if heartbeat.held >= 2:
                break
            await asyncio.sleep(0.05)
        pinged = len(sink.calls("alive"))
        await asyncio.sleep(0.5)
        assert heartbeat.held >= 2 and len(sink.calls("alive")) <= pinged + 1
        simulator.state.clear_faults()
        for _ in range(100):
            if len(sink.calls("alive")) > pinged + 1:
                break
            await asyncio.sleep(0.05)
        assert len(sink.calls("alive")) > pinged + 1
    assert all(c.method == "GET" for c in sink.calls("alive"))


def _config_file(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def test_health_and_heartbeat_are_read_from_the_config(tmp_path):
    config = _config_file(
        tmp_path,
        "health: {poll_failing_after: 2m, poll_lag: 30m}\n"
        "heartbeat: {url: 'https://hc-ping.example/abc', every: 30s}\n"
        "data_streamer: {watch: true, watch_every: 2m}\n",
    )
    assert config.health.poll_failing_after == timedelta(minutes=2)
    assert config.health.poll_lag == timedelta(minutes=30)
    assert config.heartbeat.url == "https://hc-ping.example/abc"
    assert config.heartbeat.every == timedelta(seconds=30)
    streamer = config.source_settings["data_streamer"]
    assert isinstance(streamer, StreamerSettings) and streamer.watch
    assert streamer.watch_every == timedelta(minutes=2)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("dry_run: false\nheartbeat: {every: 30s}\n", 2, "needs a `url`"),
        ("heartbeat:\n  url: ftp://x\n", 2, "http(s) URL"),
        ("heartbeat:\n  url: https://x/y\n  every: 10s\n  timeout: 10s\n", 4, "shorter"),
        ("health:\n  check_every: 0s\n", 2, "check_every"),
        ("health:\n  poll_failing_afterr: 1m\n", 2, "poll_failing_after"),
        ("data_streamer:\n  watch_every: 0s\n", 2, "watch_every"),
    ],
)
def test_bad_health_options_are_located(tmp_path, text, line, words):
    with pytest.raises(ConfigError) as error:
        _config_file(tmp_path, text)
    shown = str(error.value)
    assert f"config.yaml:{line}" in shown and words in shown


INSTANCES = """
rules:
  - id: page-on-engine-health
    when: {source: engine}
    actions:
      - log: {message: "{{ event.event_type.description }} from {{ event.detail.instance }}"}
"""


@pytest.fixture(params=["sqlite", "postgres"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    if request.param == "sqlite":
        return StoreSettings(tmp_path / "state" / "engine.sqlite3")
    return StoreSettings(postgres=request.getfixturevalue("postgres_settings"))


def _said_by(daemon: Daemon) -> list[str]:
    """What the engine events said so far, as the rule's log message: type and instance."""
    rows = [r for r in daemon.store.audit_rows(limit=10_000) if r["outcome"] == "engine_event"]
    ids = [int(r["event_id"]) for r in sorted(rows, key=lambda r: r["id"])]
    by_event = {i.event_id: i.params["message"] for i in daemon.store.intents_for_events(ids)}
    return [by_event[i] for i in ids if i in by_event]


async def test_on_a_cluster_the_leader_alone_says_poll_failing_and_the_next_says_it_is_over(
    tmp_path: Path, simulator: SimulatorServer, shared_store: StoreSettings
):
    def instance(name: str) -> Daemon:
        config = replace(
            engine_config(tmp_path, simulator),
            store_path=shared_store.path,
            store_postgres=shared_store.postgres,
            cluster=ClusterSettings(instance_id=name, lease_ttl=timedelta(seconds=3)),
            health=HealthSettings(
                check_every=timedelta(seconds=0.2), poll_failing_after=timedelta(0)
            ),
        )
        config = replace(config, api=replace(config.api, max_retries=0))
        return Daemon(config, rules_from(tmp_path, INSTANCES), TOKEN)

    simulator.state.set_faults([FaultRule.parse({"path": "^/api/v1/event$", "kind": "500"})])
    first, second = instance("first"), instance("second")
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    running_first = asyncio.create_task(first.run(stop_first))
    await eventually(lambda: first.leading)
    running_second = asyncio.create_task(second.run(stop_second))
    try:
        await eventually(lambda: _said_by(first) == ["poll_failing from first"])
        await asyncio.sleep(1.0)  # both look every 0.2s: the standby says nothing
        assert _said_by(first) == ["poll_failing from first"]
        simulator.state.clear_faults()
        stop_first.set()  # the leader leaves; the other takes over and polls fine
        await running_first
        await eventually(lambda: second.leading, timeout=10)
        await eventually(lambda: len(_said_by(second)) == 2, timeout=10)
        assert _said_by(second) == [
            "poll_failing from first",
            "poll_failing_recovered from second",
        ]
    finally:
        stop_first.set()
        stop_second.set()
        await asyncio.gather(running_first, running_second)


async def test_the_simulator_puts_a_stream_in_error_and_refuses_logins_through_its_admin_api(
    simulator: SimulatorServer,
):
    async with httpx.AsyncClient(base_url=simulator.base_url) as http:
        failed = await http.put("/admin/data_stream/1", json={"status": 3, "reason": "HTTP 502"})
        assert failed.status_code == 200 and failed.json()["status"]["description"] == "Error"
        assert (await http.put("/admin/data_stream/1", json={"status": 9})).status_code == 400
        assert (await http.put("/admin/logins", json={"refused": True})).status_code == 200
        login = await http.post("/api/v1/authenticate", json={"application_token": TOKEN})
        assert login.status_code == 401
        await http.put("/admin/logins", json={"refused": False})
        login = await http.post("/api/v1/authenticate", json={"application_token": TOKEN})
        token = login.json()["auth_token"]
        auth = {"Authorization": f"Bearer {token}"}
        [stream] = (await http.get("/api/v2/data_stream", headers=auth)).json()
        assert stream["status"] == {"id": 3, "description": "Error"}
        assert stream["errors"][-1]["message"] == "HTTP 502"
        restarted = await http.post("/api/v2/data_stream/1/restart", headers=auth)
        assert restarted.status_code == 204
        again = (await http.get("/api/v2/data_stream/1", headers=auth)).json()
        assert again["status"]["description"] == "Running"
        missing = await http.post("/api/v2/data_stream/99/restart", headers=auth)
        assert missing.status_code == 404
