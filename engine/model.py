"""The engine's domain values: intents (the outbox), audit rows, the rules' memory, and the
batch that records one batch of events. The core builds them and the stores keep them;
none of them knows how it is stored."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson

from engine.engine_events import EngineEventDraft


class IntentStatus(StrEnum):
    PENDING = "pending"  # waiting to run (or to run again after a retryable failure)
    RUNNING = "running"  # an attempt started; if the process died, it is due again
    DONE = "done"
    FAILED = "failed"  # a permanent failure (e.g. HTTP 4xx): not retried
    DEAD = "dead"  # retries exhausted: waits for `dead-letters retry|discard`
    DISCARDED = "discarded"
    SHADOW = "shadow"  # planned by a rule in shadow mode: recorded, never run
    HELD = "held"  # stopped by the blast-radius guard: kept for review, run only if released
    CANCELLED = "cancelled"  # a follow-up whose `cancel_if` a later event met before it was due


@dataclass(slots=True)  # read-only by convention: frozen triples the cost of building one
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


@dataclass(slots=True)  # read-only by convention: frozen triples the cost of building one
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
    event_ts: float | None = None  # the event's own time (epoch seconds), for `why`
    # On a rule's `matched` row: what it read and counted on its way to the verdict (the
    # event's `when` values, the condition's variables, threshold, throttle, guard,
    # silence), filled in while the rule is judged; the stores keep it as JSON text.
    steps: dict[str, Any] | None = None
    # The configured organisation the event came from (`organisations:`); "" for the single
    # organisation of a config without that key (and for the engine's own events).
    organisation: str = ""


def steps_text(steps: dict[str, Any] | None) -> str | None:
    """An audit row's `steps` as the stores keep them: JSON text (None stays None)."""
    return None if steps is None else orjson.dumps(steps, default=str).decode()


@dataclass(frozen=True, slots=True)
class FollowUpKey:
    """A follow-up a later event may cancel (its step has `cancel_if`): which key cancels it.

    `key_path` is the dotted event path the rule groups by (`sim.id` unless its threshold or
    throttle says otherwise); `key` is that path's value in the event that planned it."""

    idempotency_key: str
    rule_id: str
    action_index: int
    event_id: int
    key_path: str
    key: str
    planned_at: datetime
    due_at: datetime
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class FollowUpCancel:
    """A later event met a follow-up's `cancel_if`. `audit` is recorded when the follow-up was
    still waiting; `too_late` when the dispatcher had already taken it."""

    idempotency_key: str
    audit: AuditRow
    too_late: AuditRow
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class RuleOverride:
    """A rule switched to another mode at run time (the blast-radius guard → shadow)."""

    rule_id: str
    mode: str
    reason: str
    since: datetime  # event time of the trip
    event_id: int | None = None


@dataclass(frozen=True, slots=True)
class AbsenceMark:
    """What an absence rule knows of one key (`engine.absence`): when it was last seen (event
    time, epoch seconds) as far as event time is known to be complete, whether the rule has
    fired for that silence, and the times of matching events not yet known to be complete.

    `seen` is False for a key from the rule's `keys:` list that has not reported since the
    rule started (`last_seen` is then that start). `last_event` is the newest matching
    event's identity (id, timestamp, type, sim, endpoint) as JSON text, for the firing's
    target and templates."""

    rule_id: str
    key: str
    last_seen: float
    fired: bool = False
    seen: bool = True
    pending: tuple[float, ...] = ()
    last_event: str | None = None


@dataclass(slots=True)
class RuleStateChanges:
    """What one batch changed in the rules' memory: written with the batch or not at all.

    Windows and guard entries are event times in epoch seconds; each dict holds the state
    after the batch for the keys it touched (an empty window means: delete it)."""

    windows: dict[tuple[str, str], tuple[list[float], float]] = field(default_factory=dict)
    throttles: dict[tuple[str, str], float] = field(default_factory=dict)
    guards: dict[str, list[float]] = field(default_factory=dict)
    overrides: list[RuleOverride] = field(default_factory=list)
    follow_ups: list[FollowUpKey] = field(default_factory=list)
    cancels: list[FollowUpCancel] = field(default_factory=list)
    # Absence rules' keys after the batch; None: the key is forgotten.
    absences: dict[tuple[str, str], AbsenceMark | None] = field(default_factory=dict)
    # Drop stored windows, throttles and cancel keys that ended before this (event time).
    prune_before: float | None = None
    # The rule-state version the batch was judged on; a different one at commit (another
    # batch changed the rules' state, or someone ran `rules resume`, meanwhile) makes the
    # commit fail with StaleRuleState. A commit that changes the state sets the new one.
    version: int | None = None

    def changes_state(self) -> bool:
        """Whether committing this changes what other batches judge on (pruning what has
        ended does not: it changes no verdict)."""
        return bool(
            self.windows
            or self.throttles
            or self.guards
            or self.overrides
            or self.follow_ups
            or self.cancels
            or self.absences
        )


