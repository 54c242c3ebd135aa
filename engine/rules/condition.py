"""A rule's JsonLogic condition: checked and compiled once at load, evaluated per event.

The evaluator is datalogic-py. Two of its API habits are smoothed over here: a Python `str`
given as a rule or as data is read as JSON *text*, so string values are passed JSON-encoded;
and a result is made boolean by the engine's own truthiness (`false`, `null`, `0`, `""`,
`[]` and `{}` are false), except that a string is tested directly (non-empty is true), since
the engine's `truthy` would parse it as JSON text.

An evaluation is bounded by datalogic's operation budget (`OPS_BUDGET`): operators such as
`reduce` over `cat`, `merge` or the tensor family's `zeros` can otherwise double a value per
item or allocate gigabytes from a few bytes of rule, when the rule is compiled (constants are
folded) or for each event. Past the budget an evaluation fails like any other, for that
event and rule only.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from typing import Any

import datalogic_py
import orjson

from engine.errors import ConfigError, EngineError, Location
from engine.rules.catalog import UNKNOWN_TYPE_HINT, EventTypeCatalog
from engine.rules.fastpath import Check, Undecided, compile_fast
from engine.section import Section
from engine.yamlfile import plain

OPS_BUDGET = 1_000_000  # operations, bytes of text or tensor elements: a few ms, a few MB
_ENGINE = datalogic_py.Engine(config={"ops_budget": OPS_BUDGET})
# Compiled rules are cached by their JSON text for rules that repeat one; a long text is
# compiled for its own rule only, so reloads of edited long conditions cannot pile up.
_CACHED_TEXT_CHARS = 4096
OPERATORS: frozenset[str] = frozenset(
    name for info in _ENGINE.operators() for name in (info["name"], *info["aliases"])
)


# What a compiled rule raises when evaluation fails (the matcher catches it inline).
EvaluationFailure = datalogic_py.DataLogicError


class ConditionError(EngineError):
    """A condition that failed while evaluating (e.g. arithmetic on text)."""


def is_rule_failure(error: BaseException) -> bool:
    """Whether `error`, raised while one rule judged one event, is that pair's failure to
    record rather than the process's to end on: any Exception, and a panic of the JsonLogic
    engine, which pyo3 raises as a BaseException."""
    return isinstance(error, Exception) or type(error).__name__ == "PanicException"


def _as_json(value: Any) -> Any:
    return orjson.dumps(value).decode() if isinstance(value, str) else value


def truthy(value: Any) -> bool:
    """Whether a condition's result counts as true (JsonLogic truthiness)."""
    if value is True or value is False:
        return value
    if isinstance(value, str):
        return value != ""
    return _ENGINE.truthy(value)


def _describe(diagnostic: datalogic_py.Diagnostic) -> str:
    pointer = diagnostic["pointer"]
    place = f" at `{pointer}`" if pointer else ""
    return f"{diagnostic['message']}{place}"


def _hint(diagnostics: list[datalogic_py.Diagnostic]) -> str | None:
    for diagnostic in diagnostics:
        operator = diagnostic["operator"]
        if diagnostic["code"] == "UnknownOperator" and operator:
            close = difflib.get_close_matches(operator, sorted(OPERATORS), n=1, cutoff=0.6)
            if close:
                return f"did you mean `{close[0]}`?"
    return None


