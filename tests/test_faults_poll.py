"""The poller against the API's paging quirks and bad records: the same event on two pages,
a clamped `per_page`, late events, oversized pages, malformed records, unreadable errors."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from engine.config import Config
from engine.daemon import Daemon
from engine.simulator import FaultRule, SimulatorConfig, SimulatorServer

from helpers import TOKEN, engine_config, poller_of, rules_from

EVERY_EVENT = """
rules:
  - id: every-event
    actions: [{log: {level: debug}}]
"""


def _config(tmp_path: Path, simulator: SimulatorServer, per_page: int) -> Config:
    config = engine_config(tmp_path, simulator)
    return replace(config, api=replace(config.api, per_page=per_page))


def _faults(simulator: SimulatorServer, *rules: dict[str, Any]) -> None:
    simulator.state.set_faults(FaultRule.parse(rule) for rule in rules)


def _evaluations(daemon: Daemon) -> Counter[int]:
    return Counter(
        r["event_id"]
        for r in daemon.store.audit_rows()
        if r["rule_id"] == "every-event" and r["outcome"] == "matched"
    )


def _store(simulator: SimulatorServer, count: int) -> set[int]:
    sims = simulator.state.sims()
    records = [{"event_type": 1, "sim_id": sims[i % len(sims)]["id"]} for i in range(count)]
    return {int(r["id"]) for r in simulator.state.store_events(records)}


async def test_an_event_repeated_on_the_next_page_is_evaluated_once(tmp_path, simulator):
    ids = _store(simulator, 10)
    _faults(simulator, {"path": "^/api/v1/event$", "kind": "duplicate_across_pages"})
    daemon = Daemon(_config(tmp_path, simulator, 3), rules_from(tmp_path, EVERY_EVENT), TOKEN)
    try:
        result = await poller_of(daemon).poll_once()
        evaluated = _evaluations(daemon)
    finally:
        await daemon.aclose()
    assert result.fetched > len(ids)  # pages 2, 3, 4 each began with the previous page's last
    assert evaluated == Counter(dict.fromkeys(ids, 1))


async def test_a_clamped_per_page_is_read_back_and_every_page_is_walked(tmp_path, simulator):
    ids = _store(simulator, 10)
    _faults(simulator, {"path": "^/api/v1/event$", "kind": "clamp_per_page", "max_per_page": 4})
    daemon = Daemon(_config(tmp_path, simulator, 50), rules_from(tmp_path, EVERY_EVENT), TOKEN)
    try:
        result = await poller_of(daemon).poll_once()
        evaluated = _evaluations(daemon)
    finally:
        await daemon.aclose()
    assert result.pages == 3
    assert evaluated == Counter(dict.fromkeys(ids, 1))
    queries = [r.query for r in simulator.state.requests() if r.path == "/api/v1/event"]
    assert all("per_page=50" in q for q in queries)


async def test_an_oversized_page_is_taken_whole(tmp_path):
    # A page far larger than usual (the API's maximum raised): one page, every event once.
    with SimulatorServer(SimulatorConfig(seed=5, endpoints=8, max_per_page=5000)) as simulator:
        ids = _store(simulator, 3000)
        config = _config(tmp_path, simulator, 5000)
        daemon = Daemon(config, rules_from(tmp_path, EVERY_EVENT), TOKEN)
        try:
            result = await poller_of(daemon).poll_once()
            evaluated = _evaluations(daemon)
        finally:
            await daemon.aclose()
    assert result.pages == 1 and result.fetched == 3000
    assert evaluated == Counter(dict.fromkeys(ids, 1))


async def test_a_late_event_stored_after_its_window_passed_is_evaluated_exactly_once(
    tmp_path, simulator
):
    first = _store(simulator, 2)
    daemon = Daemon(_config(tmp_path, simulator, 100), rules_from(tmp_path, EVERY_EVENT), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        await asyncio.sleep(1.1)  # the API's windows have whole-second bounds
        # Stored only now, with a timestamp the last poll's window already covered.
        sim = simulator.state.sims()[0]
        stamp = (datetime.now(UTC) - timedelta(seconds=20)).isoformat()
        (late,) = simulator.state.store_events(
            [{"event_type": 1, "sim_id": sim["id"], "timestamp": stamp}]
        )
        await poller_of(daemon).poll_once()
        await asyncio.sleep(1.1)
        await poller_of(daemon).poll_once()  # the overlap reads it again: dropped as seen
        evaluated = _evaluations(daemon)
    finally:
        await daemon.aclose()
    assert evaluated == Counter(dict.fromkeys([*first, late["id"]], 1))


async def test_a_malformed_event_is_quarantined_once_with_its_payload_and_its_batch_goes_on(
    tmp_path, simulator
):
    sims = simulator.state.sims()
    broken = {"event_type": 1, "sim": {"id": "not-a-number"}, "description": "garbled"}
    async with httpx.AsyncClient(base_url=simulator.base_url) as admin:
        response = await admin.post(
            "/admin/events",
            json=[
                {"event_type": 1, "sim_id": sims[0]["id"]},
                broken,
                {"event_type": 1, "sim_id": sims[1]["id"]},
            ],
        )
    response.raise_for_status()
    good = {r["id"] for r in response.json() if isinstance(r.get("sim", {}).get("id"), int)}
    bad_id = next(r["id"] for r in response.json() if r["id"] not in good)
    daemon = Daemon(_config(tmp_path, simulator, 100), rules_from(tmp_path, EVERY_EVENT), TOKEN)
    try:
        for _ in range(3):  # every poll's overlap brings the broken record back
            await poller_of(daemon).poll_once()
            await asyncio.sleep(0.2)
        evaluated = _evaluations(daemon)
        quarantined = daemon.store.quarantined()
        counts = daemon.store.counts()
    finally:
        await daemon.aclose()
    assert evaluated == Counter(dict.fromkeys(good, 1))
    (row,) = quarantined
    assert counts["quarantined"] == 1
    assert row["source"] == "poller"
    assert row["reason"] == "sim.id: expected an integer, got 'not-a-number'"
    payload = orjson.loads(row["payload"])
    assert payload["id"] == bad_id and payload["description"] == "garbled"


async def test_unreadable_error_bodies_fail_a_poll_that_the_next_one_makes_good(
    tmp_path, simulator
):
    ids = _store(simulator, 3)
    config = _config(tmp_path, simulator, 100)
    config = replace(config, api=replace(config.api, max_retries=0))
    daemon = Daemon(config, rules_from(tmp_path, EVERY_EVENT), TOKEN)
    try:
        for body in ("html", "empty"):
            _faults(simulator, {"path": "^/api/v1/event$", "kind": "500", "body": body, "count": 1})
            await poller_of(daemon).poll_once()
            assert poller_of(daemon).last_error is not None
            assert "HTTP 500" in poller_of(daemon).last_error
        await poller_of(daemon).poll_once()
        error_after = poller_of(daemon).last_error
        evaluated = _evaluations(daemon)
    finally:
        await daemon.aclose()
    assert error_after is None
    assert evaluated == Counter(dict.fromkeys(ids, 1))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_page_size_that_changes_during_the_walk_loses_no_event(tmp_path, seed):
    # A clamp that comes and goes between the pages of one walk: pages shift under it.
    with SimulatorServer(SimulatorConfig(seed=seed, endpoints=8, late_fraction=0.0)) as simulator:
        ids = _store(simulator, 60)
        _faults(
            simulator,
            {
                "path": "^/api/v1/event$",
                "kind": "clamp_per_page",
                "max_per_page": 7,
                "probability": 0.5,
            },
        )
        config = _config(tmp_path, simulator, 10)
        daemon = Daemon(config, rules_from(tmp_path, EVERY_EVENT), TOKEN)
        try:
            await poller_of(daemon).poll_once()
            evaluated = _evaluations(daemon)
        finally:
            await daemon.aclose()
        clamped = sum(1 for r in simulator.state.requests() if r.fault == "clamp_per_page")
    assert clamped >= 2
    assert evaluated == Counter(dict.fromkeys(ids, 1))
