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
from engine.rules.fastpath import (
    Undecided,
    _compile,
    _compiled,
    _generate,
    _NotCompiled,
    compile_fast,
)

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
        {"or": []},
        {"and": {"==": [{"var": "a"}, 1]}},  # parts not in a list
        {"or": "x"},
        {"!": [{"var": "a"}]},
        {"!": [{"==": [{"var": "a"}, 1]}, {"==": [{"var": "b"}, 1]}]},
        {"==": [{"var": "a"}, 1], "!=": [{"var": "b"}, 1]},  # two operators in one
        "a",
        [{"==": [{"var": "a"}, 1]}],
        {"==": [{"var": "a"}]},  # one operand
        {"==": {"var": "a"}},
        {"==": [1, 2]},  # no field
        {"==": [{"var": "a"}, [1]]},  # a list for a constant
        {"==": [{"var": "a"}, {"x": 1}]},
        {"==": [{"var": "a"}, -(2**53) - 1]},
        {"==": [{"var": ""}, 1]},  # the whole event
        {"==": [{"var": ["a", "b"]}, 1]},
        {"==": [{"var": [5]}, 1]},
        {"==": [{"var": "a", "x": 1}, 1]},  # a var with more than its path
        {"==": [{"val": "a"}, 1]},
        {"==": [{"var": "a..b"}, 1]},  # an empty key
        {"==": [{"var": "a.-1"}, 1]},  # a negative index
        {"==": [{"var": "-1"}, 1]},
        {"in": [{"var": "a"}, []]},
        {"in": [{"var": "a"}, [None]]},
        {"in": [{"var": "a"}, [True, False]]},  # booleans are not listed members
        {"in": [{"var": "a"}, [2**60]]},
        {"in": [1, {"var": "a"}]},  # a number within a field
        {"in": ["x", "xy"]},
        {"in": ["x", {"var": "a"}, 1]},
    ],
)
def test_other_shapes_are_left_to_datalogic(expression: Any) -> None:
    assert compile_fast(expression) is None
    with pytest.raises(_NotCompiled):
        _compile(expression)
    with pytest.raises(_NotCompiled):
        _generate(expression)


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


# -- what is decided without datalogic, and how ----------------------------------------------
#
# The everyday cases, each with the answer datalogic gives: the closures and the generated
# function must both decide it (no Undecided) and give that answer. The generated function
# decides those of INLINE itself, and hands those of BY_CLOSURE to the leaf's closure.

