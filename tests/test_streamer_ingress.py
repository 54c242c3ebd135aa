"""The Data Streamer ingress over loopback: auth, limits, parsing, usage records, dedup with
the poller, and 2xx only once a delivery is recorded (the simulator's streamer retries)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import orjson
import pytest

from engine.daemon import Daemon
from engine.errors import StoreError
from engine.http.service import HttpService
from engine.http.settings import HttpSettings
from engine.simulator import SimulatorConfig, SimulatorServer
from engine.simulator.webhook_sink import WebhookSink
from engine.sources.streamer import StreamerSettings
from engine.store import SqliteStore
from engine.usage import is_usage_record

from helpers import (
    TOKEN,
    engine_config,
    eventually,
    ingest_url,
    metric_value,
    poller_of,
    poller_settings,
    rules_from,
    running_daemon,
    with_poller,
)

SECRET = "streamer-secret-for-tests-0123"
RULES = """
rules:
  - id: suspend-on-quota
    when: {source: policy_control, type: "Quota used up"}
    actions:
      - suspend_sim: {}
      - webhook:
          url: ${OPS_WEBHOOK_URL}
          body: {text: "SIM {{ event.sim.iccid }} suspended"}
"""
USAGE_RECORD = {
    "id": 98765,
    "traffic_type": {"id": 5, "description": "Data"},
    "start_timestamp": "2026-01-01T10:00:00Z",
    "end_timestamp": "2026-01-01T10:00:45Z",
    "volume": {"rx": 0.1, "tx": 0.05, "total": 0.15},
    "cost": 0.01,
    "currency": {"id": 1, "code": "EUR"},
}


def _daemon(
    tmp_path: Path,
    simulator: SimulatorServer,
    *,
    sources: tuple[str, ...] = ("data_streamer",),
    max_body_bytes: int = 1_000_000,
) -> tuple[Daemon, HttpService]:
    config = replace(engine_config(tmp_path, simulator), sources=sources).with_source_settings(
        data_streamer=StreamerSettings(secret=SECRET, max_body_bytes=max_body_bytes)
    )
    service = HttpService(HttpSettings(port=0))
    service.bind()
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN, services=[service])
    return daemon, service


def _quota_event(simulator: SimulatorServer) -> dict:
    sim = simulator.state.sims()[0]
    (record,) = simulator.state.store_events([{"event_type": {"id": 19}, "sim_id": sim["id"]}])
    return record


def _reopened(daemon: Daemon) -> SqliteStore:
    """The daemon's state file, opened again after the daemon closed it."""
    return SqliteStore(daemon.config.store_path)


def _unchanged(daemon: Daemon) -> dict:
    return {"counts": daemon.store.counts(), "audit": daemon.store.audit_rows()}


async def test_a_delivery_without_the_secret_header_gets_401_and_changes_nothing(
    tmp_path, simulator, hook_env
):
    daemon, service = _daemon(tmp_path, simulator)
    body = orjson.dumps([_quota_event(simulator)])
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        before = _unchanged(daemon)
        missing = await client.post(ingest_url(service), content=body)
        wrong = await client.post(
            ingest_url(service), content=body, headers={"X-Emnify-Secret": SECRET + "x"}
        )
        other_header = await client.post(
            ingest_url(service), content=body, headers={"Authorization": SECRET}
        )
        after = _unchanged(daemon)
        metrics = (await client.get(service.base_url + "/metrics")).text
    assert [r.status_code for r in (missing, wrong, other_header)] == [401, 401, 401]
    assert after == before
    assert _reopened(daemon).seen_count() == 0
    assert hook_env.calls() == []
    assert metric_value(metrics, "event_engine_streamer_requests_total", status="401") == 3
    assert metric_value(metrics, "event_engine_events_received_total") is None


async def test_the_secret_header_name_is_case_insensitive_and_any_method_emnify_uses_works(
    tmp_path, simulator, hook_env
):
    daemon, service = _daemon(tmp_path, simulator)
    record = _quota_event(simulator)
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        answers = [
            await client.request(
                method,
                ingest_url(service),
                content=orjson.dumps(body),
                headers={header: SECRET},
            )
            for method, header, body in [
                ("POST", "x-emnify-secret", [record]),
                ("PUT", "X-EMNIFY-SECRET", record),  # a bare object (stream `size: 1`)
                ("PATCH", "X-Emnify-Secret", [record, record]),
            ]
        ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["new"] for a in answers] == [1, 0, 0]
    assert [a.json()["duplicates"] for a in answers] == [0, 1, 2]