@dataclass(frozen=True, slots=True)
class DigestEvent:
    """An event a digest rule collected for its next run: `payload` is its JSON text (the
    whole event or the fields the digest includes)."""

    rule_id: str
    event_id: int
    event_ts: datetime
    payload: str


@dataclass(frozen=True, slots=True)
class Silence:
    """An operator's silence (`event-engine silence add`): matches it covers run no action
    from `created_at` until `ends_at`. `matchers` are (field, value) pairs, all of which
    must hold: `iccid`, `endpoint` (id or name), `tag` or `rule`. Who added it, when and why
    are kept, and who ended it early (`silence expire`)."""

    matchers: tuple[tuple[str, str], ...]
    comment: str
    created_by: str
    created_at: datetime
    ends_at: datetime
    id: int | None = None
    expired_by: str | None = None
    expired_at: datetime | None = None

    def active_at(self, moment: datetime) -> bool:
        return self.created_at <= moment < self.ends_at


@dataclass(frozen=True, slots=True)
class Fence:
    """Whose lease a batch is committed under: the store refuses the batch unless `holder`
    still holds lease `name` with this `token` (a leader that was paused past its lease,
    and woke up after another took over, can neither move the cursor nor plan actions)."""

    name: str
    holder: str
    token: int


@dataclass(frozen=True, slots=True)
class LeaseState:
    """Who holds a lease, under which fencing token, until when (the holder renews it)."""

    name: str
    holder: str | None
    token: int
    expires_at: datetime
    changed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Member:
    """One engine instance sharing the store, as its last heartbeat described it."""

    instance_id: str
    host: str
    pid: int
    version: str
    rules_hash: str
    started_at: datetime
    heartbeat_at: datetime
    leader: bool = False


@dataclass(slots=True)
class Batch:
    """Everything one batch of events changes, committed in one transaction."""

    seen: list[tuple[int, datetime]] = field(default_factory=list)
    intents: list[Intent] = field(default_factory=list)
    audit: list[AuditRow] = field(default_factory=list)
    quarantine: list[tuple[str, str, str]] = field(default_factory=list)  # source, reason, raw
    cursor: datetime | None = None
    state: RuleStateChanges = field(default_factory=RuleStateChanges)
    digest_events: list[DigestEvent] = field(default_factory=list)
    # The lease the batch is committed under (the poller's), or None (a push, a digest).
    fence: Fence | None = None
    # Engine events the core drafted while judging (a guard tripped, a target flapping):
    # emitted by the daemon once this batch is committed (`engine.engine_events`).
    engine_events: list[EngineEventDraft] = field(default_factory=list)
    # The organisation whose events these are (`organisations:`): its seen ids and cursor
    # are its own. "" is the single organisation of a config without that key.
    organisation: str = ""


def cursor_key(organisation: str = "") -> str:
    """The meta key of an organisation's poll cursor ("cursor" for the single one, so a
    store from before `organisations:` existed goes on where it was)."""
    return f"cursor:{organisation}" if organisation else "cursor"


GLOBAL_GUARD = "*"  # the guard scope of `guard.max_actions` (no rule id can be "*")
# A SIM's or endpoint's status, as the loop breaker's scope (`sim:ID`, `endpoint:ID`: no rule
# id has a colon), shares the guard's tables: its window of status changes is a guard scope,
# and its hold a `RuleOverride` of mode HOLD.
HOLD = "hold"


@dataclass(frozen=True, slots=True)
class OwnStatusAction:
    """A status change the engine made (or, in a replay, planned) on one target (`sim:ID`,
    `endpoint:ID`): what an event of the type its kind causes is correlated with.

    `at` is when it took effect (epoch seconds): its attempt's time in the outbox, the
    planning event's time in a replay. `intent_id` is None where intents have no id."""

    target: str
    kind: str
    rule_id: str
    idempotency_key: str
    at: float
    intent_id: int | None = None


@dataclass(frozen=True, slots=True)
class AttemptHistory:
    """The attempts of one intent: how many ever started, the first and the latest start,
    and where its retry deadline counts from (the first attempt, or the last requeue)."""

    total: int
    first_at: datetime
    last_at: datetime
    deadline_from: datetime


@dataclass(frozen=True, slots=True)
class ResumeResult:
    override: RuleOverride
    released: int  # held intents put back in the queue
    still_held: int


@dataclass(frozen=True, slots=True)
class StoreCondition:
    """Whether the store can do its job right now, and in words why not (for `/readyz`)."""

    ok: bool
    detail: str
