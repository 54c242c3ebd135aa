"""`event-engine rules list|resume` and the `guard:` config section, as an operator meets them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.cli import main
from engine.config import load_config
from engine.errors import ConfigError
from engine.pipeline import Pipeline
from engine.rules import MaxActions, load_rules
from engine.store import SqliteStore

from helpers import write_rules

RULES = """
rules:
  - id: suspend-on-quota
    when: {type: 19}
    max_actions: {count: 1, within: 1h}
    actions: [{suspend_sim: {}}]
  - id: trial
    mode: shadow
    when: {type: 11}
    actions: [{disable_endpoint: {}}]
"""


def _trip(rules: Path, store_path: Path) -> None:
    """Two quota events for two SIMs, just now: the second trips the guard."""
    now = datetime.now(UTC).replace(microsecond=0)
    records = [
        {
            "id": n,
            "timestamp": (now - timedelta(seconds=10 - n)).isoformat(),
            "event_type": {"id": 19},
            "sim": {"id": n, "iccid": f"898830300000000000{n}"},
        }
        for n in (1, 2)
    ]
    store = SqliteStore(store_path)
    Pipeline(load_rules(rules), store).process(records, source="test")
    store.close()


def test_rules_list_before_the_engine_ever_ran_shows_the_rules_as_written(tmp_path, capsys):
    rules = write_rules(tmp_path, RULES)
    store = tmp_path / "none.sqlite3"
    assert main(["rules", "list", "--rules", str(rules), "--store", str(store), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["rule"], r["mode"], r["guard"], r["held"]) for r in listed] == [
        ("suspend-on-quota", "live", {"count": 0, "limit": 1, "within": "1h"}, 0),
        ("trial", "shadow", None, 0),
    ]
    assert not store.exists()


def test_rules_list_shows_a_tripped_rule_and_resume_switches_it_back(tmp_path, capsys):
    rules = write_rules(tmp_path, RULES)
    store = tmp_path / "engine.sqlite3"
    _trip(rules, store)
    capsys.readouterr()  # the guard's log line
    assert main(["rules", "list", "--rules", str(rules), "--store", str(store), "--json"]) == 0
    (tripped, _) = json.loads(capsys.readouterr().out)
    assert (tripped["mode"], tripped["guard"]["count"], tripped["held"]) == ("shadow (guard)", 1, 1)
    assert "blast-radius guard: 2 destructive actions within 1h > 1" in tripped["note"]

    assert main(["rules", "resume", "suspend-on-quota", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "rule suspend-on-quota resumed: it acts again" in out
    assert "1 held actions stay held; `--release-held` would run them" in out
    assert main(["rules", "list", "--rules", str(rules), "--store", str(store), "--json"]) == 0
    (resumed, _) = json.loads(capsys.readouterr().out)
    assert (resumed["mode"], resumed["guard"]["count"], resumed["held"]) == ("live", 0, 1)


def test_resuming_a_rule_that_is_not_tripped_names_the_ones_that_are(tmp_path, capsys):
    rules = write_rules(tmp_path, RULES)
    store = tmp_path / "engine.sqlite3"
    _trip(rules, store)
    assert main(["rules", "resume", "suspend-on-quot", "--store", str(store)]) == 1
    err = capsys.readouterr().err
    assert "rule `suspend-on-quot` was not stopped by the blast-radius guard" in err
    assert "did you mean `suspend-on-quota`?" in err


def test_the_global_guard_is_read_from_the_config(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("guard:\n  max_actions:\n    count: 50\n    within: 10m\n", encoding="utf-8")
    assert load_config(config).guard_max_actions == MaxActions(50, timedelta(minutes=10))
    assert load_config(None).guard_max_actions is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("guard:\n  max_actions:\n    count: 50\n", ":2: `guard.max_actions` needs `count` and"),
        ("guard:\n  max_actions: {count: 5, within: soon}\n", "`guard.max_actions.within`"),
        ("guard:\n  max_action: {count: 5}\n", ":2: unknown option `guard.max_action`"),
        ("guard:\n  max_actions: {count: 0, within: 1m}\n", "must be a whole number of at least 1"),
    ],
)
def test_a_bad_guard_section_is_a_clear_error_with_its_line(tmp_path, text, message):
    config = tmp_path / "config.yaml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert message in str(raised.value)
