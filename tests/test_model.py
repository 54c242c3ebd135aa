"""What the core and the stores share (engine/model.py): the poll cursor's key, an audit
row's steps as text, whether a batch changes rule state, and when a silence holds."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.model import RuleStateChanges, Silence, cursor_key, steps_text

T0 = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)


def test_the_single_organisations_cursor_keeps_the_key_it_had_before_organisations():
    assert cursor_key() == "cursor"
    assert cursor_key("") == "cursor"
    assert cursor_key("acme") == "cursor:acme"


def test_an_audit_rows_steps_are_kept_as_json_text_and_what_json_lacks_as_its_text():
    assert steps_text(None) is None
    assert steps_text({"sim": 9, "file": Path("/var/x")}) == '{"sim":9,"file":"/var/x"}'


_STATE = {
    "windows": {("r", "9"): ([1.0], 2.0)},
    "throttles": {("r", "9"): 5.0},
    "guards": {"r": [1.0]},
    "overrides": [object()],
    "follow_ups": [object()],
    "cancels": [object()],
    "absences": {("r", "9"): None},
}


@pytest.mark.parametrize("name", sorted(_STATE))
def test_a_batch_changes_rule_state_when_it_changes_any_part_of_it(name):
    assert RuleStateChanges(**{name: _STATE[name]}).changes_state()


def test_a_batch_that_only_prunes_what_ended_changes_no_rule_state():
    assert not RuleStateChanges().changes_state()
    assert not RuleStateChanges(prune_before=5.0).changes_state()
    # Every part that changes state is named above: a new one must be added there too.
    parts = {f.name for f in fields(RuleStateChanges)} - {"prune_before", "version"}
    assert parts == set(_STATE)


def test_a_silence_holds_from_its_start_up_to_but_not_at_its_end():
    silence = Silence((("iccid", "8988"),), "maintenance", "ops", T0, T0 + timedelta(hours=1))
    assert not silence.active_at(T0 - timedelta(seconds=1))
    assert silence.active_at(T0)
    assert silence.active_at(T0 + timedelta(minutes=59))
    assert not silence.active_at(T0 + timedelta(hours=1))
