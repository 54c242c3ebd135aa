"""One of each small framework: the YAML loader and the section validator that rule files,
rule-test files and the config file share, and the one answer to "is this emnify failure
worth another try?" that the client and the dispatcher both read."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from engine.config import load_config
from engine.daemon import Daemon
from engine.dispatch import RetryPolicy
from engine.emnify import ClientSettings, EmnifyClient
from engine.errors import ApiError, ConfigError, Retry, RuleSetError
from engine.model import IntentStatus
from engine.rules import load_rules
from engine.ruletests.spec import TestFileError, load_test_file
from engine.simulator import FIRST_ENDPOINT_ID, FIRST_SIM_ID, FaultRule, SimulatorServer
from engine.yamlfile import MAX_FILE_BYTES

from helpers import TOKEN, engine_config, eventually, poller_of, poller_settings, rules_from

# -- one loader -----------------------------------------------------------------------------

_LAUGHS = "".join(
    f"{name}: &{name} [{', '.join([f'*{below}'] * 9)}]\n"
    for below, name in zip("abcdefgh", "bcdefghi", strict=True)
)

YAML_PROBLEMS = {
    "a tab": "a:\n\tb: 1\n",
    "an unquoted ': '": "a: note: this\n",
    "an open quote": 'a: "x\nb: 1\n',
    "a misindented line": "a:\n  b: 1\n   c: 2\n",
    "a duplicate key": "a: 1\nb: 2\na: 3\n",
    "an alias bomb": 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    + _LAUGHS,
    "deep nesting": "a: " + "[" * 70 + "]" * 70 + "\n",
    "a number too long": "a: 1" + ":0" * 60 + "\n",
    "a value not of its tag": "a: !!int abc\n",
    "an alias inside its anchor": "a: &r\n  b: [*r]\n",
    "a control character": "a: b\nc: \x07\n",
    "a file too large": "a: 1\n" + "# padding\n" * (MAX_FILE_BYTES // 10 + 1),
}


def _config_problem(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    return raised.value


def _rule_file_problems(path: Path) -> list[ConfigError]:
    with pytest.raises(RuleSetError) as raised:
        load_rules(path)
    return raised.value.errors


def _rule_test_file_problems(path: Path) -> list[ConfigError]:
    with pytest.raises(TestFileError) as raised:
        load_test_file(path)
    return raised.value.errors


def _said(error: ConfigError) -> tuple[int | None, str, str | None]:
    return (error.where.line if error.where else None, error.message, error.hint)


@pytest.mark.parametrize("text", YAML_PROBLEMS.values(), ids=YAML_PROBLEMS.keys())
def test_a_yaml_problem_reads_the_same_in_a_rule_file_a_config_file_and_a_rule_test_file(
    tmp_path: Path, text: str
) -> None:
    paths = [tmp_path / name for name in ("config.yaml", "rules.yaml", "rule-test.yaml")]
    for path in paths:
        path.write_text(text, encoding="utf-8")
    in_config = _config_problem(paths[0])
    line, message, hint = _said(in_config)
    in_rules = [_said(e) for e in _rule_file_problems(paths[1])]
    in_tests = [_said(e) for e in _rule_test_file_problems(paths[2])]
    if message.startswith("larger than"):
        # The same refusal; rule files add where to put the rules instead.
        assert (line, message) in [(found[0], found[1]) for found in in_rules + in_tests]
    else:
        assert (line, message, hint) in in_rules
        assert (line, message, hint) in in_tests
    assert str(in_config).startswith(f"{paths[0]}:")


def test_a_control_character_in_the_config_is_a_located_error_not_a_traceback(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("log:\n  level: info\x07\n", encoding="utf-8")
    assert str(_config_problem(path)) == (
        f"{path}:2: invalid YAML: unacceptable character #x0007: control characters are not allowed"
    )


def test_the_config_keeps_yaml_types_where_rule_files_keep_json_ones(tmp_path):
    # An unquoted date: text in a rule (conditions compare it as JSON would), a date in the
    # config, where no option takes one: refused there as it always was.
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - id: r\n    description: 2025-05-01\n    actions: [{log: {}}]\n",
        encoding="utf-8",
    )
    assert load_rules(rules).rules[0].description == "2025-05-01"
    config = tmp_path / "config.yaml"
    config.write_text("store:\n  path: 2025-05-01\n", encoding="utf-8")
    assert str(_config_problem(config)) == (
        f"{config}:2: `store.path` must be a string, got date (quote it)"
    )


def test_shared_blocks_and_merge_keys_read_alike_in_the_config_and_rule_files(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "api: &api {base_url: 'http://127.0.0.1:9', per_page: 50}\n"
        "log:\n  level: debug\n"
        "http:\n  <<: {port: 9090, host: 0.0.0.0}\n  port: 9091\n",
        encoding="utf-8",
    )
    loaded = load_config(config)
    assert (loaded.api.base_url, loaded.api.per_page) == ("http://127.0.0.1:9", 50)
    assert (loaded.http.host, loaded.http.port) == ("0.0.0.0", 9091)  # its own key wins
    assert loaded.log_level == "debug"


# -- one section validator ------------------------------------------------------------------

RULE = "rules:\n  - id: r\n    when: {type: 19}\n    actions: [{log: {}}]\n"


@pytest.mark.parametrize(
    ("in_rule", "in_config", "said", "hint"),
    [
        (
            "    threshold: {count: 0, within: 10m}\n",
            "actions:\n  max_attempts: 0\n",
            "` must be a whole number of at least 1, got the number 0",
            None,
        ),
        (
            "    enabled: 'yes'\n",
            "dry_run: 'yes'\n",
            "` must be true or false, got the string 'yes'",
            None,
        ),
        ("    description: 5\n", "rules: 5\n", "` must be a string, got the number 5", "quote it"),
        (
            "    throttle: {for: 5 minutes}\n",
            "poller:\n  interval: 5 minutes\n",
            "` is not a duration: the string '5 minutes'",
            "write a whole number and a unit (s, m, h, d, w), e.g. 30s, 10m, 24h, 7d or 1h30m",
        ),
        (
            "    throttle: {for: 99999999w}\n",
            "actions:\n  deadline: 99999999w\n",
            "`: '99999999w' is longer than 10 years",
            "no window, throttle or delay needs more",
        ),
        ("    throttle: {fro: 1h}\n", "poller:\n  intervall: 10s\n", "`", "did you mean `"),
    ],
    ids=["count", "flag", "text", "duration", "too long", "misspelt key"],
)
def test_a_wrong_value_is_told_in_the_same_words_in_a_rule_file_and_the_config(
    tmp_path: Path, in_rule: str, in_config: str, said: str, hint: str | None
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE + in_rule, encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(in_config, encoding="utf-8")
    # (a misspelt key is also a missing one: the first problem is the one compared)
    in_rules = next(e for e in _rule_file_problems(rules) if e.where and e.where.line == 5)
    for error in (in_rules, _config_problem(config)):
        assert error.message.endswith(said)
        assert error.hint == hint if hint is None else (error.hint or "").startswith(hint)


def test_a_rule_test_file_is_told_in_the_rule_files_words(tmp_path):
    (tmp_path / "rules.yaml").write_text(RULE, encoding="utf-8")
    spec = tmp_path / "test.yaml"
    spec.write_text(
        "rules: rules.yaml\ntests:\n  - name: n\n    events: [{event_type: {id: 19}}]\n"
        "    expect: [{rule: r, times: 0}]\n    ordred: true\n",
        encoding="utf-8",
    )
    assert [str(e) for e in _rule_test_file_problems(spec)] == [
        f"{spec}:6: test `n`: unknown key `ordred` (did you mean `ordered`?)",
        f"{spec}:5: test `n` → expect: `times` must be a whole number of at least 1, got the "
        "number 0",
    ]


def test_a_number_option_refuses_nan_with_its_line_not_a_traceback(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("api:\n  read_timeout: .nan\n", encoding="utf-8")
    assert str(_config_problem(config)) == (
        f"{config}:2: `api.read_timeout` must be a number of at least 0.1, got the number nan"
    )


def test_an_option_left_empty_takes_its_default_but_a_rule_key_left_empty_is_refused(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("poller:\n  interval:\nlog:\n", encoding="utf-8")
    assert poller_settings(load_config(config)).interval == timedelta(seconds=10)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE + "    enabled:\n", encoding="utf-8")
    assert [e.message for e in _rule_file_problems(rules)] == [
        "rule `r`: `enabled` must be true or false, got nothing (null)"
    ]


# -- one meaning of "retryable" -------------------------------------------------------------

SIM_PATH = r"^/api/v1/sim/\d+$"
SMS_PATH = r"^/api/v1/endpoint/\d+/sms$"
SUSPEND = """
rules:
  - id: suspend
    when: {type: 19}
    actions: [{suspend_sim: {}}]
