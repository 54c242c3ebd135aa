"""Never fight yourself: the events the engine's own status changes cause (its echoes) are
marked `caused_by` and left alone by rules that do not opt in, and the loop breaker holds a
SIM's status actions once rules toggle it too often. Judged by the pipeline over a real
SQLite file, and by replay on its in-memory store; event times drive every clock here.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.config import load_config
from engine.echoes import Echoes, LoopBreaker, nearest, status_target
from engine.errors import ConfigError, RuleSetError
from engine.model import IntentStatus, OwnStatusAction
from engine.pipeline import BatchResult, Pipeline, Planned
from engine.sources.replay import replay
from engine.state import format_moment
from engine.store import SqliteStore

from helpers import rules_from

T0 = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
QUOTA_USED_UP, SIM_ACTIVATION, SIM_SUSPENSION = 19, 8, 9
POLICY_CONTROL, API = 1, 2

SUSPEND_ON_QUOTA = """
rules:
  - id: suspend-on-quota
    when: {type: [19]}
    actions: [{suspend_sim: {}}]
  - id: tell-ops-on-suspension
    when: {type: [9]}
    actions: [{log: {message: "SIM {{ event.sim.iccid }} suspended"}}]
"""

# Two rules that would toggle a SIM for ever: each reacts to what the other did.
PING_PONG = """
rules:
  - id: reactivate-suspended
    when: {type: [9]}
    on_own_actions: true
    actions: [{activate_sim: {}}]
  - id: suspend-activated
    when: {type: [8]}
    on_own_actions: true
    actions: [{suspend_sim: {}}]
