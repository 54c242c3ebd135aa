"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from engine.config import Config, load_config
from engine.rules import RuleSet, load_rules
from engine.simulator import SimulatorServer


def write_rules(directory: Path, text: str, name: str = "rules.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def rules_from(directory: Path, text: str) -> RuleSet:
    return load_rules(write_rules(directory, text))


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
        poller=replace(
            config.poller, interval=timedelta(seconds=1), initial_lookback=timedelta(minutes=5)
        ),
    )
