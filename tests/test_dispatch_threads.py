"""Where the dispatcher's store calls run: with `store.dispatch_threads` (PostgreSQL; by
default when the database is on another machine) in threads of their own, so an attempt
waiting on the database holds up neither the other attempts nor the event loop; otherwise
on the event loop. A shutdown that cancels an attempt while its start is being written
leaves the intent due again."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine.config import load_config
from engine.daemon import Daemon
from engine.errors import ConfigError
from engine.model import IntentStatus
from engine.store.postgres import auto_dispatch_threads

from helpers import TOKEN, engine_config, eventually, poller_of, rules_from

SUSPEND = """
rules:
  - id: suspend
    when: {type: 19}
    actions: [{suspend_sim: {}}]
"""


def _quota_event(simulator: Any) -> None:
    sim = simulator.state.sims()[0]
    simulator.state.store_events([{"event_type": {"id": 19}, "sim_id": sim["id"]}])


def _daemon(tmp_path: Path, simulator: Any, postgres: Any = None, threads: Any = 2) -> Daemon:
    config = engine_config(tmp_path, simulator)
    if postgres is not None:
        postgres = replace(postgres, dispatch_threads=threads)
        config = replace(config, store_postgres=postgres)
    return Daemon(config, rules_from(tmp_path, SUSPEND), TOKEN)


class _HeldStart:
    """Wraps a store's `start_attempt`: each call says where it ran, then waits until the
    test lets it go on."""

    def __init__(self, start: Any) -> None:
        self._start = start
        self.entered = threading.Event()
        self.released = threading.Event()
        self.threads: list[str] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        if not self.released.wait(timeout=5):
            raise AssertionError("start_attempt was never let go on")
        return self._start(*args, **kwargs)


async def test_on_postgresql_a_store_call_waiting_on_the_database_does_not_hold_up_the_event_loop(
    tmp_path, simulator, postgres_settings
):
    _quota_event(simulator)
    daemon = _daemon(tmp_path, simulator, postgres_settings)
    held = _HeldStart(daemon.store.start_attempt)
    daemon.store.start_attempt = held  # type: ignore[method-assign]
    try:
        await poller_of(daemon).poll_once()
        dispatching = asyncio.create_task(daemon.dispatcher.run_due())
        # Only a loop that is free while the store call waits can let it go on.
        await eventually(held.entered.is_set)
        held.released.set()
        assert await dispatching == 1
        (intent,) = daemon.store.intents()
    finally:
        held.released.set()
        await daemon.aclose()
    assert intent.status is IntentStatus.DONE
    assert held.threads and held.threads[0].startswith("dispatch-store")


async def test_on_postgresql_the_store_calls_run_in_as_many_threads_as_configured_not_more(
    tmp_path, simulator, postgres_settings
):
    for sim in simulator.state.sims()[:2]:
        simulator.state.store_events([{"event_type": {"id": 19}, "sim_id": sim["id"]}])
    daemon = _daemon(tmp_path, simulator, postgres_settings, threads=1)
    held = _HeldStart(daemon.store.start_attempt)
    daemon.store.start_attempt = held  # type: ignore[method-assign]
    try:
        await poller_of(daemon).poll_once()
        dispatching = asyncio.create_task(daemon.dispatcher.run_due())
        await eventually(held.entered.is_set)
        await asyncio.sleep(0.2)  # time for the other attempt's start, had it a thread
        at_once = list(held.threads)
        held.released.set()
        assert await dispatching == 2
        statuses = [intent.status for intent in daemon.store.intents()]
    finally:
        held.released.set()
        await daemon.aclose()
    assert at_once == ["dispatch-store_0"]
    assert held.threads == ["dispatch-store_0"] * 2
    assert statuses == [IntentStatus.DONE] * 2


@pytest.mark.parametrize("store", ["sqlite", "postgresql on this machine, auto"])
async def test_without_threads_the_store_calls_stay_on_the_event_loop(
    tmp_path, simulator, store, request
):
    _quota_event(simulator)
    if store == "sqlite":
        daemon = _daemon(tmp_path, simulator)
    else:
        postgres = request.getfixturevalue("postgres_settings")
        daemon = _daemon(tmp_path, simulator, postgres, threads=None)
    held = _HeldStart(daemon.store.start_attempt)
    held.released.set()
    daemon.store.start_attempt = held  # type: ignore[method-assign]
    try:
        await poller_of(daemon).poll_once()
        assert await daemon.dispatcher.run_due() == 1
        (intent,) = daemon.store.intents()
    finally:
        await daemon.aclose()
    assert intent.status is IntentStatus.DONE
    assert held.threads == [threading.current_thread().name]


async def test_an_attempt_cancelled_while_its_start_is_written_is_left_due_again(
    tmp_path, simulator, postgres_settings
):
    _quota_event(simulator)
    daemon = _daemon(tmp_path, simulator, postgres_settings)
    held = _HeldStart(daemon.store.start_attempt)
    daemon.store.start_attempt = held  # type: ignore[method-assign]
    try:
        await poller_of(daemon).poll_once()
        stop = asyncio.Event()
        dispatching = asyncio.create_task(daemon.dispatcher.run_forever(stop, idle=0.05))
        await eventually(held.entered.is_set)
        # Shutdown: the dispatcher waits for the attempts in flight, until the grace runs
        # out while the start is being written; the write ends (a round trip) before the
        # attempt gives up.
        stop.set()
        await asyncio.sleep(0.05)
        threading.Timer(0.2, held.released.set).start()
        dispatching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dispatching
        (intent,) = daemon.store.intents()
    finally:
        held.released.set()
        await daemon.aclose()
    assert intent.status is IntentStatus.PENDING
    assert intent.last_error == "interrupted"
    assert intent.attempts == 1  # the start was written: the next attempt knows one ran
    changed = [r for r in simulator.state.requests() if r.method == "PATCH"]
    assert changed == []  # cancelled before its call


@pytest.mark.parametrize(
    ("url", "pool_size", "threads"),
    [
        ("postgresql://engine@127.0.0.1:5432/engine", 4, 0),
        ("postgresql://engine@localhost/engine", 4, 0),
        ("postgresql://engine@[::1]/engine", 4, 0),
        ("postgresql:///engine?host=/var/run/postgresql", 4, 0),
        ("postgresql:///engine", 4, 0),  # libpq's default: the local socket
        ("postgresql://engine@db.example:5432/engine", 4, 3),
        ("postgresql://engine@10.0.0.5/engine", 8, 7),
        ("postgresql://engine@db.example/engine", 1, 1),
        ("postgresql://engine@127.0.0.1,db.example/engine", 4, 3),  # may fail over there
        ("postgresql://engine@127.0.0.1,localhost/engine", 4, 0),  # both here
        ("host='db.example", 4, 0),  # not a URL: refused before this matters
    ],
)
def test_auto_threads_only_for_a_database_on_another_machine(url, pool_size, threads):
    assert auto_dispatch_threads(url, pool_size) == threads


def _store_config(tmp_path: Path, value: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"store:\n  url: postgresql://engine@db.example/engine\n  dispatch_threads: {value}\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(("value", "threads"), [("auto", None), ("0", 0), ("6", 6)])
def test_the_config_sets_the_dispatch_threads_or_leaves_them_to_auto(tmp_path, value, threads):
    config = load_config(_store_config(tmp_path, value))
    assert config.store_postgres is not None
    assert config.store_postgres.dispatch_threads == threads


@pytest.mark.parametrize("value", ["many", "-1", "true"])
def test_a_dispatch_threads_value_other_than_auto_or_a_count_is_refused_where_it_is(
    tmp_path, value
):
    with pytest.raises(ConfigError) as refused:
        load_config(_store_config(tmp_path, value))
    assert "store.dispatch_threads" in str(refused.value)
    assert "config.yaml:3" in str(refused.value)
