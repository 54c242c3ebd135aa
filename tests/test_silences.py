"""Silences and mute windows over the real path: `event-engine silence add|list|expire`
against the state file of a daemon that keeps running, events polled from the simulator
over loopback HTTP, a real SQLite file."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from engine.cli import main
from engine.config import load_config
from engine.daemon import Daemon
from engine.errors import ConfigError
from engine.events import format_timestamp, normalize
from engine.model import IntentStatus, Silence
from engine.mute_windows import MuteWindow
from engine.silences import StoredSilences
from engine.silencing import Quiet, covers, describe_matchers, parse_matcher
from engine.simulator import SimulatorServer

from helpers import TOKEN, engine_config, poller_of, rules_from

ACTIVE, SUSPENDED = 1, 2

SUSPEND_ON_QUOTA = """
rules:
  - id: suspend-on-quota
    when: {type: 19}
    actions: [{suspend_sim: {}}]
"""

THIRD_QUOTA_EVENT = """
rules:
  - id: suspend-after-3-quota-events
    when: {type: 19}
    threshold: {count: 3, within: 1h, per: sim.iccid}
    actions: [{suspend_sim: {}}]
"""


def _quota(simulator: SimulatorServer, sim_id: int, seconds_ago: float = 1) -> dict[str, Any]:
    moment = simulator.state.now() - timedelta(seconds=seconds_ago)
    return {"event_type": {"id": 19}, "sim_id": sim_id, "timestamp": format_timestamp(moment)}


def _status(simulator: SimulatorServer, sim_id: int) -> int:
    return int(simulator.state.sim(sim_id)["status"]["id"])


async def _poll_and_dispatch(daemon: Daemon, seconds_on: float) -> None:
    # The poll window has whole-second bounds: each poll runs its clock further on.
    poller_of(daemon).clock = lambda: datetime.now(UTC) + timedelta(seconds=seconds_on)
    await poller_of(daemon).poll_once()
    while await daemon.dispatcher.run_due():
        pass


def _silence(store: Path, *args: str) -> int:
    return main(["silence", *args, "--store", str(store)])


def _no_cache(daemon: Daemon) -> None:
    """Read the store's silences at every batch (the daemon caches them for a few seconds)."""
    quiet = daemon.pipeline.quiet
    assert isinstance(quiet, StoredSilences)
    quiet.refresh = timedelta(0)


async def test_a_silence_added_while_the_daemon_runs_stops_its_actions_until_expired(
    tmp_path, simulator, capsys
):
    sim = simulator.state.sims()[0]
    config = engine_config(tmp_path, simulator)
    daemon = Daemon(config, rules_from(tmp_path, SUSPEND_ON_QUOTA), TOKEN)
    _no_cache(daemon)
    store = config.store_path
    try:
        assert (
            _silence(
                store,
                "add",
                "--match",
                f"iccid={sim['iccid']}",
                "--for",
                "2h",
                "--comment",
                "SIM swap in the field",
                "--by",
                "alice",
            )
            == 0
        )
        assert "silence #1 added" in capsys.readouterr().out
        simulator.state.store_events([_quota(simulator, sim["id"])])
        await _poll_and_dispatch(daemon, 2)
        assert _status(simulator, sim["id"]) == ACTIVE
        (silenced,) = [r for r in daemon.store.audit_rows() if r["outcome"] == "silenced"]
        assert silenced["detail"] == "silenced by #1 (SIM swap in the field)"
        assert [i.status for i in daemon.store.intents()] == [IntentStatus.SHADOW]

        assert _silence(store, "expire", "1", "--by", "bob") == 0
        simulator.state.store_events([_quota(simulator, sim["id"])])
        await _poll_and_dispatch(daemon, 4)
        assert _status(simulator, sim["id"]) == SUSPENDED
    finally:
        await daemon.aclose()

    # Who added it, when and why, and who ended it, stay on record.
    capsys.readouterr()
    assert _silence(store, "list", "--all", "--json") == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["match"] == {"iccid": sim["iccid"]}
    assert (listed["created_by"], listed["expired_by"]) == ("alice", "bob")
    assert listed["comment"] == "SIM swap in the field"


async def test_silenced_matches_still_count_in_the_rules_window(tmp_path, simulator):
    sim = simulator.state.sims()[0]
    config = engine_config(tmp_path, simulator)
    daemon = Daemon(config, rules_from(tmp_path, THIRD_QUOTA_EVENT), TOKEN)
    _no_cache(daemon)
    store = config.store_path
    try:
        assert (
            _silence(
                store,
                "add",
                "--match",
                "rule=suspend-after-3-quota-events",
                "--for",
                "1h",
                "--comment",
                "maintenance",
            )
            == 0
        )
        simulator.state.store_events([_quota(simulator, sim["id"], s) for s in (30, 20)])
        await _poll_and_dispatch(daemon, 2)
        assert _status(simulator, sim["id"]) == ACTIVE

        assert _silence(store, "expire", "1") == 0
        simulator.state.store_events([_quota(simulator, sim["id"])])
        await _poll_and_dispatch(daemon, 4)
        # The window counted the two events judged while silenced: the third fires.
        assert _status(simulator, sim["id"]) == SUSPENDED
        fired = [r for r in daemon.store.audit_rows() if r["outcome"] == "fired"]
        assert fired[0]["detail"].startswith("3 of 3 events")
    finally:
        await daemon.aclose()


