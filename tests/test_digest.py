"""Scheduled digests: a rule with `schedule` and `digest` collects the events it matches and
acts once per fire time on the list, over the real path (simulator, SQLite file, webhook
receiver). The cron job's work is driven directly with a given time instead of waiting."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest
from structlog.testing import capture_logs

from engine.cli import main
from engine.cron import check_crontab, cron_trigger
from engine.daemon import Daemon
from engine.digest import DigestAction, collect_for_digest, digest_key, run_digest
from engine.digest_schedule import Digests, latest_fire_time, run_if_due, trigger_of
from engine.errors import RuleSetError, StoreError
from engine.events import normalize
from engine.model import Batch, IntentStatus
from engine.pipeline import Pipeline
from engine.rules import load_rules
from engine.rules.schedule import check_fields, parse_timezone
from engine.simulator import SimulatorServer
from engine.simulator.webhook_sink import WebhookSink
from engine.store import SqliteStore

from helpers import TOKEN, engine_config, poller_of, rules_from, write_rules

DIGEST_RULES = """
rules:
  - id: blocked-digest
    when: {type: 11}
    schedule: "0 8 * * *"
    digest: {max_events: 2, include: [id, endpoint.name, sim.iccid]}
    actions:
      - webhook:
          url: ${OPS_WEBHOOK_URL}
          body:
            text: "{{ count }} blocked since {{ since }}"
            names: "{% for e in events %}{{ e.endpoint.name }} {% endfor %}"
            omitted: "{{ omitted }}"
