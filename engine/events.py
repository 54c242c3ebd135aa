"""The normalized emnify event.

emnify sends one event object in several dialects (Event API, Data Streamer, older docs):
`alert` as bool or 1/0, `event_source.name` instead of `description`, `detail` as a JSON
string, four timestamp formats, nested objects null or missing. `normalize` accepts all of
them and returns an immutable `Event` whose typed fields drive matching, and whose `raw`
dict (with those differences smoothed out) is what conditions and templates see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, NamedTuple

import orjson

from engine.errors import EventFormatError

SEVERITIES: dict[int, str] = {0: "Info", 1: "Warn", 2: "Critical"}
# The engine's own events (`engine.engine_events`) come from a source of their own, with an
# id beyond emnify's.
ENGINE_SOURCE_ID = 1000
SOURCES: dict[int, str] = {0: "Network", 1: "Policy Control", 2: "API", ENGINE_SOURCE_ID: "Engine"}

# Text forms seen for severities and sources, folded to their ids.
_SEVERITY_NAMES = {"info": 0, "warn": 1, "warning": 1, "critical": 2}
_SOURCE_NAMES = {
    "network": 0,
    "policy control": 1,
    "policy_control": 1,
    "api": 2,
    "engine": ENGINE_SOURCE_ID,
}


# Where an event carries the organisation it came from (its name under `organisations:`
# in the config; absent for the single organisation). emnify's own `organisation` object
# stays as it is.
ORGANISATION_KEY = "org"


class Event(NamedTuple):
    """One emnify system event. `raw` is the normalized record; treat it as read-only.

    A named tuple rather than a frozen dataclass: equally immutable, and built in a tenth of
    the time, which counts at a million events (a frozen dataclass sets each field through
    `object.__setattr__`)."""

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

    @property
    def organisation(self) -> str:
        """The configured organisation the event came from ("" for the single one)."""
        value = self.raw.get(ORGANISATION_KEY)
        return value if isinstance(value, str) else ""

    def target(self) -> dict[str, Any]:
        """What actions aim at, as replay and the audit log show it; with the organisation
        whose token they go out with, when several are configured."""
        target = {"sim_id": self.sim_id, "endpoint_id": self.endpoint_id, "iccid": self.iccid}
        organisation = self.raw.get(ORGANISATION_KEY)
        if organisation:
            target["organisation"] = organisation
        return target


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
    zone = parsed.tzinfo
    if zone is UTC:
        return parsed
    if zone is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # year 1 east of UTC, or 9999 west of it
        raise EventFormatError(
            f"timestamp {parsed.isoformat()} is out of range in UTC", field
        ) from None


def format_timestamp(moment: datetime) -> str:
    """The Event API's own format: milliseconds and `Z`."""
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


# Ids are kept as SQLite integers: signed 64-bit. A larger one would fail its whole batch.
# `normalize` tests an id against this inline, and calls `_as_int` only for anything else.
_ID_LIMIT = 2**63
# Past this, a float no longer holds every integer: an id the JSON parser read as a float
# (orjson does so beyond 64 bits) may have been rounded onto another event's id.
_EXACT_FLOAT_LIMIT = 2**53


def _as_int(value: object, field: str, *, required: bool = False) -> int | None:
    """An id in any form emnify sends it, or an `EventFormatError` naming `field`.
    `normalize` takes the plain int in range itself, before calling this."""
    if value is None or value == "":
        if required:
            raise EventFormatError("missing", field)
        return None
    if isinstance(value, bool):
        raise EventFormatError(f"expected an integer, got {value!r}", field)
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        if not -_EXACT_FLOAT_LIMIT < value < _EXACT_FLOAT_LIMIT:
            raise EventFormatError(
                f"{value!r} is out of range for an id (or was rounded by the JSON reader)", field
            )
        number = int(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):  # reported below, with the value
            number = int(value.strip())
    if number is None:
        raise EventFormatError(f"expected an integer, got {str(value)[:40]!r}", field)
    if not -_ID_LIMIT <= number < _ID_LIMIT:
        raise EventFormatError(f"{str(value)[:40]} is out of range for an id", field)
    return number