async def test_a_body_over_the_limit_gets_413_declared_or_chunked(tmp_path, simulator, hook_env):
    daemon, service = _daemon(tmp_path, simulator, max_body_bytes=1024)
    records = [_quota_event(simulator) for _ in range(4)]
    body = orjson.dumps(records)
    assert len(body) > 1024

    async def chunked():  # no Content-Length: the limit must hold while reading
        for start in range(0, len(body), 100):
            yield body[start : start + 100]

    headers = {"X-Emnify-Secret": SECRET}
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        declared = await client.post(ingest_url(service), content=body, headers=headers)
        streamed = await client.post(ingest_url(service), content=chunked(), headers=headers)
        small = await client.post(
            ingest_url(service), content=orjson.dumps(records[0]), headers=headers
        )
    assert (declared.status_code, streamed.status_code) == (413, 413)
    assert "1024 bytes" in declared.json()["error"]
    assert small.status_code == 200
    assert _reopened(daemon).seen_count() == 1


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'[{"id": 1,', "not valid JSON"),
        (b"", "empty body"),
        (b'"just a string"', "got str"),
        (b"42", "got int"),
    ],
)
async def test_a_malformed_body_gets_400_with_the_reason(tmp_path, simulator, body, says):
    daemon, service = _daemon(tmp_path, simulator)
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        answer = await client.post(
            ingest_url(service), content=body, headers={"X-Emnify-Secret": SECRET}
        )
    assert answer.status_code == 400
    assert says in answer.json()["error"]
    store = _reopened(daemon)
    assert store.counts()["quarantined"] == 0
    assert store.seen_count() == 0


async def test_a_body_only_the_lenient_reader_reads_is_taken(tmp_path, simulator, hook_env):
    # A number beyond a double and a lone surrogate: valid JSON that orjson refuses.
    daemon, service = _daemon(tmp_path, simulator)
    event = {**_quota_event(simulator), "description": orjson.Fragment(b'"a \\udc00 b"')}
    body = orjson.dumps([{**event, "detail": {"volume": orjson.Fragment(b"1e400")}}])
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        answer = await client.post(
            ingest_url(service), content=body, headers={"X-Emnify-Secret": SECRET}
        )
        await eventually(lambda: len(hook_env.calls()) == 1)
    assert answer.status_code == 200 and answer.json()["new"] == 1
    assert _reopened(daemon).seen_count() == 1


async def test_usage_records_are_ignored_and_counted_while_no_rule_uses_them(
    tmp_path, simulator, hook_env
):
    daemon, service = _daemon(tmp_path, simulator)
    event = _quota_event(simulator)
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        answer = await client.post(
            ingest_url(service),
            content=orjson.dumps([USAGE_RECORD, event, {**USAGE_RECORD, "id": 98766}]),
            headers={"X-Emnify-Secret": SECRET},
        )
        await eventually(lambda: len(hook_env.calls()) == 1)
        metrics = (await client.get(service.base_url + "/metrics")).text
    assert answer.status_code == 200
    assert answer.json() == {
        "received": 3,
        "new": 1,
        "duplicates": 0,
        "quarantined": 0,
        "usage_used": 0,
        "usage_ignored": 2,
    }
    assert metric_value(metrics, "event_engine_streamer_usage_records_ignored_total") == 2
    assert _reopened(daemon).counts()["quarantined"] == 0  # ignored, not treated as broken events


def test_usage_records_are_told_from_event_records_by_their_fields():
    assert is_usage_record(USAGE_RECORD)
    assert not is_usage_record({"event_type": {"id": 19}, "volume": {"total": 1}})
    assert not is_usage_record({"id": 3})  # neither: the pipeline quarantines it
    assert not is_usage_record([1, 2])