"""


def _fault(simulator: SimulatorServer, path: str, method: str, kind: str) -> None:
    simulator.state.set_faults([FaultRule.parse({"path": path, "method": method, "kind": kind})])


def _sent(simulator: SimulatorServer, method: str, path_end: str) -> int:
    return sum(
        1 for r in simulator.state.requests() if r.method == method and r.path.endswith(path_end)
    )


async def _client_sends(simulator: SimulatorServer, kind: str, idempotent: bool) -> int:
    """How often the client sends one call that keeps failing with `kind` (two retries
    allowed): a GET of a SIM (idempotent) or a POST of an SMS (not)."""
    simulator.state.reset()
    method, path = ("GET", SIM_PATH) if idempotent else ("POST", SMS_PATH)
    _fault(simulator, path, method, kind)
    settings = ClientSettings(
        base_url=simulator.base_url,
        max_retries=2,
        backoff_initial=0.001,
        backoff_max=0.001,
        read_timeout=2.0,
        action_rate_limit=1000.0,
    )
    async with EmnifyClient(TOKEN, settings) as client:
        with pytest.raises(ApiError) as raised:
            if idempotent:
                await client.get_sim(FIRST_SIM_ID)
            else:
                await client.send_sms(FIRST_ENDPOINT_ID, {"payload": "x"})
    ending = f"/sim/{FIRST_SIM_ID}" if idempotent else "/sms"
    await eventually(lambda: _sent(simulator, method, ending) >= 1)
    retried = raised.value.retry in (Retry.AT_ONCE, Retry.AT_ONCE_IF_IDEMPOTENT)
    assert raised.value.retryable or not retried  # repeated at once implies worth a try later
    return _sent(simulator, method, ending)


async def _dispatcher_tries_again(tmp_path: Path, simulator: SimulatorServer, kind: str) -> bool:
    """Whether the dispatcher keeps a suspend_sim for another attempt after the first one
    failed with `kind` (the client itself gives up at once)."""
    simulator.state.reset()
    (event,) = simulator.state.store_events(
        [{"event_type": {"id": 19}, "sim_id": simulator.state.sims()[0]["id"]}]
    )
    _fault(simulator, SIM_PATH, "GET", kind)
    config = engine_config(tmp_path, simulator)
    config = replace(
        config,
        api=replace(config.api, max_retries=0, read_timeout=2.0),
        retry=RetryPolicy(initial_backoff=timedelta(hours=1), max_backoff=timedelta(hours=1)),
    )
    daemon = Daemon(config, rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        await daemon.dispatcher.run_due()
        (intent,) = daemon.store.intents()
    finally:
        await daemon.aclose()
    assert intent.attempts == 1 and event["sim"]["id"] == intent.target["sim_id"]
    assert intent.status in (IntentStatus.PENDING, IntentStatus.FAILED)
    return intent.status is IntentStatus.PENDING


@pytest.mark.parametrize(
    ("kind", "get_sent", "post_sent", "later"),
    [
        ("429", 3, 3, True),  # refused before any work: anything is repeated at once
        ("502", 3, 1, True),  # may have reached emnify: only what is safe to repeat
        ("503", 3, 1, True),
        ("504", 3, 1, True),
        ("drop", 3, 1, True),  # no answer at all
        ("500", 1, 1, True),  # not at once, but an action is tried again later
    ],
)
async def test_the_client_and_the_dispatcher_agree_on_what_is_worth_another_try(
    tmp_path: Path,
    simulator: SimulatorServer,
    kind: str,
    get_sent: int,
    post_sent: int,
    later: bool,
) -> None:
    assert await _client_sends(simulator, kind, idempotent=True) == get_sent
    assert await _client_sends(simulator, kind, idempotent=False) == post_sent
    assert await _dispatcher_tries_again(tmp_path, simulator, kind) is later


async def test_a_refused_call_is_tried_once_and_never_again(tmp_path, simulator):
    async with EmnifyClient(TOKEN, ClientSettings(base_url=simulator.base_url)) as client:
        with pytest.raises(ApiError) as raised:
            await client.get_sim(999_999)  # no such SIM: 404
    assert raised.value.retry is Retry.NEVER and not raised.value.retryable
    assert _sent(simulator, "GET", "/sim/999999") == 1
    # A SIM that cannot be suspended (Issued): the dispatcher fails the action at once.
    (event,) = simulator.state.store_events(
        [{"event_type": {"id": 19}, "sim_id": simulator.state.sims()[0]["id"]}]
    )
    simulator.state.change_sim_status(event["sim"]["id"], 0, emit=False)
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, SUSPEND), TOKEN)
    try:
        await poller_of(daemon).poll_once()
        await daemon.dispatcher.run_due()
        (intent,) = daemon.store.intents()
    finally:
        await daemon.aclose()
    assert (intent.status, intent.attempts) == (IntentStatus.FAILED, 1)


def test_a_login_that_failed_is_never_repeated_at_once_but_may_be_tried_later():
    from engine.emnify.errors import LoginError

    for status, later in [(None, True), (429, True), (502, True), (401, True), (403, False)]:
        error = LoginError(status, "login failed", unsent=status is None)
        assert error.retry is (Retry.LATER if later else Retry.NEVER)
        assert error.retryable is later


def test_a_401_after_a_fresh_login_is_the_engines_trouble_tried_again_later():
    error = ApiError(401, "refused again right after a fresh login")
    assert error.retry is Retry.LATER and error.retryable
