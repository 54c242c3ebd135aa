"""The ports: what the engine needs of the state it keeps, as small interfaces.

The pipeline, the dispatcher, the digests, the retention, the commands and the HTTP
handlers each depend on the few of these they use, never on a backend class. A store
backend (`engine.store.SqliteStore`, `engine.store.postgres.PostgresStore`, replay's
`engine.store.MemoryStore`) implements the ports; the contract tests in
`tests/test_store_contract.py` run against each. Values crossing a port are
`engine.model`'s; a port raises `engine.errors.StoreError`, never its backend's own errors;
every time it records comes from its caller (`now`), so one clock rules them all. A
default written `...` is the backend's to give (the contract tests pin each, the same for
every backend). The last
section is what actions need of the world outside: the emnify calls and HTTP calls to
receivers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from engine.errors import EngineError
from engine.model import (
    AbsenceMark,
    AttemptHistory,
    AuditRow,
    Batch,
    FollowUpKey,
    Intent,
    IntentStatus,
    LeaseState,
    Member,
    OwnStatusAction,
    ResumeResult,
    RuleOverride,
    Silence,
    StoreCondition,
)


class SeenEvents(Protocol):
    """Which events were evaluated already (the dedup of every source)."""

    def unseen(self, event_ids: Sequence[int], organisation: str = ...) -> set[int]:
        """The ids among `event_ids` not recorded as evaluated (of `organisation`: each
        named under `organisations:` has its own; "" is the single one)."""
        ...

    def seen_count(self) -> int: ...


class DedupHorizon(Protocol):
    """A store that runs for months keeps seen ids only as long as an event may come
    again (the poll overlap and late deliveries), with the time each event had."""

    def prune_seen(self, before: datetime, organisation: str = ...) -> int:
        """Forget the ids of `organisation`'s events older than `before` (past the dedup
        horizon)."""
        ...

    def seen_at(self, event_id: int, organisation: str = ...) -> datetime | None:
        """The timestamp of a seen event, while it is within the dedup horizon."""
        ...


class RuleStateSource(Protocol):
    """What the rules remember, read lazily by `engine.state.RuleMemory`. Every change
    reaches the store through a batch (`UnitOfWork`)."""

    def window(self, rule_id: str, key: str) -> list[float]: ...

    def has_windows_or_throttles(self) -> bool: ...

    def throttle_until(self, rule_id: str, key: str) -> float | None: ...

    def guard_entries(self, scope: str) -> list[float]: ...

    def rule_overrides(self) -> dict[str, RuleOverride]: ...

    def rule_state_version(self) -> int:
        """Changes whenever something outside the pipeline changed the rules' state
        (`rules resume`); a batch judged on another version is refused at commit."""
        ...

    def cancellable_follow_ups(self) -> list[FollowUpKey]:
        """Follow-ups with `cancel_if` that have not run yet (shadow ones included)."""
        ...

    def absence_marks(self) -> list[AbsenceMark]:
        """Every key the absence rules know (`engine.absence`)."""
        ...


class OwnActions(Protocol):
    """The status changes the engine itself made, to recognize the events they cause (its
    echoes): every instance of a cluster reads them from the store."""

    def status_actions(
        self, target: str, kinds: Sequence[str], since: float, until: float
    ) -> list[OwnStatusAction]:
        """Intents of `kinds` on `target` (`sim:ID`, `endpoint:ID`) done, or running, at a
        time (epoch seconds) in [since, until]."""
        ...


class UnitOfWork(Protocol):
    """One batch, one transaction: seen ids, rule state, intents, audit rows, quarantined
    records, digest events and the cursor are recorded together or not at all."""

    def commit_batch(self, batch: Batch, now: datetime) -> int:
        """Record the batch; returns how many intents it created (a repeated idempotency
        key creates none). Raises StaleRuleState when the rules' state changed under it."""
        ...