class Condition:
    """A compiled JsonLogic expression; `source` is the expression as written.

    Equal expressions share one `compiled` rule, so a matcher can evaluate each distinct
    expression once per event however many rules repeat it. `fields` names the top-level
    event keys the expression reads (None: it may read anything): handing the evaluator
    only those is what makes a condition cheap, since copying the whole event into the
    engine costs more than evaluating it. `implied_ids` holds what the expression requires
    of the event's type, source and severity ids (`{"==": [{"var": "event_type.id"}, 19]}`
    requires type 19) and `implied_alert` of its alert flag, so the rule index can keep the
    rule away from other events as it does for `when`."""

    __slots__ = ("compiled", "fast", "fields", "implied_alert", "implied_ids", "reads", "source")

    def __init__(self, source: Any, compiled: datalogic_py.Rule):
        self.source = source
        self.compiled = compiled
        # Decides the common cases without datalogic; raises Undecided for the rest.
        self.fast: Check | None = compile_fast(source)
        self.fields = _top_level_reads(compiled)
        # The variable paths it reads, as the trace shows their values (`engine.rules.trace`).
        self.reads = _read_paths(compiled, source)
        self.implied_ids = implied_ids(source)
        self.implied_alert = implied_alert(source)

    def evaluate(self, data: Any) -> Any:
        """The expression's value for `data` (any JSON-shaped value)."""
        try:
            return self.compiled.evaluate(_as_json(data))
        except datalogic_py.DataLogicError as error:
            raise ConditionError(str(error)) from None

    def outcome(self, data: EventData) -> Any:
        """The expression's value for one event, or a ConditionError when it fails to
        evaluate: the fast path's answer where it decides, the full evaluator's otherwise."""
        fast = self.fast
        if fast is not None:
            try:
                return fast(data.raw)
            except Undecided:
                pass
        return self.evaluated(data)

    def evaluated(self, data: EventData) -> Any:
        """The full evaluator's answer (`outcome` without its fast path), or a
        ConditionError."""
        handle = data.next_handle()
        try:
            if handle is None:
                return self.compiled.evaluate(project(data.raw, self.fields))
            return self.compiled.evaluate_data(handle)
        except EvaluationFailure as error:
            return ConditionError(str(error))

    def holds(self, raw: dict[str, Any]) -> bool:
        """Whether the condition is true for one event's raw dict."""
        value = self.outcome(EventData(raw))
        if isinstance(value, ConditionError):
            raise value
        return value is True or (value is not False and truthy(value))

    def __repr__(self) -> str:
        return f"Condition({orjson.dumps(self.source, default=str).decode()[:80]})"


def compile_condition(source: Any, where: Location) -> Condition:
    """Check and compile a JsonLogic expression; raise ConfigError naming every problem
    (unknown operator, wrong number of arguments, ...) with its JSON pointer."""
    try:
        compiled = _compile(source)
    except datalogic_py.CompileError as error:
        problems = [d for d in error.diagnostics if d["severity"] == "error"] or error.diagnostics
        if not problems:
            raise ConfigError(f"invalid condition: {error}", where) from None
        message = "; ".join(_describe(d) for d in problems)
        hint = _hint(problems)
        if hint is not None and hint in message:  # datalogic's own words may suggest it already
            hint = None
        raise ConfigError(f"invalid condition: {message}", where, hint) from None
    except (datalogic_py.DataLogicError, TypeError, ValueError) as error:
        raise ConfigError(f"invalid condition: {error}", where) from None
    return Condition(source, compiled)


def _top_level_reads(compiled: datalogic_py.Rule) -> tuple[str, ...] | None:
    facts = compiled.facts()
    if not facts["reads_data"]:
        return ()
    if facts["computed_reads"] or not facts["reads_complete"]:
        return None
    fields = set()
    for path in facts["reads"]:
        # An empty path reads the whole event; a backslash is an escaped dot in a key.
        if not path or "\\" in path[0]:
            return None
        fields.add(path[0])
    return tuple(sorted(fields))


def _read_paths(compiled: datalogic_py.Rule, source: Any) -> tuple[tuple[str, ...], ...]:
    """Each path the expression reads, as keys (a `\\.` in a name is a dot in a key); where
    the evaluator cannot tell them all (a computed `var`), the literal ones written."""
    facts = compiled.facts()
    if facts["reads_complete"] and not facts["computed_reads"]:
        found = [_keys(path) for path in facts["reads"] if path]
    else:
        found = [tuple(name.split(".")) for name in _literal_vars(source) if name]
    return tuple(dict.fromkeys(found))


def _keys(path: list[str]) -> tuple[str, ...]:
    keys: list[str] = []
    joined = ""
    for part in path:
        if part.endswith("\\"):
            joined += part[:-1] + "."
            continue
        keys.append(joined + part)
        joined = ""
    return tuple(keys)


