"""Hot reload of the rules: by SIGHUP and by a file change. An invalid new set leaves the old
one in force with every problem logged at file:line; a rule whose id stays keeps its state,
unless what its window counts changed."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from engine.daemon import Daemon
from engine.digest_schedule import Digests
from engine.pipeline import Pipeline
from engine.reload import RuleReloader
from engine.rules import load_rules
from engine.store import SqliteStore

from helpers import TOKEN, engine_config, eventually

THRESHOLD_RULE = """\
rules:
  - id: suspend-after-three
    description: {description}
    when: {{type: 19}}
    threshold: {{count: 3, within: {within}, per: sim.iccid}}
    actions: [{{suspend_sim: {{}}}}]
  - id: log-blocked
    when: {{type: 11}}
    actions: [{{log: {{message: blocked}}}}]
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _quota(event_id: int, minute: int) -> dict:
    return {
        "id": event_id,
        "timestamp": f"2025-05-01T10:{minute:02d}:00Z",
        "event_type": {"id": 19},
        "sim": {"id": 9, "iccid": "8988"},
    }


def _pipeline(tmp_path: Path, rules_file: Path) -> tuple[Pipeline, SqliteStore, RuleReloader]:
    store = SqliteStore(tmp_path / "state.sqlite3")
    pipeline = Pipeline(load_rules(rules_file), store)
    reloader = RuleReloader(rules_file, watch=False)
    reloader.attach(pipeline)
    return pipeline, store, reloader


async def test_a_reload_reports_added_removed_and_changed_rules(tmp_path):
    rules_file = _write(
        tmp_path / "rules.yaml", THRESHOLD_RULE.format(description="first", within="10m")
    )
    pipeline, store, reloader = _pipeline(tmp_path, rules_file)
    try:
        _write(
            rules_file,
            THRESHOLD_RULE.format(description="second", within="10m").replace(
                "log-blocked", "log-blocked-endpoints"
            ),
        )
        with capture_logs() as logs:
            changes = await reloader.reload("SIGHUP")
    finally:
        store.close()
    assert changes is not None
    assert (changes.added, changes.removed, changes.changed) == (
        ["log-blocked-endpoints"],
        ["log-blocked"],
        ["suspend-after-three"],
    )
    assert changes.windows_reset == {}
    assert [r.id for r in pipeline.rules] == ["suspend-after-three", "log-blocked-endpoints"]
    (done,) = [entry for entry in logs if entry["event"] == "rules reloaded"]
    assert done["reason"] == "SIGHUP" and done["added"] == ["log-blocked-endpoints"]


async def test_an_invalid_new_set_keeps_the_old_one_and_logs_file_and_line(tmp_path):
    rules_file = _write(
        tmp_path / "rules.yaml", THRESHOLD_RULE.format(description="first", within="10m")
    )
    pipeline, store, reloader = _pipeline(tmp_path, rules_file)
    before = pipeline.rules
    try:
        _write(
            rules_file,
            THRESHOLD_RULE.format(description="second", within="10m").replace(
                "suspend_sim", "suspend_simm"
            ),
        )
        with capture_logs() as logs:
            changes = await reloader.reload("SIGHUP")
        # The old set still acts.
        result = pipeline.process([_quota(i, i) for i in (1, 2, 3)], source="test")
    finally:
        store.close()
    assert changes is None
    assert pipeline.rules is before
    problems = [entry["problem"] for entry in logs if entry["event"] == "invalid rule"]
    assert problems == [
        f"{rules_file}:6: rule `suspend-after-three`: unknown action `suspend_simm`"
        " (did you mean `suspend_sim`?)"
    ]
    assert any(
        entry["event"].startswith("rules not reloaded") and entry["log_level"] == "error"
        for entry in logs
    )
    assert [p.action.kind for p in result.planned] == ["suspend_sim"]


async def test_an_unchanged_rule_id_keeps_its_window_across_a_reload(tmp_path):
    rules_file = _write(
        tmp_path / "rules.yaml", THRESHOLD_RULE.format(description="first", within="10m")
    )
    pipeline, store, reloader = _pipeline(tmp_path, rules_file)
    try:
        pipeline.process([_quota(1, 0), _quota(2, 1)], source="test")
        _write(rules_file, THRESHOLD_RULE.format(description="reworded", within="10m"))
        changes = await reloader.reload("SIGHUP")
        result = pipeline.process([_quota(3, 2)], source="test")
    finally:
        store.close()
    assert changes is not None and changes.changed == ["suspend-after-three"]
    assert [(p.event.id, p.action.kind) for p in result.planned] == [(3, "suspend_sim")]


async def test_a_changed_threshold_resets_the_window_and_says_so(tmp_path):
    rules_file = _write(
        tmp_path / "rules.yaml", THRESHOLD_RULE.format(description="first", within="10m")
    )
    pipeline, store, reloader = _pipeline(tmp_path, rules_file)
    try:
        pipeline.process([_quota(1, 0), _quota(2, 1)], source="test")
        _write(rules_file, THRESHOLD_RULE.format(description="first", within="15m"))
        with capture_logs() as logs:
            changes = await reloader.reload("SIGHUP")
        third = pipeline.process([_quota(3, 2)], source="test")
        more = pipeline.process([_quota(4, 3), _quota(5, 4)], source="test")
    finally:
        store.close()
    assert changes is not None
    assert changes.windows_reset == {"suspend-after-three": ["threshold"]}
    (reset,) = [entry for entry in logs if "window reset" in entry["event"]]
    assert reset["rule_id"] == "suspend-after-three" and reset["changed"] == ["threshold"]
    assert third.planned == []  # counting starts again: 1 of 3
    assert [p.event.id for p in more.planned] == [5]


