"""Jinja's sandbox, with the cost of a template bounded as well as what it may touch.

Jinja's `SandboxedEnvironment` keeps templates away from Python internals, but not from
spending memory and time: `{{ 'a' * 10**9 }}` is even folded into a constant when the
template compiles, and a loop, a namespace or a chain of `~` can double a text forty times.
Rule files are operator input, so each render runs on a budget and every value a template
makes is measured when it is made:

- steps: loop iterations, calls, filters and arithmetic count one each (`MAX_STEPS`);
- work: every text or list made, measured or written out costs its size (`MAX_WORK`), and a
  loop iteration also costs the literal text of its body;
- size: no single value may pass `MAX_VALUE` characters (a list counts its items);
- operations whose result can dwarf their operands (`*` and `**`, %-formatting, `center`,
  `indent`, `replace`, `join`, `wordwrap`, `batch`, `slice`, `tojson` indent, `round`) are
  checked before they run, since measuring afterwards would be too late;
- str methods that make text larger (`center`, `ljust`, `zfill`, `replace`, `join`,
  `format`, ...) and `lipsum` are not available; list, dict and number methods only those
  that read. Nothing can be changed in place (Jinja's immutable sandbox).

Intercepted operators are not folded at compile time, and filters folded then run the same
checks under the compile's own budget. A template that passes a bound raises
`TemplateLimitError`, a `SecurityError`, naming the bound.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_STEPS = 100_000
MAX_WORK = 16 << 20
MAX_VALUE = 1 << 20
MAX_OUTPUT = MAX_VALUE
MAX_INT_BITS = 4096
_MAX_JSON_INDENT = 16
_MAX_ROUND_DIGITS = 1000

# Methods of plain data a template may call: the ones that read, or make text no longer
# than what they are given.
_STR_METHODS = frozenset(
    {
        *("capitalize", "casefold", "count", "endswith", "find", "index", "lower", "lstrip"),
        *("isalnum", "isalpha", "isascii", "isdecimal", "isdigit", "isidentifier", "islower"),
        *("isnumeric", "isprintable", "isspace", "istitle", "isupper", "partition"),
        *("removeprefix", "removesuffix", "rfind", "rindex", "rpartition", "rsplit", "rstrip"),
        *("split", "splitlines", "startswith", "strip", "swapcase", "title", "upper"),
    }
)
_DATA_METHODS: tuple[tuple[type, frozenset[str]], ...] = (
    (str, _STR_METHODS),
    (dict, frozenset({"get", "items", "keys", "values"})),
    (list, frozenset({"count", "index"})),
    (tuple, frozenset({"count", "index"})),
    (int, frozenset({"bit_length", "conjugate"})),
    (float, frozenset({"as_integer_ratio", "conjugate", "is_integer"})),
)


class TemplateLimitError(SecurityError):
    """A template went past one of its bounds."""


class Budget:
    """What one render may still spend, and still write (`MAX_OUTPUT`)."""

    __slots__ = ("output", "steps", "work")

    def __init__(self) -> None:
        self.steps = MAX_STEPS
        self.work = MAX_WORK
        self.output = MAX_OUTPUT

    def step(self, count: int = 1) -> None:
        self.steps -= count
        if self.steps < 0:
            raise TemplateLimitError(
                f"the template takes more than {MAX_STEPS:,} steps (loop iterations, calls, "
                "filters)"
            )

    def spend(self, chars: int) -> None:
        self.work -= chars
        if self.work < 0:
            raise TemplateLimitError(
                f"the template makes more than {MAX_WORK:,} characters of text and data"
            )

    def write(self, text: str) -> str:
        """`text` as part of the render's output, which is at most MAX_OUTPUT in all."""
        self.output -= len(text)
        if self.output < 0:
            raise TemplateLimitError(f"the output is over {MAX_OUTPUT:,} characters")
        self.spend(len(text))
        return text

    def made(self, value: Any) -> Any:
        """`value`, once it is measured and paid for; TemplateLimitError when too large."""
        size = self.measure(value)
        self.spend(size)
        if size > MAX_VALUE:
            raise TemplateLimitError(f"a value larger than {MAX_VALUE:,} characters")
        return value

    def measure(self, value: Any) -> int:
        """Characters of text plus one per item, as if shared parts were copies; counting
        stops past MAX_VALUE, and the walk is paid for."""
        if isinstance(value, str):
            return len(value)
        if not isinstance(value, list | tuple | dict):
            return 1
        size = 0
        stack: list[Any] = [value]
        while stack and size <= MAX_VALUE:
            item = stack.pop()
            if isinstance(item, str):
                size += len(item)
            elif isinstance(item, dict):
                size += 1 + len(item)
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list | tuple):
                size += 1 + len(item)
                stack.extend(item)
        self.spend(size)
        return size


_budget: ContextVar[Budget | None] = ContextVar("template_budget", default=None)


