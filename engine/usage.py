"""Usage records as rule input: the Data Streamer's data and SMS traffic records.

A usage record (emnify-api.md §8) tells how much one endpoint used between
`start_timestamp` and `end_timestamp`: `volume.total` in MB for data (`traffic_type` 5),
one message for SMS (6). Data records come every so often during a session and once at
its end, each with the usage since the one before, so summing them over a window gives the
usage in that window. A rule with `usage:` sums them per key in a sliding window, in the
same window store as a threshold's counts (`engine.state.sum_usage`).

`read_usage` turns a record into an `Event` the pipeline judges like any other: its
`timestamp` is the record's `end_timestamp`, its endpoint and SIM are the record's, and
`usage` holds what it counts (`{"traffic": "data", "amount": bytes, "record_id": id}`).
Its id is the record's id mapped below zero (`usage_event_id`), so the seen-ids dedup drops
a record pushed twice without ever mistaking it for an event of the same number.

Units: emnify gives volumes in MB with six decimals, i.e. to the byte when a MB is
1,000,000 bytes, so `KB`, `MB`, `GB`, `TB` are decimal (1000); `KiB`, `MiB`, `GiB`,
`TiB` are there for who counts in 1024s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from engine.errors import EventFormatError
from engine.events import Event, normalize

Traffic = Literal["data", "sms"]
TRAFFIC_TYPES: dict[int, Traffic] = {5: "data", 6: "sms"}
_TRAFFIC_NAMES: dict[str, Traffic] = {"data": "data", "sms": "sms"}
BYTES_PER_MB = 1_000_000  # emnify's volume unit (six decimals: to the byte)
UNITS: dict[str, int] = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
_UNITS_FOLDED = {name.lower(): name for name in UNITS}
_LIMIT = re.compile(r"\s*(>=?)\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
SMS_UNIT = "SMS"


def is_usage_record(record: object) -> bool:
    """A usage record (data or SMS traffic), as opposed to an event record: usage records
    carry `traffic_type` and `volume` and no `event_type` (emnify-api.md §8)."""
    return (
        isinstance(record, dict)
        and "event_type" not in record
        and ("traffic_type" in record or "volume" in record)
    )


def usage_event_id(record_id: int) -> int:
    """The id a usage record is judged and remembered under: below zero, where no event id
    lies (emnify's ids are positive; the engine's own start at 2**62)."""
    return -record_id - 1


def is_usage_event_id(event_id: int | None) -> bool:
    return event_id is not None and event_id < 0


def record_id_of(event_id: int) -> int:
    """The usage record's own id, from the id it is judged under (`usage_event_id`)."""
    return -event_id - 1


@dataclass(frozen=True, slots=True)
class UsageLimit:
    """A rule's `usage:`: fire when the `traffic` summed per `per` within `within` goes
    above `above` (bytes for data, messages for SMS), or reaches it when `inclusive`.
    `unit` is the unit the rule wrote its limit in, for explanations."""

    traffic: Traffic
    above: float
    inclusive: bool
    unit: str
    within: timedelta
    per: str

    def crossed(self, total: float) -> bool:
        return total >= self.above if self.inclusive else total > self.above

    def shown(self, amount: float) -> str:
        """An amount in the limit's unit: `212.4 MB`, `101 SMS`."""
        value = amount / UNITS.get(self.unit, 1)
        text = f"{value:.1f}".removesuffix(".0")
        return f"{text} {self.unit}"

    @property
    def comparison(self) -> str:
        return ">=" if self.inclusive else ">"


