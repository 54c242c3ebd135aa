"""The template sandbox's bounds at their edges (engine.template_sandbox): a value of exactly
`MAX_VALUE` characters is made, one more is refused, and each operation that could make more
than its operands is refused before it runs, naming itself; what stays within the bounds
renders exactly as Jinja renders it."""

from __future__ import annotations

from typing import Any

import pytest
from jinja2 import StrictUndefined, UndefinedError

from engine.errors import ActionError, Location
from engine.template_sandbox import (
    MAX_OUTPUT,
    MAX_STEPS,
    MAX_VALUE,
    MAX_WORK,
    BoundedEnvironment,
    Budget,
    TemplateLimitError,
    spending,
)
from engine.templates import TemplateValue

# Data from the event is not measured when read (only what a template makes of it is).
HALVES = ["a" * 524287, "b" * 524287]
CONTEXT: dict[str, Any] = {
    "event": {"halves": HALVES, "whole": ["a" * MAX_VALUE], "over": ["a" * 524288] * 2},
    "rule": {},
}
LONGEST = f"{MAX_VALUE:,}"  # 1,048,576


def render(text: str) -> Any:
    return TemplateValue(text, Location("rules.yaml", 3), "log.message").render(CONTEXT)


def refusal(text: str) -> str:
    with pytest.raises(ActionError) as caught:
        render(text)
    return str(caught.value).removeprefix("template error: ")


@pytest.mark.parametrize(
    ("text", "rendered"),
    [
        # a text or list as large as a value may be
        ("{{ ('ab' * 524288) | length }}", "1048576"),
        ("{{ (('x' * 1048574 ~ '%%') % ()) | length }}", "1048575"),  # `%%` writes one `%`
        ("{{ '100%%' % () }}", "100%"),
        # powers and products up to 4096 bits
        ("{{ 1 ** (10 ** 9) }}|{{ (-1) ** (10 ** 9 + 1) }}", "1|-1"),
        ("{{ (2 ** 2048) | string | length }}", "617"),
        ("{{ ((2 ** 2047) * (2 ** 2047)) | string | length }}", "1233"),
        ("{{ 2.5 * 4 }}|{{ 3 * 2.5 }}|{{ 7 % 3 }}", "10.0|7.5|1"),
        # filters within their bounds
        ("{{ 2.5 | round(1000) }}", "2.5"),
        ("{{ {'a': 1} | tojson(indent=16) }}", '{\n                "a": 1\n}'),
        ("{{ ('x' * 262143) | replace('', 'yyy') | length }}", "1048575"),
        ("{{ ('x' * 600000) | replace('z', 'yy') | length }}", "600000"),
        ("{{ ('x' * 600000) | replace('x', 'yy', 1) | length }}", "600001"),
        ("{{ ('x' * 600000) | replace('x', 'yy', 0) | length }}", "600000"),
        ("{{ ('x' * 1000000) | replace('x', 'y') | length }}", "1000000"),
        ("{{ ('\n' * 262143) | indent(4) | length }}", "262143"),
        ("{{ ['a', 'b'] | join }}|{{ ['a', 'b'] | map('upper') | join(',') }}", "ab|A,B"),
        ("{{ event.halves | join(', ') | length }}", "1048576"),
        ("{{ event.whole | join('y') | length }}", "1048576"),
        ("{{ ['a' * 1048574] | length }}|{{ {'k': 'a' * 1048573} | length }}", "1|1"),
        ("{{ 'aaa bbb' | wordwrap(3) }}", "aaa\nbbb"),
        ("{{ ('a\n' * 1045) | wordwrap(1000000, wrapstring='x' * 1000) | length }}", "1045045"),
        ("{{ ('a' * 3134) | wordwrap(3, wrapstring='x' * 1000) | length }}", "1047134"),
        # tuples are values like lists; as loop targets they only name
        ("{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}{{ (1, 2)[1] }}", "a=12"),
    ],
)
def test_what_stays_within_the_bounds_renders_as_jinja_renders_it(text: str, rendered: str) -> None:
    assert render(text) == rendered


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{{ ('ab' * 524289) | length }}", "repeating a text or list would make more than"),
        ("{{ 'a' * 600000 + 'b' * 500000 }}", "joining two texts or lists would make more than"),
        ("{{ 2 ** 2049 }}", "a power of more than 4096 bits"),
        ("{{ (2 ** 2047) * (2 ** 2048) }}", "a product of more than 4096 bits"),
        ("{{ '%9999999d' % 1 }}", "%-formatting would make more than"),
        ("{{ '%.9999999d' % 1 }}", "%-formatting would make more than"),
        ("{{ '%10000000d' % 1 }}", "a %-format width or precision past 9,999,999"),
        ("{{ '%.10000000d' % 1 }}", "a %-format width or precision past 9,999,999"),
        ("{{ '%*d' % (5, 1) }}", "a `*` width or precision in %-formatting"),
        ("{{ '%s%s' | format('x' * 600000, 'x' * 600000) }}", "%-formatting would make more than"),
        ("{{ 5 | round(1001) }}", "`round` to more than 1000 digits"),
        ("{{ {'a': 1} | tojson(indent=17) }}", "a `tojson` indent wider than 16"),
        ("{{ {'a': 1} | tojson(indent=' ' * 17) }}", "a `tojson` indent wider than 16"),
        ("{{ ('x' * 600000) | replace('x', 'yy') }}", "`replace` would make more than"),
        ("{{ ('x' * 600000) | replace('x', 'yy', 600000) }}", "`replace` would make more than"),
        ("{{ ('a\n' * 300000) | indent(4) }}", "`indent` would make more than"),
        ("{{ ('a\n' * 10) | indent('x' * 200000) }}", "`indent` would make more than"),
        ("{{ [1] | slice(100000) | list }}", "the template takes more than 100,000 steps"),
        ("{{ range(3) | sum(start='') }}", "`sum` adds numbers; use `join` for texts"),
        ("{{ ('a' * 600000) | join('yy') }}", "`join` would make more than"),
        ("{{ event.over | join('y') }}", "`join` would make more than"),
        ("{{ ('a' * 1000) | wordwrap(1, wrapstring='x' * 2000) }}", "`wordwrap` would make more"),
        ("{{ ('a\n' * 174763) | wordwrap(1000000, wrapstring='xxxx') }}", "`wordwrap` would make"),
        ("{{ ('a' * 6320) | wordwrap(wrapstring='x' * 13000) }}", "`wordwrap` would make more"),
        # a list or tuple counts its items and the texts in it, nested or not
        ("{% set x = 'a' * 600000 %}{{ (x, x) | length }}", "a value larger than"),
        ("{% set x = 'a' * 600000 %}{{ [[x], [x]] | length }}", "a value larger than"),
        ("{% set x = 'a' * 600000 %}{{ {'a': {'k': x}, 'b': {'k': x}} | length }}", "a value"),
        ("{{ ([''] * 600000) | length }}", "repeating a text or list would make more than"),
        ("{{ ['a' * 1048575] | length }}", "a value larger than"),
        ("{{ {'k': 'a' * 1048574} | length }}", "a value larger than"),
        ("{{ ['b', 'a' * 1048573] | length }}", "a value larger than"),
        # what `~` makes is paid for, though it stays within a value's bound
        (
            "{% set x = 'a' * 1000000 %}{% for i in range(20) %}{% set y = x ~ '' %}{% endfor %}",
            "the template makes more than 16,777,216 characters",
        ),
        # the sandbox's own refusals stand
        ("{{ (['a'] | map('upper')).gi_frame }}", "access to attribute 'gi_frame' of 'generator'"),
        ("{% for x in [1] recursive %}{{ loop([], 2) }}{% endfor %}", "TypeError"),
    ],
)
def test_an_operation_past_its_bound_is_refused_naming_it(text: str, reason: str) -> None:
    assert refusal(text).startswith(reason)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{{ 'a' | center(2000000) }}", f"`center` would make more than {LONGEST} characters"),
        ("{{ 'x' | replace('x', big) }}", "`replace` would make more than"),
        ("{{ ('a' * 1000) | wordwrap(1, wrapstring='x' * 2000) }}", "`wordwrap` would make more"),
        ("{{ [1, 2] | join(big) }}", "`join` would make more than"),
        ("{{ lipsum() }}", "'lipsum' is undefined"),
        ("{{ missing }}", "'missing' is undefined"),
    ],
)
def test_an_environment_made_anew_is_as_bounded_as_the_rules_own(text: str, reason: str) -> None:
    env = BoundedEnvironment(undefined=StrictUndefined)
    with spending(Budget()), pytest.raises((TemplateLimitError, UndefinedError)) as caught:
        env.from_string(text).render(big="y" * 2_000_000)
    assert str(caught.value).startswith(reason)


