"""`event-engine test`: rule test files run events through the real pipeline and say, for
every expectation that fails, which part of the rule did not hold."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from engine.cli import main
from engine.ruletests import TestFileError, find_test_files, load_test_file, run_path

ROOT = Path(__file__).resolve().parent.parent

QUOTA_RULES = """\
rules:
  - id: suspend-on-quota
    when: {source: policy_control, type: "Quota used up"}
    condition:
      "!": {"in": ["vip", {"var": "endpoint.tags"}]}
    actions:
      - suspend_sim: {}
      - webhook:
          url: ${OPS_WEBHOOK_URL}
          body: {iccid: "{{ event.sim.iccid }}", event_id: "{{ event.id }}"}
"""

HEADER = """\
rules: rules.yaml
env: {OPS_WEBHOOK_URL: "https://hooks.test/ops"}
defaults:
  event_type: {id: 19}
  event_source: {id: 1}
  event_severity: {id: 1}
  sim: {id: 9, iccid: "8988"}
  endpoint: {id: 5, name: truck-1, tags: fleet}
tests:
"""


def _files(tmp_path: Path, tests: str, rules: str = QUOTA_RULES) -> Path:
    (tmp_path / "rules.yaml").write_text(rules, encoding="utf-8")
    path = tmp_path / "quota.test.yaml"
    path.write_text(HEADER + textwrap.indent(textwrap.dedent(tests), "  "), encoding="utf-8")
    return path


def _run(capsys: pytest.CaptureFixture[str], path: Path, *extra: str) -> tuple[int, str]:
    code = main(["test", str(path), *extra])
    return code, capsys.readouterr().out


def _line_of(path: Path, text: str) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(number for number, line in enumerate(lines, start=1) if text in line)


# -- the shipped rules ---------------------------------------------------------------------------


def test_the_example_rules_pass_their_tests(capsys):
    code, out = _run(capsys, ROOT / "rules")
    assert code == 0, out
    assert " 0 failed" in out
    assert "FAIL" not in out


def test_every_example_rule_is_named_by_a_passing_test(capsys):
    code, out = _run(capsys, ROOT / "rules", "--json")
    report = json.loads(out)
    assert code == 0
    assert report["failed"] == 0 and report["passed"] >= 10
    assert report["untested_rules"] == []
    tested = {rule for file in report["files"] for rule in file["rules"]}
    shipped = {p.stem for p in (ROOT / "rules").glob("*.yaml")}
    assert len(tested) >= len(shipped)


def test_a_folder_run_finds_test_files_and_skips_rule_files(tmp_path):
    path = _files(tmp_path, "- name: t\n  events: [{id: 1}]\n  expect_none: true\n")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "more.yaml").write_text(
        path.read_text().replace("rules.yaml", "../rules.yaml")
    )
    assert find_test_files(tmp_path) == [tmp_path / "nested" / "more.yaml", path]


# -- passing and failing expectations, with reasons ----------------------------------------------


def test_matching_expectations_pass(tmp_path, capsys):
    path = _files(
        tmp_path,
        """\
        - name: quota used up suspends and notifies
          events: [{id: 7}]
          expect:
            - rule: suspend-on-quota
              action: webhook
              params: {url: "https://hooks.test/ops", body: {iccid: "8988"}}
            - {rule: suspend-on-quota, action: suspend_sim, target: {sim_id: 9}, event: 7}
        - name: vip is left alone
          events: [{id: 8, endpoint: {tags: "fleet,vip"}}]
          expect_none: true
        """,
    )
    code, out = _run(capsys, path)
    assert code == 0, out
    assert f"PASS {path}:{_line_of(path, 'quota used up suspends')}" in out
    assert "rule tests: 2 passed, 0 failed" in out


def test_an_expectation_the_when_rules_out_fails_naming_the_when_part(tmp_path, capsys):
    path = _files(
        tmp_path,
        """\
        - name: a threshold warning is wrongly expected to suspend
          events: [{id: 1, event_type: {id: 18}}]
          expect:
            - {rule: suspend-on-quota, action: suspend_sim}
        """,
    )
    code, out = _run(capsys, path)
    assert code == 1
    expect_line = _line_of(path, "action: suspend_sim")
    assert (
        f"expected `suspend_sim` from `suspend-on-quota`, but it was not planned "
        f"({path}:{expect_line})"
    ) in out
    assert "event 1: `when` does not hold: type is 18" in out
    assert "rule wants 19 (Quota used up)" in out
    assert "rule tests: 0 passed, 1 failed" in out


def test_an_expectation_the_condition_rules_out_fails_naming_the_condition(tmp_path, capsys):
    path = _files(
        tmp_path,
        """\
        - name: vip wrongly expected to be suspended
          events: [{id: 2, endpoint: {tags: vip}}]
          expect:
            - {rule: suspend-on-quota, action: suspend_sim}
        """,
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert 'event 2: `condition` is false: {"!":{"in":["vip",{"var":"endpoint.tags"}]}}' in out


THRESHOLD_RULES = """\
rules:
  - id: suspend-after-three
    when: {type: 19}
    threshold: {count: 3, within: 10m, per: sim.iccid}
    throttle: {for: 1h, per: sim.iccid}
    actions: [{suspend_sim: {}}]
