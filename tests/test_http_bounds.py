"""The daemon's HTTP server is bounded, fed over real loopback sockets as an attacker would:
connections that send nothing or drip their headers are closed, oversized headers get 431, a
body that drips gets 408, idle connections give way past the connection limit and busy ones
make new ones wait outside (503), refusals are logged once per burst, and a large delivery
is capped by its records and judged in slices while the event loop keeps turning."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import orjson
import pytest

from engine import logging as engine_logging
from engine.config import load_config
from engine.daemon import Daemon
from engine.errors import ConfigError
from engine.http.service import HttpService
from engine.http.settings import HttpSettings
from engine.simulator import SimulatorServer
from engine.sources.streamer import StreamerSettings

from helpers import TOKEN, engine_config, ingest_url, metric_value, rules_from, running_daemon

ROOT = Path(__file__).resolve().parent.parent
SECRET = "streamer-secret-for-bounds-tests"
RULES = """
rules:
  - id: suspend-on-quota
    when: {source: policy_control, type: "Quota used up"}
    actions: [{suspend_sim: {}}]
"""


@pytest.fixture
def engine_log() -> Iterator[io.StringIO]:
    """What the engine logs (JSON lines), for counting lines."""
    stream = io.StringIO()
    engine_logging.configure("info", "json", stream=stream)
    yield stream


def _daemon(
    tmp_path: Path,
    simulator: SimulatorServer,
    *,
    max_records: int | None = None,
    rules: str = RULES,
    dry_run: bool = False,
    **http: object,
) -> tuple[Daemon, HttpService]:
    streamer = StreamerSettings(
        secret=SECRET,
        max_body_bytes=16 * 1024 * 1024,
        **({"max_records": max_records} if max_records is not None else {}),
    )
    config = replace(
        engine_config(tmp_path, simulator), sources=("data_streamer",), dry_run=dry_run
    ).with_source_settings(data_streamer=streamer)
    service = HttpService(HttpSettings(port=0, **http))  # type: ignore[arg-type]
    service.bind()
    daemon = Daemon(config, rules_from(tmp_path, rules), TOKEN, services=[service])
    return daemon, service


async def _connect(service: HttpService) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", service.port)


async def _answer(reader: asyncio.StreamReader, within: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), within)


def _lines(log: io.StringIO, text: str) -> list[str]:
    return [line for line in log.getvalue().splitlines() if text in line]


def _ingest_head(service: HttpService, length: int) -> bytes:
    return (
        f"POST /ingest/data-streamer HTTP/1.1\r\nHost: engine\r\nX-Emnify-Secret: {SECRET}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


# -- headers ---------------------------------------------------------------------------------


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    tmp_path, simulator
):
    daemon, service = _daemon(tmp_path, simulator, header_timeout=0.3)
    async with running_daemon(daemon):
        reader, writer = await _connect(service)
        assert await _answer(reader) == b""  # closed, without a word
        writer.close()


async def test_headers_dripped_a_line_at_a_time_are_cut_off_with_408(
    tmp_path, simulator, engine_log
):
    daemon, service = _daemon(tmp_path, simulator, header_timeout=0.3)
    async with running_daemon(daemon):
        reader, writer = await _connect(service)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: engine\r\n")

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                for number in range(100):
                    writer.write(b"X-Drip-%d: slow\r\n" % number)
                    await writer.drain()
                    await asyncio.sleep(0.05)

        dripping = asyncio.create_task(drip())
        answer = await _answer(reader)
        dripping.cancel()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert len(_lines(engine_log, "headers did not arrive in time")) == 1


async def test_headers_larger_than_the_limit_get_431(tmp_path, simulator):
    daemon, service = _daemon(tmp_path, simulator, max_header_bytes=8192)
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        huge = await client.get(service.base_url + "/healthz", headers={"X-Big": "a" * 20_000})
        fine = await client.get(service.base_url + "/healthz", headers={"X-Small": "a" * 2000})
    assert huge.status_code == 431
    assert fine.status_code == 200


# -- the connection limit --------------------------------------------------------------------


async def test_500_idle_connections_leave_the_daemon_ready_and_the_log_quiet(
    tmp_path, simulator, engine_log
):
    daemon, service = _daemon(tmp_path, simulator)
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        idle = [await _connect(service) for _ in range(500)]
        health = await client.get(service.base_url + "/healthz")
        ready = await client.get(service.base_url + "/readyz")
        for _, writer in idle:
            writer.close()
    assert (health.status_code, ready.status_code) == (200, 200)
    assert len(engine_log.getvalue().splitlines()) < 10


async def test_past_the_limit_idle_connections_give_way_so_probes_and_deliveries_get_in(
    tmp_path, simulator, engine_log
):
    daemon, service = _daemon(tmp_path, simulator, max_connections=20)
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        idle = [await _connect(service) for _ in range(200)]
        await asyncio.sleep(0.1)  # let the server take them all in
        health = await client.get(service.base_url + "/healthz")
        delivery = await client.post(
            ingest_url(service), content=b"[]", headers={"X-Emnify-Secret": SECRET}
        )
        metrics = (await client.get(service.base_url + "/metrics")).text
        for _, writer in idle:
            writer.close()
    assert (health.status_code, delivery.status_code) == (200, 200)
    gave_way = metric_value(
        metrics, "event_engine_http_turned_away_total", reason="idle one closed at the limit"
    )
    assert gave_way is not None and gave_way >= 180
    assert len(_lines(engine_log, "HTTP connection limit reached")) == 1
    assert len(_lines(engine_log, "more HTTP connections turned away")) == 1  # at shutdown


async def test_when_every_connection_has_a_request_in_progress_new_ones_get_503(
    tmp_path, simulator, engine_log
):
    daemon, service = _daemon(tmp_path, simulator, max_connections=3, body_timeout=10.0)
    async with running_daemon(daemon):
        busy = [await _connect(service) for _ in range(3)]
        for _, writer in busy:  # headers in, the body never comes
            writer.write(_ingest_head(service, 100))
            await writer.drain()
        await asyncio.sleep(0.1)
        refused = []
        for _ in range(10):
            reader, writer = await _connect(service)
            refused.append(await _answer(reader))
            writer.close()
        for _, writer in busy:
            writer.close()
    assert all(answer.startswith(b"HTTP/1.1 503 ") for answer in refused)
    assert len(_lines(engine_log, "HTTP connection refused")) == 1


# -- deliveries ------------------------------------------------------------------------------


async def test_a_delivery_whose_body_drips_gets_408_and_the_stream_may_send_it_again(
    tmp_path, simulator, engine_log
):
    daemon, service = _daemon(tmp_path, simulator, body_timeout=0.5)
    async with running_daemon(daemon):
        reader, writer = await _connect(service)
        writer.write(_ingest_head(service, 1000))

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(100):
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(0.05)

        dripping = asyncio.create_task(drip())
        answer = await _answer(reader)
        dripping.cancel()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"did not arrive within 0.5s" in answer
    assert len(_lines(engine_log, "Data Streamer delivery refused (408)")) == 1


async def test_a_client_that_goes_away_mid_body_leaves_no_traceback(
    tmp_path, simulator, engine_log, caplog
):
    daemon, service = _daemon(tmp_path, simulator)
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        for _ in range(5):
            _, writer = await _connect(service)
            writer.write(_ingest_head(service, 1000) + b"[{")
            await writer.drain()
            writer.close()
        await asyncio.sleep(0.2)
        health = await client.get(service.base_url + "/healthz")
    assert health.status_code == 200
    assert "Traceback" not in engine_log.getvalue() + caplog.text
    assert "Exception in ASGI application" not in caplog.text


async def test_refused_deliveries_are_logged_once_per_burst_not_once_each(
    tmp_path, simulator, engine_log
):
    daemon, service = _daemon(tmp_path, simulator)
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        answers = [
            await client.post(ingest_url(service), content=b"[]", headers={"X-Emnify-Secret": "x"})
            for _ in range(100)
        ]
        during = _lines(engine_log, "Data Streamer deliver")
    assert {a.status_code for a in answers} == {401}
    assert len(during) == 1 and "refused (401)" in during[0]
    (summary,) = _lines(engine_log, "more Data Streamer deliveries refused")
    assert orjson.loads(summary)["count"] == 99


async def test_a_delivery_over_the_record_limit_gets_413_and_records_nothing(tmp_path, simulator):
    daemon, service = _daemon(tmp_path, simulator, max_records=100)
    records = [{"id": 1000 + n, "timestamp": "2026-01-01T00:00:00Z"} for n in range(101)]
    # Few records of many values each: refused before a byte of it is parsed.
    dense = [{"id": 1, "detail": list(range(20_000))}]
    headers = {"X-Emnify-Secret": SECRET}
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        many = await client.post(
            ingest_url(service), content=orjson.dumps(records), headers=headers
        )
        heavy = await client.post(ingest_url(service), content=orjson.dumps(dense), headers=headers)
        fits = await client.post(
            ingest_url(service), content=orjson.dumps(records[:100]), headers=headers
        )
    assert many.status_code == 413
    assert "101 records, more than the 100" in many.json()["error"]
    assert heavy.status_code == 413
    assert "more JSON values than 100 records" in heavy.json()["error"]
    assert fits.status_code == 200 and fits.json()["received"] == 100


async def test_a_large_delivery_is_judged_in_slices_while_the_event_loop_keeps_turning(
    tmp_path, simulator
):
    # Every event matches and is recorded as "would have acted" (dry run): judging them
    # costs far more than reading them, as with a busy rule set.
    count = 15_000
    rules = "rules: [{id: every-pdp, when: {type: 3}, actions: [{log: {}}]}]"
    daemon, service = _daemon(tmp_path, simulator, max_records=count, rules=rules, dry_run=True)
    body = orjson.dumps(
        [
            {"id": 10_000_000 + n, "timestamp": "2026-01-01T00:00:00Z", "event_type": {"id": 3}}
            for n in range(count)
        ]
    )
    longest = 0.0

    async def watch_the_loop() -> None:
        nonlocal longest
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            longest = max(longest, time.perf_counter() - before)

    async with running_daemon(daemon), httpx.AsyncClient(timeout=60) as client:
        watching = asyncio.create_task(watch_the_loop())
        answer = await client.post(
            ingest_url(service), content=body, headers={"X-Emnify-Secret": SECRET}
        )
        watching.cancel()
    assert answer.status_code == 200 and answer.json()["new"] == count
    # Judged in one piece, the loop stood still for seconds; in slices, for one slice (or
    # the parse of the body) at most.
    assert longest < 0.6, longest


# -- configuration and deployment ------------------------------------------------------------


def test_the_http_bounds_and_the_record_limit_are_read_from_the_config_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "http:\n  max_connections: 50\n  header_timeout: 3s\n  max_header_bytes: 4096\n"
        "  body_timeout: 1m\ndata_streamer:\n  max_records: 500\n"
    )
    loaded = load_config(config)
    assert (loaded.http.max_connections, loaded.http.max_header_bytes) == (50, 4096)
    assert (loaded.http.header_timeout, loaded.http.body_timeout) == (3.0, 60.0)
    assert loaded.source_settings["data_streamer"].max_records == 500
    config.write_text("http:\n  port: 8080\n  header_timeout: 0s\n")
    with pytest.raises(ConfigError, match=rf"{config}:3: `http.header_timeout` must be longer"):
        load_config(config)


def test_the_systemd_unit_raises_the_open_files_limit_above_the_connection_limit():
    unit = (ROOT / "deploy" / "event-engine.service").read_text()
    (line,) = [line for line in unit.splitlines() if line.startswith("LimitNOFILE=")]
    assert int(line.removeprefix("LimitNOFILE=")) > HttpSettings().max_connections + 256