def _as_bool(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes"}
    return bool(value)


def _obj(raw: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = raw.get(key)
    if value is None or type(value) is dict:
        return value
    if isinstance(value, dict):
        return value
    raise EventFormatError(f"expected an object, got {type(value).__name__}", key)


def _lookup_id(obj: dict[str, Any] | None, names: Mapping[str, int], field: str) -> int | None:
    """Id of a `{id, description|name}` object, falling back to its text. `normalize` has
    taken an int id in range already."""
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


@lru_cache(maxsize=4096)
def _split_tags(text: str) -> tuple[frozenset[str], tuple[str, ...]]:
    # A fleet has few distinct tag strings, and every event of a device repeats its own.
    listed = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    return frozenset(listed), listed


def _tags_of(endpoint: dict[str, Any]) -> tuple[frozenset[str], tuple[str, ...]]:
    """The endpoint's tags as a set (for `when`) and in order (for `tag_list`)."""
    tag_text = endpoint.get("tags")
    if isinstance(tag_text, str) and tag_text:
        return _split_tags(tag_text)
    if isinstance(tag_text, list):
        listed = tuple(dict.fromkeys(str(t).strip() for t in tag_text if str(t).strip()))
        return frozenset(listed), listed
    return _NO_TAGS, ()


def _with_tag_list(endpoint: dict[str, Any], tag_list: list[str]) -> dict[str, Any] | None:
    """The endpoint object with `tag_list` (its tags, one whole tag an item), or None when
    it has that already. emnify sends tags as one comma-separated string, in which
    `{"in": ["vip", ...]}` would find `vipersat` too; a list holds whole tags only."""
    if endpoint.get("tag_list") == tag_list:
        return None
    return {**endpoint, "tag_list": tag_list}


_NO_TAGS: frozenset[str] = frozenset()
# Event(*fields) without the keyword handling of the generated __new__.
_new_event = tuple.__new__
_from_iso = datetime.fromisoformat
_OBJECTS = ("event_type", "event_source", "event_severity", "endpoint", "sim")


def normalize(record: object, *, tag_list: bool = True) -> Event:
    """Turn one raw emnify event record into an `Event`, or raise `EventFormatError`.

    The event's `raw` is the record itself when it is already in normalized form, else a
    shallow copy with the differences smoothed out; either way, treat both as read-only.
    `tag_list=False` leaves `endpoint.tag_list` out of `raw` (and the endpoint object as
    it came): for a rule set none of whose rules reads it (`RuleSet.reads_tag_list`), it
    would cost two copies per event for nothing.

    This runs once or twice for every event, so the common case of each field (an int id,
    an ISO timestamp in UTC, an object or null) is tested inline, and only anything else
    goes to the helper that parses, converts or reports it."""
    if type(record) is not dict and not isinstance(record, dict):
        raise EventFormatError(f"an event must be a JSON object, got {type(record).__name__}")
    get = record.get
    event_id = get("id")
    if type(event_id) is not int or not -_ID_LIMIT <= event_id < _ID_LIMIT:
        event_id = _as_int(event_id, "id", required=True)
    stamp = get("timestamp")
    if type(stamp) is str and stamp:
        try:
            timestamp = _from_iso(stamp)
        except ValueError:
            timestamp = parse_timestamp(stamp)  # raises, naming the field
        if timestamp.tzinfo is not UTC:
            timestamp = parse_timestamp(timestamp)
    else:
        timestamp = parse_timestamp(stamp)

    event_type = get("event_type")
    source = get("event_source")
    severity = get("event_severity")
    endpoint = get("endpoint")
    sim = get("sim")
    if (
        (event_type is not None and type(event_type) is not dict)
        or (source is not None and type(source) is not dict)
        or (severity is not None and type(severity) is not dict)
        or (endpoint is not None and type(endpoint) is not dict)
        or (sim is not None and type(sim) is not dict)
    ):  # a dict subclass, or something to report (the first, in this order)
        event_type, source, severity, endpoint, sim = [_obj(record, key) for key in _OBJECTS]

    changes: dict[str, Any] = {}
    if source is not None and "description" not in source and "name" in source:
        source = changes["event_source"] = {**source, "description": source["name"]}
    if severity is not None and "description" not in severity and "name" in severity:
        severity = changes["event_severity"] = {**severity, "description": severity["name"]}
    alert = get("alert")
    if alert is not True and alert is not False:
        alert = changes["alert"] = _as_bool(alert)
    detail = get("detail")
    if isinstance(detail, str):
        parsed = _parse_detail(detail)
        if parsed is not detail:
            changes["detail"] = parsed
    if endpoint is None:
        tags = _NO_TAGS
    elif tag_list:
        tags, listed = (_NO_TAGS, ()) if endpoint.get("tags") is None else _tags_of(endpoint)
        # A list of its own per event, as conditions and templates see JSON lists.
        with_list = _with_tag_list(endpoint, list(listed))
        if with_list is not None:
            changes["endpoint"] = with_list
    else:
        tags = _NO_TAGS if endpoint.get("tags") is None else _tags_of(endpoint)[0]
    raw = record if not changes and type(record) is dict else {**record, **changes}

    description = get("description")
    if sim is not None:
        sim_id = sim.get("id")
        if type(sim_id) is not int or not -_ID_LIMIT <= sim_id < _ID_LIMIT:
            sim_id = _as_int(sim_id, "sim.id")
        iccid = sim.get("iccid")
        if iccid is not None and type(iccid) is not str:
            iccid = str(iccid)
    else:
        sim_id = iccid = None
    if endpoint is not None:
        endpoint_id = endpoint.get("id")
        if type(endpoint_id) is not int or not -_ID_LIMIT <= endpoint_id < _ID_LIMIT:
            endpoint_id = _as_int(endpoint_id, "endpoint.id")
        endpoint_name = endpoint.get("name")
        if endpoint_name is not None and type(endpoint_name) is not str:
            endpoint_name = str(endpoint_name)
    else:
        endpoint_id = endpoint_name = None
    if event_type:
        type_id = event_type.get("id")
        if type(type_id) is not int or not -_ID_LIMIT <= type_id < _ID_LIMIT:
            type_id = _as_int(type_id, "event_type.id")
    else:
        type_id = None
    source_id = source.get("id") if source is not None else None
    if type(source_id) is not int or not -_ID_LIMIT <= source_id < _ID_LIMIT:
        source_id = _lookup_id(source, _SOURCE_NAMES, "event_source")
    severity_id = severity.get("id") if severity is not None else None
    if type(severity_id) is not int or not -_ID_LIMIT <= severity_id < _ID_LIMIT:
        severity_id = _lookup_id(severity, _SEVERITY_NAMES, "event_severity")
    return _new_event(
        Event,
        (
            event_id,
            timestamp,
            type_id,
            source_id,
            severity_id,
            alert,
            description if isinstance(description, str) else "",
            sim_id,
            iccid,
            endpoint_id,
            endpoint_name,
            tags,
            raw,
        ),
    )