"""


def test_a_threshold_not_reached_is_the_reason_given(tmp_path, capsys):
    path = _files(
        tmp_path,
        """\
        - name: two events are wrongly expected to be enough
          events: [{id: 1, at: 0s}, {id: 2, at: 1m}]
          expect:
            - {rule: suspend-after-three, action: suspend_sim}
        """,
        THRESHOLD_RULES,
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert "event 1: `threshold` not reached: 1 of 3 events for sim.iccid=8988" in out
    assert "event 2: `threshold` not reached: 2 of 3 events for sim.iccid=8988" in out


def test_a_throttled_event_is_the_reason_given_and_the_clock_is_the_events(tmp_path, capsys):
    path = _files(
        tmp_path,
        """\
        - name: the third event fires, a fourth soon after is throttled
          events: [{id: 1, at: 0s}, {id: 2, at: 1m}, {id: 3, at: 2m}, {id: 4, at: 3m},
                   {id: 5, at: 4m}]
          expect:
            - {rule: suspend-after-three, action: suspend_sim, event: 3}
            - {rule: suspend-after-three, action: suspend_sim, event: 5}
        """,
        THRESHOLD_RULES,
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert "expected `suspend_sim` from `suspend-after-three` for event 5" in out
    assert "`suspend_sim` from `suspend-after-three` for event 3 came, but event is 3, not 5" in out


def test_a_throttled_event_explained_when_no_such_action_came(tmp_path, capsys):
    rules = THRESHOLD_RULES.replace("count: 3", "count: 1")
    path = _files(
        tmp_path,
        """\
        - name: an event soon after the first is throttled
          events: [{id: 1, at: 0s}, {id: 2, at: 5m}]
          expect:
            - {rule: suspend-after-three, action: suspend_sim, event: 2}
        """,
        rules,
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert "event 2: `throttle` held it back: throttled for sim.iccid=8988 until" in out


def test_a_params_mismatch_names_the_field_and_both_values(tmp_path, capsys):
    path = _files(
        tmp_path,
        """\
        - name: wrong iccid in the webhook body
          events: [{id: 3}]
          strict: false
          expect:
            - rule: suspend-on-quota
              action: webhook
              params: {body: {iccid: "0000", event_id: 3}}
        """,
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert "came, but params.body.iccid: expected '0000', got '8988'" in out
    assert "params.body.event_id: expected 3, got '3' (a different type)" in out


def test_an_action_nobody_expected_fails_a_strict_test(tmp_path, capsys):
    path = _files(
        tmp_path,
        """\
        - name: only the suspension is listed
          events: [{id: 4}]
          expect:
            - {rule: suspend-on-quota, action: suspend_sim}
        """,
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert "unexpected action: `webhook` from `suspend-on-quota` for event 4" in out
    assert "set `strict: false`" in out


def test_an_action_that_must_not_come_names_the_event_that_caused_it(tmp_path, capsys):
    path = _files(
        tmp_path,
        """\
        - name: no webhook wanted
          events: [{id: 5, endpoint: {tags: vip}}, {id: 6}]
          expect_absent:
            - {action: webhook}
        - name: nothing wanted
          events: [{id: 7}]
          expect_none: true
        """,
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert f"expected no `webhook`, but the rules planned it ({path}:" in out
    assert "`webhook` from `suspend-on-quota` for event 6: params" in out
    assert "expected no actions, but the rules planned 2" in out
    assert "rule tests: 0 passed, 2 failed" in out


def test_an_unknown_rule_or_action_in_an_expectation_is_explained(tmp_path, capsys):
    path = _files(
        tmp_path,
        """\
        - name: typo in the rule id
          events: [{id: 1}]
          strict: false
          expect:
            - {rule: suspend-on-quotas, action: suspend_sim}
            - {rule: suspend-on-quota, action: send_sms}
        """,
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert "there is no rule `suspend-on-quotas`" in out
    assert "(did you mean `suspend-on-quota`?)" in out
    assert (
        "rule `suspend-on-quota` has no `send_sms` action (it has `suspend_sim`, `webhook`)" in out
    )


def test_a_template_that_cannot_render_is_the_reason_given(tmp_path, capsys):
    rules = QUOTA_RULES.replace("event.sim.iccid", "event.sim.imsi")
    path = _files(
        tmp_path,
        """\
        - name: the body names a field the event lacks
          events: [{id: 1}]
          strict: false
          expect:
            - {rule: suspend-on-quota, action: webhook}
        """,
        rules,
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert "event 1: `webhook` could not be planned: template error" in out
    assert "imsi" in out


def test_a_repeated_event_id_is_dropped_as_run_drops_it(tmp_path, capsys):
    path = _files(
        tmp_path,
        """\
        - name: the same event twice suspends once
          events: [{id: 1}, {id: 1}]
          strict: false
          expect:
            - {rule: suspend-on-quota, action: suspend_sim, times: 2}
        """,
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert "event 1: dropped: its id repeats an earlier event's" in out


def test_ordered_expectations_must_come_in_that_order(tmp_path, capsys):
    path = _files(
        tmp_path,
        """\
        - name: webhook before suspension is the wrong order
          events: [{id: 1}]
          ordered: true
          expect:
            - {action: webhook}
            - {action: suspend_sim}
        """,
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert "expected `suspend_sim`, but it was not planned" in out
    assert "came, but another expectation took it" not in out


FOLLOW_UP_RULES = """\
rules:
  - id: block-then-restore
    when: {type: 19}
    actions:
      - suspend_sim: {}
      - after: 24h
        do: {activate_sim: {}}
        cancel_if: {when: {type: 8}}