def parse_limit(traffic: Traffic, text: object) -> tuple[float, bool, str]:
    """`">200MB"` → (200_000_000.0, False, "MB"); `">=100"` for SMS → (100.0, True, "SMS").
    ValueError with what to write instead."""
    example = '">200MB"' if traffic == "data" else '">100"'
    if not isinstance(text, str):
        raise ValueError(f"must be a quoted comparison like {example}, got {text!r}")
    found = _LIMIT.fullmatch(text)
    if found is None:
        raise ValueError(f"{text!r} is not a comparison like {example}")
    sign, number, unit = found.groups()
    amount = float(number)
    if traffic == "sms":
        if unit and unit.upper() != SMS_UNIT:
            raise ValueError(f"{text!r}: SMS are counted, without a unit (e.g. {example})")
        return amount, sign == ">=", SMS_UNIT
    if not unit:
        raise ValueError(f"{text!r} needs a unit: B, KB, MB, GB (1000s) or KiB, MiB, GiB (1024s)")
    name = unit if unit in UNITS else _UNITS_FOLDED.get(unit.lower())
    if name is None:
        raise ValueError(
            f"unknown unit {unit!r} in {text!r}: use B, KB, MB, GB, TB (1000s) or KiB, MiB, "
            "GiB, TiB (1024s)"
        )
    return amount * UNITS[name], sign == ">=", name


def read_usage(record: object, *, tag_list: bool = True) -> Event:
    """A usage record as the `Event` its rules judge, or `EventFormatError` naming the field
    that is wrong (the record is then quarantined with that reason)."""
    if not isinstance(record, dict):
        raise EventFormatError(f"a usage record must be a JSON object, got {type(record).__name__}")
    traffic = _traffic(record.get("traffic_type"))
    record_id = record.get("id")
    if type(record_id) is not int or isinstance(record_id, bool) or not 0 <= record_id < 2**63 - 1:
        raise EventFormatError(f"expected a positive integer id, got {str(record_id)[:40]!r}", "id")
    stamp_field = "end_timestamp" if record.get("end_timestamp") else "start_timestamp"
    stamp = record.get(stamp_field)
    if not stamp:
        raise EventFormatError("missing", "end_timestamp")
    amount = _data_bytes(record.get("volume")) if traffic == "data" else 1.0
    usage = {"traffic": traffic, "amount": amount, "record_id": record_id}
    shaped = {**record, "timestamp": stamp, "usage": usage}
    try:
        event = normalize(shaped, tag_list=tag_list)
    except EventFormatError as error:
        if error.field == "timestamp":
            raise EventFormatError(error.reason, stamp_field) from None
        raise
    mb = amount / BYTES_PER_MB
    description = "SMS usage" if traffic == "sms" else f"data usage {mb:g} MB"
    return event._replace(id=usage_event_id(record_id), description=description)


def _traffic(value: object) -> Traffic:
    if not isinstance(value, Mapping):
        raise EventFormatError("missing or not an object", "traffic_type")
    ident = value.get("id")
    if type(ident) is int and ident in TRAFFIC_TYPES:
        return TRAFFIC_TYPES[ident]
    name = value.get("description")
    if isinstance(name, str) and name.strip().lower() in _TRAFFIC_NAMES:
        return _TRAFFIC_NAMES[name.strip().lower()]
    raise EventFormatError(
        f"unknown traffic type {_shown(value)} (known: 5 Data, 6 SMS)", "traffic_type"
    )


def _data_bytes(volume: object) -> float:
    """`volume.total` (MB) in bytes: a number, or a number in a string, 0 or more."""
    if not isinstance(volume, Mapping):
        raise EventFormatError("missing or not an object", "volume")
    total: Any = volume.get("total")
    if isinstance(total, str):
        try:
            total = float(total.strip())
        except ValueError:
            raise EventFormatError(f"not a number: {total[:40]!r}", "volume.total") from None
    if isinstance(total, bool) or not isinstance(total, int | float):
        raise EventFormatError("missing or not a number", "volume.total")
    if not math.isfinite(total) or total < 0:
        raise EventFormatError(f"must be a volume in MB, 0 or more, got {total!r}", "volume.total")
    return float(total) * BYTES_PER_MB


def _shown(value: Mapping[str, Any]) -> str:
    ident, name = value.get("id"), value.get("description")
    return " ".join(str(part)[:40] for part in (ident, name) if part is not None) or "{}"
