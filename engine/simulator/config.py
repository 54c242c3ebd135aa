"""How a simulator instance is set up. Everything random derives from `seed`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ORGANISATION_ID = 731245
ORGANISATION_NAME = "Acme Fleet GmbH"
FIRST_EVENT_ID = 412907744513201


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Settings of one simulator. Defaults give a quiet 20-device fleet that only speaks when asked.

    `late_fraction` of generated events get a timestamp up to `late_by` seconds in the past, the
    way real events are sometimes stored late; a poller needs an overlap window to catch them.
    `faults` holds fault rules as dicts (see `engine.simulator.faults.FaultRule.parse`).
    `stream_url` turns on Data Streamer push mode: new events are POSTed there in batches.
    `extra_event_types` adds event types (id -> name) to those `/api/v1/event/type` lists.
    """

    seed: int = 0
    endpoints: int = 20
    application_token: str = "demo-application-token"
    token_ttl: float = 14400.0
    event_rate: float = 0.0
    max_per_page: int = 1000
    default_per_page: int = 100
    late_fraction: float = 0.05
    late_by: float = 90.0
    faults: Sequence[Mapping[str, Any]] = ()
    stream_url: str | None = None
    stream_headers: Mapping[str, str] = field(default_factory=dict)
    stream_batch_size: int = 100
    stream_interval: float = 1.0
    stream_retry_initial: float = 0.5
    stream_retry_max: float = 30.0
    # Event types the platform knows beyond the table shipped with the engine (id -> name):
    # `/api/v1/event/type` serves them too, as the real API lists types newer than ours.
    extra_event_types: Mapping[int, str] = field(default_factory=dict)
    # The organisation this simulator is (`engine.simulator.organisations` serves several,
    # one a config): its id and name in tokens and events, and how far its endpoint, SIM and
    # IMSI ids (and ICCIDs) are moved from the defaults, so two fleets share none.
    organisation_id: int = ORGANISATION_ID
    organisation_name: str = ORGANISATION_NAME
    id_offset: int = 0

    def __post_init__(self) -> None:
        if self.endpoints < 1:
            raise ValueError("endpoints must be at least 1")
        if self.max_per_page < 1 or self.default_per_page < 1:
            raise ValueError("max_per_page and default_per_page must be at least 1")
        if not 0.0 <= self.late_fraction <= 1.0:
            raise ValueError("late_fraction must be between 0 and 1")
        if self.event_rate < 0:
            raise ValueError("event_rate must not be negative")
        if self.stream_batch_size < 1:
            raise ValueError("stream_batch_size must be at least 1")
