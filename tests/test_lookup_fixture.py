"""Lookups offline: `event-engine test` and `replay` read the facts rules look up from a
lookup file keyed by endpoint id, so rules with `lookup:` are testable without the API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.cli import main
from engine.errors import ConfigError
from engine.lookup_fixture import load_lookup_fixture
from engine.lookups import Fact

RULES = """\
rules:
  - id: cap-heavy-users
    when: {type: 18}
    lookup: [stats.month, connectivity]
    condition:
      and:
        - {">": [{"var": "lookup.stats.month.data.volume"}, 500]}
        - {"==": [{"var": "lookup.connectivity.status.description"}, "ONLINE"]}
    actions:
      - log: {message: "{{ event.endpoint.id }} used {{ lookup.stats.month.data.volume }} MB"}
"""

LOOKUPS = """\
501:
  stats.month: {data: {volume: 812.5}}
  connectivity: {status: {description: ONLINE}}
502:
  stats.month: {data: {volume: 40}}
  connectivity: {status: {description: ONLINE}}
503:
  stats.month: {data: {volume: 900}}
  connectivity: {unavailable: "HTTP 429 from the API"}
"""

TESTS = """\
rules: rules.yaml
lookups: lookups.yaml
defaults:
  event_type: {id: 18}
  event_source: {id: 1}
  event_severity: {id: 1}
tests:
  - name: a heavy user online is capped
    events: [{id: 1, endpoint: {id: 501}}]
    expect:
      - {rule: cap-heavy-users, action: log, params: {message: "501 used 812.5 MB"}}
  - name: a light user is left alone
    events: [{id: 2, endpoint: {id: 502}}]
    expect_none: true
  - name: an unavailable lookup does not act
    events: [{id: 3, endpoint: {id: 503}}, {id: 4, endpoint: {id: 999}}]
    expect_none: true
"""


def _files(tmp_path: Path, tests: str = TESTS, lookups: str = LOOKUPS) -> Path:
    (tmp_path / "rules.yaml").write_text(RULES, encoding="utf-8")
    (tmp_path / "lookups.yaml").write_text(lookups, encoding="utf-8")
    path = tmp_path / "caps.test.yaml"
    path.write_text(tests, encoding="utf-8")
    return path


def test_a_lookup_file_gives_each_endpoint_its_facts(tmp_path):
    _files(tmp_path)
    table = load_lookup_fixture(tmp_path / "lookups.yaml")
    assert table[501]["stats.month"] == Fact({"data": {"volume": 812.5}})
    assert table[503]["connectivity"] == Fact(error="HTTP 429 from the API")


def test_a_wrong_lookup_file_is_refused_with_its_file_and_line(tmp_path):
    _files(tmp_path, lookups="501:\n  stats.mnth: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_lookup_fixture(tmp_path / "lookups.yaml")
    assert str(caught.value.where) == f"{tmp_path / 'lookups.yaml'}:2"
    assert "unknown lookup 'stats.mnth'" in str(caught.value)
    assert "stats.month" in str(caught.value.hint)


def test_rule_tests_judge_lookup_rules_on_the_lookup_file(tmp_path, capsys):
    path = _files(tmp_path)
    code = main(["test", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "rule tests: 3 passed, 0 failed" in out


def test_a_rule_test_expecting_an_action_on_an_unavailable_lookup_says_why(tmp_path, capsys):
    tests = TESTS.replace(
        "    events: [{id: 3, endpoint: {id: 503}}, {id: 4, endpoint: {id: 999}}]\n"
        "    expect_none: true",
        "    events: [{id: 3, endpoint: {id: 503}}]\n"
        "    expect: [{rule: cap-heavy-users, action: log}]",
    )
    code = main(["test", str(_files(tmp_path, tests))])
    out = capsys.readouterr().out
    assert code == 1
    assert "lookup unavailable: connectivity for endpoint 503: HTTP 429 from the API" in out


def test_replay_reads_lookups_from_the_file_it_is_given(tmp_path, capsys):
    _files(tmp_path)
    events = tmp_path / "events.jsonl"
    lines = [
        {
            "id": n,
            "timestamp": f"2025-05-01T10:0{n}:00Z",
            "event_type": {"id": 18},
            "event_source": {"id": 1},
            "event_severity": {"id": 1},
            "endpoint": {"id": endpoint},
        }
        for n, endpoint in enumerate((501, 502, 503), start=1)
    ]
    events.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    args = ["replay", "--rules", str(tmp_path / "rules.yaml"), "--events", str(events)]

    assert main([*args, "--lookups", str(tmp_path / "lookups.yaml")]) == 0
    planned = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p["event_id"], p["params"]["message"]) for p in planned] == [(1, "501 used 812.5 MB")]

    assert main(args) == 0  # without the file every lookup is unavailable
    assert capsys.readouterr().out == ""


def test_a_test_file_naming_a_missing_lookup_file_is_refused(tmp_path, capsys):
    path = _files(tmp_path, TESTS.replace("lookups: lookups.yaml", "lookups: nowhere.yaml"))
    code = main(["test", str(path)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"{tmp_path / 'nowhere.yaml'}: test file: lookup file: cannot read" in out
