"""What the store keeps: intents (the outbox), audit rows, and the batch that records them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class IntentStatus(StrEnum):
    PENDING = "pending"  # waiting to run (or to run again after a retryable failure)
    RUNNING = "running"  # an attempt started; if the process died, it is due again
    DONE = "done"
    FAILED = "failed"  # a permanent failure (e.g. HTTP 4xx): not retried
    DEAD = "dead"  # retries exhausted: waits for `dead-letters retry|discard`
    DISCARDED = "discarded"
    SHADOW = "shadow"  # planned by a rule in shadow mode: recorded, never run


@dataclass(frozen=True, slots=True)
class Intent:
    """One action to carry out, as planned for one event by one rule."""

    idempotency_key: str
    event_id: int | None
    rule_id: str
    action_index: int
    kind: str
    params: dict[str, Any]
    target: dict[str, Any]
    status: IntentStatus = IntentStatus.PENDING
    due_at: datetime | None = None
    id: int | None = None
    attempts: int = 0
    created_at: datetime | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One decision: a rule matched, an action was planned, ran, failed or was skipped."""

    event_id: int | None
    rule_id: str | None
    action: str | None
    outcome: str
    detail: str | None = None
    sim_id: int | None = None
    endpoint_id: int | None = None
    iccid: str | None = None
    intent_id: int | None = None


@dataclass(slots=True)
class Batch:
    """Everything one batch of events changes, committed in one transaction."""

    seen: list[tuple[int, datetime]] = field(default_factory=list)
    intents: list[Intent] = field(default_factory=list)
    audit: list[AuditRow] = field(default_factory=list)
    quarantine: list[tuple[str, str, str]] = field(default_factory=list)  # source, reason, raw
    cursor: datetime | None = None