def _literal_vars(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, list):
        for item in node:
            found.extend(_literal_vars(item))
    elif isinstance(node, dict):
        name = node.get("var") if len(node) == 1 else None
        if isinstance(name, list) and name:
            name = name[0]
        if isinstance(name, str):
            found.append(name)
        for value in node.values():
            found.extend(_literal_vars(value))
    return found


def project(raw: dict[str, Any], fields: tuple[str, ...] | None) -> dict[str, Any]:
    """The part of the event that reads of `fields` can see (all of it for None)."""
    if fields is None:
        return raw
    return {key: raw[key] for key in fields if key in raw}


# The event fields the rule index sorts by, as an expression reads them.
_INDEXED_VARS = {
    "event_type.id": "type",
    "event_source.id": "source",
    "event_severity.id": "severity",
}


def implied_ids(source: Any) -> dict[str, frozenset[int]]:
    """Ids of type, source or severity that an event must have for `source` to be true:
    from its top-level conjuncts of the form `{"==": [{"var": "event_type.id"}, 19]}`,
    `===`, or `{"in": [{"var": "event_severity.id"}, [1, 2]]}`.

    Sound because the event's typed ids are read from those very values (an id given as
    text or as 19.0 becomes 19; anything else the normalizer rejects). Loose `==` with 0 is
    left out: the evaluator holds `null == 0`, while an event without the id has none."""
    implied: dict[str, frozenset[int]] = {}
    for conjunct in _conjuncts(source):
        found = _id_constraint(conjunct)
        if found is not None:
            name, ids = found
            implied[name] = implied[name] & ids if name in implied else ids
    return implied


def implied_alert(source: Any) -> bool | None:
    """The alert flag an event must have for `source` to be true, if a top-level conjunct
    says so: `{"==": [{"var": "alert"}, true]}` (the normalized `alert` is a boolean)."""
    for conjunct in _conjuncts(source):
        if isinstance(conjunct, dict) and len(conjunct) == 1:
            ((operator, args),) = conjunct.items()
            if operator in ("==", "===") and isinstance(args, list) and len(args) == 2:
                for var, value in (args, args[::-1]):
                    if var == {"var": "alert"} and isinstance(value, bool):
                        return value
    return None


def _conjuncts(source: Any) -> list[Any]:
    if isinstance(source, dict) and len(source) == 1 and isinstance(source.get("and"), list):
        return [part for item in source["and"] for part in _conjuncts(item)]
    return [source]


def _var_name(value: Any) -> str | None:
    if not (isinstance(value, dict) and len(value) == 1 and "var" in value):
        return None
    name = value["var"]
    if isinstance(name, list) and len(name) == 1:  # a second item would be a default
        name = name[0]
    return _INDEXED_VARS.get(name) if isinstance(name, str) else None


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _id_constraint(expression: Any) -> tuple[str, frozenset[int]] | None:
    if not (isinstance(expression, dict) and len(expression) == 1):
        return None
    ((operator, args),) = expression.items()
    if not (isinstance(args, list) and len(args) == 2):
        return None
    if operator in ("==", "==="):
        for var, value in (args, args[::-1]):
            name = _var_name(var)
            if name and _is_id(value) and (operator == "===" or value != 0):
                return name, frozenset({value})
    if operator == "in":
        name, values = _var_name(args[0]), args[1]
        if name and isinstance(values, list) and values and all(_is_id(v) for v in values):
            return name, frozenset(values)
    return None


def _compile(source: Any) -> datalogic_py.Rule:
    # Compiled once per distinct expression: rules repeating one share it.
    try:
        text = orjson.dumps(source).decode()
    except TypeError:  # not JSON-shaped (e.g. integer keys): let the engine explain
        return _ENGINE.compile_checked(_as_json(source))
    if len(text) > _CACHED_TEXT_CHARS:
        return _ENGINE.compile_checked(text)
    return _compile_json(text)


@lru_cache(maxsize=8192)
def _compile_json(text: str) -> datalogic_py.Rule:
    return _ENGINE.compile_checked(text)