A, B_C, B_C_E = {"var": "a"}, {"var": "b.c"}, {"var": "b.c.e"}
X_IS_A = {"==": [A, "x"]}
INLINE: list[tuple[Any, dict[str, Any], bool]] = [
    # A field against a text, either way round; a missing field is plainly not that text.
    (X_IS_A, {"a": "x"}, True),
    (X_IS_A, {"a": "y"}, False),
    (X_IS_A, {}, False),
    (X_IS_A, {"a": None}, False),
    ({"==": ["x", A]}, {"a": "x"}, True),
    ({"!=": [A, "x"]}, {"a": "x"}, False),
    ({"!=": [A, "x"]}, {"a": "y"}, True),
    ({"!=": [A, "x"]}, {}, True),
    ({"!=": ["x", A]}, {}, True),
    ({"===": [A, "x"]}, {"a": "x"}, True),
    ({"===": [A, "x"]}, {}, False),
    ({"!==": [A, "x"]}, {"a": "x"}, False),
    ({"!==": [A, "x"]}, {}, True),
    # Numbers and booleans against their own kind; an integer at the edge of exact floats.
    ({"==": [A, 1]}, {"a": 1}, True),
    ({"==": [A, 1]}, {"a": 1.0}, True),
    ({"==": [A, 1]}, {"a": 2}, False),
    ({"==": [A, 2**53]}, {"a": 2**53}, True),
    ({"==": [A, -(2**53)]}, {"a": -(2**53)}, True),
    ({"!=": [A, 1]}, {"a": 2}, True),
    ({"===": [A, 1.5]}, {"a": 1.5}, True),
    ({"!==": [A, 1.5]}, {"a": 1.5}, False),
    ({"==": [A, True]}, {"a": True}, True),
    ({"==": [A, True]}, {"a": False}, False),
    ({"==": [False, A]}, {"a": False}, True),
    # Ordered against a number, a missing field counts as 0.
    ({">": [A, 20]}, {"a": 25.5}, True),
    ({">": [A, 20]}, {"a": 20}, False),
    ({">=": [A, 20]}, {"a": 20}, True),
    ({"<": [A, 20]}, {"a": 20}, False),
    ({"<=": [A, 20]}, {"a": 20}, True),
    ({">": [A, -2]}, {}, True),
    ({"<": [A, 1]}, {}, True),
    ({"<=": [A, 0]}, {"a": None}, True),
    ({">=": [A, 1]}, {}, False),
    ({"<": [1, A]}, {"a": 2}, True),
    ({"<": [1, A]}, {"a": 0}, False),
    ({">": [1, A]}, {}, True),
    ({"<=": [20, A]}, {"a": 20}, True),
    ({">=": [20, A]}, {"a": 21}, False),
    # Deeper fields: through objects, and missing anywhere on the way.
    ({"==": [B_C, "x"]}, {"b": {"c": "x"}}, True),
    ({"==": [B_C, "x"]}, {"b": {}}, False),
    ({"==": [B_C, "x"]}, {"b": None}, False),
    ({"==": [B_C, "x"]}, {}, False),
    ({">": [B_C, 1]}, {"b": {"c": 2}}, True),
    ({"==": [B_C_E, "x"]}, {"b": {"c": {"e": "x"}}}, True),
    ({"==": [B_C_E, "x"]}, {"b": {"c": {"e": "y"}}}, False),
    ({"==": [B_C_E, "x"]}, {"b": {"c": None}}, False),
    ({"==": [B_C_E, "x"]}, {"b": None}, False),
    ({"==": [B_C_E, "x"]}, {}, False),
    ({"==": [{"var": ["a"]}, "x"]}, {"a": "x"}, True),  # the var as a list of one
    # A text within a field: a substring of text, an item of a list of texts.
    ({"in": ["vip", A]}, {"a": "meter,vip"}, True),
    ({"in": ["vip", A]}, {"a": "meter"}, False),
    ({"in": ["vip", A]}, {}, False),
    ({"in": ["x", B_C]}, {"b": {"c": "xy"}}, True),
    ({"in": ["x", B_C]}, {"b": None}, False),
    # A field among listed texts or numbers.
    ({"in": [A, ["x", "vip"]]}, {"a": "vip"}, True),
    ({"in": [A, ["x", "vip"]]}, {"a": "y"}, False),
    ({"in": [A, ["x", "vip"]]}, {}, False),
    ({"in": [A, [1, 20]]}, {"a": 20}, True),
    ({"in": [A, [1, 20]]}, {"a": 1.0}, True),
    ({"in": [A, [1, 20]]}, {"a": 2}, False),
    ({"in": [B_C, ["x"]]}, {"b": {"c": "x"}}, True),
    # Joined: and, or, not (with or without its list).
    ({"and": [X_IS_A, {">": [B_C, 1]}]}, {"a": "x", "b": {"c": 2}}, True),
    ({"and": [X_IS_A, {">": [B_C, 1]}]}, {"a": "x", "b": {"c": 1}}, False),
    ({"and": [X_IS_A, {">": [B_C, 1]}]}, {"a": "y", "b": {"c": 2}}, False),
    ({"and": [X_IS_A]}, {"a": "x"}, True),
    ({"or": [X_IS_A, {">": [B_C, 1]}]}, {"a": "y", "b": {"c": 2}}, True),
    ({"or": [X_IS_A, {">": [B_C, 1]}]}, {"a": "x", "b": {"c": 0}}, True),
    ({"or": [X_IS_A, {">": [B_C, 1]}]}, {"a": "y"}, False),
    ({"or": [X_IS_A]}, {"a": "y"}, False),
    ({"!": [X_IS_A]}, {"a": "x"}, False),
    ({"!": X_IS_A}, {"a": "y"}, True),
    (
        {"and": [{"!": X_IS_A}, {"or": [{"in": ["vip", B_C]}, {"<": [A, 3]}]}]},
        {"b": {"c": "vip"}},
        True,
    ),
    ({"==": [{"var": "b.X9"}, "x"]}, {"b": {"X9": "x"}}, True),  # a key with digits, no index
]
BY_CLOSURE: list[tuple[Any, dict[str, Any], bool]] = [
    # Strictly, a missing field is no number, no boolean and no text, and is null.
    ({"===": [A, 1]}, {}, False),
    ({"!==": [A, 1]}, {}, True),
    ({"===": [A, True]}, {"a": "true"}, False),
    ({"===": [A, None]}, {}, True),
    ({"===": [A, None]}, {"a": 0}, False),
    ({"!==": [A, None]}, {"a": 0}, True),
    # Loosely, null equals null, and is plainly unequal to a non-empty text.
    ({"==": [A, None]}, {"a": None}, True),
    ({"==": [A, None]}, {"a": "x"}, False),
    ({"==": [None, A]}, {"a": "x"}, False),
    ({"!=": [A, None]}, {"a": "x"}, True),
    # A text within a list of texts.
    ({"in": ["vip", A]}, {"a": ["x", "vip"]}, True),
    ({"in": ["vip", A]}, {"a": ["vipersat"]}, False),
    ({"in": ["vip", A]}, {"a": []}, False),
]
DECIDED = INLINE + BY_CLOSURE