async def test_a_silence_on_a_tag_leaves_other_endpoints_acting(tmp_path, simulator):
    tagged, other = simulator.state.sims()[:2]
    endpoint = tagged["endpoint"]["id"]
    simulator.state.endpoint(endpoint)["tags"] = "maintenance,berlin"
    config = engine_config(tmp_path, simulator)
    daemon = Daemon(config, rules_from(tmp_path, SUSPEND_ON_QUOTA), TOKEN)
    try:
        assert (
            _silence(
                config.store_path,
                "add",
                "--match",
                "tag=maintenance",
                "--for",
                "2h",
                "--comment",
                "firmware rollout",
            )
            == 0
        )
        simulator.state.store_events(
            [
                {
                    **_quota(simulator, tagged["id"]),
                    "endpoint": {"id": endpoint, "tags": "maintenance,berlin"},
                },
                _quota(simulator, other["id"]),
            ]
        )
        await _poll_and_dispatch(daemon, 2)
    finally:
        await daemon.aclose()
    assert _status(simulator, tagged["id"]) == ACTIVE
    assert _status(simulator, other["id"]) == SUSPENDED


def test_a_silence_needs_a_comment_and_a_known_field(tmp_path, capsys):
    store = tmp_path / "state.sqlite3"
    from engine.store import SqliteStore

    SqliteStore(store).close()
    with pytest.raises(SystemExit):
        _silence(store, "add", "--match", "iccid=1", "--for", "2h")
    assert "--comment" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _silence(store, "add", "--match", "imsi=1", "--for", "2h", "--comment", "x")
    assert "iccid, endpoint, tag, rule" in capsys.readouterr().err
    assert _silence(store, "add", "--match", "iccid=1", "--for", "2h", "--comment", " ") == 1
    assert "needs a comment" in capsys.readouterr().err