class EventData:
    """One event as its conditions read it: the raw dict, and a handle to it parsed once
    for the full evaluator. Parsing costs about as much as one evaluation on the dict, and
    each evaluation on the handle is then several times cheaper, so with `share` (several
    conditions to evaluate, as in a rule index bucket) the handle is made when a second
    condition needs the full evaluator; `fields` are the top-level fields any of them read
    (None: all)."""

    __slots__ = ("_fields", "_handle", "_share", "_slow", "raw")

    def __init__(
        self, raw: dict[str, Any], fields: tuple[str, ...] | None = None, share: bool = False
    ):
        self.raw = raw
        self._fields = fields
        self._share = share
        self._handle: datalogic_py.DataHandle | None = None
        self._slow = False

    def next_handle(self) -> datalogic_py.DataHandle | None:
        """The handle for the next full evaluation; None: evaluate on the dict."""
        if self._handle is None and self._slow and self._share:
            self._handle = event_handle(project(self.raw, self._fields))
            self._share = self._handle is not None
        self._slow = True
        return self._handle


def event_handle(raw: dict[str, Any]) -> datalogic_py.DataHandle | None:
    """The event parsed once, to evaluate several conditions on; None when it holds a
    value JSON cannot carry (then each condition reads the dict and reports the error)."""
    try:
        return datalogic_py.DataHandle(raw)
    except (datalogic_py.DataLogicError, TypeError, ValueError):
        return None


def read_condition(
    section: Section, key: str, catalog: EventTypeCatalog | None = None
) -> Condition | None:
    """Compile `section[key]`, reporting problems at the line of the key, and warning of
    tests that load but likely do not do what was meant (see `_lint`)."""
    source = plain(section.data[key])
    if isinstance(source, str):
        # In JsonLogic a string is a constant, so such a condition would always hold.
        section.error(
            key,
            f"`{key}` is a string; JsonLogic would read it as a constant, not as a test",
            'write the expression as a mapping, e.g. {"==": [{"var": "alert"}, true]}',
        )
        return None
    try:
        condition = compile_condition(source, section.at(key))
    except ConfigError as error:
        section.error(key, error.message, error.hint)
        return None
    for message, hint in _lint(condition, catalog):
        section.warn(key, message, hint)
    return condition


_TAG_TEXT = "endpoint.tags"


def _lint(condition: Condition, catalog: EventTypeCatalog | None) -> list[tuple[str, str]]:
    """(message, hint) for each part of a valid condition that is likely a mistake."""
    found = []
    for needle in _substring_tag_tests(condition.source):
        shown = orjson.dumps(needle).decode() if needle is not None else "..."
        found.append(
            (
                f"`in` over `{_TAG_TEXT}` looks for {shown} inside the comma-separated tag "
                f"text, so it matches longer tags too (`vip` is found in `vipersat`)",
                f'test whole tags: {{"in": [{shown}, {{"var": "endpoint.tag_list"}}]}}, or '
                f"`when: {{tags: ...}}` / `when: {{not: {{tags: ...}}}}`",
            )
        )
    types = condition.implied_ids.get("type")
    if catalog is not None and types is not None:
        for type_id in sorted(types):
            if type_id not in catalog:
                found.append((f"event type {type_id} is not in the catalog", UNKNOWN_TYPE_HINT))
    return found


def _substring_tag_tests(node: Any) -> list[Any]:
    """The needles of every `{"in": [needle, {"var": "endpoint.tags"}]}` in an expression."""
    found: list[Any] = []
    if isinstance(node, list):
        for item in node:
            found.extend(_substring_tag_tests(item))
    elif isinstance(node, dict):
        args = node.get("in") if len(node) == 1 else None
        if isinstance(args, list) and len(args) == 2 and _reads(args[1], _TAG_TEXT):
            found.append(args[0] if isinstance(args[0], str | int | float) else None)
        for value in node.values():
            found.extend(_substring_tag_tests(value))
    return found


def _reads(node: Any, path: str) -> bool:
    """Whether `node` is `{"var": path}` (with or without a default)."""
    if not (isinstance(node, dict) and len(node) == 1 and "var" in node):
        return False
    name = node["var"]
    if isinstance(name, list) and name:
        name = name[0]
    return bool(name == path)