"""


NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)  # when the store is told things happen


def _at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2025, 5, day, hour, minute, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _blocked(simulator: SimulatorServer, count: int) -> list[dict]:
    endpoints = simulator.state.endpoints()
    return simulator.state.store_events(
        [{"event_type": {"id": 11}, "endpoint_id": endpoints[i]["id"]} for i in range(count)]
    )


async def _dispatch(daemon: Daemon) -> None:
    while await daemon.dispatcher.run_due():
        pass


# -- collecting and sending ------------------------------------------------------------------


async def test_a_digest_collects_events_and_sends_one_webhook_with_the_list(
    tmp_path, simulator, hook_env: WebhookSink
):
    events = _blocked(simulator, 3)
    rules = rules_from(tmp_path, DIGEST_RULES)
    clock = Clock(_at(1, 7))
    digests = Digests(clock=clock)
    daemon = Daemon(engine_config(tmp_path, simulator), rules, TOKEN, services=[digests])
    try:
        await digests.start(daemon)  # first start: now is the digest's starting point
        await poller_of(daemon).poll_once()
        await _dispatch(daemon)
        assert hook_env.calls("ops") == []  # nothing per event
        assert daemon.store.digest_backlog("blocked-digest") == 3
        job = daemon.scheduler.get_job("digest:blocked-digest")
        assert job is not None and "hour='8', minute='0'" in str(job.trigger)

        clock.now = _at(1, 7, 59)
        assert digests.run_due("blocked-digest") == []  # not yet 08:00
        clock.now = _at(1, 8)
        (run,) = digests.run_due("blocked-digest")
        await _dispatch(daemon)
        clock.now = _at(1, 8, 30)
        assert digests.run_due("blocked-digest") == []  # once per fire time
    finally:
        await digests.stop()
        await daemon.aclose()

    assert run.count == 3 and run.fire_time == _at(1, 8)
    (call,) = hook_env.calls("ops")
    names = [simulator.state.endpoint(e["endpoint"]["id"])["name"] for e in events[:2]]
    assert call.body == {
        "text": "3 blocked since 2025-05-01T07:00:00Z",
        "names": f"{names[0]} {names[1]} ",  # max_events: 2, in event order
        "omitted": "1",
    }
    assert call.headers["idempotency-key"] == "digest-blocked-digest-2025-05-01T08:00:00Z-0"


def test_a_digest_with_nothing_collected_sends_nothing(tmp_path):
    rules = rules_from(tmp_path, DIGEST_RULES)
    store = SqliteStore(tmp_path / "state.sqlite3")
    try:
        rule = rules.get("blocked-digest")
        assert rule is not None
        assert run_if_due(store, rule, _at(1, 7)) == []  # first sight: the starting point
        (run,) = run_if_due(store, rule, _at(1, 9))
        assert run.count == 0 and run.planned == []
        assert store.intents() == []
        assert run_if_due(store, rule, _at(1, 9, 30)) == []  # done all the same: not again
    finally:
        store.close()


def test_the_template_context_has_the_list_and_the_count(tmp_path):
    rules = rules_from(
        tmp_path,
        """
        rules:
          - id: d
            schedule: "*/5 * * * *"
            digest: {send_empty: true}
            actions:
              - log: {message: "{{ count }} events: {{ events | map(attribute='id') | join(',') }}"}
        """,
    )
    rule = rules.get("d")
    assert rule is not None
    store = SqliteStore(tmp_path / "state.sqlite3")
    try:
        store.start_digest("d", _at(1, 7))
        for event_id in (3, 1, 2):
            event = normalize({"id": event_id, "timestamp": f"2025-05-01T07:0{event_id}:00Z"})
            batch = Batch()
            assert collect_for_digest(batch, event, rule)
            store.commit_batch(batch, NOW)
            store.commit_batch(batch, NOW)  # again (a batch judged again): kept once
        (run,) = run_if_due(store, rule, _at(1, 7, 12))
        (empty,) = run_if_due(store, rule, _at(1, 7, 16))  # send_empty: runs with nothing
    finally:
        store.close()
    assert run.fire_time == _at(1, 7, 10)
    assert [a.params["message"] for a in run.planned] == ["3 events: 1,2,3"]
    assert [a.params["message"] for a in empty.planned] == ["0 events: "]


def test_a_digest_action_that_fails_unexpectedly_ends_its_run_and_the_next_run_goes_on(
    tmp_path, monkeypatch
):
    rules = rules_from(
        tmp_path,
        """
        rules:
          - id: d
            schedule: "*/5 * * * *"
            digest: {send_empty: true}
            actions:
              - log: {message: "{{ count }} events"}
              - log: {message: "second"}
        """,
    )
    rule = rules.get("d")
    assert rule is not None
    first = rule.actions[0].action
    calls = {"n": 0}
    render = type(first).render

    def breaks_once(self, context):  # a bug, not an ActionError, on the first run only
        calls["n"] += 1
        if self is first and calls["n"] == 1:
            raise RuntimeError("a bug in rendering")
        return render(self, context)

    monkeypatch.setattr(type(first), "render", breaks_once)
    store = SqliteStore(tmp_path / "state.sqlite3")
    try:
        store.start_digest("d", _at(1, 7))
        (broken,) = run_if_due(store, rule, _at(1, 7, 6))
        (later,) = run_if_due(store, rule, _at(1, 7, 11))
    finally:
        store.close()
    assert broken.failures == [("log", "RuntimeError: a bug in rendering")]
    assert [a.params["message"] for a in broken.planned] == ["second"]
    assert later.fire_time == _at(1, 7, 10)  # not the broken run claimed again
    assert [a.params["message"] for a in later.planned] == ["0 events", "second"]


# -- missed runs -----------------------------------------------------------------------------


async def test_a_run_missed_while_down_runs_once_at_start_up_and_not_again_after_a_restart(
    tmp_path, simulator, hook_env
):
    _blocked(simulator, 2)
    config = engine_config(tmp_path, simulator)
    rules = rules_from(tmp_path, DIGEST_RULES)

    first = Daemon(config, rules, TOKEN)
    digests = Digests(clock=Clock(_at(1, 7)))
    try:
        await digests.start(first)
        await poller_of(first).poll_once()  # collected, then the daemon goes down before 08:00
    finally:
        await digests.stop()
        await first.aclose()

    # Down over two fire times (day 1 and day 2 at 08:00): one run at start-up.
    second = Daemon(config, rules, TOKEN)
    digests = Digests(clock=Clock(_at(2, 9)))
    try:
        await digests.start(second)
        await _dispatch(second)
    finally:
        await digests.stop()
        await second.aclose()
    (call,) = hook_env.calls("ops")
    assert call.body["text"] == "2 blocked since 2025-05-01T07:00:00Z"
    assert call.headers["idempotency-key"] == "digest-blocked-digest-2025-05-02T08:00:00Z-0"

    third = Daemon(config, rules, TOKEN)
    digests = Digests(clock=Clock(_at(2, 9, 30)))
    try:
        await digests.start(third)
        await _dispatch(third)
        intents = third.store.intents()
    finally:
        await digests.stop()
        await third.aclose()
    assert len(hook_env.calls("ops")) == 1
    assert [(i.idempotency_key, i.status) for i in intents] == [
        ("digest-blocked-digest-2025-05-02T08:00:00Z-0", IntentStatus.DONE)
    ]


def test_a_run_interrupted_after_its_claim_is_finished_with_the_same_events(tmp_path):
    rules = rules_from(tmp_path, DIGEST_RULES)
    rule = rules.get("blocked-digest")
    assert rule is not None
    path = tmp_path / "state.sqlite3"
    store = SqliteStore(path)

    def blocked(event_id: int) -> None:
        raw = {
            "id": event_id,
            "timestamp": "2025-05-01T07:30:00Z",
            "event_type": {"id": 11},
            "endpoint": {"name": f"e{event_id}"},
        }
        batch = Batch()
        collect_for_digest(batch, normalize(raw), rule)
        store.commit_batch(batch, NOW)

    try:
        store.start_digest(rule.id, _at(1, 7))
        blocked(1)
        store.claim_digest(rule.id, _at(1, 8), 10)  # ...and the process died here
        blocked(2)  # collected after the claim: belongs to the next run
    finally:
        store.close()

    store = SqliteStore(path)
    try:
        runs = run_if_due(store, rule, _at(1, 8, 5))
        backlog = store.digest_backlog(rule.id)
    finally:
        store.close()
    assert [(r.fire_time, r.count) for r in runs] == [(_at(1, 8), 1)]
    assert [a.params["body"]["names"] for r in runs for a in r.planned] == ["e1 "]
    assert backlog == 1


def test_the_latest_missed_fire_time_is_found_across_a_long_gap():
    every_minute = cron_trigger("* * * * *", parse_timezone("UTC"))
    assert latest_fire_time(every_minute, _at(1, 8), _at(20, 9, 30)) == _at(20, 9, 30)
    daily = cron_trigger("0 8 * * *", parse_timezone("UTC"))
    assert latest_fire_time(daily, _at(1, 8), _at(20, 7)) == _at(19, 8)
    assert latest_fire_time(daily, _at(1, 8), _at(2, 7, 59)) is None
    assert latest_fire_time(daily, _at(1, 7), _at(1, 8)) == _at(1, 8)


def test_crontab_weekdays_count_from_sunday_as_cron_does():
    # 2025-05-05 is a Monday; APScheduler alone would read `1` as Tuesday.
    monday = cron_trigger("0 8 * * 1", parse_timezone("UTC"))
    assert monday.get_next_fire_time(None, _at(4, 9)) == _at(5, 8)
    sunday = cron_trigger("0 8 * * 0", parse_timezone("UTC"))
    assert sunday.get_next_fire_time(None, _at(5, 9)) == _at(11, 8)
    assert cron_trigger("0 8 * * 7", parse_timezone("UTC")).get_next_fire_time(
        None, _at(5, 9)
    ) == _at(11, 8)
    weekdays = cron_trigger("0 8 * * 1-5", parse_timezone("UTC"))
    assert weekdays.get_next_fire_time(None, _at(9, 9)) == _at(12, 8)  # Fri → Mon
    by_name = cron_trigger("0 8 * * mon-fri", parse_timezone("UTC"))
    assert by_name.get_next_fire_time(None, _at(9, 9)) == _at(12, 8)


def test_a_schedule_is_read_in_the_digest_time_zone(tmp_path):
    rules = rules_from(
        tmp_path,
        """
        rules:
          - id: d
            schedule: "0 8 * * *"
            digest: {timezone: Europe/Berlin}
            actions: [{log: {}}]
        """,
    )
    rule = rules.get("d")
    assert rule is not None
    assert trigger_of(rule).get_next_fire_time(None, _at(1, 0)) == _at(1, 6)  # 08:00 CEST


# -- validation ------------------------------------------------------------------------------


def _problems(tmp_path: Path, rule: str) -> list[str]:
    path = write_rules(tmp_path, "rules:\n  - id: d\n" + rule)
    with pytest.raises(RuleSetError) as caught:
        load_rules(path, cron=check_crontab)
    return [str(e) for e in caught.value.errors]


@pytest.mark.parametrize(
    ("snippet", "line", "expected"),
    [
        ('    schedule: "0 8 * * *"\n', 3, "`schedule` needs `digest`"),
        ("    digest: {}\n", 3, "`digest` needs `schedule`"),
        ('    schedule: "0 8 * *"\n    digest: {}\n', 3, "a schedule has 5 fields, got 4"),
        ('    schedule: "61 8 * * *"\n    digest: {}\n', 3, "is not valid"),
        ('    schedule: "0 8 * * 9"\n    digest: {}\n', 3, "weekday '9' is not within 0-7"),
        ('    schedule: "0 8 * * *"\n    digest: {max_event: 5}\n', 4, "unknown key `max_event`"),
        ('    schedule: "0 8 * * *"\n    digest: {max_events: 0}\n', 4, "at least 1"),
        ('    schedule: "0 8 * * *"\n    digest: {include: [sim iccid]}\n', 4, "dotted paths"),
        ('    schedule: "0 8 * * *"\n    digest: {timezone: Mars/Base}\n', 4, "unknown time zone"),
        (
            '    schedule: "0 8 * * *"\n    digest: {}\n    throttle: {for: 1h}\n',
            5,
            "`throttle` cannot be combined with `digest`",
        ),
    ],
)
def test_digest_settings_are_checked_with_file_and_line(tmp_path, snippet, line, expected):
    (problem,) = _problems(tmp_path, snippet + "    actions: [{log: {}}]\n")
    assert problem.startswith(f"{tmp_path / 'rules.yaml'}:{line}: rule `d`"), problem
    assert expected in problem


def test_a_digest_cannot_aim_at_one_sim_or_follow_up(tmp_path):
    problems = _problems(
        tmp_path,
        '    schedule: "0 8 * * *"\n    digest: {}\n    actions:\n'
        "      - suspend_sim: {}\n      - after: 1h\n        do: {log: {}}\n",
    )
    assert [p.split(": ", 1)[0] for p in problems] == [
        f"{tmp_path / 'rules.yaml'}:6",
        f"{tmp_path / 'rules.yaml'}:7",
    ]
    assert "`suspend_sim` needs one event's sim" in problems[0]
    assert "cannot have follow-up actions" in problems[1]


def test_validate_checks_a_schedules_fields_with_the_scheduler(tmp_path, capsys):
    path = write_rules(
        tmp_path,
        """
        rules:
          - id: d
            schedule: "61 8 * * *"
            digest: {}
            actions: [{log: {}}]
        """,
    )
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "rules.yaml:4: rule `d`: `schedule` '61 8 * * *' is not valid" in err
    assert "maximum value (59)" in err


def test_a_batch_whose_commit_fails_collects_nothing_for_its_digest(tmp_path, monkeypatch):
    # Collecting used to write at once, outside the batch's transaction: a failed commit
    # left the event in the next digest although the batch (its seen id, its audit row)
    # was never recorded.
    rules = rules_from(tmp_path, DIGEST_RULES)
    store = SqliteStore(tmp_path / "state.sqlite3")
    pipeline = Pipeline(rules, store)
    blocked = {
        "id": 1,
        "timestamp": "2025-05-01T07:30:00Z",
        "event_type": {"id": 11},
        "endpoint": {"id": 5, "name": "e5"},
    }

    def disk_fails(*args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(SqliteStore, "_insert_audit", staticmethod(disk_fails))
    with pytest.raises(StoreError):
        pipeline.process([blocked], source="test")
    monkeypatch.undo()
    assert store.digest_backlog("blocked-digest") == 0
    pipeline.process([blocked], source="test")  # delivered again, recorded this time
    assert store.digest_backlog("blocked-digest") == 1
    store.close()


def test_a_schedule_has_exactly_five_fields_whatever_checks_them() -> None:
    check_fields("0 8 * * 1-5")
    check_fields("  0   8 *\t* *  ")  # any run of spaces or tabs between them
    for written, count in (("0 8 * *", 4), ("0 8 * * * 2026", 6), ("", 0)):
        with pytest.raises(ValueError) as refused:
            check_fields(written)
        assert str(refused.value) == f"a schedule has 5 fields, got {count}"


def test_a_time_zone_is_read_by_its_name_and_an_unknown_one_is_refused_naming_it() -> None:
    assert parse_timezone("Europe/Berlin") == ZoneInfo("Europe/Berlin")
    assert _at(1, 6).astimezone(parse_timezone("UTC")).hour == 6
    for name in ("Mars/Base", "../etc/passwd", ""):  # unknown, and not a zone's name at all
        with pytest.raises(ValueError) as refused:
            parse_timezone(name)
        assert str(refused.value) == f"unknown time zone {name!r}"
        assert refused.value.__suppress_context__  # the lookup's own error is not shown


# -- what a run plans and records ------------------------------------------------------------

AUDITED_RULES = """
rules:
  - id: d
    description: the morning list
    schedule: "*/5 * * * *"
    digest: {}
    actions:
      - log:
          message: "{{ rule.id }}, {{ rule.description }}: {{ count }} from {{ since }}
            until {{ until }}"
      - log: {message: "{{ events[5].id }}"}
  - id: quiet
    mode: shadow
    schedule: "*/5 * * * *"
    digest: {send_empty: true}
    actions: [{log: {message: "{{ count }}"}}]
  - id: per-event
    actions: [{log: {}}]