@pytest.mark.parametrize(("expression", "event", "answer"), DECIDED)
def test_the_everyday_cases_are_decided_without_datalogic(
    expression: Any, event: dict[str, Any], answer: bool
) -> None:
    assert truthy(datalogic(expression, event)) is answer  # the judge agrees
    generated = _generate(expression)
    assert generated is not None
    assert generated(event) is answer
    assert _compile(expression)(event) is answer


def _without_closures(generated: Any) -> Any:
    """`generated` with every leaf's closure it may call replaced by a failure."""

    def called(event: dict[str, Any]) -> bool:
        raise AssertionError("a closure was called")

    names = generated.__globals__
    for name in [n for n, value in names.items() if n[1:].isdigit() and callable(value)]:
        names[name] = called
    return generated


@pytest.mark.parametrize(("expression", "event", "answer"), INLINE)
def test_the_generated_function_decides_the_plain_cases_itself(
    expression: Any, event: dict[str, Any], answer: bool
) -> None:
    # Its point: the plain case of each leaf (text against text, a number against a number,
    # a field missing where the answer is fixed) costs no call to the leaf's closure.
    assert _without_closures(_generate(expression))(event) is answer


UNDECIDED: list[tuple[Any, dict[str, Any]]] = [
    ({"==": [A, 1]}, {"a": "1"}),  # text against a number
    ({"==": [A, 1]}, {}),  # datalogic holds null == 0
    ({"!=": [A, True]}, {}),  # and null == false
    ({"==": [A, None]}, {"a": ""}),  # and null == ""
    ({"==": [A, "x"]}, {"a": 1}),
    ({"===": [A, 1]}, {"a": 2**53 + 1}),  # beyond exact floats
    ({"==": [A, 1]}, {"a": -(2**53) - 1}),
    ({"==": [A, "x"]}, {"a": ["x"]}),
    ({"==": [A, "x"]}, {"a": {}}),
    ({"<": [A, 5]}, {"a": "3"}),
    ({"<": [A, 5]}, {"a": True}),
    ({"<": [5, A]}, {"a": [1]}),
    ({"<": [A, "x"]}, {"a": "a"}),  # text ordered against text
    ({">=": ["x", A]}, {"a": "y"}),
    ({"<": [A, "x"]}, {}),
    ({"==": [B_C, "x"]}, {"b": "text"}),  # a path through text
    ({"==": [B_C, 1]}, {"b": [1]}),
    ({"==": [B_C_E, "x"]}, {"b": {"c": "text"}}),
    ({"==": [B_C_E, "x"]}, {"b": "text"}),
    ({"in": ["vip", A]}, {"a": ["vip", 1]}),  # a list not of texts only
    ({"in": ["vip", A]}, {"a": 5}),
    ({"in": ["x", B_C]}, {"b": 5}),
    ({"in": [A, ["x", "vip"]]}, {"a": 1}),  # another kind than the list's
    ({"in": [A, [1, 20]]}, {"a": "1"}),
    ({"in": [A, [1, 20]]}, {"a": True}),
    ({"and": [X_IS_A, {"==": [B_C, 1]}]}, {"a": "x", "b": {"c": "1"}}),
    ({"or": [X_IS_A, {"==": [B_C, 1]}]}, {"a": "y", "b": {"c": "1"}}),
    ({"!": {"==": [A, 1]}}, {"a": "1"}),
]