def test_status_shows_the_silences_in_force_and_the_mute_windows(tmp_path, capsys):
    from engine.store import SqliteStore

    store = tmp_path / "state.sqlite3"
    SqliteStore(store).close()
    config = tmp_path / "engine.yaml"
    config.write_text(
        f"store: {{path: {store}}}\n"
        "mute_windows:\n"
        '  - {name: nightly, cron: "0 2 * * 1-5", for: 2h, timezone: Europe/Berlin,\n'
        "     match: {tag: maintenance}, comment: firmware rollout}\n"
    )
    assert (
        _silence(
            store,
            "add",
            "--match",
            "endpoint=42",
            "--for",
            "1h",
            "--comment",
            "moving the gateway",
            "--by",
            "carol",
        )
        == 0
    )
    capsys.readouterr()
    assert main(["status", "--config", str(config)]) == 0
    shown = capsys.readouterr().out
    assert "#1" in shown and "endpoint=42" in shown and "moving the gateway" in shown
    assert "nightly" in shown and "0 2 * * 1-5 Europe/Berlin for 2h, tag=maintenance" in shown
    assert main(["status", "--config", str(config), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["silences"][0]["created_by"] == "carol"
    assert data["mute_windows"][0]["name"] == "nightly"


# -- mute windows -------------------------------------------------------------------------

BERLIN = "Europe/Berlin"


def _window(**extra: Any) -> MuteWindow:
    from zoneinfo import ZoneInfo

    values: dict[str, Any] = {
        "name": "nightly",
        "cron": "0 2 * * 1-5",
        "length": timedelta(hours=2),
        "timezone": ZoneInfo(BERLIN),
    }
    return MuteWindow(**(values | extra))


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_a_mute_window_is_open_weekdays_from_two_to_four_in_its_time_zone():
    window = _window()
    # Wednesday 2025-01-15, Berlin is UTC+1 in winter: open 01:00-03:00 UTC.
    assert not window.open_at(_utc("2025-01-15T00:59:59+00:00"))
    assert window.open_at(_utc("2025-01-15T01:00:00+00:00"))
    assert window.open_at(_utc("2025-01-15T02:59:59.999999+00:00"))
    assert not window.open_at(_utc("2025-01-15T03:00:00+00:00"))
    # Summer time: UTC+2, open 00:00-02:00 UTC.
    assert window.open_at(_utc("2025-07-16T00:30:00+00:00"))
    assert not window.open_at(_utc("2025-07-16T02:30:00+00:00"))
    # Saturday: closed all night.
    assert not window.open_at(_utc("2025-01-18T01:30:00+00:00"))
    # Asked out of order, the remembered answers still hold.
    assert window.open_at(_utc("2025-01-15T01:30:00+00:00"))
    assert not window.open_at(_utc("2025-01-14T00:30:00+00:00"))


def test_a_mute_window_silences_by_the_events_time_in_replay(tmp_path):
    from engine.sources.replay import replay

    rules = rules_from(tmp_path, SUSPEND_ON_QUOTA)
    events = tmp_path / "events.jsonl"
    lines = [
        {"id": 1, "event_type": {"id": 19}, "sim": {"id": 9}, "timestamp": "2025-01-15T01:30:00Z"},
        {"id": 2, "event_type": {"id": 19}, "sim": {"id": 9}, "timestamp": "2025-01-15T03:30:00Z"},
    ]
    events.write_text("".join(json.dumps(line) + "\n" for line in lines))
    planned: list[dict[str, Any]] = []
    replay(
        events,
        rules,
        on_planned=lambda item: planned.append(item.as_json()),
        on_problem=lambda line, reason: None,
        parallel=False,
        mute_windows=[_window(comment="maintenance")],
    )
    assert [(p["event_id"], p.get("silenced")) for p in planned] == [
        (1, "silenced by mute window nightly (maintenance)"),
        (2, None),
    ]


def test_a_silence_covers_an_event_of_its_time_or_one_judged_while_it_holds():
    start = datetime(2025, 1, 15, 10, tzinfo=UTC)
    silence = Silence((("iccid", "8988"),), "swap", "alice", start, start + timedelta(hours=1), 3)
    record = {"id": 1, "event_type": {"id": 19}, "sim": {"id": 9, "iccid": "8988"}}

    def event_at(moment: datetime) -> Any:
        return normalize({**record, "timestamp": moment.isoformat()})

    late = event_at(start + timedelta(minutes=30))  # from during the silence, judged after
    assert (
        Quiet((silence,), start + timedelta(hours=5)).reason(late, "r") == "silenced by #3 (swap)"
    )
    early = event_at(start - timedelta(hours=1))  # from before it, judged during it
    assert Quiet((silence,), start + timedelta(minutes=5)).reason(early, "r") is not None
    assert Quiet((silence,), start + timedelta(hours=2)).reason(early, "r") is None
    other = normalize({**record, "sim": {"id": 8, "iccid": "8977"}, "timestamp": start.isoformat()})
    assert Quiet((silence,), start).reason(other, "r") is None


@pytest.mark.parametrize(
    ("entry", "message", "line"),
    [
        ('  - {name: a, cron: "0 2 * * *"}', "needs `for`", 2),
        ('  - {name: a, cron: "0 25 * * *", for: 1h}', "mute_windows[0].cron", 2),
        ('  - {name: a, cron: "0 2 * * *", for: 1h, timezone: Mars/Olympus}', "time zone", 2),
        ('  - {name: a, cron: "0 2 * * *", for: 1h, match: {imsi: 1}}', "cannot be matched", 2),
        ('  - {name: a, cron: "0 2 * * *", for: 1h, until: 4h}', "unknown option", 2),
    ],
)
def test_a_wrong_mute_window_is_refused_with_its_file_and_line(tmp_path, entry, message, line):
    config = tmp_path / "engine.yaml"
    config.write_text(f"mute_windows:\n{entry}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert message in str(raised.value)
    assert raised.value.where is not None and raised.value.where.line == line


def test_a_silence_on_an_endpoint_matches_its_id_or_else_its_name():
    pump = normalize(
        {"id": 1, "timestamp": "2025-01-15T10:00:00Z", "endpoint": {"id": 5, "name": "pump-7"}}
    )
    assert covers([("endpoint", "5")], pump, "r") and not covers([("endpoint", "6")], pump, "r")
    assert covers([("endpoint", "pump-7")], pump, "r")
    assert not covers([("endpoint", "pump-8")], pump, "r")


def test_a_matcher_is_field_equals_value_and_a_value_may_hold_an_equals_sign():
    assert parse_matcher(" tag = site=berlin ") == ("tag", "site=berlin")
    for text in ("iccid", "iccid=", "iccid= "):
        with pytest.raises(ValueError, match="is not FIELD=VALUE"):
            parse_matcher(text)
    assert describe_matchers([("iccid", "8988"), ("tag", "site=berlin")]) == (
        "iccid=8988 tag=site=berlin"
    )


def test_a_mute_window_covers_only_the_matches_its_matchers_name():
    window = MuteWindow(
        "pumps",
        "0 2 * * *",
        timedelta(hours=2),
        ZoneInfo("UTC"),
        (("rule", "restart"), ("endpoint", "pump-7")),
        "nightly restart",
    )
    record = {"id": 1, "timestamp": "2025-01-15T02:30:00Z", "endpoint": {"id": 5, "name": "pump-7"}}
    quiet = Quiet((), None, (window,))
    said = "silenced by mute window pumps (nightly restart)"
    assert quiet.reason(normalize(record), "restart") == said
    assert quiet.reason(normalize(record), "other-rule") is None
    other = normalize(record | {"endpoint": {"id": 6, "name": "pump-8"}})
    assert quiet.reason(other, "restart") is None
