"""The engine's own events: what it has to say about itself (a poll failing, the API out of
reach, a guard tripped), shaped like emnify's events so that rules match, judge and route
them like any other (`when: {source: engine, type: poll_failing}`), and the audit log keeps
them. They never leave the engine: nothing sends them to emnify.

This module is the core's part of it, pure: the kinds, their ids, and the record an event
becomes. Two doors lead in. Adapters and services call `ServiceContext.emit_engine_event`
(`engine.emitter.EngineEvents`), which builds the record and hands it to the pipeline as a
batch of its own. The core (the pipeline's guard, the loop breaker) cannot do I/O, so it
appends an `EngineEventDraft` to the `BatchResult` it returns, and the daemon emits the
drafts once that batch is committed: a batch rolled back says nothing.

Ids: an engine event's id is at or above `ENGINE_EVENT_IDS` (2**62), far beyond any id
emnify hands out, so the two never collide in the seen ids, the outbox's keys or `why`.
Its type ids (1001 and up) and its source id (1000) are beyond emnify's too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from engine.events import ENGINE_SOURCE_ID, SOURCES, format_timestamp

ENGINE_EVENT_IDS = 2**62  # the first engine event id; emnify's ids stay far below
_ID_SPAN = 2**62  # engine event ids lie in [2**62, 2**63): SQLite's signed 64-bit integers


@dataclass(frozen=True, slots=True)
class EngineEventKind:
    """One kind of engine event: its name (the event type's description), type id and
    severity (emnify's: 0 Info, 1 Warn, 2 Critical), and what it means, for the docs."""

    name: str
    type_id: int
    severity: int
    meaning: str
    recovers: str | None = None  # the kind that says it is over, if any


def _kinds() -> dict[str, EngineEventKind]:
    # A condition and its recovery: type ids n and n + 1, the recovery at Info.
    pairs = [
        (1001, "poll_failing", 2, "polls of the Event API have failed for a while"),
        (1003, "api_unreachable", 2, "the emnify API does not answer (network, timeouts, 5xx)"),
        (1005, "auth_failed", 2, "emnify refused the application token"),
        (1007, "poll_lag_exceeded", 1, "the poller's cursor is further behind than allowed"),
        (1009, "stream_silent", 1, "the Data Streamer sends nothing while the poller sees events"),
        (1011, "data_stream_error", 2, "emnify reports the data stream in Error"),
    ]
    single = [
        (1021, "action_dead_lettered", 2, "an action gave up retrying (see `dead-letters`)"),
        (1022, "guard_tripped", 2, "a blast-radius guard switched a rule to shadow"),
        (1023, "target_flapping", 2, "a SIM or endpoint changed status too often: held"),
        (1024, "action_failed", 1, "an action failed for good (e.g. no SIM to act on)"),
    ]
    kinds: dict[str, EngineEventKind] = {}
    for type_id, name, severity, meaning in pairs:
        recovered = f"{name}_recovered"
        kinds[name] = EngineEventKind(name, type_id, severity, meaning, recovered)
        kinds[recovered] = EngineEventKind(recovered, type_id + 1, 0, f"over: {meaning}")
    for type_id, name, severity, meaning in single:
        kinds[name] = EngineEventKind(name, type_id, severity, meaning)
    return kinds


KINDS: Mapping[str, EngineEventKind] = _kinds()


def kind_of(name: str) -> EngineEventKind:
    """The kind named `name`; ValueError (listing the kinds) when there is none."""
    try:
        return KINDS[name]
    except KeyError:
        known = ", ".join(KINDS)
        raise ValueError(f"no engine event kind {name!r} (known: {known})") from None


@dataclass(frozen=True, slots=True)
class EngineEventDraft:
    """An engine event the core wants said, said by the daemon once its batch committed.

    `detail` is the event's `detail` object; `sim` and `endpoint` are emnify-shaped objects
    (`{"id": 7, "iccid": "..."}`) when the event is about one; `at`, the moment it is about
    (the event time that tripped a guard), defaults to the time it is emitted."""

    kind: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    sim: Mapping[str, Any] | None = None
    endpoint: Mapping[str, Any] | None = None
    at: datetime | None = None


def engine_event_record(draft: EngineEventDraft, *, at: datetime, instance: str) -> dict[str, Any]:
    """The emnify-shaped record of `draft`, emitted at `at` by `instance`. Its id is derived
    from what it says (kind, instance, moment, detail): the same draft emitted twice (a
    retry after the store failed) is judged once."""
    kind = kind_of(draft.kind)
    moment = draft.at or at
    detail = {**draft.detail, "instance": instance}
    record: dict[str, Any] = {
        "id": engine_event_id(kind.name, instance, moment, detail),
        "timestamp": format_timestamp(moment),
        "alert": kind.severity > 0,
        "description": _describe(kind, draft.detail),
        "event_type": {"id": kind.type_id, "description": kind.name},
        "event_source": {"id": ENGINE_SOURCE_ID, "description": SOURCES[ENGINE_SOURCE_ID]},
        "event_severity": {"id": kind.severity, "description": _SEVERITY[kind.severity]},
        "detail": detail,
    }
    if draft.sim is not None:
        record["sim"] = dict(draft.sim)
    if draft.endpoint is not None:
        record["endpoint"] = dict(draft.endpoint)
    return record


def engine_event_id(kind: str, instance: str, moment: datetime, detail: Mapping[str, Any]) -> int:
    """A stable id in the engine's range for what an event says."""
    text = f"{kind}|{instance}|{moment.isoformat()}|{sorted(detail.items())!r}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return ENGINE_EVENT_IDS + int.from_bytes(digest, "big") % _ID_SPAN


def is_engine_event_id(event_id: int | None) -> bool:
    return event_id is not None and event_id >= ENGINE_EVENT_IDS


def _describe(kind: EngineEventKind, detail: Mapping[str, Any]) -> str:
    """The event's description: what it means, the reason when there is one, and whose
    when it concerns one of several organisations."""
    reason = detail.get("reason")
    text = f"{kind.meaning}: {reason}" if isinstance(reason, str) and reason else kind.meaning
    organisation = detail.get("organisation")
    return f"{text} (organisation {organisation})" if organisation else text


_SEVERITY = {0: "Info", 1: "Warn", 2: "Critical"}


def catalog_records() -> list[dict[str, Any]]:
    """The engine's event types as catalog records (`engine.rules.catalog`)."""
    return [
        {
            "id": k.type_id,
            "description": k.name,
            "source": "Engine",
            "severity": _SEVERITY[k.severity],
        }
        for k in KINDS.values()
    ]