@pytest.mark.parametrize(("expression", "event"), UNDECIDED)
def test_cases_datalogic_reads_otherwise_are_left_to_it_by_both_ways(
    expression: Any, event: dict[str, Any]
) -> None:
    generated = _generate(expression)
    assert generated is not None
    with pytest.raises(Undecided):
        generated(event)
    with pytest.raises(Undecided):
        _compile(expression)(event)


def test_a_part_after_the_answer_is_known_is_not_judged() -> None:
    # `and` stops at its first false part, `or` at its first true one, in both ways: a later
    # part that only datalogic could judge does not make the whole undecided.
    undecided = {"==": [A, 1]}
    event = {"a": "1"}
    for expression, answer in (
        ({"and": [{"==": [B_C, "x"]}, undecided]}, False),
        ({"or": [{"!=": [B_C, "x"]}, undecided]}, True),
    ):
        generated = _generate(expression)
        assert generated is not None
        assert generated(event) is answer
        assert _compile(expression)(event) is answer


def _nested(operator: str, depth: int, leaf: Any = X_IS_A) -> Any:
    expression: Any = leaf
    for _ in range(depth):  # each part after the first nests one level deeper
        expression = {operator: [{"==": [{"var": "b"}, "y"]}, expression]}
    return expression


@pytest.mark.parametrize("operator", ["and", "or"])
def test_an_expression_is_generated_up_to_its_depth_limit_then_kept_as_closures(
    operator: str,
) -> None:
    assert _generate(_nested(operator, 28)) is not None
    assert _generate(_nested(operator, 29)) is None
    check = compile_fast(_nested(operator, 40))
    assert check is not None
    if operator == "and":
        assert check({"a": "x", "b": "y"}) is True
        assert check({"a": "x", "b": "z"}) is False
        assert check({"a": "z", "b": "y"}) is False
    else:
        assert check({"a": "x", "b": "z"}) is True
        assert check({"a": "z", "b": "y"}) is True
        assert check({"a": "z", "b": "z"}) is False
        with pytest.raises(Undecided):
            check({"a": 1, "b": "z"})


@pytest.mark.parametrize(
    "leaf",
    [
        pytest.param({"==": [B_C_E, "x"]}, id="a deep field"),
        pytest.param({"in": [A, ["x", "vip"]]}, id="a listed member"),
        pytest.param({"in": ["vip", A]}, id="a text within"),
        pytest.param({"<": [A, 3]}, id="an order"),
    ],
)
def test_the_depth_limit_is_the_same_whatever_the_innermost_test(leaf: Any) -> None:
    # Every leaf's lines nest at most one level below the leaf itself.
    assert _generate(_nested("and", 28, leaf)) is not None
    assert _generate(_nested("and", 29, leaf)) is None


def test_expressions_of_one_shape_compile_their_text_once() -> None:
    # Keys and constants are names in the text, so a thousand rules of a few shapes compile a
    # few texts; a text too long to be worth keeping is compiled and not kept.
    _compiled.cache_clear()
    for constant in ("x", "y", "z"):
        assert _generate({"==": [{"var": "detail.name"}, constant]}) is not None
    assert (_compiled.cache_info().misses, _compiled.cache_info().hits) == (1, 2)
    deep = {"==": [{"var": ".".join(f"k{i}" for i in range(150))}, "x"]}  # 4 lines a key
    check = _generate(deep)
    assert check is not None
    assert check({"k0": {"k1": None}}) is False
    assert _compiled.cache_info().currsize == 1