class RuleControl(Protocol):
    """What operators and reloads change in the rules' state, outside any batch."""

    def reset_rule_windows(self, rule_id: str) -> int: ...

    def guard_summary(self) -> dict[str, tuple[list[float], int]]:
        """Per guard scope: its entries, and per rule the number of held intents."""
        ...

    def resume_rule(
        self,
        rule_id: str,
        *,
        now: datetime,
        release_held: bool = ...,
        by: str = ...,
    ) -> ResumeResult | None:
        """`by`: who resumed it, as its audit row names them (the console's operator)."""
        ...


class PipelineStore(SeenEvents, RuleStateSource, OwnActions, UnitOfWork, Protocol):
    """Everything the pipeline needs: dedup, the rules' memory, and its batch's commit."""

    def reset_rule_windows(self, rule_id: str) -> int: ...


class Outbox(Protocol):
    """The intents waiting to run. In a cluster every instance dispatches: `start_attempt`
    claims an intent for its `owner` until `claim_until` (renewed while the attempt runs;
    another instance takes it over only once that has passed: its owner died), and
    `due_intents` never returns an intent while an earlier due or attempted one is open on
    the same lane (the SIM's, the endpoint's): actions on one target keep their order
    across the cluster."""

    def due_intents(
        self,
        now: datetime,
        limit: int = ...,
        *,
        kinds: Sequence[str] | None = None,
        except_kinds: Sequence[str] = (),
        owner: str | None = None,
        claim_until: datetime | None = None,
    ) -> list[Intent]:
        """Open intents whose time has come, oldest first (see SqliteStore's). With `owner`,
        another owner's claim that has not run out keeps its intent out; with `claim_until`
        too, the intents given are claimed for `owner` until then as they are read (one
        claimed by `owner` already keeps a later end), so that the instances of a cluster
        reading at once are given different intents."""
        ...

    def renew_claims(self, owner: str, intent_ids: Sequence[int], until: datetime) -> int:
        """Extend `owner`'s claims (the attempts it still runs); returns how many it holds."""
        ...

    def next_due(self, after: datetime) -> datetime | None: ...

    def retrying_intents(self) -> list[Intent]: ...

    def start_attempt(
        self,
        intent_id: int,
        now: datetime,
        *,
        owner: str | None = None,
        claim_until: datetime | None = None,
    ) -> int | None:
        """Count an attempt before it is made, and claim the intent; None when it is no
        longer open, or another owner's claim on it still runs."""
        ...

    def attempt_history(self, intent_id: int) -> AttemptHistory | None: ...

    def outcomes_on_endpoint(
        self, action: str, endpoint_id: int, since: datetime, *, excluding_intent: int
    ) -> list[str]: ...

    def finish_intent(
        self,
        intent: Intent,
        status: IntentStatus,
        *,
        now: datetime,
        error: str | None = None,
        due_at: datetime | None = None,
        audit: AuditRow | None = None,
        owner: str | None = None,
    ) -> bool:
        """Record an attempt's outcome (and release `owner`'s claim); False when the intent
        was closed meanwhile or another owner claims it now."""
        ...

    def get_intent(self, intent_id: int) -> Intent | None: ...

    def intents(self, status: IntentStatus | None = None, limit: int = ...) -> list[Intent]: ...

    def requeue(self, intent_id: int, *, now: datetime, audit: AuditRow | None = None) -> bool: ...

    def discard(
        self,
        intent_id: int,
        *,
        now: datetime,
        audit: AuditRow | None = None,
        from_status: IntentStatus = IntentStatus.DEAD,
    ) -> bool:
        """Give up on an intent in `from_status` (dead-lettered, or held) for good."""
        ...

    def release(self, intent_id: int, *, now: datetime, audit: AuditRow | None = None) -> bool:
        """Run a held intent after all: pending with a fresh retry budget, due now (a
        follow-up not due yet keeps its time); False when it is not held."""
        ...


