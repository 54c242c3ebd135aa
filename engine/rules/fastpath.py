"""The common shapes of JsonLogic, compiled to Python closures, with datalogic as the judge.

Handing an event to datalogic costs more than the test itself: the fields an expression reads
are converted into the evaluator's own values on every call, several times what a Python
function reading the same path costs (figures in docs/performance.md). Most rule conditions
are such comparisons of one field with a constant, joined by `and`, `or` and `!`, so those
are compiled here, once per expression.

The closures decide only where datalogic's answer is plain: a string compared with a string,
a number with a number, a boolean with a boolean, and the few cases with a missing field
whose answer is fixed (listed below). Anything else — a number compared with text, a field
holding a list, an integer beyond 2**53 — raises `Undecided`, and the caller evaluates the
expression with datalogic, whose result (or error) is the answer. Expressions outside these
shapes are not compiled at all. A property test checks the closures against datalogic.

Each expression is then also written out as one generated function that decides the plain
cases inline and calls the closures for the rest (see the end of this module).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from types import CodeType
from typing import Any

Check = Callable[[dict[str, Any]], bool]

_EXACT = 2**53  # beyond this, datalogic may compare integers as floats


class Undecided(Exception):
    """This event is for datalogic to judge (a case the closures do not decide)."""


def compile_fast(source: Any) -> Check | None:
    """A function deciding `source` for an event dict, or None when the expression is not
    of the shapes compiled here."""
    try:
        return _generate(source) or _compile(source)
    except _NotCompiled:
        return None


class _NotCompiled(Exception):
    pass


class _TooDeep(Exception):
    """The generated function would nest deeper than Python allows."""


def _compile(node: Any) -> Check:
    if type(node) is not dict or len(node) != 1:
        raise _NotCompiled
    ((operator, args),) = node.items()
    if operator in ("and", "or"):
        if type(args) is not list or not args:
            raise _NotCompiled
        parts = tuple(_compile(arg) for arg in args)
        return _all_of(parts) if operator == "and" else _any_of(parts)
    if operator == "!":
        inner = _compile(args[0] if type(args) is list and len(args) == 1 else args)
        return lambda event: not inner(event)
    if type(args) is not list or len(args) != 2:
        raise _NotCompiled
    left, right = args
    if operator == "in":
        return _compile_in(left, right)
    compare = _COMPARISONS.get(operator)
    if compare is None:
        raise _NotCompiled
    if _is_constant(right) and (read := _reader(left)) is not None:
        return _comparison(compare, read, right, var_first=True)
    if _is_constant(left) and (read := _reader(right)) is not None:
        return _comparison(compare, read, left, var_first=False)
    raise _NotCompiled


def _all_of(parts: tuple[Check, ...]) -> Check:
    def check(event: dict[str, Any]) -> bool:
        for part in parts:  # noqa: SIM110 - all() over a generator costs more per event
            if not part(event):
                return False
        return True

    return check


def _any_of(parts: tuple[Check, ...]) -> Check:
    def check(event: dict[str, Any]) -> bool:
        for part in parts:  # noqa: SIM110 - any() over a generator costs more per event
            if part(event):
                return True
        return False

    return check


# -- reading fields ---------------------------------------------------------------------


def _path(node: Any) -> tuple[str, ...] | None:
    """The keys of `{"var": "a.b.c"}`, or None when the var is of another form (a default,
    an index, the whole event)."""
    if type(node) is not dict or len(node) != 1 or "var" not in node:
        return None
    path = node["var"]
    if type(path) is list and len(path) == 1:
        path = path[0]
    if type(path) is not str or not path:
        return None
    keys = tuple(path.split("."))
    if any(not key or key.isdigit() or key.lstrip("-").isdigit() for key in keys):
        return None
    return keys


def _reader(node: Any) -> Callable[[dict[str, Any]], Any] | None:
    """A function reading `{"var": "a.b.c"}` from an event (None for a missing field), or
    None when the var is of another form."""
    keys = _path(node)
    if keys is None:
        return None
    if len(keys) == 1:
        (only,) = keys
        return lambda event: event.get(only)
    if len(keys) == 2:  # the common depth (`detail.name`, `endpoint.tags`): unrolled
        outer, inner = keys

        def read_two(event: dict[str, Any]) -> Any:
            value = event.get(outer)
            if type(value) is dict:
                return value.get(inner)
            if value is None:
                return None
            raise Undecided

        return read_two
    first, *rest = keys

    def read(event: dict[str, Any]) -> Any:
        value = event.get(first)
        for key in rest:
            if type(value) is dict:
                value = value.get(key)
            elif value is None:
                return None
            else:
                raise Undecided  # a path through text or a list: datalogic knows
        return value

    return read


def _is_constant(node: Any) -> bool:
    if type(node) is int:
        return -_EXACT <= node <= _EXACT
    return node is None or type(node) in (str, float, bool)


def _kind(value: Any) -> str | None:
    """'str', 'num' or 'bool' for plain values the closures compare, None for null, and
    anything else raises Undecided."""
    kind = type(value)
    if kind is str:
        return "str"
    if kind is bool:
        return "bool"
    if kind is float or (kind is int and -_EXACT <= value <= _EXACT):
        return "num"
    if value is None:
        return None
    raise Undecided


# -- comparisons --------------------------------------------------------------------------


def _equal(value: Any, constant: Any, strict: bool) -> bool:
    value_kind, constant_kind = _kind(value), _kind(constant)
    if value_kind is not None and value_kind == constant_kind:
        return bool(value == constant)
    if value is None and constant is None:
        return True
    if strict:
        return False  # `===` holds only between values of one kind
    # Loose `==` with null: datalogic holds `null == ""`, `null == 0` and `null == false`,
    # but `null == "text"` is plainly false.
    if (value is None and constant_kind == "str" and constant) or (
        constant is None and value_kind == "str" and value
    ):
        return False
    raise Undecided


def _ordered(value: Any, constant: Any) -> None:
    if _kind(value) != "num" or _kind(constant) != "num":
        raise Undecided  # text is parsed as a number, and so on: datalogic knows


def _eq(a: Any, b: Any) -> bool:
    return _equal(a, b, strict=False)


def _ne(a: Any, b: Any) -> bool:
    return not _equal(a, b, strict=False)


def _seq(a: Any, b: Any) -> bool:
    return _equal(a, b, strict=True)


def _sne(a: Any, b: Any) -> bool:
    return not _equal(a, b, strict=True)


def _lt(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return bool(a < b)


def _le(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return bool(a <= b)


def _gt(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return bool(a > b)


def _ge(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return bool(a >= b)


_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "==": _eq,
    "!=": _ne,
    "===": _seq,
    "!==": _sne,
    "<": _lt,
    "<=": _le,
    ">": _gt,
    ">=": _ge,
}


_ORDERINGS = frozenset({_lt, _le, _gt, _ge})


def _null_as_zero(read: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    def zero_for_null(event: dict[str, Any]) -> Any:
        value = read(event)
        return 0 if value is None else value

    return zero_for_null


def _comparison(
    compare: Callable[[Any, Any], bool],
    read: Callable[[dict[str, Any]], Any],
    constant: Any,
    *,
    var_first: bool,
) -> Check:
    if compare in _ORDERINGS and _kind(constant) == "num":
        # Ordered against a number, a missing field counts as 0 (as in JavaScript): a
        # common case, as many event types lack many `detail` fields.
        read = _null_as_zero(read)
    if var_first:
        general: Check = lambda event: compare(read(event), constant)  # noqa: E731
    else:
        general = lambda event: compare(constant, read(event))  # noqa: E731
    if compare in (_eq, _ne, _seq, _sne) and type(constant) is str and constant:
        # The commonest test of all, a field against a text: decided here in one step when
        # the field holds text or nothing (`==` and `===` agree on both), else as above.
        equal = compare in (_eq, _seq)

        def text_equals(event: dict[str, Any]) -> bool:
            value = read(event)
            if type(value) is str:
                return (value == constant) is equal
            if value is None:
                return not equal
            return general(event)

        return text_equals
    return general


# -- in -----------------------------------------------------------------------------------


def _compile_in(needle: Any, haystack: Any) -> Check:
    if type(needle) is str and (text_reader := _reader(haystack)) is not None:
        read_text = text_reader

        # A constant text within a field: a substring of text, or an item of a list of
        # texts (`endpoint.tag_list`); a missing field holds nothing.
        def within(event: dict[str, Any]) -> bool:
            value = read_text(event)
            if type(value) is str:
                return needle in value
            if value is None:
                return False
            if type(value) is list and all(type(item) is str for item in value):
                return needle in value
            raise Undecided

        return within
    if type(haystack) is list and (read := _reader(needle)) is not None:
        kinds = {_constant_kind(item) for item in haystack}
        if len(kinds) != 1 or None in kinds:
            raise _NotCompiled
        (kind,) = kinds
        members = frozenset(haystack)

        def member(event: dict[str, Any]) -> bool:
            value = read(event)
            if value is None:
                return False
            if _kind(value) != kind:
                raise Undecided
            return value in members

        return member
    raise _NotCompiled


def _constant_kind(item: Any) -> str | None:
    """The kind of a list item the membership test decides ('str' or 'num'), else None."""
    try:
        kind = _kind(item)
    except Undecided:
        return None
    return kind if kind in ("str", "num") else None


# -- one function per expression ------------------------------------------------------------
#
# The closures above call one another: `and` calls each part, a part calls its reader and its
# comparison. For the everyday leaves (a field against a text, a number, a boolean, a tag, a list),
# the same test is also written out as the statements of one generated function, with every field
# read inline, which saves the calls between closures (docs/performance.md). The generated code
# decides only the plain case of each leaf (text against text, a number against a number, a missing
# field where the closure's answer is fixed); for anything else it calls that leaf's closure at that
# point, in the same order and after the same short-circuits, so its answer, or its Undecided, is
# the closure's. A property test compares the two.  Nothing from the rule file enters the generated
# text: keys and constants are passed in as names, so the text is made only of the names chosen
# here.

_SLOW = object()  # a path through text or a list: the leaf's closure decides
_MAX_NESTING = 30  # deeper expressions keep the closures (Python limits indentation)
_NUMBER_TEST = "(type({v}) is float or (type({v}) is int and -_E <= {v} <= _E))"
_KIND_TESTS = {"str": "type({v}) is str", "bool": "type({v}) is bool", "num": _NUMBER_TEST}
_EQUALITIES = {"==": True, "===": True, "!=": False, "!==": False}
_ORDERS = frozenset({"<", "<=", ">", ">="})


class _Source:
    """The lines of a generated function and the names it reads."""

    def __init__(self) -> None:
        self.lines: list[str] = ["def check(event):"]
        self.names: dict[str, Any] = {"_SLOW": _SLOW, "_E": _EXACT}

    def name(self, value: Any) -> str:
        name = f"_{len(self.names)}"
        self.names[name] = value
        return name

    def add(self, depth: int, line: str) -> None:
        if depth > _MAX_NESTING:
            raise _TooDeep
        self.lines.append("    " * depth + line)


def _generate(source: Any) -> Check | None:
    """`source` as one generated function (see above), or None when it nests too deep.
    Raises _NotCompiled for an expression `_compile` does not compile either (each leaf's
    closure is compiled on the way: the closures of a whole expression are not made twice)."""
    code = _Source()
    try:
        _emit(source, code, 1)
    except _TooDeep:
        return None
    code.add(1, "return t")
    text = "\n".join(code.lines)
    # Our own text (see above); a long one is not kept in the cache.
    exec(_compiled(text) if len(text) <= _CACHED_TEXT_CHARS else _compile_text(text), code.names)
    check: Check = code.names["check"]
    return check


_CACHED_TEXT_CHARS = 8192


@lru_cache(maxsize=1024)
def _compiled(text: str) -> CodeType:
    # Expressions of one shape make one text (their keys and constants are names), and a
    # thousand rules repeat a few shapes: compiling each text once kept loading 1,000 rules
    # at 0.26-0.31 s instead of 0.35 s (0.20-0.27 s with the closures alone).
    return _compile_text(text)


def _compile_text(text: str) -> CodeType:
    return compile(text, "<condition>", "exec")


def _emit(node: Any, code: _Source, depth: int) -> None:
    """Lines that set `t` to the truth of `node`; _NotCompiled where `_compile` refuses it."""
    if type(node) is not dict or len(node) != 1:
        raise _NotCompiled
    ((operator, args),) = node.items()
    if operator in ("and", "or"):
        if type(args) is not list or not args:
            raise _NotCompiled
        _emit(args[0], code, depth)
        for part in args[1:]:
            code.add(depth, "if t:" if operator == "and" else "if not t:")
            depth += 1
            _emit(part, code, depth)
        return
    if operator == "!":
        _emit(args[0] if type(args) is list and len(args) == 1 else args, code, depth)
        code.add(depth, "t = not t")
        return
    closure = code.name(_compile(node))
    left, right = args
    keys: tuple[str, ...] | None
    if operator == "in":
        if type(left) is str and (keys := _path(right)) is not None:
            _read(keys, code, depth)
            needle = code.name(left)
            _decide(code, depth, closure, [("type(v) is str", f"{needle} in v")], "v is None")
            return
        keys, kind = _path(left), _constant_kind(right[0])
        assert keys is not None and kind is not None  # as `_compile_in` accepted it
        _read(keys, code, depth)
        code.add(depth, "if v is None:")
        code.add(depth + 1, "t = False")
        test = _KIND_TESTS[kind].format(v="v")
        members = code.name(frozenset(right))
        code.add(depth, f"elif {test}:")
        code.add(depth + 1, f"t = v in {members}")
        code.add(depth, "else:")
        code.add(depth + 1, f"t = {closure}(event)")
        return
    var_first = _is_constant(right) and _path(left) is not None
    constant = right if var_first else left
    keys = _path(left if var_first else right)
    assert keys is not None  # as `_compile` accepted it
    kind = _kind(constant)
    if operator in _EQUALITIES and kind is not None and (kind != "str" or constant):
        _read(keys, code, depth)
        name = code.name(constant)
        same = _EQUALITIES[operator]
        test = _KIND_TESTS[kind].format(v="v")
        outcome = f"v {'==' if same else '!='} {name}"
        # A missing field against a text is plainly unequal (`_equal`); else it is a case
        # for the closure, as is a value of another kind.
        otherwise = "v is None" if kind == "str" else None
        _decide(code, depth, closure, [(test, outcome)], otherwise, missing=not same)
    elif operator in _ORDERS and kind == "num":
        _read(keys, code, depth)
        name = code.name(constant)
        code.add(depth, "if v is None:")  # a missing field counts as 0 (`_null_as_zero`)
        code.add(depth + 1, "v = 0")
        outcome = f"v {operator} {name}" if var_first else f"{name} {operator} v"
        _decide(code, depth, closure, [(_NUMBER_TEST.format(v="v"), outcome)], None)
    else:
        code.add(depth, f"t = {closure}(event)")


def _decide(
    code: _Source,
    depth: int,
    closure: str,
    cases: list[tuple[str, str]],
    otherwise: str | None,
    *,
    missing: bool = False,
) -> None:
    """`if test: t = outcome` per case, `t = missing` where `otherwise` holds, and the
    leaf's closure for the rest."""
    keyword = "if"
    for test, outcome in cases:
        code.add(depth, f"{keyword} {test}:")
        code.add(depth + 1, f"t = {outcome}")
        keyword = "elif"
    if otherwise is not None:
        code.add(depth, f"elif {otherwise}:")
        code.add(depth + 1, f"t = {missing}")
    code.add(depth, "else:")
    code.add(depth + 1, f"t = {closure}(event)")


def _read(keys: tuple[str, ...], code: _Source, depth: int) -> None:
    """Lines that set `v` to the field at `keys` (None where missing, `_SLOW` where the path
    runs through anything but an object), as `_reader`'s functions read it."""
    code.add(depth, f"v = event.get({code.name(keys[0])})")
    for key in keys[1:]:
        code.add(depth, "if type(v) is dict:")
        code.add(depth + 1, f"v = v.get({code.name(key)})")
        code.add(depth, "elif v is not None:")
        code.add(depth + 1, "v = _SLOW")
