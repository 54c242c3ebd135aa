"""What a rule read of an event while judging it, step by step, for the console's trace and
`why`: the event's values of the `when` keys the rule sets, and the values of the variables
its condition reads.

Recorded only for rules an event got past `when` with, and kept small: a condition's first
`MAX_READS` variables, each value cut to `MAX_TEXT` characters (a list or mapping as its JSON
text). The values come from the event (and the rule's looked-up facts), never from a rule's
actions, so no expanded `${VAR}` can reach them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from engine.events import SEVERITIES, SOURCES, Event
from engine.rules.when import When

MAX_READS = 12
MAX_TEXT = 120
_MISSING = None


def when_values(when: When, event: Event) -> dict[str, Any]:
    """The event's value of each key the rule's `when` sets (`not` included)."""
    found: dict[str, Any] = {}
    _constraint_values(when, event, found)
    if when.exclude is not None:
        excluded: dict[str, Any] = {}
        _constraint_values(when.exclude, event, excluded)
        found["not"] = excluded
    return found


def _constraint_values(when: Any, event: Event, found: dict[str, Any]) -> None:
    if when.type_ids is not None:
        name = event.type_name
        found["type"] = f"{event.type_id} ({name})" if name else event.type_id
    if when.source_ids is not None:
        found["source"] = _named(event.source_id, SOURCES)
    if when.severity_ids is not None:
        found["severity"] = _named(event.severity_id, SEVERITIES)
    if when.alert is not None:
        found["alert"] = event.alert
    if when.iccids is not None:
        found["iccid"] = shown(event.iccid)
    if when.endpoint_names is not None:
        found["endpoint_name"] = shown(event.endpoint_name)
    if when.tags is not None:
        found["tags"] = [shown(tag) for tag in sorted(event.tags)[:MAX_READS]]


def _named(value: int | None, names: dict[int, str]) -> str | None:
    return None if value is None else names.get(value, str(value))


def condition_values(reads: tuple[tuple[str, ...], ...], data: Mapping[str, Any]) -> dict[str, Any]:
    """The value at each of the condition's variable paths (`Condition.reads`) in `data`,
    by dotted path; a missing one as null."""
    return {".".join(path): shown(_at(data, path)) for path in reads[:MAX_READS]}


def _at(data: Any, path: tuple[str, ...]) -> Any:
    value = data
    for part in path:
        if isinstance(value, Mapping):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def shown(value: Any) -> Any:
    """A value as the trace keeps it: scalars as they are, text cut to `MAX_TEXT`
    characters, a list or mapping as its JSON text, cut too."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if not isinstance(value, str):
        try:
            value = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        except TypeError:
            value = repr(value)
    return value if len(value) <= MAX_TEXT else value[: MAX_TEXT - 1] + "…"