def test_an_environment_made_anew_writes_its_values_through_its_finalize() -> None:
    env = BoundedEnvironment(field_finalize=lambda value: f"<{value}>")
    with spending(Budget()):
        assert env.from_string("a{{ 1 }}{{ ['x'] | join }}").render() == "a<1><x>"
        assert env.from_string("{{ 'ab' | replace('a', 'c') | center(4) }}").render() == "< cb >"


def test_a_budget_allows_exactly_its_steps_work_and_output() -> None:
    budget = Budget()
    budget.step(MAX_STEPS)
    with pytest.raises(TemplateLimitError) as caught:
        budget.step()
    assert str(caught.value) == (
        "the template takes more than 100,000 steps (loop iterations, calls, filters)"
    )
    budget = Budget()
    budget.spend(MAX_WORK)
    with pytest.raises(TemplateLimitError, match=r"^the template makes more than 16,777,216 "):
        budget.spend(1)
    budget = Budget()
    assert budget.write("x" * (MAX_OUTPUT - 1)) == "x" * (MAX_OUTPUT - 1)
    budget.write("x")
    with pytest.raises(TemplateLimitError) as caught:
        budget.write("x")
    assert str(caught.value) == "the output is over 1,048,576 characters"


def test_what_one_parameter_structure_renders_to_is_bounded_as_a_whole() -> None:
    halves = {"a": "{{ 'x' * 600000 }}", "b": "{{ 'y' * 600000 }}"}
    value = TemplateValue(halves, Location("rules.yaml", 3), "webhook.body")
    with pytest.raises(ActionError, match=r"^template error: the output is over 1,048,576 "):
        value.render(CONTEXT)
