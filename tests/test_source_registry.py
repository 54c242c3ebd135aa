"""One place to add a source: a source written in one module (tests/sample_source.py) is found
by name, reads its own config section, runs in the daemon beside nothing else, and shows in
`/readyz` and `/metrics`, with no other file of the engine naming it."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import orjson
import pytest
from sample_source import FileDrop, FileDropSettings

from engine.config import Config, load_config
from engine.daemon import Daemon
from engine.errors import ConfigError, EngineError
from engine.http.app import source_routes
from engine.http.service import HttpService
from engine.simulator import SimulatorServer
from engine.sources import registered
from engine.sources.base import Answer, Route, Source, SourceError
from engine.sources.poller import PollerSource
from engine.sources.streamer import StreamerSource
from engine.store import SqliteStore

from helpers import TOKEN, eventually, metric_value, rules_from, running_daemon

RULES = """
rules:
  - id: suspend-on-quota
    when: {source: policy_control, type: "Quota used up"}
    actions: [{suspend_sim: {}}]
"""


def _config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "engine.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config(path)


def _file_drop_config(tmp_path: Path, simulator: SimulatorServer) -> Config:
    return _config(
        tmp_path,
        f"""
        api: {{base_url: "{simulator.base_url}", backoff_initial: 0.01, backoff_max: 0.05}}
        store: {{path: state/engine.sqlite3}}
        http: {{port: 0}}
        sources: [file_drop]
        file_drop: {{path: drop.jsonl, every: 0.1}}
        """,
    )


def test_sources_are_found_by_name_without_a_list_to_keep():
    sources = registered()
    assert sources["poller"] is PollerSource
    assert sources["data_streamer"] is StreamerSource
    assert sources["file_drop"] is FileDrop  # registered by importing its module


def test_a_source_reads_its_own_section_and_paths_are_relative_to_the_config_file(tmp_path):
    config = _config(tmp_path, "sources: [poller, file_drop]\nfile_drop: {path: in/drop.jsonl}\n")
    assert config.sources == ("poller", "file_drop")
    assert config.source_settings["file_drop"] == FileDropSettings(path=tmp_path / "in/drop.jsonl")


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        ("sources: [poller, file_dorp]\n", 1, "did you mean `file_drop`"),
        ("file_drop:\n  every: soon\n", 2, "`file_drop.every`"),
        ("file_drop:\n  pth: drop.jsonl\n", 2, "did you mean `path`"),
        ("sources: [file_drop]\n", 1, "the file_drop source needs `file_drop.path`"),
    ],
)
def test_a_sources_config_mistakes_are_reported_with_file_and_line(tmp_path, text, line, says):
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, text)
    assert str(caught.value).startswith(f"{tmp_path / 'engine.yaml'}:{line}: ")
    assert says in str(caught.value)


def test_two_sources_may_not_share_a_name():
    with pytest.raises(SourceError, match="two sources are named 'file_drop'"):

        class _Again(FileDrop, name="file_drop"):
            pass

    assert registered()["file_drop"] is FileDrop


def test_a_route_a_source_asks_for_may_not_take_a_path_already_served():
    async def handle(request: object) -> Answer:
        return Answer(200)

    clashing = SimpleNamespace(name="clash", routes=lambda: [Route("/metrics", ("GET",), handle)])
    with pytest.raises(EngineError, match="the clash source asks for /metrics, which is taken"):
        source_routes(SimpleNamespace(sources=[clashing]))  # type: ignore[arg-type]


async def test_a_source_added_in_one_module_runs_and_its_events_are_judged_and_acted_on(
    tmp_path, simulator
):
    simulator.state.set_event_rate(0)
    config = _file_drop_config(tmp_path, simulator)
    service = HttpService(config.http)
    service.bind()
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN, services=[service])
    drop = daemon.source("file_drop")
    assert isinstance(drop, FileDrop) and isinstance(drop, Source)
    sim = simulator.state.sims()[0]
    async with running_daemon(daemon), httpx.AsyncClient(base_url=service.base_url) as client:
        await eventually(lambda: drop.error is not None)  # no file yet
        waiting = await client.get("/readyz")
        (event,) = simulator.state.store_events([{"event_type": {"id": 19}, "sim_id": sim["id"]}])
        with (tmp_path / "drop.jsonl").open("ab") as file:
            file.write(orjson.dumps(event) + b"\n")
        await eventually(lambda: simulator.state.sim(sim["id"])["status"]["id"] == 2)
        await eventually(lambda: drop.error is None)
        ready = await client.get("/readyz")
        metrics = (await client.get("/metrics")).text

    assert waiting.status_code == 503
    assert waiting.json()["checks"]["file_drop"] == {
        "ok": False,
        "detail": f"cannot read {tmp_path / 'drop.jsonl'}: No such file or directory",
    }
    assert ready.status_code == 200
    assert set(ready.json()["checks"]) == {"store", "lease", "file_drop", "api"}  # no poller
    labels = {"source": "file_drop"}
    assert metric_value(metrics, "event_engine_events_received_total", **labels) == 1
    assert metric_value(metrics, "event_engine_events_new_total", **labels) == 1
    assert metric_value(metrics, "event_engine_events_received_total", source="poller") is None
    assert daemon.summary.new_events_by_source == {"file_drop": 1}
    assert [r.path for r in simulator.state.requests() if r.path == "/api/v1/event"] == []
    reopened = SqliteStore(config.store_path)
    (matched,) = [r for r in reopened.audit_rows() if r["outcome"] == "matched"]
    assert matched["event_id"] == event["id"]


async def test_a_listed_source_is_built_from_its_settings_not_from_a_hand_kept_switch(
    tmp_path, simulator
):
    config = _file_drop_config(tmp_path, simulator)
    both = replace(config, sources=("file_drop", "poller"))
    daemon = Daemon(both, rules_from(tmp_path, RULES), TOKEN)
    try:
        assert [source.name for source in daemon.sources] == ["file_drop", "poller"]
        with pytest.raises(EngineError, match="no data_streamer source in this daemon"):
            daemon.source("data_streamer")
    finally:
        await daemon.aclose()
