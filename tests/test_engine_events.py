"""Engine events: the engine's own events, shaped like emnify's, judged by the rules like any
other, kept in the audit log, and said by the daemon after the batch that drafted them."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine import engine_events
from engine.cli import main
from engine.daemon import Daemon
from engine.dispatch import RetryPolicy
from engine.engine_events import (
    ENGINE_EVENT_IDS,
    KINDS,
    EngineEventDraft,
    catalog_records,
    engine_event_record,
    is_engine_event_id,
)
from engine.errors import RuleSetError, StoreError
from engine.events import normalize
from engine.model import IntentStatus
from engine.simulator import FaultRule, SimulatorServer

from helpers import TOKEN, engine_config, poller_of, rules_from

ON_ENGINE_EVENTS = """
rules:
  - id: page-on-poll-failing
    when: {source: engine, type: poll_failing}
    actions: [{log: {message: "engine says {{ event.event_type.description }}"}}]
"""


def _engine_rows(daemon: Daemon, kind: str) -> list[dict[str, object]]:
    rows = daemon.store.audit_rows(limit=1000)
    return [
        r
        for r in rows
        if r["outcome"] == "engine_event" and str(r["detail"]).startswith(KINDS[kind].meaning)
    ]


def test_an_engine_event_is_shaped_like_emnify_s_with_an_id_beyond_emnify_s():
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    record = engine_event_record(
        EngineEventDraft("api_unreachable", {"reason": "connect timeout"}), at=moment, instance="a"
    )
    event = normalize(record)
    assert event.id >= ENGINE_EVENT_IDS and is_engine_event_id(event.id)
    assert event.source_id == 1000 and record["event_source"]["description"] == "Engine"
    assert event.type_id == KINDS["api_unreachable"].type_id
    assert event.timestamp == moment
    assert record["detail"] == {"reason": "connect timeout", "instance": "a"}
    assert "connect timeout" in event.description
    # The same thing said twice is one event; said by another instance, another.
    again = engine_event_record(
        EngineEventDraft("api_unreachable", {"reason": "connect timeout"}), at=moment, instance="a"
    )
    other = engine_event_record(
        EngineEventDraft("api_unreachable", {"reason": "connect timeout"}), at=moment, instance="b"
    )
    assert again["id"] == record["id"] != other["id"]


def test_every_condition_has_a_recovery_one_type_id_above_it():
    for kind in KINDS.values():
        if kind.recovers is not None:
            recovered = KINDS[kind.recovers]
            assert recovered.type_id == kind.type_id + 1 and recovered.severity == 0


def test_rules_name_the_engine_source_and_its_types_and_a_misspelt_type_is_located(tmp_path):
    rules = rules_from(tmp_path, ON_ENGINE_EVENTS)
    assert rules.rules[0].id == "page-on-poll-failing"
    with pytest.raises(RuleSetError) as error:
        rules_from(tmp_path, ON_ENGINE_EVENTS.replace("poll_failing", "poll_failng"))
    assert "rules.yaml:4" in str(error.value) and "poll_failing" in str(error.value)


async def test_an_emitted_engine_event_is_judged_by_rules_and_audited(
    tmp_path: Path, simulator: SimulatorServer
):
    daemon = Daemon(
        engine_config(tmp_path, simulator), rules_from(tmp_path, ON_ENGINE_EVENTS), TOKEN
    )
    try:
        daemon.emit_engine_event("poll_failing", detail={"reason": "503 from the API"})
        daemon.emit_engine_event("poll_failing_recovered")
        audited = _engine_rows(daemon, "poll_failing")
        assert len(audited) == 1 and "503 from the API" in str(audited[0]["detail"])
        assert len(_engine_rows(daemon, "poll_failing_recovered")) == 1
        [event_id] = [r["event_id"] for r in audited]
        intents = daemon.store.intents_for_events([int(str(event_id))])
        assert [(i.rule_id, i.kind) for i in intents] == [("page-on-poll-failing", "log")]
        await daemon.dispatcher.run_due()
        [done] = daemon.store.intents_for_events([int(str(event_id))])
        assert done.status is IntentStatus.DONE
        assert "engine_events" in daemon.metrics.render().decode()
    finally:
        await daemon.aclose()


async def test_an_unknown_kind_is_refused_at_once(tmp_path: Path, simulator: SimulatorServer):
    daemon = Daemon(
        engine_config(tmp_path, simulator), rules_from(tmp_path, ON_ENGINE_EVENTS), TOKEN
    )
    try:
        with pytest.raises(ValueError, match="poll_failing"):
            daemon.emit_engine_event("poll_failng")
    finally:
        await daemon.aclose()


DEAD_LETTERS = """
rules:
  - id: quota
    when: {type: 19}
    actions: [{suspend_sim: {}}]
  - id: tell-ops-about-dead-letters
    when: {source: engine, type: action_dead_lettered}
    actions: [{log: {message: "dead: {{ event.detail.rule }} {{ event.detail.action }}"}}]
