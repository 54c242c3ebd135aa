"""The dispatcher: runs the intents waiting in the outbox, with retries and a dead letter.

Each attempt is counted in the store before it is made, so after a crash the action knows
it may have run already (status actions read the state first, webhooks carry the same
`Idempotency-Key`, an SMS is looked for before it is sent again). Intents on the same SIM or
endpoint run one after another in their planned order; different targets run side by side.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import httpx
import structlog

from engine import secrets
from engine.actions import ACTIONS, ActionContext, PlannedAction
from engine.errors import ActionError, ApiError
from engine.store import AuditRow, Intent, IntentStatus, SqliteStore

if TYPE_CHECKING:
    from engine.emnify import EmnifyClient

_log = structlog.get_logger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long an intent keeps trying: exponential backoff with full jitter."""

    max_attempts: int = 8
    initial_backoff: timedelta = timedelta(seconds=2)
    max_backoff: timedelta = timedelta(minutes=10)
    deadline: timedelta = timedelta(hours=24)

    def next_try(self, attempts: int, now: datetime, rng: random.Random) -> datetime:
        ceiling = min(
            self.max_backoff.total_seconds(),
            self.initial_backoff.total_seconds() * 2 ** max(attempts - 1, 0),
        )
        return now + timedelta(seconds=rng.uniform(ceiling / 2, ceiling))


@dataclass(slots=True)
class DispatchStats:
    by_outcome: dict[tuple[str, str], int]

    def add(self, kind: str, outcome: str) -> None:
        self.by_outcome[(kind, outcome)] = self.by_outcome.get((kind, outcome), 0) + 1


class Dispatcher:
    def __init__(
        self,
        store: SqliteStore,
        client: EmnifyClient,
        http: httpx.AsyncClient,
        *,
        policy: RetryPolicy | None = None,
        concurrency: int = 4,
        clock: Callable[[], datetime] = utcnow,
        on_outcome: Callable[[str, str], None] | None = None,
        on_attempt: Callable[[str, bool, float], None] | None = None,
    ):
        self.store = store
        self.client = client
        self.http = http
        self.policy = policy or RetryPolicy()
        self.clock = clock
        self.stats = DispatchStats({})
        self._on_outcome = on_outcome
        self._on_attempt = on_attempt  # (kind, succeeded, seconds): for latency metrics
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._rng = random.Random()

    def wake(self) -> None:
        """New intents were committed: look at the outbox now rather than at the next tick."""
        self._wake.set()

    async def run_due(self) -> int:
        """Run every intent that is due now; returns how many were attempted."""
        intents = self.store.due_intents(self.clock(), limit=200)
        if not intents:
            return 0
        lanes: dict[str, list[Intent]] = defaultdict(list)
        for intent in intents:
            lanes[_lane(intent)].append(intent)
        await asyncio.gather(*(self._run_lane(lane) for lane in lanes.values()))
        return len(intents)

    async def run_forever(self, stop: asyncio.Event, idle: float = 1.0) -> None:
        """Dispatch until `stop` is set; in-flight attempts finish before it returns."""
        while not stop.is_set():
            ran = await self.run_due()
            if ran:
                continue
            self._wake.clear()
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopper}, timeout=idle, return_when="FIRST_COMPLETED")
            waiter.cancel()
            stopper.cancel()

    async def _run_lane(self, lane: list[Intent]) -> None:
        for intent in lane:
            async with self._slots:
                await self._attempt(intent)

    async def _attempt(self, intent: Intent) -> None:
        assert intent.id is not None
        action = ACTIONS.get(intent.kind)
        if action is None:
            self._finish(intent, IntentStatus.FAILED, "failed", f"unknown action {intent.kind!r}")
            return
        attempt = self.store.start_attempt(intent.id)
        ctx = ActionContext(
            client=self.client,
            http=self.http,
            idempotency_key=intent.idempotency_key,
            attempt=attempt,
            created_at=intent.created_at or self.clock(),
        )
        planned = PlannedAction(intent.kind, intent.params, intent.target)
        started = time.monotonic()
        try:
            outcome = await action.run(planned, ctx)
        except asyncio.CancelledError:
            # Shutdown mid-call: leave it due again; the attempt counter already says it ran.
            self.store.finish_intent(intent, IntentStatus.PENDING, error="interrupted")
            raise
        except (ActionError, ApiError) as error:
            self._timed(intent, False, started)
            self._failed(intent, attempt, error.retryable, secrets.redact(str(error)))
        except Exception as error:  # a bug must not stop the daemon; keep the intent
            self._timed(intent, False, started)
            _log.exception("action crashed", intent_id=intent.id, action=intent.kind)
            self._failed(intent, attempt, True, f"internal error: {type(error).__name__}")
        else:
            self._timed(intent, True, started)
            self._finish(intent, IntentStatus.DONE, outcome, None)

    def _timed(self, intent: Intent, ok: bool, started: float) -> None:
        if self._on_attempt is not None:
            self._on_attempt(intent.kind, ok, time.monotonic() - started)

    def _failed(self, intent: Intent, attempt: int, retryable: bool, reason: str) -> None:
        now = self.clock()
        created = intent.created_at or now
        if not retryable:
            self._finish(intent, IntentStatus.FAILED, "failed", reason)
        elif attempt >= self.policy.max_attempts or now - created >= self.policy.deadline:
            self._finish(intent, IntentStatus.DEAD, "dead", f"gave up after {attempt}: {reason}")
        else:
            due = self.policy.next_try(attempt, now, self._rng)
            _log.warning(
                "action failed, will retry",
                intent_id=intent.id,
                action=intent.kind,
                attempt=attempt,
                retry_at=due.isoformat(),
                reason=reason,
            )
            self.store.finish_intent(
                intent,
                IntentStatus.PENDING,
                error=reason,
                due_at=due,
                audit=_audit(intent, "retry", f"attempt {attempt}: {reason}"),
            )
            self.stats.add(intent.kind, "retry")

    def _finish(
        self, intent: Intent, status: IntentStatus, outcome: str, error: str | None
    ) -> None:
        self.store.finish_intent(intent, status, error=error, audit=_audit(intent, outcome, error))
        self.stats.add(intent.kind, outcome.split(" ")[0])
        if self._on_outcome:
            self._on_outcome(intent.kind, outcome)
        log = _log.info if status is IntentStatus.DONE else _log.warning
        log(
            "action " + status.value,
            intent_id=intent.id,
            rule=intent.rule_id,
            action=intent.kind,
            event_id=intent.event_id,
            outcome=outcome,
            **({"error": error} if error else {}),
            **{k: v for k, v in intent.target.items() if v is not None},
        )


def _lane(intent: Intent) -> str:
    target = intent.target
    if intent.kind in ("suspend_sim", "activate_sim") and target.get("sim_id") is not None:
        return f"sim:{target['sim_id']}"
    if target.get("endpoint_id") is not None and intent.kind != "webhook":
        return f"endpoint:{target['endpoint_id']}"
    return f"intent:{intent.id}"


def _audit(intent: Intent, outcome: str, detail: str | None) -> AuditRow:
    target = intent.target
    return AuditRow(
        event_id=intent.event_id,
        rule_id=intent.rule_id,
        action=intent.kind,
        outcome=outcome,
        detail=detail,
        sim_id=target.get("sim_id"),
        endpoint_id=target.get("endpoint_id"),
        iccid=target.get("iccid"),
        intent_id=intent.id,
    )
