"""The Python closures for common JsonLogic shapes agree with datalogic wherever they decide.

Expressions and events are drawn from the shapes the closures compile and from the values
that make JsonLogic tricky (null, 0, "", "0", booleans, floats, integers beyond 2**53,
lists, objects, text that looks like a number). Where a closure answers, datalogic must give
the same truth value and no error; where it cannot, it must say so (Undecided), never guess.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.rules.condition import _ENGINE, truthy
from engine.rules.fastpath import Undecided, _compile, _generate, compile_fast

PATHS = ["a", "b", "b.c", "b.d", "b.c.e"]
CONSTANTS = [None, 0, 1, -2, 1.5, 20, 2**53, "", "x", "vip", "0", "1", "20", True, False]
LEAVES = [
    *CONSTANTS,
    *(2**53 + 1, [], ["vip"], [1, 2], {}, "vip,x", "x,vip", 0.0, -0.5),
    # Lists of whole tags, as `endpoint.tag_list` holds them, and mixed ones.
    *(["vipersat", "x"], ["x", "vip"], [""], ["vip", 1], [None]),
]

constants = st.sampled_from(CONSTANTS)
variables = st.sampled_from(PATHS).map(lambda path: {"var": path})
comparisons = st.builds(
    lambda op, var, constant, flip: {op: [constant, var] if flip else [var, constant]},
    st.sampled_from(["==", "!=", "===", "!==", "<", "<=", ">", ">="]),
    variables,
    constants,
    st.booleans(),
)
within = st.builds(
    lambda needle, var: {"in": [needle, var]}, st.sampled_from(["vip", "x", ""]), variables
)
members = st.builds(
    lambda var, items: {"in": [var, items]},
    variables,
    st.one_of(
        st.lists(st.sampled_from(["x", "vip", "", "1"]), min_size=1, max_size=3),
        st.lists(st.sampled_from([0, 1, 20, 1.5, -2]), min_size=1, max_size=3),
    ),
)
expressions = st.recursive(
    st.one_of(comparisons, within, members),
    lambda inner: st.one_of(
        st.builds(lambda parts: {"and": parts}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda parts: {"or": parts}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda part: {"!": [part]}, inner),
        st.builds(lambda part: {"!": part}, inner),
    ),
    max_leaves=6,
)
leaves = st.sampled_from(LEAVES)
events = st.fixed_dictionaries(
    {},
    optional={
        "a": leaves,
        "b": st.one_of(
            leaves,
            st.fixed_dictionaries(
                {},
                optional={
                    "c": st.one_of(leaves, st.fixed_dictionaries({}, optional={"e": leaves})),
                    "d": leaves,
                },
            ),
        ),
    },
)


def datalogic(expression: Any, event: dict[str, Any]) -> Any:
    return _ENGINE.compile_checked(orjson.dumps(expression).decode()).evaluate(event)


@settings(max_examples=3000, deadline=None)
@given(expressions, events)
def test_closures_agree_with_datalogic(expression: Any, event: dict[str, Any]) -> None:
    check = compile_fast(expression)
    assert check is not None, f"not compiled: {expression}"
    try:
        decided = check(event)
    except Undecided:
        return
    assert decided == truthy(datalogic(expression, event)), (expression, event)


def _outcome(check: Any, event: dict[str, Any]) -> object:
    try:
        return check(event)
    except Undecided:
        return Undecided


@settings(max_examples=3000, deadline=None)
@given(expressions, events)
def test_the_generated_function_answers_as_the_closures(
    expression: Any, event: dict[str, Any]
) -> None:
    # Same value, and Undecided exactly where the closures are undecided.
    generated = _generate(expression)
    assert generated is not None
    assert _outcome(generated, event) is _outcome(_compile(expression), event), (expression, event)


def test_too_deep_an_expression_keeps_the_closures() -> None:
    expression: Any = {"==": [{"var": "a"}, "x"]}
    for _ in range(40):  # each `and` nests the test of its second part one level deeper
        expression = {"and": [{"!=": [{"var": "b"}, "y"]}, expression]}
    assert _generate(expression) is None
    check = compile_fast(expression)
    assert check is not None
    assert check({"a": "x"}) is True
    assert check({"a": "x", "b": "y"}) is False


def test_a_fair_share_is_decided_without_datalogic() -> None:
    # The point of the closures: the everyday cases do not reach datalogic.
    check = compile_fast(
        {
            "and": [
                {"==": [{"var": "detail.traffic_type.description"}, "SMS"]},
                {"in": ["vip", {"var": "endpoint.tags"}]},
                {">": [{"var": "detail.volume.total"}, 20]},
            ]
        }
    )
    assert check is not None
    sms = {"detail": {"traffic_type": {"description": "SMS"}, "volume": {"total": 25.5}}}
    assert check({**sms, "endpoint": {"tags": "meter,vip"}}) is True
    assert check({**sms, "endpoint": {"tags": "meter"}}) is False
    assert check({"detail": {}}) is False  # no traffic type: plainly not "SMS"
    assert check({}) is False


@pytest.mark.parametrize(
    "expression",
    [
        {"var": "a"},  # a bare value: its truthiness is datalogic's to judge
        {"==": [{"var": "a"}, {"var": "b"}]},  # two fields
        {"==": [{"var": ["a", 1]}, 1]},  # a default
        {"==": [{"var": "a.0"}, 1]},  # an index
        {"==": [{"var": "a"}, 2**60]},  # beyond exact floats
        {"<": [1, {"var": "a"}, 3]},  # between
        {"in": [{"var": "a"}, [1, "x"]]},  # mixed list
        {"+": [1, 2]},
        {"and": []},
    ],
)
def test_other_shapes_are_left_to_datalogic(expression: Any) -> None:
    assert compile_fast(expression) is None


@pytest.mark.parametrize(
    ("expression", "event"),
    [
        ({"==": [{"var": "a"}, 1]}, {"a": "1"}),  # text against a number
        ({"==": [{"var": "a"}, ""]}, {}),  # datalogic holds null == ""
        ({"<": [{"var": "a"}, 5]}, {"a": "3"}),
        ({"in": ["vip", {"var": "a"}]}, {"a": ["vip", 1]}),  # a list not of texts only
        ({"==": [{"var": "a.b"}, "x"]}, {"a": "text"}),
        ({"==": [{"var": "a"}, 1]}, {"a": 2**60}),
    ],
)
def test_tricky_values_go_to_datalogic(expression: Any, event: dict[str, Any]) -> None:
    check = compile_fast(expression)
    assert check is not None
    with pytest.raises(Undecided):
        check(event)


def test_undecided_keeps_nothing_alive() -> None:
    # Re-raising one shared exception instance would chain each raise's traceback onto the
    # last, keeping every event it passed alive (a leak of ~5 KB an event, seen in replay).
    check = compile_fast({"==": [{"var": "a"}, 1]})
    assert check is not None
    caught: list[BaseException] = []
    for _ in range(50):
        try:
            check({"a": "1"})
        except Undecided as error:
            caught.append(error)
    depth, traceback = 0, caught[-1].__traceback__
    while traceback is not None:
        depth, traceback = depth + 1, traceback.tb_next
    assert depth < 10
    assert len({id(error) for error in caught}) == len(caught)