"""


async def test_a_dead_lettered_action_is_an_engine_event_about_its_sim(
    tmp_path: Path, simulator: SimulatorServer
):
    sim = simulator.state.sims()[0]
    simulator.state.store_events([{"event_type": 19, "sim_id": sim["id"]}])
    simulator.state.set_faults([FaultRule.parse({"path": "^/api/v1/sim/", "kind": "503"})])
    config = engine_config(tmp_path, simulator)
    config = replace(
        config,
        api=replace(config.api, max_retries=0),
        retry=RetryPolicy(
            max_attempts=2,
            initial_backoff=timedelta(milliseconds=1),
            max_backoff=timedelta(milliseconds=1),
        ),
    )
    daemon = Daemon(config, rules_from(tmp_path, DEAD_LETTERS), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        for _ in range(200):  # each retry is due a millisecond after the last attempt
            await daemon.dispatcher.run_due()
            if daemon.store.counts().get("intents_dead") == 1:
                break
            await asyncio.sleep(0.01)
        [row] = _engine_rows(daemon, "action_dead_lettered")
        assert row["sim_id"] == sim["id"]
        intents = daemon.store.intents_for_events([int(str(row["event_id"]))])
        assert [i.rule_id for i in intents] == ["tell-ops-about-dead-letters"]
        assert intents[0].params["message"] == "dead: quota suspend_sim"
    finally:
        await daemon.aclose()


GUARDED = """
rules:
  - id: quota
    when: {type: 19}
    max_actions: {count: 1, within: 10m}
    actions: [{suspend_sim: {}}]
  - id: tell-ops-about-guards
    when: {source: engine, type: guard_tripped}
    actions: [{log: {message: "guard on {{ event.detail.rule }}"}}]
