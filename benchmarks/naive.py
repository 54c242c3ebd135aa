"""The naive reference of B1: what a hand-written script would do with the same rules.

Every rule becomes one JsonLogic expression (its `when` shorthand spelled out as JsonLogic,
joined with its condition), and every event is tested against every rule with
panzi-json-logic, a pure-Python JsonLogic interpreter. No index, no compiling, no state, no
store: it only counts matches, so it does less than the engine does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from json_logic import jsonLogic  # type: ignore[import-untyped]

from engine.rules import Rule, RuleSet


def expression(rule: Rule) -> Any:
    """The rule's `when` and `condition` as one JsonLogic expression."""
    when = rule.when
    parts: list[Any] = []
    for values, var in (
        (when.type_ids, "event_type.id"),
        (when.source_ids, "event_source.id"),
        (when.severity_ids, "event_severity.id"),
        (when.iccids, "sim.iccid"),
        (when.endpoint_names, "endpoint.name"),
    ):
        if values is not None:
            parts.append({"in": [{"var": var}, sorted(values)]})
    if when.alert is not None:
        parts.append({"==": [{"var": "alert"}, when.alert]})
    for tag in sorted(when.tags or ()):
        # emnify's tags are one comma-separated string; a script would test for the text.
        parts.append({"in": [tag, {"var": "endpoint.tags"}]})
    if rule.condition_source is not None:
        parts.append(rule.condition_source)
    return {"and": parts} if parts else True


def expressions(rules: RuleSet) -> list[tuple[str, Any]]:
    return [(rule.id, expression(rule)) for rule in rules if rule.enabled]


def lines(path: Path, limit: int) -> Iterator[bytes]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle):
            if number >= limit:
                return
            yield line


def count_matches(path: Path, rules: RuleSet, limit: int) -> tuple[int, int]:
    """(events, matches) for the first `limit` events of `path`, the naive way."""
    checks = expressions(rules)
    events = matches = 0
    for line in lines(path, limit):
        text = line.strip()
        if not text:
            continue
        event = orjson.loads(text)
        events += 1
        for _rule_id, check in checks:
            try:
                if jsonLogic(check, event):
                    matches += 1
            except (TypeError, ValueError, KeyError):
                pass  # a script would skip a rule that fails on an event, too
    return events, matches
