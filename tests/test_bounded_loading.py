"""Rule, config and rule-test files cost a bounded amount to load, whatever they hold: a few
hundred bytes never expand to gigabytes, and every refusal names `file:line`."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import textwrap
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from engine.cli import main
from engine.config import load_config
from engine.daemon import Daemon
from engine.errors import ActionError, ConfigError, Location, RuleSetError
from engine.reload import RuleReloader
from engine.rules import EventTypeCatalog, RuleSet, load_rules, load_rules_text
from engine.ruletests import TestFileError, load_test_file
from engine.templates import TemplateValue
from engine.yamlfile import MAX_FILE_BYTES

from helpers import BILLION_LAUGHS, TOKEN, engine_config, eventually

# The classic "billion laughs": nine levels of nine aliases stand for 9**9 strings.


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


def _problems(text: str) -> list[str]:
    with pytest.raises(RuleSetError) as caught:
        load_rules_text(text, "rules.yaml")
    return [str(problem) for problem in caught.value.errors]


# -- YAML aliases, nesting, size, numbers ---------------------------------------------------


def test_an_alias_bomb_is_refused_by_validate_with_file_and_line(tmp_path, capsys):
    path = _write(tmp_path / "laughs.yaml", BILLION_LAUGHS)
    assert path.stat().st_size < 1000
    code, err = _validate(path, capsys)
    assert code == 1
    assert err.startswith(f"error: {path}:12: aliases copy too much")
    assert "anchor at line 11" in err
    events = _write(tmp_path / "events.jsonl", '{"id": 1, "timestamp": "2025-05-01T10:00:00Z"}\n')
    assert main(["replay", "--rules", str(path), "--events", str(events)]) == 1
    assert capsys.readouterr().err == err


def test_an_alias_bomb_in_the_config_file_is_refused_with_its_line(tmp_path):
    bomb = BILLION_LAUGHS.split("condition:")[1].split("actions:")[0]
    config = _write(tmp_path / "config.yaml", "extra:" + bomb)
    with pytest.raises(ConfigError, match=r"config\.yaml:\d+: aliases copy too much"):
        load_config(config)


def test_a_merge_key_bomb_is_refused():
    lines = ["rules:", "  - id: m", "    actions: [{log: {}}]"]
    lines.append("    a0: &a0 {k0: 1, k1: 2, k2: 3}")
    lines += [f"    a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 9)}]}}" for i in range(1, 10)]
    assert any("aliases copy too much" in p for p in _problems("\n".join(lines)))


def test_shared_blocks_by_alias_still_load():
    rules = load_rules_text(
        textwrap.dedent(
            """\
        rules:
          - id: first
            when: &quota {source: policy_control, type: 19}
            actions:
              - webhook: &hook
                  url: https://hooks.example.com/ops
                  body: {text: "{{ event.description }}", iccid: "{{ event.sim.iccid }}"}
          - id: second
            when: *quota
            throttle: {per: sim.iccid, for: 1h}
            actions: [{webhook: {<<: *hook, headers: {X-Team: ops}}}]
        """
        ),
        "rules.yaml",
    )
    second = rules.get("second")
    assert second is not None and second.when == rules.get("first").when  # type: ignore[union-attr]
    assert second.definition["actions"][0]["webhook"]["url"] == "https://hooks.example.com/ops"


def test_an_alias_inside_its_own_anchor_is_refused_with_its_line():
    found = _problems("rules:\n  - &r\n    id: x\n    actions: [*r]\n")
    assert found == ["rules.yaml:2: an alias refers to itself"]


@pytest.mark.parametrize("depth", [65, 999, 100_000])
def test_deep_nesting_is_refused_with_a_line_not_a_recursion_error(tmp_path, capsys, depth):
    path = _write(tmp_path / "deep.yaml", "rules: " + "[" * depth + "]" * depth + "\n")
    code, err = _validate(path, capsys)
    assert code == 1
    assert f"{path}:1: " in err
    assert "nested more than 64 levels deep" in err or "maximum nesting depth" in err


def test_deep_nesting_in_the_config_file_is_refused(tmp_path):
    for depth in (70, 990):
        config = _write(tmp_path / "config.yaml", "rules: " + "[" * depth + "]" * depth)
        with pytest.raises(ConfigError, match="nested more than 64 levels deep"):
            load_config(config)


def test_a_rule_file_over_the_size_cap_is_refused_without_reading_it_all(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text("rules:\n" + "# padding\n" * (MAX_FILE_BYTES // 10 + 1), encoding="utf-8")
    code, err = _validate(path, capsys)
    assert code == 1
    assert f"error: {path}: larger than 512 KiB, too large to load" in err
    assert "split the rules over several files" in err


def test_a_number_too_long_to_be_a_number_is_refused_with_its_line():
    # Sexagesimal (YAML 1.1 `1:0:0`) conversion is quadratic: a long one takes minutes.
    found = _problems("rules:\n  - id: a\n    description: 1" + ":0" * 60_000 + "\n")
    assert found == [
        "rules.yaml:3: a number of 120,001 characters (quote it if it is meant as text)"
    ]


def test_a_value_that_does_not_fit_its_tag_is_a_located_error(tmp_path):
    assert _problems("rules:\n  - id: a\n    description: !!int abc\n") == [
        "rules.yaml:3: invalid YAML: not a valid int: invalid literal for int() with base 10: 'abc'"
    ]
    config = _write(tmp_path / "config.yaml", "log:\n  level: !!float x\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:2: invalid YAML: not a valid float"):
        load_config(config)


def test_the_problems_of_one_file_are_capped_not_listed_by_the_hundred_thousand(tmp_path, capsys):
    path = _write(tmp_path / "rules.yaml", "rules: [" + ", ".join(["1"] * 100_000) + "]\n")
    code, err = _validate(path, capsys)
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 101
    assert (
        lines[-1] == f"error: {path}:1: more problems after these 100, not listed (fix these first)"
    )


def test_a_key_half_a_file_long_is_quoted_short(tmp_path):
    key = "k" * 100_000  # an explicit key (`? key`): a plain one stops at 1024 characters
    found = _problems(f"rules:\n  - id: a\n    actions: [{{log: {{}}}}]\n    ? {key}\n    : 1\n")
    assert found[0].startswith(f"rules.yaml:4: rule `a`: unknown key `{'k' * 60}...` (")
    assert max(map(len, found)) < 400
    config = _write(tmp_path / "config.yaml", f"? {key}\n: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    # The key quoted short; the rest is the file's path and the list of known options.
    message = str(caught.value).removeprefix(str(config))
    assert f"unknown option `{'k' * 60}...`" in message
    assert "k" * 100 not in message
    assert len(message) < 600


# -- durations ------------------------------------------------------------------------------


def test_durations_beyond_ten_years_are_refused_at_load(tmp_path):
    found = _problems(
        "rules:\n  - id: a\n    when: {type: 19}\n    actions:\n"
        "      - after: 142857142w\n        do: {activate_sim: {}}\n"
    )
    assert found == [
        "rules.yaml:5: rule `a`: `after`: '142857142w' is longer than 10 years "
        "(no window, throttle or delay needs more)"
    ]
    config = _write(tmp_path / "config.yaml", "poller:\n  initial_lookback: 1.0e+300\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:2: `poller.initial_lookback` must be"):
        load_config(config)


def test_a_digest_may_list_at_most_ten_thousand_events():
    found = _problems(
        "rules:\n  - id: d\n    schedule: '0 8 * * *'\n"
        "    digest: {max_events: 99999999999999999999}\n    actions: [{log: {}}]\n"
    )
    assert found == [
        "rules.yaml:4: rule `d` → digest: `max_events` must be at most 10,000, got "
        "99,999,999,999,999,999,999 (the digest's `count` still tells how many events there were)"
    ]


# -- rule test files ------------------------------------------------------------------------


def test_a_rule_test_file_is_bounded_like_a_rule_file(tmp_path):
    _write(tmp_path / "rules.yaml", "rules:\n  - id: a\n    actions: [{log: {}}]\n")
    spec = _write(
        tmp_path / "test.yaml",
        """\
        rules: rules.yaml
        start: "9999-12-31T23:00:00Z"
        tests:
          - name: a billion expectations
            events: [{event_type: {id: 19}, at: 2h}]
            expect: [{rule: a, times: 1000000000}]
        """,
    )
    with pytest.raises(TestFileError) as caught:
        load_test_file(spec)
    assert [str(e) for e in caught.value.errors] == [
        f"{spec}:5: test `a billion expectations`: `start` plus `at` is past the year 9999",
        f"{spec}:6: test `a billion expectations` → expect: `times` must be at most 10,000, "
        "got 1,000,000,000",
    ]
    bomb = _write(tmp_path / "bomb.yaml", BILLION_LAUGHS.replace("rules:", "tests:"))
    with pytest.raises(TestFileError, match="aliases copy too much"):
        load_test_file(bomb)


def test_a_folder_is_read_one_file_at_a_time_and_reports_every_file(tmp_path):
    folder = tmp_path / "rules"
    folder.mkdir()
    _write(folder / "a.yaml", BILLION_LAUGHS)
    (folder / "b.yaml").write_bytes(b"rules: \xff\n")
    _write(folder / "c.yaml", "rules:\n  - id: c\n    actions: [{log: {}}]\n")
    with pytest.raises(RuleSetError) as caught:
        load_rules(folder)
    assert [str(e).split(": ")[0] for e in caught.value.errors] == [
        f"{folder / 'a.yaml'}:12",
        f"{folder / 'b.yaml'}",
    ]


# -- templates ------------------------------------------------------------------------------

CONTEXT = {"event": {"id": 7, "description": "quota used up", "xs": list(range(60))}, "rule": {}}


def _template(text: str, field: str = "log.message") -> TemplateValue:
    return TemplateValue(text, Location("rules.yaml", 3), field)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # Jinja folds constants while compiling: these ran at load before.
        ("{{ 'a' * 10**9 }}", "repeating a text or list would make more than 1,048,576"),
        ("{{ 3**(10**8) }}", "a power of more than 4096 bits"),
        ("{{ 'a' | center(999999999) }}", "`center` would make more than 1,048,576"),
        ("{{ '%0999999999d' % 1 }}", "a %-format width or precision past 9,999,999"),
    ],
)
def test_constants_are_not_folded_into_bombs_at_load_and_fail_the_action(text, reason):
    value = _template(text)  # compiles at once
    with pytest.raises(ActionError, match="template error: " + re.escape(reason)):
        value.render(CONTEXT)


NS_DOUBLING = "{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}"
LIST_DOUBLING = "{% set a = [1, 1] %}" + "{% set a = [a, a] %}" * 30 + "{{ a | length }}"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "the template takes more than 100,000 steps",
        ),
        (NS_DOUBLING + "{% endfor %}{{ ns.x | length }}", "`~` would make more than"),
        (NS_DOUBLING.replace("~", "+") + "{% endfor %}", "joining two texts or lists"),
        (
            "{% set ns = namespace(x=2) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}"
            "{% endfor %}",
            "a product of more than 4096 bits",
        ),
        (LIST_DOUBLING, "a value larger than 1,048,576 characters"),
        (
            "{% macro m(n) %}{% if n %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}{% endmacro %}"
            "{{ m(40) }}",
            "the template takes more than 100,000 steps",
        ),
        ("{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}", "RecursionError"),
        (
            "{{ range(100000) | map('center', 500000) | join }}",
            "the template makes more than 16,777,216 characters",
        ),
        ("{{ 'ab' | indent(999999999) }}", "`indent` would make more than"),
        ("{{ [1] | batch(999999999, 0) | list }}", "`batch` would make more than"),
        ("{{ [1] | slice(999999999) | list }}", "`slice` would make more than"),
        ("{{ range(100000) | batch(1) | sum(start=[]) }}", "`sum` adds numbers"),
        ("{{ 5 | round(-999999999) }}", "`round` to more than 1000 digits"),
        ("{{ event | tojson(indent=999999) }}", "a `tojson` indent wider than 16"),
        ("{{ 'x' | replace('', 'y' * 600000) }}", "`replace` would make more than"),
        ("{{ '%(a)s%(a)s' % {'a': 'x' * 600000} }}", "%-formatting would make more than"),
        ("{{ '%*d' % (999999999, 1) }}", "a `*` width or precision"),
        ("{{ '{:>999999999}'.format(1) }}", "access to attribute 'format' of 'str'"),
        ("{{ 'a'.ljust(999999999) }}", "access to attribute 'ljust' of 'str'"),
        ("{{ (9).to_bytes(999999999, 'big') }}", "access to attribute 'to_bytes' of 'int'"),
        ("{{ lipsum(100000) }}", "'lipsum' is undefined"),
        (
            "{% for i in range(99999) %}{{ event.xs }}{% endfor %}",
            "the template makes more than 16,777,216",
        ),
    ],
)
def test_a_render_that_would_blow_up_fails_the_action_with_the_bound_it_passed(text, reason):
    with pytest.raises(ActionError) as caught:
        _template(text).render(CONTEXT)
    assert str(caught.value).startswith(f"template error: {reason}")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
        ("{{ 2.0 ** 5000 }}", "OverflowError"),
        ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "RecursionError"),
        ("{{ ''.__class__ }}", "access to attribute '__class__' of 'str' object is unsafe"),
        ("{{ event.missing }}", "'dict object' has no attribute 'missing'"),
        ("{% include 'other' %}", "TypeError: no loader for this environment specified"),
    ],
)
def test_any_exception_while_rendering_fails_only_the_action(text, reason):
    with pytest.raises(ActionError, match="template error: .*" + re.escape(reason)):
        _template(text).render(CONTEXT)


def test_templates_as_rules_write_them_still_render():
    digest = (
        "{% for e in events %}{{ e.endpoint.name }} (SIM {{ e.sim.iccid }})\n{% endfor %}"
        "{% if omitted %}and {{ omitted }} more{% endif %}"
    )
    events = [{"endpoint": {"name": f"dev-{i}"}, "sim": {"iccid": str(i)}} for i in range(3)]
    assert _template(digest).render({"events": events, "omitted": 2}) == (
        "dev-0 (SIM 0)\ndev-1 (SIM 1)\ndev-2 (SIM 2)\nand 2 more"
    )
    text = (
        "{{ event.description | upper }} #{{ event.id + 1 }} {{ '%5.1f' | format(2.25) }} "
        "{{ event.xs[:3] | join(',') }} {{ [event.id, 'x'] | tojson }} "
        "{{ event.description.split() | length }} {{ 'a' * 3 }}{{ '-' ~ event.id }}"
    )
    assert _template(text).render(CONTEXT) == 'QUOTA USED UP #8   2.2 0,1,2 [7, "x"] 3 aaa-7'


def test_a_template_too_long_or_too_deep_is_a_load_error_naming_file_line_and_field():
    long_body = "{{ event.id }}" * 2400
    found = _problems(
        "rules:\n  - id: a\n    actions:\n      - webhook:\n          url: https://x.test/\n"
        f"          body: {{text: '{long_body}'}}\n"
    )
    assert found == [
        "rules.yaml:4: rule `a`: `webhook.body.text`: a template of 33,600 characters, "
        "more than 32,768 (shorten it: a loop over the data writes long texts from a short "
        "template)"
    ]
    deep = "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}"
    with pytest.raises(ConfigError, match=r"rules\.yaml:3: `log.message`: the template cannot"):
        _template(deep)


# -- conditions -----------------------------------------------------------------------------

CONDITION_BOMBS = """\
rules:
  - id: doubles-text-per-item
    when: {type: 19}
    condition:
      "==": [{reduce: [{var: xs}, {cat: [{var: accumulator}, {var: accumulator}]}, ab]}, x]
    actions: [{log: {}}]
  - id: allocates-a-tensor
    when: {type: 19}
    condition: {"==": [{length: {zeros: [[16000, 16000], "f64"]}}, 1]}
    actions: [{log: {}}]
  - id: plain
    when: {type: 19}
    actions: [{log: {message: "{{ 'a' * 10**9 }}"}}, {suspend_sim: {}}]