"""


async def test_a_tripped_guard_is_said_once_its_batch_is_committed(
    tmp_path: Path, simulator: SimulatorServer
):
    sims = simulator.state.sims()[:3]
    simulator.state.store_events([{"event_type": 19, "sim_id": s["id"]} for s in sims])
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, GUARDED), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        [row] = _engine_rows(daemon, "guard_tripped")
        [intent] = daemon.store.intents_for_events([int(str(row["event_id"]))])
        assert intent.rule_id == "tell-ops-about-guards"
        assert intent.params["message"] == "guard on quota"
    finally:
        await daemon.aclose()


async def test_why_shows_an_engine_event_and_what_the_rules_made_of_it(
    tmp_path: Path, simulator: SimulatorServer, capsys: pytest.CaptureFixture[str]
):
    config = engine_config(tmp_path, simulator)
    daemon = Daemon(config, rules_from(tmp_path, ON_ENGINE_EVENTS), TOKEN)
    try:
        daemon.emit_engine_event("poll_failing", detail={"reason": "HTTP 503 for 5m"})
        [row] = _engine_rows(daemon, "poll_failing")
    finally:
        await daemon.aclose()
    capsys.readouterr()
    assert main(["why", "--event", str(row["event_id"]), "--store", str(config.store_path)]) == 0
    shown = capsys.readouterr().out
    assert "engine_event" in shown and "HTTP 503 for 5m" in shown
    assert "page-on-poll-failing" in shown


async def test_an_engine_event_the_store_could_not_take_is_recorded_with_the_next_one(
    tmp_path: Path, simulator: SimulatorServer, monkeypatch: pytest.MonkeyPatch
):
    daemon = Daemon(
        engine_config(tmp_path, simulator), rules_from(tmp_path, ON_ENGINE_EVENTS), TOKEN
    )
    try:
        commit = daemon.store.commit_batch

        def broken(batch: object, now: datetime) -> int:
            raise StoreError("disk I/O error")

        monkeypatch.setattr(daemon.store, "commit_batch", broken)
        daemon.emit_engine_event("poll_failing", detail={"reason": "HTTP 503"})
        assert daemon.engine_events.pending == 1 and _engine_rows(daemon, "poll_failing") == []
        monkeypatch.setattr(daemon.store, "commit_batch", commit)
        daemon.emit_engine_event("poll_failing_recovered")
        assert daemon.engine_events.pending == 0
        assert len(_engine_rows(daemon, "poll_failing")) == 1
        assert len(_engine_rows(daemon, "poll_failing_recovered")) == 1
    finally:
        await daemon.aclose()


def test_two_kinds_said_at_the_same_moment_with_the_same_detail_are_two_events():
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    failing = engine_event_record(EngineEventDraft("poll_failing"), at=moment, instance="a")
    unreachable = engine_event_record(EngineEventDraft("api_unreachable"), at=moment, instance="a")
    assert failing["id"] != unreachable["id"]


@pytest.mark.parametrize(
    ("detail", "description"),
    [
        ({}, "the emnify API does not answer (network, timeouts, 5xx)"),
        ({"reason": ""}, "the emnify API does not answer (network, timeouts, 5xx)"),
        ({"reason": 503}, "the emnify API does not answer (network, timeouts, 5xx)"),
        (
            {"reason": "connect timeout", "organisation": "acme"},
            "the emnify API does not answer (network, timeouts, 5xx): connect timeout"
            " (organisation acme)",
        ),
    ],
)
def test_an_engine_events_description_says_its_meaning_its_reason_and_whose_it_is(
    detail, description
):
    draft = EngineEventDraft("api_unreachable", detail)
    record = engine_event_record(draft, at=datetime(2026, 1, 2, tzinfo=UTC), instance="a")
    assert record["description"] == description


def test_the_engines_event_types_are_in_the_catalog_with_their_source_and_severity():
    records = {r["description"]: r for r in catalog_records()}
    assert records["poll_failing"] == {
        "id": 1001,
        "description": "poll_failing",
        "source": "Engine",
        "severity": "Critical",
    }
    assert records["poll_failing_recovered"]["severity"] == "Info"
    assert records["action_failed"]["severity"] == "Warn"


def test_an_engine_event_is_an_alert_unless_it_only_informs():
    moment = datetime(2026, 1, 2, tzinfo=UTC)
    kinds = {"poll_failing": True, "poll_lag_exceeded": True, "poll_failing_recovered": False}
    for name, alert in kinds.items():
        record = engine_event_record(EngineEventDraft(name), at=moment, instance="a")
        assert record["alert"] is alert and normalize(record).alert is alert


def test_an_engine_events_source_severity_sim_and_endpoint_are_emnify_shaped_objects():
    draft = EngineEventDraft(
        "target_flapping",
        {"target": "endpoint:5"},
        sim={"id": 7, "iccid": "8988"},
        endpoint={"id": 5},
    )
    record = engine_event_record(draft, at=datetime(2026, 1, 2, tzinfo=UTC), instance="a")
    assert record["event_source"] == {"id": 1000, "description": "Engine"}
    assert record["event_severity"] == {"id": 2, "description": "Critical"}
    assert (record["sim"], record["endpoint"]) == ({"id": 7, "iccid": "8988"}, {"id": 5})
    event = normalize(record)
    assert (event.sim_id, event.iccid, event.endpoint_id) == (7, "8988", 5)


# What each kind says (its description, the type's name and id rules match, its severity) is
# part of what rules and operators read: the table, built afresh.
KIND_TABLE = [
    ("poll_failing", 1001, 2, "polls of the Event API have failed for a while"),
    ("api_unreachable", 1003, 2, "the emnify API does not answer (network, timeouts, 5xx)"),
    ("auth_failed", 1005, 2, "emnify refused the application token"),
    ("poll_lag_exceeded", 1007, 1, "the poller's cursor is further behind than allowed"),
    ("stream_silent", 1009, 1, "the Data Streamer sends nothing while the poller sees events"),
    ("data_stream_error", 1011, 2, "emnify reports the data stream in Error"),
]
SINGLE_KINDS = [
    ("action_dead_lettered", 1021, 2, "an action gave up retrying (see `dead-letters`)", None),
    ("guard_tripped", 1022, 2, "a blast-radius guard switched a rule to shadow", None),
    ("target_flapping", 1023, 2, "a SIM or endpoint changed status too often: held", None),
    ("action_failed", 1024, 1, "an action failed for good (e.g. no SIM to act on)", None),
]


def test_each_engine_event_kind_has_its_type_id_severity_and_meaning_and_a_condition_its_recovery():
    expected = []
    for name, type_id, severity, meaning in KIND_TABLE:
        expected.append((name, type_id, severity, meaning, f"{name}_recovered"))
        expected.append((f"{name}_recovered", type_id + 1, 0, f"over: {meaning}", None))
    expected += SINGLE_KINDS
    built = engine_events._kinds()  # built afresh, as at the engine's start
    assert [(k.name, k.type_id, k.severity, k.meaning, k.recovers) for k in built.values()] == (
        expected
    )
    assert list(built) == [row[0] for row in expected]


def test_the_engines_event_ids_start_at_two_to_the_62nd_exactly():
    assert is_engine_event_id(2**62) and ENGINE_EVENT_IDS == 2**62
    assert not is_engine_event_id(2**62 - 1) and not is_engine_event_id(None)


def test_an_unknown_kind_is_refused_with_the_list_of_known_ones():
    known = r"\(known: poll_failing, poll_failing_recovered, api_unreachable, "
    with pytest.raises(ValueError, match=r"no engine event kind 'poll_failng' " + known):
        engine_events.kind_of("poll_failng")
