"""The normalized emnify event.

emnify sends one event object in several dialects (Event API, Data Streamer, older docs):
`alert` as bool or 1/0, `event_source.name` instead of `description`, `detail` as a JSON
string, four timestamp formats, nested objects null or missing. `normalize` accepts all of
them and returns an immutable `Event` whose typed fields drive matching, and whose `raw`
dict (with those differences smoothed out) is what conditions and templates see.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from engine.errors import EventFormatError

SEVERITIES: dict[int, str] = {0: "Info", 1: "Warn", 2: "Critical"}
SOURCES: dict[int, str] = {0: "Network", 1: "Policy Control", 2: "API"}

# Text forms seen for severities and sources, folded to their ids.
_SEVERITY_NAMES = {"info": 0, "warn": 1, "warning": 1, "critical": 2}
_SOURCE_NAMES = {"network": 0, "policy control": 1, "policy_control": 1, "api": 2}


@dataclass(frozen=True, slots=True)
class Event:
    """One emnify system event. `raw` is the normalized record; treat it as read-only."""

    id: int
    timestamp: datetime
    type_id: int | None
    source_id: int | None
    severity_id: int | None
    alert: bool
    description: str
    sim_id: int | None
    iccid: str | None
    endpoint_id: int | None
    endpoint_name: str | None
    tags: frozenset[str]
    raw: dict[str, Any]

    @property
    def type_name(self) -> str | None:
        value = self.raw.get("event_type")
        return value.get("description") if isinstance(value, dict) else None

    def sort_key(self) -> tuple[datetime, int]:
        return (self.timestamp, self.id)

    def target(self) -> dict[str, Any]:
        """What actions aim at, as replay and the audit log show it."""
        return {"sim_id": self.sim_id, "endpoint_id": self.endpoint_id, "iccid": self.iccid}


def parse_timestamp(value: object, field: str = "timestamp") -> datetime:
    """Parse any timestamp format emnify uses; a value without a zone is UTC."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise EventFormatError(f"unrecognised timestamp {value[:40]!r}", field) from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        # Epoch seconds or milliseconds: not documented, but cheap to accept.
        seconds = value / 1000 if value > 1e11 else value
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            raise EventFormatError(f"timestamp {value!r} out of range", field) from None
    else:
        raise EventFormatError("missing or not a string", field)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def format_timestamp(moment: datetime) -> str:
    """The Event API's own format: milliseconds and `Z`."""
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def _as_int(value: object, field: str, *, required: bool = False) -> int | None:
    if value is None or value == "":
        if required:
            raise EventFormatError("missing", field)
        return None
    if isinstance(value, bool):
        raise EventFormatError(f"expected an integer, got {value!r}", field)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise EventFormatError(f"expected an integer, got {str(value)[:40]!r}", field)


def _as_bool(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes"}
    return bool(value)


def _obj(raw: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, dict):
        return value
    raise EventFormatError(f"expected an object, got {type(value).__name__}", key)


def _lookup_id(obj: dict[str, Any] | None, names: Mapping[str, int], field: str) -> int | None:
    """Id of a `{id, description|name}` object, falling back to its text."""
    if obj is None:
        return None
    ident = _as_int(obj.get("id"), f"{field}.id")
    if ident is not None:
        return ident
    text = obj.get("description") or obj.get("name")
    if isinstance(text, str):
        return names.get(text.strip().lower())
    return None


def _parse_detail(value: object) -> object:
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in ("{", "["):
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                return value
    return value


def normalize(record: object) -> Event:
    """Turn one raw emnify event record into an `Event`, or raise `EventFormatError`."""
    if not isinstance(record, dict):
        raise EventFormatError(f"an event must be a JSON object, got {type(record).__name__}")
    event_id = _as_int(record.get("id"), "id", required=True)
    assert event_id is not None
    timestamp = parse_timestamp(record.get("timestamp"))

    raw = dict(record)
    event_type = _obj(record, "event_type")
    source = _obj(record, "event_source")
    severity = _obj(record, "event_severity")
    endpoint = _obj(record, "endpoint")
    sim = _obj(record, "sim")

    if source is not None and "description" not in source and "name" in source:
        source = {**source, "description": source["name"]}
        raw["event_source"] = source
    if severity is not None and "description" not in severity and "name" in severity:
        severity = {**severity, "description": severity["name"]}
        raw["event_severity"] = severity
    alert = _as_bool(record.get("alert"))
    raw["alert"] = alert
    if "detail" in record:
        raw["detail"] = _parse_detail(record["detail"])

    tags: frozenset[str] = frozenset()
    if endpoint is not None:
        tag_text = endpoint.get("tags")
        if isinstance(tag_text, str) and tag_text:
            tags = frozenset(t.strip() for t in tag_text.split(",") if t.strip())
        elif isinstance(tag_text, list):
            tags = frozenset(str(t).strip() for t in tag_text if str(t).strip())

    description = record.get("description")
    iccid = sim.get("iccid") if sim else None
    endpoint_name = endpoint.get("name") if endpoint else None
    return Event(
        id=event_id,
        timestamp=timestamp,
        type_id=_as_int(event_type.get("id"), "event_type.id") if event_type else None,
        source_id=_lookup_id(source, _SOURCE_NAMES, "event_source"),
        severity_id=_lookup_id(severity, _SEVERITY_NAMES, "event_severity"),
        alert=alert,
        description=description if isinstance(description, str) else "",
        sim_id=_as_int(sim.get("id"), "sim.id") if sim else None,
        iccid=str(iccid) if iccid is not None else None,
        endpoint_id=_as_int(endpoint.get("id"), "endpoint.id") if endpoint else None,
        endpoint_name=str(endpoint_name) if endpoint_name is not None else None,
        tags=tags,
        raw=raw,
    )
