"""The command line as a user meets it: exit codes, messages, output formats."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from engine.cli import build_parser, main
from engine.simulator import generate_events

from helpers import write_rules

ROOT = Path(__file__).resolve().parent.parent


def _run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_every_command_explains_itself_with_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in ("run", "demo", "simulate", "validate", "replay"):
        assert name in commands
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0


def test_validate_accepts_the_example_rules(capsys):
    assert main(["validate", str(ROOT / "rules")]) == 0
    assert "rules valid" in capsys.readouterr().out


def test_validate_names_file_and_line_of_a_typo(tmp_path, capsys):
    path = write_rules(
        tmp_path,
        """
        rules:
          - id: quota
            when: {type: 19}
            actions:
              - suspend_simm: {}
        """,
    )
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:6:" in err
    assert "did you mean `suspend_sim`?" in err


def test_replay_prints_one_json_object_per_planned_action(tmp_path, capsys):
    rules = write_rules(
        tmp_path,
        """
        rules:
          - id: suspend-on-quota
            when: {type: 19}
            actions:
              - suspend_sim: {}
              - log: {message: "quota used up on {{ event.sim.iccid }}"}
        """,
    )
    quota = {
        "id": 7,
        "timestamp": "2025-05-01T10:00:00Z",
        "event_type": {"id": 19, "description": "Quota used up"},
        "event_source": {"id": 1},
        "event_severity": {"id": 1},
        "sim": {"id": 9, "iccid": "8988"},
        "endpoint": {"id": 5, "name": "truck"},
    }
    other = {**quota, "id": 8, "event_type": {"id": 1}}
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(orjson.dumps(e) for e in (quota, other, quota)) + b"\n")

    assert main(["replay", "--rules", str(rules), "--events", str(events)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    target = {"sim_id": 9, "endpoint_id": 5, "iccid": "8988"}
    assert lines == [
        {
            "event_id": 7,
            "rule": "suspend-on-quota",
            "action": "suspend_sim",
            "target": target,
            "params": {},
        },
        {
            "event_id": 7,
            "rule": "suspend-on-quota",
            "action": "log",
            "target": target,
            "params": {"message": "quota used up on 8988", "level": "info"},
        },
    ]


def test_replay_closes_with_matches_and_planned_actions_per_rule_a_digests_too(tmp_path, capsys):
    rules = write_rules(
        tmp_path,
        """
        rules:
          - id: suspend-on-quota
            when: {type: 19}
            actions: [{suspend_sim: {}}, {log: {}}]
          - id: morning-digest
            when: {type: 19}
            schedule: "0 8 * * *"
            digest: {max_events: 10}
            actions: [{log: {message: "{{ count }} quota events"}}]
          - id: never-matches
            when: {type: 3}
            actions: [{log: {}}]
        """,
    )
    quota = {
        "id": 7,
        "timestamp": "2025-05-01T10:00:00Z",
        "description": "Quota used up",
        "event_type": {"id": 19, "description": "Quota used up"},
        "sim": {"id": 9, "iccid": "8988"},
    }
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(orjson.dumps({**quota, "id": n}) for n in (1, 2, 3)) + b"\n")
    assert main(["replay", "--rules", str(rules), "--events", str(events)]) == 0
    err = capsys.readouterr().err
    rows = {line.split()[0]: line.split()[1:3] for line in err.splitlines()[2:] if "  " in line}
    assert rows["suspend-on-quota"] == ["3", "6"]
    assert rows["morning-digest"] == ["3", "0"]
    assert "a digest: acts at its schedule, not in a replay" in err
    assert "1 rule(s) matched nothing: never-matches" in err


def test_replay_starts_without_the_http_stack(tmp_path):
    """Replay only plans actions: it loads neither httpx, nor the API client, nor the rule
    test runner, a tenth of a second of every start."""
    rules = write_rules(
        tmp_path,
        """
        rules:
          - id: hook
            when: {type: 19}
            actions:
              - webhook: {url: "https://example.com/hook", body: {iccid: "{{ event.sim.iccid }}"}}
        """,
    )
    event = {
        "id": 7,
        "timestamp": "2025-05-01T10:00:00Z",
        "event_type": {"id": 19},
        "sim": {"id": 9, "iccid": "8988"},
    }
    events = tmp_path / "events.jsonl"
    events.write_bytes(orjson.dumps(event) + b"\n")
    script = (
        "import sys\n"
        "from engine.cli import main\n"
        f"code = main(['replay', '--rules', {str(rules)!r}, '--events', {str(events)!r}])\n"
        "loaded = sorted(m for m in ('httpx', 'engine.emnify', 'engine.ruletests')"
        " if m in sys.modules)\n"
        "print('loaded:', loaded, 'exit:', code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert '"url":"https://example.com/hook"' in done.stdout  # the webhook was planned
    assert done.stdout.splitlines()[-1] == "loaded: [] exit: 0"


def test_replay_reads_a_json_array_too(tmp_path, capsys):
    rules = write_rules(tmp_path, "rules: [{id: r, when: {type: 19}, actions: [suspend_sim: {}]}]")
    events = tmp_path / "events.json"
    events.write_bytes(orjson.dumps(list(generate_events(300, seed=2))))
    assert main(["replay", "--rules", str(rules), "--events", str(events)]) == 0
    planned = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = [e["id"] for e in generate_events(300, seed=2) if e["event_type"]["id"] == 19]
    assert [p["event_id"] for p in planned] == expected


def test_replay_reports_malformed_lines_with_their_number_and_goes_on(tmp_path, capsys):
    rules = write_rules(tmp_path, "rules: [{id: r, when: {type: 19}, actions: [suspend_sim: {}]}]")
    good = orjson.dumps(
        {"id": 3, "timestamp": "2025-05-01T10:00:00Z", "event_type": {"id": 19}, "sim": {"id": 1}}
    ).decode()
    events = tmp_path / "events.jsonl"
    events.write_text(
        "{not json\n" + '{"id": 2, "timestamp": "never"}\n' + good + "\n", encoding="utf-8"
    )
    assert main(["replay", "--rules", str(rules), "--events", str(events)]) == 0
    captured = capsys.readouterr()
    assert f"{events}:1: not valid JSON" in captured.err
    assert f"{events}:2: malformed event: timestamp: unrecognised timestamp 'never'" in captured.err
    assert [json.loads(line)["event_id"] for line in captured.out.splitlines()] == [3]


def test_replay_with_invalid_rules_exits_1_with_the_errors(tmp_path, capsys):
    rules = write_rules(tmp_path, "rules: [{id: r, when: {severity: loud}, actions: [log: {}]}]")
    events = tmp_path / "e.jsonl"
    events.write_text("", encoding="utf-8")
    assert main(["replay", "--rules", str(rules), "--events", str(events)]) == 1
    assert f"{rules}:1" in capsys.readouterr().err


def test_a_missing_events_file_is_a_clear_error(tmp_path, capsys):
    rules = write_rules(tmp_path, "rules: [{id: r, actions: [log: {}]}]")
    assert main(["replay", "--rules", str(rules), "--events", str(tmp_path / "nope")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_run_without_a_token_says_how_to_get_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMNIFY_APPLICATION_TOKEN")}
    result = subprocess.run(
        [sys.executable, "-m", "engine", "run", "--rules", str(ROOT / "rules")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1
    assert "EMNIFY_APPLICATION_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_config_file_with_an_unknown_option_names_its_line(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("api:\n  base_url: http://127.0.0.1:1\npoller:\n  intervall: 5s\n")
    result = _run("run", "--config", str(config), env={"EMNIFY_APPLICATION_TOKEN": "x" * 20})
    assert result.returncode == 1
    assert (
        f"{config}:4: unknown option `poller.intervall` (did you mean `interval`?)" in result.stderr
    )


def test_the_example_config_loads(monkeypatch):
    from engine.config import load_config

    config = load_config(ROOT / "config.example.yaml")
    assert config.api.base_url == "https://cdn.emnify.net"
    assert config.rules == ROOT / "rules"


def test_simulate_writes_generated_events_as_json_lines(tmp_path):
    out = tmp_path / "events.jsonl"
    result = _run("simulate", "--write-events", str(out), "--count", "500", "--seed", "4")
    assert result.returncode == 0, result.stderr
    lines = out.read_bytes().splitlines()
    assert len(lines) == 500
    assert orjson.loads(lines[0]) == next(generate_events(1, seed=4))


def test_demo_suspends_a_sim_and_delivers_a_webhook_then_stops_by_itself():
    result = _run("demo", "--duration", "7s", timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = result.stdout
    # The actions table: kind, outcome and count in columns as wide as the longest kind.
    assert re.search(r"^  suspend_sim +done +[1-9]\d*$", summary, re.MULTILINE)
    assert re.search(r"^  webhook +delivered +[1-9]\d*$", summary, re.MULTILINE)
    rows = [line for line in summary.splitlines() if re.match(r"^  [a-z_]+ +[a-z]+ +\d+$", line)]
    assert len({line.index(line.split()[1], 2 + len(line.split()[0])) for line in rows}) == 1
    assert "Activated → Suspended" in summary


def test_run_refuses_to_start_when_a_webhook_secret_is_unset(tmp_path):
    rules = write_rules(
        tmp_path,
        """
        rules:
          - id: page-oncall
            when: {severity: critical}
            actions:
              - webhook: {url: "${PAGER_URL}", headers: {Authorization: "Bearer ${PAGER_KEY}"}}
        """,
    )
    config = tmp_path / "config.yaml"
    config.write_text(
        f"api:\n  base_url: http://127.0.0.1:9\n  max_retries: 0\nrules: {rules}\n"
        f"store:\n  path: {tmp_path / 's.sqlite3'}\nhttp:\n  enabled: false\n"
    )
    env = {"EMNIFY_APPLICATION_TOKEN": "x" * 20, "PAGER_KEY_FILE": str(tmp_path / "key")}
    result = _run("run", "--config", str(config), env=env)
    assert result.returncode == 1
    assert "${PAGER_URL} (rule page-oncall)" in result.stderr
    assert "PAGER_KEY}" not in result.stderr  # set through PAGER_KEY_FILE
    assert "Traceback" not in result.stderr


def test_validate_of_rules_it_cannot_read_is_one_error_line_not_a_traceback(tmp_path, capsys):
    # A folder the engine's user may not enter raises EACCES, which a test run as root
    # never meets; a name too long to look up fails the same way.
    unreadable = tmp_path / ("r" * 300)
    assert main(["validate", str(unreadable)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {str(unreadable)[:200]}...: cannot read: File name too long")
    assert "see docs/service.md" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