async def test_an_event_pushed_by_the_streamer_and_also_polled_acts_once(
    tmp_path, hook_env: WebhookSink
):
    service = HttpService(HttpSettings(port=0))
    service.bind()
    simulated = SimulatorConfig(
        seed=3,
        endpoints=6,
        late_fraction=0.0,
        stream_url=ingest_url(service),
        stream_headers={"X-Emnify-Secret": SECRET},
        stream_interval=0.05,
    )
    with SimulatorServer(simulated) as simulator:
        config = engine_config(tmp_path, simulator)
        config = with_poller(
            replace(config, sources=("poller", "data_streamer")),
            interval=poller_settings(config).interval / 4,
        ).with_source_settings(data_streamer=StreamerSettings(secret=SECRET))
        daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN, services=[service])
        received = daemon.metrics.registry.get_sample_value
        async with running_daemon(daemon):
            sim = simulator.state.sims()[0]
            event = _quota_event(simulator)
            await eventually(
                lambda: (
                    (received("event_engine_events_received_total", {"source": "poller"}) or 0) >= 1
                    and (
                        received("event_engine_events_received_total", {"source": "data_streamer"})
                        or 0
                    )
                    >= 1
                )
            )
            await eventually(lambda: len(hook_env.calls()) >= 1)
            await eventually(lambda: simulator.state.sim(sim["id"])["status"]["id"] == 2)
            # Both doors delivered the event; give a wrongly repeated action time to show.
            await poller_of(daemon).poll_once()
            while await daemon.dispatcher.run_due():
                pass
        assert simulator.streamer is not None
        assert simulator.streamer.stats.delivered_events >= 1
    store = _reopened(daemon)
    rows = store.audit_rows(event_id=event["id"])
    assert [r["outcome"] for r in rows if r["action"] is None] == ["matched"]
    assert len(store.intents_for_events([event["id"]])) == 2
    assert len(hook_env.calls()) == 1
    patches = [
        r for r in simulator.state.requests() if r.method == "PATCH" and str(sim["id"]) in r.path
    ]
    assert len(patches) == 1
    new = sum(
        received("event_engine_events_new_total", {"source": s}) or 0
        for s in ("poller", "data_streamer")
    )
    duplicates = sum(
        received("event_engine_events_duplicate_total", {"source": s}) or 0
        for s in ("poller", "data_streamer")
    )
    assert duplicates >= 1
    assert new == store.seen_count()


async def test_a_delivery_that_cannot_be_recorded_gets_503_and_the_streamer_retries_it(
    tmp_path, hook_env, monkeypatch
):
    service = HttpService(HttpSettings(port=0))
    service.bind()
    simulated = SimulatorConfig(
        seed=3,
        endpoints=6,
        late_fraction=0.0,
        stream_url=ingest_url(service),
        stream_headers={"X-Emnify-Secret": SECRET},
        stream_interval=0.05,
        stream_retry_initial=0.05,
        stream_retry_max=0.1,
    )
    with SimulatorServer(simulated) as simulator:
        config = replace(
            engine_config(tmp_path, simulator), sources=("data_streamer",)
        ).with_source_settings(data_streamer=StreamerSettings(secret=SECRET))
        daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN, services=[service])
        real_commit = daemon.store.commit_batch
        failures = []

        def disk_full_twice(batch, now):  # a failure the simulator cannot produce: the store's
            if len(failures) < 2:
                failures.append(batch)
                raise StoreError("cannot commit to the state store: database or disk is full")
            return real_commit(batch, now)

        monkeypatch.setattr(daemon.store, "commit_batch", disk_full_twice)
        async with running_daemon(daemon):
            event = _quota_event(simulator)
            await eventually(lambda: len(hook_env.calls()) == 1)
            metrics = daemon.metrics.registry.get_sample_value
            assert metrics("event_engine_streamer_requests_total", {"status": "503"}) == 2
            assert metrics("event_engine_streamer_requests_total", {"status": "200"}) >= 1
            assert simulator.streamer is not None
            assert simulator.streamer.stats.failed_attempts == 2
    assert len(failures) == 2
    rows = _reopened(daemon).audit_rows(event_id=event["id"])
    assert [r["outcome"] for r in rows if r["action"] is None] == ["matched"]