"""


def test_costly_conditions_and_templates_fail_their_event_and_rule_in_replay(tmp_path, capsys):
    rules = _write(tmp_path / "rules.yaml", CONDITION_BOMBS)
    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"id": 1, "timestamp": "2025-05-01T10:00:00Z", "event_type": {"id": 19}, '
        '"sim": {"id": 9}, "xs": [' + ", ".join(["1"] * 60) + "]}\n"
    )
    code = main(["replay", "--rules", str(rules), "--events", str(events), "--single-process"])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    planned = [json.loads(line) for line in captured.out.splitlines()]
    assert [(p["rule"], p["action"]) for p in planned] == [("plain", "suspend_sim")]


# -- hot reload -----------------------------------------------------------------------------

GOOD = "rules:\n  - id: {id}\n    actions: [{{log: {{}}}}]\n"


async def test_the_watcher_survives_bad_files_and_picks_up_the_next_good_edit(tmp_path, simulator):
    folder = tmp_path / "rules"
    folder.mkdir()
    _write(folder / "a.yaml", GOOD.format(id="a"))
    daemon = Daemon(engine_config(tmp_path, simulator), load_rules(folder), TOKEN)
    reloader = RuleReloader(folder, debounce=0.05)
    bad_files = [
        (BILLION_LAUGHS, "b.yaml:12: aliases copy too much"),
        ("rules: " + "[" * 999 + "]" * 999, "b.yaml:1: nested more than 64 levels deep"),
        ("rules:\n  - id: b\n    description: !!int abc\n", "b.yaml:3: invalid YAML"),
        ("rules: [\xff]", "b.yaml: not UTF-8 text"),
    ]
    try:
        await reloader.start(daemon)
        await asyncio.wait_for(reloader.ready.wait(), 5.0)
        await asyncio.sleep(0.1)  # the watcher's first poll
        with capture_logs() as logs:
            for text, problem in bad_files:
                path = folder / "b.yaml"
                path.write_bytes(text.encode("latin-1" if "\xff" in text else "utf-8"))
                await eventually(
                    lambda p=problem: any(p in entry.get("problem", "") for entry in logs), 10.0
                )
                assert [r.id for r in daemon.pipeline.rules] == ["a"]
            _write(folder / "b.yaml", GOOD.format(id="b"))
            await eventually(lambda: [r.id for r in daemon.pipeline.rules] == ["a", "b"], 10.0)
        assert not any("not watching" in entry["event"] for entry in logs)
    finally:
        await reloader.stop()
        await daemon.aclose()


async def test_a_failing_listener_does_not_stop_the_watcher(tmp_path, simulator):
    folder = tmp_path / "rules"
    folder.mkdir()
    _write(folder / "a.yaml", GOOD.format(id="a"))
    daemon = Daemon(engine_config(tmp_path, simulator), load_rules(folder), TOKEN)
    calls: list[int] = []

    def failing_once(rules: RuleSet) -> None:
        calls.append(len(rules))
        if len(calls) == 1:
            raise ValueError("listener broke")

    reloader = RuleReloader(folder, debounce=0.05, on_reload=[failing_once])
    try:
        await reloader.start(daemon)
        await asyncio.wait_for(reloader.ready.wait(), 5.0)
        await asyncio.sleep(0.1)
        with capture_logs() as logs:
            _write(folder / "b.yaml", GOOD.format(id="b"))
            await eventually(lambda: calls == [2], 10.0)
            _write(folder / "c.yaml", GOOD.format(id="c"))
            await eventually(lambda: calls == [2, 3], 10.0)
        (failed,) = [e for e in logs if e["event"] == "rules reloaded, but a listener failed"]
        assert failed["error"] == "ValueError: listener broke"
    finally:
        await reloader.stop()
        await daemon.aclose()


async def test_sighup_with_a_failing_catalog_logs_and_keeps_the_rules(tmp_path, simulator):
    rules_file = _write(tmp_path / "rules.yaml", GOOD.format(id="a"))
    daemon = Daemon(engine_config(tmp_path, simulator), load_rules(rules_file), TOKEN)

    def broken_catalog() -> EventTypeCatalog:
        raise RuntimeError("catalog unavailable")

    reloader = RuleReloader(rules_file, watch=False, catalog=broken_catalog)
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        await reloader.start(daemon)
        with capture_logs() as logs:
            os.kill(os.getpid(), signal.SIGHUP)
            await eventually(lambda: any("not reloaded" in e["event"] for e in logs), 5.0)
            await eventually(lambda: not reloader._pending, 5.0)
        (failed,) = [e for e in logs if "not reloaded" in e["event"]]
        assert failed["error"] == "RuntimeError: catalog unavailable"
        assert [r.id for r in daemon.pipeline.rules] == ["a"]
        gc.collect()  # an unretrieved task exception is reported when the task is collected
        assert unhandled == []
    finally:
        loop.set_exception_handler(None)
        await reloader.stop()
        await daemon.aclose()