"""


def event(
    event_id: int, minutes: float, type_id: int, *, source: int = API, sim: int = 1
) -> dict[str, Any]:
    return {
        "id": event_id,
        "timestamp": format_moment(T0 + timedelta(minutes=minutes)),
        "event_type": {"id": type_id},
        "event_source": {"id": source},
        "event_severity": {"id": 0},
        "sim": {"id": sim, "iccid": f"898830300000000000{sim}"},
        "endpoint": {"id": 500 + sim, "name": f"truck-{sim}"},
    }


class Engine:
    """A pipeline on a SQLite file whose planned intents an operator marks done (the
    dispatcher's part), at the moment given."""

    def __init__(self, tmp_path: Path, rules: str, **options: Any):
        self.store = SqliteStore(tmp_path / "engine.sqlite3")
        self.pipeline = Pipeline(rules_from(tmp_path, rules), self.store, **options)

    def feed(self, *records: dict[str, Any]) -> BatchResult:
        return self.pipeline.process(list(records), source="test")

    def run_pending(self, minutes: float) -> None:
        for intent in self.store.intents(IntentStatus.PENDING):
            self.store.finish_intent(intent, IntentStatus.DONE, now=T0 + timedelta(minutes=minutes))

    def audit(self, outcome: str) -> list[dict[str, Any]]:
        return [r for r in self.store.audit_rows() if r["outcome"] == outcome]


def decisions(result: BatchResult) -> list[tuple[int, str, str]]:
    return [(d.event_id, d.rule_id, d.outcome) for d in result.decisions]


def test_a_suspension_after_the_engines_own_suspend_is_its_echo_and_rules_leave_it_alone(
    tmp_path,
):
    engine = Engine(tmp_path, SUSPEND_ON_QUOTA)
    engine.feed(event(1, 0, QUOTA_USED_UP, source=POLICY_CONTROL))
    engine.run_pending(0.1)
    intent = engine.store.intents()[0]

    result = engine.feed(event(2, 0.2, SIM_SUSPENSION))

    assert decisions(result) == [(2, "tell-ops-on-suspension", "own_echo")]
    assert not result.planned
    [echo] = engine.audit("echo")
    assert echo["event_id"] == 2
    assert echo["detail"] == f"echo of intent {intent.id} (rule suspend-on-quota)"


def test_a_rule_with_on_own_actions_judges_the_echo_and_sees_what_caused_it(tmp_path):
    rules = SUSPEND_ON_QUOTA.replace(
        "when: {type: [9]}",
        'when: {type: [9]}\n    on_own_actions: true\n    condition: {"==": [{"var": '
        '"caused_by.rule"}, "suspend-on-quota"]}',
    )
    engine = Engine(tmp_path, rules)
    engine.feed(event(1, 0, QUOTA_USED_UP, source=POLICY_CONTROL))
    engine.run_pending(0.1)

    result = engine.feed(event(2, 0.2, SIM_SUSPENSION))

    assert decisions(result) == [(2, "tell-ops-on-suspension", "fired")]
    assert result.planned[0].event.raw["caused_by"] == {
        "rule": "suspend-on-quota",
        "intent": engine.store.intents()[0].id,
    }


@pytest.mark.parametrize(
    ("what", "echo_like"),
    [
        ("from Policy Control, not the API", event(2, 0.2, SIM_SUSPENSION, source=POLICY_CONTROL)),
        ("on another SIM", event(2, 0.2, SIM_SUSPENSION, sim=2)),
        ("of a type suspend_sim does not cause", event(2, 0.2, SIM_ACTIVATION)),
        ("past the echo window", event(2, 11, SIM_SUSPENSION)),
    ],
)
def test_an_event_not_matching_a_done_status_change_is_no_echo(tmp_path, what, echo_like):
    rules = SUSPEND_ON_QUOTA.replace("when: {type: [9]}", "when: {type: [8, 9]}")
    engine = Engine(tmp_path, rules)
    engine.feed(event(1, 0, QUOTA_USED_UP, source=POLICY_CONTROL))
    engine.run_pending(0.1)

    result = engine.feed(echo_like)

    assert decisions(result) == [(2, "tell-ops-on-suspension", "fired")], what
    assert "caused_by" not in result.planned[0].event.raw
    assert engine.audit("echo") == []


def test_a_status_action_planned_but_not_yet_done_has_no_echo(tmp_path):
    engine = Engine(tmp_path, SUSPEND_ON_QUOTA)
    engine.feed(event(1, 0, QUOTA_USED_UP, source=POLICY_CONTROL))

    result = engine.feed(event(2, 0.2, SIM_SUSPENSION))

    assert decisions(result) == [(2, "tell-ops-on-suspension", "fired")]


def test_the_echo_window_is_configurable(tmp_path):
    engine = Engine(tmp_path, SUSPEND_ON_QUOTA, echoes=Echoes(within=timedelta(hours=1)))
    engine.feed(event(1, 0, QUOTA_USED_UP, source=POLICY_CONTROL))
    engine.run_pending(0.1)

    result = engine.feed(event(2, 30, SIM_SUSPENSION))

    assert decisions(result) == [(2, "tell-ops-on-suspension", "own_echo")]


def ping_pong_events(count: int, start_id: int = 10, start_minute: float = 0.0) -> list[dict]:
    """The platform's events as two ping-ponging rules would make it log them."""
    return [
        event(
            start_id + n, start_minute + n * 0.5, SIM_SUSPENSION if n % 2 == 0 else SIM_ACTIVATION
        )
        for n in range(count)
    ]


def test_the_loop_breaker_holds_a_sim_toggled_more_than_four_times_in_ten_minutes(tmp_path):
    engine = Engine(tmp_path, PING_PONG)
    results = [engine.feed(record) for record in ping_pong_events(8)]

    planned = [p for r in results for p in r.planned]
    assert [p.held for p in planned] == [False] * 4 + [True] * 4
    statuses = [i.status for i in engine.store.intents()]
    assert statuses == [IntentStatus.PENDING] * 4 + [IntentStatus.HELD] * 4
    [flapping] = engine.audit("target flapping")
    assert flapping["event_id"] == 14
    assert flapping["detail"].startswith("5 status changes on sim:1 within 10m > 4")
    held = engine.audit("held")
    assert held[0]["detail"].startswith("target flapping: 5 status changes on sim:1")
    assert "held since" in held[1]["detail"]
    assert engine.store.rule_overrides()["sim:1"].mode == "hold"
    [said] = [draft for r in results for draft in r.engine_events]
    assert (said.kind, said.detail["target"], said.detail["rule"]) == (
        "target_flapping",
        "sim:1",
        "reactivate-suspended",
    )
    assert said.sim is not None and said.sim["id"] == 1


def test_the_loop_breaker_counts_each_target_apart(tmp_path):
    engine = Engine(tmp_path, PING_PONG)
    records = [
        event(10 + n, n * 0.5, SIM_SUSPENSION if n % 4 < 2 else SIM_ACTIVATION, sim=1 + n % 2)
        for n in range(8)
    ]
    results = [engine.feed(record) for record in records]

    assert not any(p.held for r in results for p in r.planned)


def test_a_held_target_acts_again_once_resumed_by_an_operator(tmp_path):
    engine = Engine(tmp_path, PING_PONG)
    for record in ping_pong_events(6):
        engine.feed(record)

    resumed = engine.store.resume_rule("sim:1", now=T0, release_held=True)

    assert (resumed.released, resumed.still_held) == (2, 0)
    result = engine.feed(*ping_pong_events(1, start_id=20, start_minute=4))
    assert [p.held for p in result.planned] == [False]


def test_a_held_target_acts_again_after_the_hold_times_out(tmp_path):
    breaker = LoopBreaker(max_changes=2, within=timedelta(minutes=10), hold_for=timedelta(hours=1))
    engine = Engine(tmp_path, PING_PONG, loop_breaker=breaker)
    for record in ping_pong_events(4):
        engine.feed(record)

    still = engine.feed(*ping_pong_events(1, start_id=20, start_minute=59))
    after = engine.feed(*ping_pong_events(1, start_id=21, start_minute=62))

    assert [p.held for p in still.planned] == [True]
    assert [p.held for p in after.planned] == [False]


def test_without_a_loop_breaker_nothing_is_held(tmp_path):
    engine = Engine(tmp_path, PING_PONG, loop_breaker=None)
    results = [engine.feed(record) for record in ping_pong_events(8)]

    assert not any(p.held for r in results for p in r.planned)


def test_the_loop_breaker_survives_a_restart(tmp_path):
    engine = Engine(tmp_path, PING_PONG)
    for record in ping_pong_events(5):
        engine.feed(record)
    engine.store.close()

    again = Engine(tmp_path, PING_PONG)
    result = again.feed(*ping_pong_events(1, start_id=20, start_minute=3))

    assert [p.held for p in result.planned] == [True]


def replayed(
    tmp_path: Path, rules: str, records: list[dict], *, parallel: bool = False
) -> list[Planned]:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    planned: list[Any] = []
    replay(
        path,
        rules_from(tmp_path, rules),
        on_planned=planned.append,
        on_problem=lambda line, reason: pytest.fail(f"{line}: {reason}"),
        parallel=parallel,
    )
    return planned


@pytest.mark.parametrize("parallel", [False, True], ids=["one process", "two processes"])
def test_replay_counts_a_planned_status_change_as_done_and_knows_its_echo(tmp_path, parallel):
    rules = SUSPEND_ON_QUOTA.replace("actions: [{log:", "actions: [{activate_sim: {}}, {log:")
    records = [event(1, 0, QUOTA_USED_UP, source=POLICY_CONTROL), event(2, 0.2, SIM_SUSPENSION)]

    planned = replayed(tmp_path, rules, records, parallel=parallel)

    assert [(p.event.id, p.rule.id) for p in planned] == [(1, "suspend-on-quota")]


@pytest.mark.parametrize("parallel", [False, True], ids=["one process", "two processes"])
def test_replay_of_ping_pong_rules_stops_at_the_loop_breaker(tmp_path, parallel):
    planned = replayed(tmp_path, PING_PONG, ping_pong_events(8), parallel=parallel)

    assert [p.held for p in planned] == [False] * 4 + [True] * 4


def test_on_own_actions_that_is_not_a_flag_is_refused_with_its_line(tmp_path):
    rules = PING_PONG.replace("on_own_actions: true", "on_own_actions: sometimes", 1)
    with pytest.raises(RuleSetError) as raised:
        rules_from(tmp_path, rules)
    assert "rules.yaml:5: rule `reactivate-suspended`: `on_own_actions` must be true or false" in (
        str(raised.value)
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("loop_breaker:\n  hold: 1h\n", "config.yaml:2: unknown option `loop_breaker.hold`"),
        (
            "loop_breaker:\n  max_status_changes: 0\n",
            "config.yaml:2: `loop_breaker.max_status_changes`",
        ),
        ("echoes:\n  within: soon\n", "config.yaml:2: `echoes.within` is not a duration"),
    ],
)
def test_bad_loop_settings_are_refused_with_their_line(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert message in str(raised.value)


def test_the_config_sets_the_echo_window_and_the_loop_breaker_or_turns_it_off(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "echoes: {within: 2m}\nloop_breaker: {max_status_changes: 6, within: 1h, hold_for: 4h}\n"
    )
    config = load_config(path)
    assert config.echoes == Echoes(within=timedelta(minutes=2))
    assert config.loop_breaker == LoopBreaker(6, timedelta(hours=1), timedelta(hours=4))
    path.write_text("loop_breaker: {enabled: false}\n")
    assert load_config(path).loop_breaker is None
    path.write_text("")
    assert load_config(path).loop_breaker == LoopBreaker()


def _done(at: float, key: str) -> OwnStatusAction:
    return OwnStatusAction("sim:7", "suspend_sim", "r", key, at)


def test_an_echo_is_laid_on_the_nearest_status_change_within_the_window_the_later_on_a_tie() -> (
    None
):
    at = T0.timestamp()
    assert nearest([_done(at - 60, "near"), _done(at + 300, "far")], at, 600).idempotency_key == (
        "near"
    )
    assert nearest([_done(at - 60, "first"), _done(at + 60, "later")], at, 600).idempotency_key == (
        "later"
    )
    assert nearest([_done(at - 600, "edge")], at, 600) is not None  # exactly `within` away
    assert nearest([_done(at - 601, "out")], at, 600) is None


def test_only_the_actions_that_change_a_status_have_a_status_target() -> None:
    target = {"sim_id": 7, "endpoint_id": 5}
    assert status_target("suspend_sim", target) == "sim:7"
    assert status_target("disable_endpoint", target) == "endpoint:5"
    assert status_target("send_sms", target) is None  # acts on the endpoint, no status
    assert status_target("no_such_action", target) is None