async def test_sighup_reloads_the_rules_of_a_running_service(tmp_path, simulator):
    rules_file = _write(
        tmp_path / "rules.yaml", THRESHOLD_RULE.format(description="first", within="10m")
    )
    daemon = Daemon(engine_config(tmp_path, simulator), load_rules(rules_file), TOKEN)
    reloader = RuleReloader(rules_file, watch=False)
    try:
        await reloader.start(daemon)
        handler = signal.getsignal(signal.SIGHUP)
        assert handler not in (signal.SIG_DFL, signal.SIG_IGN, None)  # else SIGHUP would kill
        _write(rules_file, "rules:\n  - id: only-one\n    actions: [{log: {}}]\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: [r.id for r in daemon.pipeline.rules] == ["only-one"], 5.0)
    finally:
        await reloader.stop()
        await daemon.aclose()


async def test_a_changed_rule_file_is_reloaded_by_the_watcher(tmp_path, simulator):
    folder = tmp_path / "rules"
    folder.mkdir()
    _write(folder / "a.yaml", "rules:\n  - id: a\n    actions: [{log: {}}]\n")
    daemon = Daemon(engine_config(tmp_path, simulator), load_rules(folder), TOKEN)
    digests = Digests()
    reloader = RuleReloader(folder, debounce=0.05, on_reload=[digests.rules_changed])
    try:
        await digests.start(daemon)
        await reloader.start(daemon)
        await asyncio.wait_for(reloader.ready.wait(), 5.0)
        await asyncio.sleep(0.1)  # the watcher's first poll
        _write(
            folder / "b.yaml",
            'rules:\n  - id: b\n    schedule: "0 8 * * *"\n    digest: {}\n'
            "    actions: [{log: {}}]\n",
        )
        await eventually(lambda: [r.id for r in daemon.pipeline.rules] == ["a", "b"], 5.0)
        # The digest rule that came with the reload is scheduled.
        assert daemon.scheduler.get_job("digest:b") is not None
        # A file beside the rules that is not a rule file does not count.
        (folder / "notes.txt").write_text("x")
        _write(folder / "b.yaml", "rules:\n  - id: b\n    actions: [{log: {}}]\n")
        await eventually(lambda: daemon.scheduler.get_job("digest:b") is None, 5.0)
    finally:
        await reloader.stop()
        await digests.stop()
        await daemon.aclose()


async def test_a_single_rule_file_is_watched_through_its_folder(tmp_path, simulator):
    rules_file = _write(tmp_path / "rules.yaml", "rules:\n  - id: a\n    actions: [{log: {}}]\n")
    daemon = Daemon(engine_config(tmp_path, simulator), load_rules(rules_file), TOKEN)
    reloader = RuleReloader(rules_file, debounce=0.05)
    try:
        await reloader.start(daemon)
        await asyncio.wait_for(reloader.ready.wait(), 5.0)
        await asyncio.sleep(0.1)
        # Editors often save by writing a new file and renaming it over the old one.
        replacement = tmp_path / ".rules.yaml.tmp"
        _write(replacement, "rules:\n  - id: renamed\n    actions: [{log: {}}]\n")
        replacement.replace(rules_file)
        await eventually(lambda: [r.id for r in daemon.pipeline.rules] == ["renamed"], 5.0)
    finally:
        await reloader.stop()
        await daemon.aclose()


def test_reload_before_start_is_a_programming_error(tmp_path):
    reloader = RuleReloader(tmp_path / "rules.yaml", watch=False)
    with pytest.raises(RuntimeError):
        reloader.reload_now("test")


ABSENCE_RULE = """\
rules:
  - id: went-silent
    when: {{type: 19}}
    absence: {{for: {span}, per: {per}}}
    actions: [{{log: {{}}}}]
"""


async def test_an_absence_rule_forgets_its_keys_when_per_changes_and_keeps_them_for_a_new_span(
    tmp_path,
):
    rules_file = _write(tmp_path / "rules.yaml", ABSENCE_RULE.format(span="2h", per="sim.id"))
    pipeline, store, reloader = _pipeline(tmp_path, rules_file)
    try:
        pipeline.process([_quota(1, 0)], source="test")
        assert [m.key for m in store.absence_marks()] == ["9"]
        _write(rules_file, ABSENCE_RULE.format(span="3h", per="sim.id"))
        kept = await reloader.reload("SIGHUP")
        after_span = [m.key for m in store.absence_marks()]
        _write(rules_file, ABSENCE_RULE.format(span="3h", per="sim.iccid"))
        changed = await reloader.reload("SIGHUP")
        after_per = store.absence_marks()
    finally:
        store.close()
    assert kept is not None and kept.windows_reset == {}
    assert after_span == ["9"]  # a sim.id seen is still a sim.id: kept
    assert changed is not None and changed.windows_reset == {"went-silent": ["absence"]}
    assert after_per == []  # sim.id values are no ICCIDs: forgotten