"""


def test_follow_ups_are_checked_by_due_time_and_cancellation(tmp_path, capsys):
    path = _files(
        tmp_path,
        """\
        - name: the follow-up waits a day
          events: [{id: 1, timestamp: "2025-05-01T10:00:00Z"}]
          expect:
            - {action: suspend_sim}
            - {action: activate_sim, due: 24h, status: pending}
        - name: its due time can be given as a moment
          events: [{id: 1, timestamp: "2025-05-01T10:00:00Z"}]
          expect:
            - {action: suspend_sim}
            - {action: activate_sim, due: "2025-05-02T10:00:00Z"}
        - name: a manual activation before then cancels it
          events: [{id: 1, at: 0s}, {id: 2, at: 2h, event_type: {id: 8}}]
          expect:
            - {action: suspend_sim}
            - {action: activate_sim, status: cancelled}
        - name: a wrong delay is reported with the real one
          events: [{id: 1}]
          strict: false
          expect:
            - {action: activate_sim, due: 12h}
        """,
        FOLLOW_UP_RULES,
    )
    code, out = _run(capsys, path, "--json")
    assert code == 1
    results = {t["name"]: t for f in json.loads(out)["files"] for t in f["tests"]}
    assert [name for name, t in results.items() if t["passed"]] == [
        "the follow-up waits a day",
        "its due time can be given as a moment",
        "a manual activation before then cancels it",
    ]
    (wrong,) = results["a wrong delay is reported with the real one"]["failures"]
    assert wrong["message"] == "expected `activate_sim`, but it was not planned"
    assert wrong["details"] == [
        "`activate_sim` from `block-then-restore` for event 1, due 2025-01-02T00:00:00Z came,"
        " but due 24h after the event, not 12h"  # as rule files write durations
    ]


def test_a_near_miss_in_a_strict_test_is_reported_once_not_again_as_unexpected(tmp_path, capsys):
    path = _files(
        tmp_path,
        """        - name: restored after two hours (wrong)
          events: [{id: 1}]
          expect:
            - {action: suspend_sim}
            - {action: activate_sim, due: 2h}
        """,
        FOLLOW_UP_RULES,
    )
    code, out = _run(capsys, path, "--json")
    assert code == 1
    ((test,),) = [f["tests"] for f in json.loads(out)["files"]]
    assert [failure["message"] for failure in test["failures"]] == [
        "expected `activate_sim`, but it was not planned"
    ]
    assert test["failures"][0]["details"] == [
        "`activate_sim` from `block-then-restore` for event 1, due 2025-01-02T00:00:00Z came,"
        " but due 24h after the event, not 2h"
    ]
    # An action no expectation comes close to is still reported as unexpected.
    path.write_text(
        path.read_text(encoding="utf-8").replace(
            "{action: activate_sim, due: 2h}", "{action: log}"
        ),
        encoding="utf-8",
    )
    code, out = _run(capsys, path, "--json")
    ((test,),) = [f["tests"] for f in json.loads(out)["files"]]
    messages = [failure["message"] for failure in test["failures"]]
    assert messages[0] == "expected `log`, but it was not planned"
    assert messages[1].startswith("unexpected action: `activate_sim`")


def test_events_can_come_from_a_file_with_line_numbers(tmp_path, capsys):
    (tmp_path / "events.jsonl").write_text(
        '{"id": 1, "timestamp": "2025-05-01T10:00:00Z", "event_type": {"id": 19},'
        ' "event_source": {"id": 1}, "sim": {"id": 9, "iccid": "8988"}}\n'
        "not json\n",
        encoding="utf-8",
    )
    path = _files(
        tmp_path, "- name: from a file\n  events_file: events.jsonl\n  expect_none: true\n"
    )
    with pytest.raises(TestFileError) as caught:
        load_test_file(path)
    assert str(caught.value).startswith(
        f"{tmp_path / 'events.jsonl'}:2: test `from a file`: not valid JSON"
    )
    (tmp_path / "events.jsonl").write_text(
        (tmp_path / "events.jsonl").read_text().splitlines()[0] + "\n", encoding="utf-8"
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert "expected no actions, but the rules planned 2" in out


# -- bad test files ------------------------------------------------------------------------------


def test_a_broken_test_file_is_reported_with_file_and_line(tmp_path, capsys):
    path = _files(
        tmp_path,
        """\
        - name: typo
          events: [{id: 1}]
          expekt: []
        - name: bad due
          events: [{id: 1}]
          expect: [{action: suspend_sim, due: tomorrow}]
        """,
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert f"ERROR {path}:{_line_of(path, 'expekt')}: test `typo`: unknown key `expekt`" in out
    assert "(did you mean `expect`?)" in out
    assert f"ERROR {path}:{_line_of(path, 'due: tomorrow')}:" in out
    assert "`due` is a time or a delay after the event" in out
    assert "1 test files unusable" in out


def test_a_test_whose_name_is_left_empty_is_an_error_not_skipped(tmp_path, capsys):
    path = _files(
        tmp_path,
        """\
        - name:
          events: [{id: 1}]
          expect: [{rule: no-such-rule}]
        """,
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert f"ERROR {path}:{_line_of(path, '- name:')}: test `#1`: `name` is empty" in out


def test_rules_that_do_not_load_make_the_file_fail(tmp_path, capsys):
    path = _files(
        tmp_path,
        "- name: t\n  events: []\n  expect_none: true\n",
        "rules: [{id: r, actions: [{nope: {}}]}]\n",
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert f"the rules under test do not load: {tmp_path / 'rules.yaml'}:1:" in out
    assert "unknown action `nope`" in out


def test_only_restricts_the_rules_and_rejects_unknown_ids(tmp_path, capsys):
    two = QUOTA_RULES + "  - id: log-all\n    actions: [{log: {message: seen}}]\n"
    path = _files(tmp_path, "- name: t\n  events: [{id: 1}]\n  expect_none: true\n", two)
    path.write_text(
        path.read_text().replace("rules: rules.yaml", "rules: rules.yaml\nonly: [log-all]")
    )
    code, out = _run(capsys, path)
    assert code == 1
    assert "expected no actions, but the rules planned 1" in out
    assert "`log` from `log-all`" in out
    path.write_text(path.read_text().replace("only: [log-all]", "only: [log-al]"))
    code, out = _run(capsys, path)
    assert code == 1
    assert f"{path}:2: `only` names no rule `log-al`" in out


def test_a_path_without_test_files_is_an_error(tmp_path, capsys):
    (tmp_path / "rules.yaml").write_text(QUOTA_RULES)
    assert main(["test", str(tmp_path)]) == 1
    assert "no rule test files in" in capsys.readouterr().err


def test_run_path_reports_results_per_file(tmp_path):
    path = _files(
        tmp_path, "- name: t\n  events: [{id: 1, endpoint: {tags: vip}}]\n  expect_none: true\n"
    )
    (result,) = run_path(path)
    assert result.passed and result.rule_ids == ("suspend-on-quota",)
    assert [c.name for c in result.cases] == ["t"]


def test_a_rule_file_given_as_a_test_file_is_told_apart(capsys):
    code, out = _run(capsys, ROOT / "rules" / "usage-limit.yaml")
    assert code == 1
    assert "usage-limit.yaml:3: this is a rule file, not a rule test file" in out