class DigestLedger(Protocol):
    """The events collected for scheduled digests, and each digest's runs."""

    def digest_run_state(self, rule_id: str) -> tuple[datetime, datetime | None] | None: ...

    def start_digest(self, rule_id: str, now: datetime) -> None: ...

    def claim_digest(
        self, rule_id: str, fire_time: datetime, limit: int
    ) -> tuple[int, list[dict[str, Any]]]: ...

    def finish_digest(self, rule_id: str, fire_time: datetime) -> None: ...

    def digest_backlog(self, rule_id: str) -> int: ...


class DigestStore(DigestLedger, UnitOfWork, Protocol):
    """What a digest run needs: its ledger, and a batch to record its intents."""


class AuditLog(Protocol):
    """What was decided and done, for `why` and `status`."""

    def audit_rows(
        self, *, event_id: int | None = None, iccid: str | None = None, limit: int = ...
    ) -> list[dict[str, Any]]: ...

    def intents_for_events(self, event_ids: Sequence[int]) -> list[Intent]: ...

    def latest_audit_rows(self, limit: int = ...) -> list[dict[str, Any]]:
        """The newest decisions, newest first (the console's live list)."""
        ...

    def quarantined(self, limit: int = ...) -> list[dict[str, Any]]: ...

    def decision_summaries(self, iccid: str) -> list[dict[str, Any]]: ...

    def rule_activity(self, since: datetime) -> list[dict[str, Any]]:
        """Per rule with decisions since `since`: `rule_id`, `matches` (its "matched"
        rows), `actions` (actions planned or scheduled) and `last_fired` (epoch seconds of
        its newest planned action, or None), ordered by rule id (the console's rules page)."""
        ...


class Meta(Protocol):
    """Small named values: the poll cursor, the last poll's outcome, markers."""

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def get_cursor(self, organisation: str = ...) -> datetime | None: ...


class Retainer(Protocol):
    """Keeping the store's size bounded (see `engine.retention`)."""

    def prune_older_than(self, before: datetime, limit: int) -> int: ...

    def summarize_decisions(self, keep: int, span: int) -> int | None: ...


class StoreHealth(Protocol):
    """The truth about the store itself, for `/readyz`, `/metrics` and `status`."""

    def condition(self, now: datetime) -> StoreCondition: ...

    def check_integrity(self, budget: float = ...) -> bool: ...

    def counts(self) -> dict[str, int]: ...

    def disk_bytes(self) -> int: ...

    def oldest_kept(self) -> dict[str, datetime | None]: ...

    def close(self) -> None: ...


# -- running together: instances of one engine sharing a store ----------------------------


class Leases(Protocol):
    """Named leases with fencing tokens (the poller's `leader` lease, once-per-cluster
    jobs): one holder at a time, the token bumped whenever the holder changes; a batch
    carries its `Fence` and the store refuses it once the lease has moved on."""

    def acquire_lease(self, name: str, holder: str, ttl: timedelta, now: datetime) -> int | None:
        """Take `name` (free, expired, or `holder`'s own) until now + ttl and return the
        fencing token, or None while another holder's lease runs."""
        ...

    def release_lease(self, name: str, holder: str, now: datetime) -> None:
        """Give the lease up at once (a clean stop), if `holder` has it."""
        ...

    def lease(self, name: str) -> LeaseState | None: ...


class Members(Protocol):
    """Which instances share the store: each says so by a heartbeat (`status` lists them)."""

    def heartbeat(self, member: Member) -> None: ...

    def members(self) -> list[Member]: ...

    def forget_member(self, instance_id: str) -> None: ...


class Silences(Protocol):
    """Operators' silences (`event-engine silence add|list|expire`): kept with who added
    them, when and why, and who ended one early."""

    def add_silence(self, silence: Silence) -> Silence:
        """Keep `silence`; it comes back with its id."""
        ...

    def silences(self, ending_after: datetime) -> list[Silence]:
        """The silences that end after `ending_after` (ended ones too when it is earlier
        than now), the newest first."""
        ...

    def expire_silence(self, silence_id: int, by: str, now: datetime) -> Silence | None:
        """End a silence at `now` (noting who did); None when there is no such silence.
        One that already ended stays as it was."""
        ...


