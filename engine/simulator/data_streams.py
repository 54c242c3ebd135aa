"""The organisation's data streams, as `GET /api/v2/data_stream` shows them: each with a
status that a test (or the demo) can put in Error, and that `POST …/{id}/restart` puts back
to Running (emnify-api.md §8: statuses 1 Running, 2 Paused, 3 Error, 4 Pending; a stream
goes to Error once its destination failed long enough, and `/restart` resumes it).

emnify's page on the statuses (docs.emnify.com/developers/emnify-rest-api/enterprise/
integrations/get-data-streamer-statuses) adds that a misconfigured stream keeps failing after
a restart, and that `GET /api/v2/data_stream/status` lists them as `{id, description}`.

Only what the engine's watchdog reads is modelled: id, name, type, status, the errors that
put it in Error (with their time), and how often it was restarted.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from engine.events import format_timestamp

STATUSES = {1: "Running", 2: "Paused", 3: "Error", 4: "Pending"}
RUNNING, PAUSED, ERROR, PENDING = 1, 2, 3, 4
EVENT_RECORDS = {"id": 2, "description": "Event records"}  # data_stream_type 2


@dataclass(slots=True)
class _Stream:
    id: int
    name: str
    status: int = RUNNING
    errors: list[dict[str, Any]] = field(default_factory=list)
    restarts: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "data_stream_type": EVENT_RECORDS,
            "status": {"id": self.status, "description": STATUSES[self.status]},
            "destination": {"connection_type": "RestAPI", "format": "Json"},
            "errors": list(self.errors[-10:]),
        }


class UnknownStream(LookupError):
    pass


class DataStreams:
    """The data streams of the simulated organisation; one event stream to begin with."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[int, _Stream] = {}
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._streams = {1: _Stream(1, "rules-engine")}

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [s.as_json() for s in self._streams.values()]

    def get(self, stream_id: int) -> dict[str, Any]:
        with self._lock:
            return self._stream(stream_id).as_json()

    def fail(self, stream_id: int, reason: str, at: datetime) -> None:
        """The destination failed long enough: the stream is in Error."""
        with self._lock:
            stream = self._stream(stream_id)
            stream.status = ERROR
            stream.errors.append({"timestamp": format_timestamp(at), "message": reason})

    def set_status(self, stream_id: int, status: int) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}")
        with self._lock:
            self._stream(stream_id).status = status

    def restart(self, stream_id: int) -> None:
        with self._lock:
            stream = self._stream(stream_id)
            stream.status = RUNNING
            stream.restarts += 1

    def restarts(self, stream_id: int) -> int:
        with self._lock:
            return self._stream(stream_id).restarts

    def _stream(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise UnknownStream(f"DataStream with id {stream_id} not found")
        return stream
