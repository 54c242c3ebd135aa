"""The Event API's `sort` and `q` parameters: parsed once, then applied to stored events.

`from`/`until` have whole-second resolution and are inclusive: an event stamped
10:05:00.500 belongs to a window ending at 10:05:00 (and to one starting there).
Only events whose timestamp has passed are visible, whatever `until` says.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from engine.simulator.event_store import StoredEvent
from engine.simulator.fleet import luhn_digit

_SORT_FIELDS = frozenset({"id", "timestamp"})
_BOUND = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_MAX_VALUES = 6


class QueryError(ValueError):
    """A bad `sort` or `q`, with the status and error body the API gives for it."""

    def __init__(self, status: int, error_code: int, error_token: str, message: str):
        self.status = status
        self.error_code = error_code
        self.error_token = error_token
        super().__init__(message)


def _invalid_query(message: str) -> QueryError:
    return QueryError(422, 1301, "InvalidQueryCriteria", message)


def _path(record: Mapping[str, Any], *keys: str) -> Any:
    value: Any = record
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _iccid_with_luhn(record: Mapping[str, Any]) -> Any:
    iccid = _path(record, "sim", "iccid")
    return iccid + luhn_digit(iccid) if isinstance(iccid, str) and iccid.isdigit() else None


Extractor = Callable[[Mapping[str, Any]], Any]

# Which part of the record each documented `q` field looks at.
_FIELDS: dict[str, Extractor] = {
    "type": lambda r: _path(r, "event_type", "id"),
    "severity": lambda r: _path(r, "event_severity", "id"),
    "source": lambda r: _path(r, "event_source", "id"),
    "alert": lambda r: _path(r, "alert"),
    "description": lambda r: _path(r, "description"),
    "organisation": lambda r: _path(r, "organisation", "name"),
    "user": lambda r: _path(r, "user", "name"),
    "endpoint": lambda r: _path(r, "endpoint", "name"),
    "tags": lambda r: _path(r, "endpoint", "tags"),
    "ip_address": lambda r: _path(r, "endpoint", "ip_address"),
    "imei": lambda r: _path(r, "endpoint", "imei"),
    "iccid": lambda r: _path(r, "sim", "iccid"),
    "iccid_with_luhn": _iccid_with_luhn,
    "imsi": lambda r: _path(r, "imsi", "imsi"),
    "network": lambda r: _path(r, "detail", "name"),
    "country": lambda r: _path(r, "detail", "country", "name"),
    "rat": lambda r: _path(r, "detail", "pdp_context", "rat_type"),
}
_NUMERIC = frozenset({"type", "severity", "source", "rat"})
_SUBSTRING = frozenset({"description", "tags"})


@dataclass(frozen=True, slots=True)
class Criterion:
    """One `field:value|value` term; a record matches when any value does."""

    field: str
    values: tuple[str, ...]

    def matches(self, record: Mapping[str, Any]) -> bool:
        actual = _FIELDS[self.field](record)
        if actual is None:
            return False
        if self.field == "alert":
            return str(bool(actual)).lower() in self.values
        text = str(actual).lower()
        if self.field in _SUBSTRING:
            return any(value in text for value in self.values)
        return text in self.values


@dataclass(frozen=True, slots=True)
class EventQuery:
    sort: str
    start_ms: int | None
    end_ms: int | None
    day: str | None
    criteria: tuple[Criterion, ...]

    def select(self, candidates: Sequence[StoredEvent], now_ms: int) -> list[StoredEvent]:
        """The matching visible events, in the requested order."""
        end = now_ms if self.end_ms is None else min(self.end_ms, now_ms)
        chosen = [
            e
            for e in candidates
            if e.at_ms <= end
            and (self.start_ms is None or e.at_ms >= self.start_ms)
            and (self.day is None or e.record.get("timestamp", "").startswith(self.day))
            and all(c.matches(e.record) for c in self.criteria)
        ]
        keys: dict[str, Callable[[StoredEvent], tuple[int, ...]]] = {
            "id": lambda e: (e.id, e.seq),
            "timestamp": lambda e: (e.at_ms, e.id, e.seq),
        }
        first = self.sort.split(",")[0]
        chosen.sort(key=keys[first])
        return chosen


def _bound_ms(value: str, name: str) -> int:
    if not _BOUND.fullmatch(value):
        raise _invalid_query(f"'{name}' must look like 2025-05-01T10:00:00Z, got '{value}'")
    try:
        moment = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise _invalid_query(f"'{name}' is not a valid date: '{value}'") from None
    return int(moment.timestamp()) * 1000


def parse_sort(text: str | None) -> str:
    if text is None or text == "":
        return "id"
    fields = [part.strip() for part in text.split(",")]
    if not all(field in _SORT_FIELDS for field in fields):
        raise QueryError(400, 1302, "InvalidSortCriteria", f"Invalid sort criteria '{text}'")
    return ",".join(fields)


def parse_query(sort: str | None, q: str | None) -> EventQuery:
    """Parse `sort` and `q` or raise `QueryError` with the API's status and code."""
    terms: dict[str, str] = {}
    for part in (q or "").split(","):
        if not part.strip():
            continue
        field, sep, value = part.partition(":")
        field = field.strip()
        if not sep or not value:
            raise _invalid_query(f"Invalid query criteria '{part}': expected field:value")
        if field not in _FIELDS and field not in {"from", "until", "timestamp"}:
            raise _invalid_query(f"Unknown query field '{field}'")
        terms[field] = value.strip()
    if ("from" in terms) != ("until" in terms):
        raise _invalid_query("'from' and 'until' must be given together")
    start_ms = _bound_ms(terms.pop("from"), "from") if "from" in terms else None
    end_ms = _bound_ms(terms.pop("until"), "until") + 999 if "until" in terms else None
    day = terms.pop("timestamp", None)
    if day is not None and not _DAY.fullmatch(day):
        raise _invalid_query(f"'timestamp' must be a day like 2025-05-01, got '{day}'")
    criteria: list[Criterion] = []
    for field, value in terms.items():
        values = tuple(v.strip().lower() for v in value.split("|"))
        if len(values) > _MAX_VALUES:
            raise _invalid_query(f"At most {_MAX_VALUES} values for '{field}'")
        if field in _NUMERIC and not all(v.isdigit() for v in values):
            raise _invalid_query(f"'{field}' takes numeric ids, got '{value}'")
        if field == "alert" and not all(v in {"true", "false"} for v in values):
            raise _invalid_query(f"'alert' takes true or false, got '{value}'")
        criteria.append(Criterion(field, values))
    return EventQuery(parse_sort(sort), start_ms, end_ms, day, tuple(criteria))