class Store(
    PipelineStore,
    DedupHorizon,
    Leases,
    Members,
    RuleControl,
    Outbox,
    DigestStore,
    AuditLog,
    Meta,
    Retainer,
    StoreHealth,
    Silences,
    Protocol,
):
    """Every port: what a daemon's store backend implements."""

    path: str


# -- Outbound calls: what actions may call, so an action module imports no HTTP library ----


class EmnifyCalls(Protocol):
    """The emnify API calls actions make (`engine.emnify.EmnifyClient` implements them).

    A failure raises `engine.errors.ApiError`. The calls that change something are not
    retried by the implementation once they may have reached emnify: the dispatcher reads
    back (`Action.effect`) before anything is sent again."""

    async def get_sim(self, sim_id: int) -> dict[str, Any]: ...

    async def set_sim_status(self, sim_id: int, status_id: int) -> None: ...

    async def get_endpoint(self, endpoint_id: int) -> dict[str, Any]: ...

    async def set_endpoint_status(self, endpoint_id: int, status_id: int) -> None: ...

    async def send_sms(self, endpoint_id: int, message: dict[str, Any]) -> int | None:
        """The new SMS's id, None when the answer does not say it."""
        ...

    async def list_sms(self, endpoint_id: int) -> list[dict[str, Any]]: ...

    async def get_quota(self, endpoint_id: int, kind: str) -> dict[str, Any] | None:
        """The endpoint's "data" or "sms" quota; None when it has none."""
        ...

    async def set_quota(self, endpoint_id: int, kind: str, quota: dict[str, Any]) -> None:
        """Replace the endpoint's "data" or "sms" quota with `quota` (the API's POST body)."""
        ...

    async def traffic_limit_extension(self, endpoint_id: int) -> dict[str, Any] | None:
        """The endpoint's traffic-limit extension, None when it has none."""
        ...

    async def extend_traffic_limit(self, endpoint_id: int, volume: float) -> None: ...

    async def update_endpoint(self, endpoint_id: int, changes: dict[str, Any]) -> None:
        """A partial update of the endpoint (`tags`, `service_profile`, `imei_lock`, ...)."""
        ...

    async def profiles(self, kind: str) -> list[dict[str, Any]]:
        """The "service_profile" or "tariff_profile" list of the organisation."""
        ...

    async def profile_id(self, kind: str, name: str) -> int | None:
        """The id of the profile of `kind` named `name`, None when there is none (names
        are resolved once and cached)."""
        ...

    async def reset_connectivity(
        self, endpoint_id: int, *, location: bool, pdp_context: bool
    ) -> None: ...

    async def operator_blacklist(self, endpoint_id: int) -> list[int]: ...

    async def set_operator_blacklisted(
        self, endpoint_id: int, operator_id: int, blacklisted: bool
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class ReceiverAnswer:
    """What a receiver answered: its status, and its body when that is small and came
    uncompressed (`None` otherwise: a receiver cannot make the engine read or inflate
    more than a bounded amount)."""

    status: int
    body: bytes | None


class ReceiverError(EngineError):
    """A call to a receiver that got no answer. `reason` is safe to show: it never quotes
    the URL, a header or the transport's own message, any of which may hold a secret."""

    def __init__(self, reason: str, *, retryable: bool):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class Receivers(Protocol):
    """HTTP calls to receivers outside emnify (webhooks), bounded in time and in what is
    read of the answer (`engine.outbound.HttpReceivers` implements it with httpx)."""

    async def call(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: Any = None,
        timeout: float,
    ) -> ReceiverAnswer:
        """Send `body` as JSON (none when None); `timeout` bounds the whole exchange.
        Raises ReceiverError when no answer came."""
        ...

    def origin(self, url: str) -> tuple[str, str, int | None]:
        """Scheme, host and port of `url` as a call would reach them (the default port when
        the URL has none); ValueError when `url` is not one a call could use."""
        ...