def current_budget() -> Budget:
    """The budget of the render (or compile) under way; a fresh one outside any, so each
    operation is still bounded on its own."""
    return _budget.get() or Budget()


def active_budget() -> Budget | None:
    return _budget.get()


@contextlib.contextmanager
def spending(budget: Budget) -> Iterator[Budget]:
    """Run renders and compiles in the block on `budget`."""
    token = _budget.set(budget)
    try:
        yield budget
    finally:
        _budget.reset(token)


def _limit(amount: int, what: str) -> None:
    if amount > MAX_VALUE:
        raise TemplateLimitError(f"{what} would make more than {MAX_VALUE:,} characters")


# -- operators ------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_power(base: Any, exponent: Any) -> None:
    if (
        _is_int(base)
        and _is_int(exponent)
        and abs(base) > 1
        and abs(base).bit_length() * exponent > MAX_INT_BITS
    ):
        raise TemplateLimitError(f"a power of more than {MAX_INT_BITS} bits")


def _check_product(budget: Budget, left: Any, right: Any) -> None:
    for sequence, times in ((left, right), (right, left)):
        if isinstance(sequence, str | list | tuple) and isinstance(times, int):
            if times > 0:
                _limit(budget.measure(sequence) * times, "repeating a text or list")
            return
    if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise TemplateLimitError(f"a product of more than {MAX_INT_BITS} bits")


def _check_sum(budget: Budget, left: Any, right: Any) -> None:
    if isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
        _limit(budget.measure(left) + budget.measure(right), "joining two texts or lists")


_CONVERSION = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?[a-zA-Z%]")


def _check_percent(budget: Budget, text: str, args: Any) -> None:
    """%-formatting: each conversion may pad to its width or precision, or write any of
    the arguments; together they must stay within MAX_VALUE."""
    if isinstance(args, tuple):
        values = list(args)
    elif isinstance(args, Mapping):
        values = list(args.values())
    else:
        values = [args]
    longest = max((len(budget.made(str(value))) for value in values), default=0)
    total = len(text)
    for found in _CONVERSION.finditer(text):
        width, precision = found.group(1) or "", found.group(2) or ""
        if "*" in (width, precision):
            raise TemplateLimitError("a `*` width or precision in %-formatting")
        if len(width) > 7 or len(precision) > 7:
            raise TemplateLimitError("a %-format width or precision past 9,999,999")
        total += max(int(width or 0), int(precision or 0)) + longest
        _limit(total, "%-formatting")


# -- filters --------------------------------------------------------------------------------


def _check_center(value: Any, width: Any = 80) -> None:
    if _is_int(width):
        _limit(width, "`center`")