"""


def _collected(store: SqliteStore, rule, records: list[dict]) -> None:
    for record in records:
        batch = Batch()
        assert collect_for_digest(batch, normalize(record), rule)
        store.commit_batch(batch, NOW)


def test_a_digest_run_is_audited_per_collected_event_and_per_action_with_its_outcome(tmp_path):
    rules = rules_from(tmp_path, AUDITED_RULES)
    rule = rules.get("d")
    assert rule is not None
    store = SqliteStore(tmp_path / "state.sqlite3")
    try:
        store.start_digest("d", _at(1, 7))
        record = {
            "id": 1,
            "timestamp": "2025-05-01T07:01:00Z",
            "sim": {"id": 3, "iccid": "8988303000000000003"},
            "endpoint": {"id": 5},
        }
        _collected(store, rule, [record])
        run = run_digest(store, rule, _at(1, 7, 5), now=NOW, since=_at(1, 7))
        intents = store.intents()
        columns = ("event_id", "rule_id", "action", "outcome", "detail", "sim_id", "endpoint_id")
        rows = [tuple(r[c] for c in (*columns, "iccid")) for r in store.audit_rows()]
    finally:
        store.close()
    until = "2025-05-01T07:05:00Z"
    message = f"d, the morning list: 1 from 2025-05-01T07:00:00Z until {until}"
    assert run.rule_id == "d" and run.count == 1
    assert run.planned == [DigestAction("log", 0, {"message": message, "level": "info"}, False)]
    ((failed_kind, reason),) = run.failures
    assert failed_kind == "log" and reason.startswith("template error: ")
    assert [(i.status, i.idempotency_key) for i in intents] == [
        (IntentStatus.PENDING, "digest-d-2025-05-01T07:05:00Z-0")
    ]
    assert rows == [
        (1, "d", None, "collected for digest", "schedule */5 * * * *", 3, 5, "8988303000000000003"),
        (None, "d", "log", "planned", f"digest of 1 events, run {until}", None, None, None),
        (None, "d", "log", "failed", reason, None, None, None),
    ]


def test_a_shadow_digest_rule_or_a_dry_run_plans_shadow_intents_that_would_have_acted(tmp_path):
    rules = rules_from(tmp_path, AUDITED_RULES.replace("{{ events[5].id }}", "second"))
    live, quiet = rules.get("d"), rules.get("quiet")
    assert live is not None and quiet is not None
    store = SqliteStore(tmp_path / "state.sqlite3")
    try:
        shadow = run_digest(store, quiet, _at(1, 7, 5), now=NOW, since=_at(1, 7))
        store.start_digest("d", _at(1, 7))
        _collected(store, live, [{"id": 1, "timestamp": "2025-05-01T07:01:00Z"}])
        dry = run_digest(store, live, _at(1, 7, 5), now=NOW, since=_at(1, 7), dry_run=True)
        statuses = {i.idempotency_key: i.status for i in store.intents()}
        outcomes = [(r["rule_id"], r["outcome"]) for r in store.audit_rows()]
    finally:
        store.close()
    assert [a.shadow for a in shadow.planned + dry.planned] == [True, True, True]
    assert set(statuses.values()) == {IntentStatus.SHADOW} and len(statuses) == 3
    assert outcomes == [
        ("quiet", "would have acted"),
        ("d", "collected for digest"),
        ("d", "would have acted"),
        ("d", "would have acted"),
    ]


def test_a_digest_keeps_only_the_included_fields_nested_as_in_the_event(tmp_path):
    rules = rules_from(
        tmp_path,
        AUDITED_RULES.replace(
            "digest: {}", "digest: {include: [id, detail.pdp.apn, endpoint.name, sim.iccid]}"
        ),
    )
    rule, other = rules.get("d"), rules.get("per-event")
    assert rule is not None and other is not None
    event = normalize(
        {
            "id": 1,
            "timestamp": "2025-05-01T07:01:00Z",
            "endpoint": {"id": 5, "name": "e5"},
            "detail": {"pdp": {"apn": "iot", "ip": "10.0.0.1"}, "other": 1},
        }
    )
    batch = Batch()
    assert collect_for_digest(batch, event, other) is False  # a rule that acts per event
    assert batch.digest_events == [] and batch.audit == []
    assert collect_for_digest(batch, event, rule)
    (kept,) = batch.digest_events
    assert orjson.loads(kept.payload) == {
        "id": 1,
        "detail": {"pdp": {"apn": "iot"}},
        "endpoint": {"name": "e5"},
    }


def test_a_digests_key_and_times_are_written_in_utc_whatever_the_zones(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        fire = _at(1, 8).astimezone(ZoneInfo("Europe/Berlin"))
        assert digest_key("d", fire, 0) == "digest-d-2025-05-01T08:00:00Z-0"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_digest_run_and_an_action_it_could_not_plan_are_logged_for_the_operator(tmp_path):
    rules = rules_from(tmp_path, AUDITED_RULES)
    rule = rules.get("d")
    assert rule is not None
    store = SqliteStore(tmp_path / "state.sqlite3")
    try:
        store.start_digest("d", _at(1, 7))
        with capture_logs() as empty:
            run_digest(store, rule, _at(1, 7, 5), now=NOW, since=_at(1, 7))
        _collected(store, rule, [{"id": 1, "timestamp": "2025-05-01T07:06:00Z"}])
        with capture_logs() as logs:
            run = run_digest(store, rule, _at(1, 7, 10), now=NOW, since=_at(1, 7, 5))
    finally:
        store.close()
    assert empty == [
        {"event": "digest: nothing collected, nothing sent", "rule_id": "d", "log_level": "info"}
    ]
    ((_, reason),) = run.failures
    assert logs == [
        {
            "event": "digest action not planned",
            "rule": "d",
            "action": "log",
            "reason": reason,
            "log_level": "error",
        },
        {
            "event": "digest run",
            "rule_id": "d",
            "events": 1,
            "actions": 1,
            "run_at": "2025-05-01T07:10:00Z",
            "log_level": "info",
        },
    ]
