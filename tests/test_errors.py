"""The engine's errors say what failed in words an operator can act on, and carry those
words as a plain exception does (its `args`, so a log or a traceback shows them)."""

from __future__ import annotations

import pytest

from engine.errors import ActionError, ApiError, ConfigError, Location, RuleSetError
from engine.ports import ReceiverError


def test_an_api_error_names_the_call_the_answer_and_emnifys_code():
    error = ApiError(
        422, "invalid status", method="PATCH", path="/api/v1/sim/9", error_code=1, error_token="x"
    )
    assert str(error) == "PATCH /api/v1/sim/9 HTTP 422 [1 x]: invalid status"
    assert error.args == (str(error),)


@pytest.mark.parametrize(
    ("code", "token", "said"),
    [(7, None, " [7 None]"), (None, "bad_token", " [None bad_token]"), (None, None, "")],
)
def test_an_api_errors_code_is_said_when_emnify_gave_either_part(code, token, said):
    error = ApiError(400, "no", error_code=code, error_token=token)
    assert str(error) == f"HTTP 400{said}: no"


def test_an_api_error_without_an_answer_or_a_call_says_so():
    error = ApiError(None, "timed out")
    assert str(error) == "no response: timed out"
    assert (error.method, error.path, error.unsent) == ("", "", False)  # it may have been sent


def test_an_action_error_is_final_unless_said_to_be_retryable():
    assert ActionError("no SIM").retryable is False
    assert ActionError("busy", retryable=True).retryable is True


def test_a_config_error_names_where_and_how_to_fix_it_or_just_what():
    located = ConfigError("unknown key", Location("rules/a.yaml", 4), "did you mean `when`?")
    assert str(located) == "rules/a.yaml:4: unknown key (did you mean `when`?)"
    assert located.args == (str(located),)
    assert str(ConfigError("no rules")) == "no rules"
    assert str(ConfigError("empty", Location("rules/b.yaml"))) == "rules/b.yaml: empty"


def test_a_rule_set_error_says_every_problem_one_a_line():
    problems = [ConfigError("a", Location("r.yaml", 1)), ConfigError("b", Location("r.yaml", 2))]
    error = RuleSetError(problems)
    assert str(error) == "r.yaml:1: a\nr.yaml:2: b"
    assert error.errors == problems


def test_a_receiver_error_says_only_its_reason_which_is_safe_to_show():
    error = ReceiverError("no answer within 10 s", retryable=True)
    assert str(error) == error.reason == "no answer within 10 s"
    assert error.retryable is True