def _check_indent(s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    unit = len(width) if isinstance(width, str) else width if _is_int(width) else 0
    _limit((str(s).count("\n") + 1) * unit, "`indent`")


def _check_format(text: Any, *args: Any, **kwargs: Any) -> None:
    _check_percent(current_budget(), str(text), kwargs or args)


def _check_replace(s: Any, old: Any, new: Any, count: Any = None) -> None:
    text, old, new = str(s), str(old), str(new)
    found = text.count(old) if old else len(text) + 1
    if _is_int(count) and count >= 0:
        found = min(found, count)
    _limit(len(text) + found * (len(new) - len(old)), "`replace`")


def _check_wordwrap(
    s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None, **_: Any
) -> None:
    if _is_int(width):
        text = str(s)
        breaks = len(text) // max(width, 1) + text.count("\n") + 1
        _limit(len(text) + breaks * len(str(wrapstring or "\n")), "`wordwrap`")


def _check_batch(value: Any, linecount: Any, fill_with: Any = None) -> None:
    if _is_int(linecount):
        _limit(linecount, "`batch`")


def _check_slice(value: Any, slices: Any, fill_with: Any = None) -> None:
    if _is_int(slices):
        _limit(slices, "`slice`")
        current_budget().step(max(slices, 0))  # one step for each slice it makes


def _check_tojson(value: Any, indent: Any = None) -> None:
    width = len(indent) if isinstance(indent, str) else indent if _is_int(indent) else 0
    if width > _MAX_JSON_INDENT:
        raise TemplateLimitError(f"a `tojson` indent wider than {_MAX_JSON_INDENT}")


def _check_sum_filter(iterable: Any, attribute: Any = None, start: Any = 0) -> None:
    # Adding lists or texts one at a time copies them over and over.
    if not isinstance(start, int | float):
        raise TemplateLimitError("`sum` adds numbers; use `join` for texts")


def _check_round(value: Any, precision: Any = 0, *_: Any, **__: Any) -> None:
    if _is_int(precision) and abs(precision) > _MAX_ROUND_DIGITS:
        raise TemplateLimitError(f"`round` to more than {_MAX_ROUND_DIGITS} digits")


_CHECKS: dict[str, Callable[..., None]] = {
    "center": _check_center,
    "indent": _check_indent,
    "format": _check_format,
    "replace": _check_replace,
    "wordwrap": _check_wordwrap,
    "batch": _check_batch,
    "slice": _check_slice,
    "tojson": _check_tojson,
    "sum": _check_sum_filter,
    "round": _check_round,
}


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    check = _CHECKS.get(name)
    # Jinja passes a context, eval context or environment first to the filters marked so.
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = current_budget()
        budget.step()
        if check is not None:
            check(*args[skip:], **kwargs)
        if name == "join":
            args, kwargs = (*args[:skip], *_joinable(budget, *args[skip:], **kwargs)), {}
        result = func(*args, **kwargs)
        if isinstance(result, Iterator):
            return _paid_items(budget, result)
        return budget.made(result)

    return bounded


def _joinable(
    budget: Budget, value: Any, d: Any = "", attribute: Any = None
) -> tuple[list[Any], str, Any]:
    """`join`'s arguments, its items in a list whose joined text is known to fit (each item
    whole stands in for its attribute)."""
    items = list(value)
    separators = len(str(d)) * max(len(items) - 1, 0)
    _limit(separators, "`join`")
    _limit(separators + sum(len(budget.made(str(item))) for item in items), "`join`")
    return items, str(d), attribute


def _paid_items(budget: Budget, items: Iterator[Any]) -> Iterator[Any]:
    for item in items:
        budget.step()
        yield budget.made(item)


# -- code generation ------------------------------------------------------------------------


class _CodeGenerator(CodeGenerator):
    """Jinja's code, with loops, `~` and literals of lists and mappings paid for."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        # Each loop iterates `environment.loop_items(items, literal_chars)`, which pays a
        # step and the literal text of the loop's body for every item.
        for loop in node.find_all(nodes.For):
            text = sum(len(data.data) for part in loop.body for data in _texts(part))
            guard = nodes.EnvironmentAttribute("loop_items", lineno=loop.lineno)
            loop.iter = nodes.Call(
                guard, [loop.iter, nodes.Const(text)], [], None, None, lineno=loop.lineno
            )
            loop.iter.set_environment(self.environment)
        super().visit_Template(node, frame)

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.join_text((")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("))")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self.write("environment.made(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self.write("environment.made(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx != "load":  # an assignment target, as in `{% for key, value in ... %}`
            super().visit_Tuple(node, frame)
            return
        self.write("environment.made(")
        super().visit_Tuple(node, frame)
        self.write(")")


def _texts(node: nodes.Node) -> Iterator[nodes.TemplateData]:
    if isinstance(node, nodes.TemplateData):
        yield node
    yield from node.find_all(nodes.TemplateData)


# -- the environment ------------------------------------------------------------------------


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox templates render in. `field_finalize` is applied to every value a
    template writes (like Jinja's `finalize`), before the value is paid for."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(
        self, *, field_finalize: Callable[[Any], Any] | None = None, **options: Any
    ) -> None:
        self.field_finalize = field_finalize
        super().__init__(finalize=self._written, **options)
        self.globals.pop("lipsum", None)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def _written(self, value: Any) -> str:
        text = str(self.field_finalize(value) if self.field_finalize else value)
        current_budget().made(text)
        return text

    # Called by the generated code ----------------------------------------------------------

    def loop_items(self, items: Iterable[Any], literal_chars: int) -> Iterator[Any]:
        budget = current_budget()
        for item in items:
            budget.step()
            budget.spend(literal_chars)
            yield item

    def join_text(self, parts: Iterable[Any]) -> str:
        texts = [str(part) for part in parts]
        _limit(sum(map(len, texts)), "`~`")
        text = "".join(texts)
        current_budget().made(text)
        return text

    def made(self, value: Any) -> Any:
        return current_budget().made(value)

    # Jinja's sandbox hooks -----------------------------------------------------------------

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = current_budget()
        budget.step()
        if operator == "**":
            _check_power(left, right)
        elif operator == "*":
            _check_product(budget, left, right)
        elif operator == "+":
            _check_sum(budget, left, right)
        elif operator == "%" and isinstance(left, str):
            _check_percent(budget, left, right)
        return budget.made(super().call_binop(context, operator, left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = current_budget()
        budget.step()
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level
            args = (__self.loop_items(args[0], 0), *args[1:])
        return budget.made(super().call(__context, __obj, *args, **kwargs))

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if not super().is_safe_attribute(obj, attr, value):
            return False
        if callable(value):
            for kind, methods in _DATA_METHODS:
                if isinstance(obj, kind):
                    return attr in methods
        return True

    def wrap_str_format(self, value: Any) -> None:
        # `str.format` pads to any width it is given: refused like the other str methods
        # that make text larger (is_safe_attribute), rather than sandboxed.
        return None
