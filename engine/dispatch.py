"""The dispatcher: runs the intents waiting in the outbox, with retries and a dead letter.

Each attempt is counted in the store before it is made, so after a crash the action knows
it may have run already (status actions read the state first, webhooks carry the same
`Idempotency-Key`, an SMS is looked for before it is sent again). Intents on the same SIM or
endpoint run one after another in their planned order; different targets run side by side.
An intent waiting for a retry holds back the later ones on its target (a follow-up "activate
again" never overtakes the "suspend" it follows).

A failure is retried when it is transient (429, 5xx, timeouts, connection errors), with
exponential backoff and jitter, honouring `Retry-After`, until `max_attempts` or the
`deadline` (counted from the first attempt) runs out: then the intent is dead-lettered with
its last error and waits for `event-engine dead-letters retry|discard`. Other failures
(4xx, a template that cannot render) fail the intent at once.
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
from engine.actions import ACTIONS, Action, ActionContext, PlannedAction
from engine.errors import ActionError, ApiError
from engine.store import AuditRow, Intent, IntentStatus, SqliteStore
from engine.store.sqlite import AttemptHistory

if TYPE_CHECKING:
    from engine.emnify import EmnifyClient

_log = structlog.get_logger(__name__)

# How far back the outcomes of sibling intents are read, before this intent's first attempt.
_SIBLING_MARGIN = timedelta(minutes=10)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long an intent keeps trying: exponential backoff with full jitter.

    `deadline` counts from the first attempt (so a follow-up due in 24h gets its full
    deadline too). `settle_time` is how long after an attempt of an action that cannot be
    repeated (an SMS) the next attempt waits before it looks whether the first took effect.
    """

    max_attempts: int = 8
    initial_backoff: timedelta = timedelta(seconds=2)
    max_backoff: timedelta = timedelta(minutes=10)
    deadline: timedelta = timedelta(hours=24)
    settle_time: timedelta = timedelta(seconds=30)

    def next_try(self, attempts: int, now: datetime, rng: random.Random) -> datetime:
        ceiling = min(
            self.max_backoff.total_seconds(),
            self.initial_backoff.total_seconds() * 2 ** max(attempts - 1, 0),
        )
        return now + timedelta(seconds=rng.uniform(ceiling / 2, ceiling))


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
        self._on_outcome = on_outcome
        self._on_attempt = on_attempt
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self._held_until: datetime | None = None  # when the earliest held-back lane may move
        self._rng = random.Random()

    def wake(self) -> None:
        """New intents were committed: look at the outbox now rather than at the next tick."""
        self._wake.set()

    async def run_due(self) -> int:
        """Run every intent that is due now; returns how many were taken up."""
        intents = self.store.due_intents(self.clock(), limit=200)
        if not intents:
            return 0
        # The first intent of each target that is still waiting for a retry: nothing
        # planned after it on that target may run before it is through.
        held: dict[str, Intent] = {}
        for waiting in self.store.retrying_intents():
            held.setdefault(_lane(waiting), waiting)
        lanes: dict[str, list[Intent]] = defaultdict(list)
        self._held_until = None
        for intent in intents:
            lane = _lane(intent)
            blocker = held.get(lane)
            if blocker is not None and (blocker.id or 0) < (intent.id or 0):
                if blocker.due_at is not None:
                    self._held_until = min(self._held_until or blocker.due_at, blocker.due_at)
                continue
            lanes[lane].append(intent)
        await asyncio.gather(*(self._run_lane(lane) for lane in lanes.values()))
        return sum(len(lane) for lane in lanes.values())

    async def run_forever(self, stop: asyncio.Event, idle: float = 1.0) -> None:
        """Dispatch until `stop` is set. Attempts in flight then finish; intents not yet
        started stay pending for the next start."""
        self._stop = stop
        while not stop.is_set():
            ran = await self.run_due()
            if ran:
                continue
            self._wake.clear()
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait(
                {waiter, stopper}, timeout=self._idle_wait(idle), return_when="FIRST_COMPLETED"
            )
            waiter.cancel()
            stopper.cancel()

    def _idle_wait(self, idle: float) -> float:
        """Until the next intent is due (a follow-up, a retry), at most `idle` seconds."""
        due = self.store.next_due()
        if due is None:
            return idle
        now = self.clock()
        if due <= now and self._held_until is not None:
            due = self._held_until  # what is due waits behind a retry
        return min(idle, max((due - now).total_seconds(), 0.01))

    async def _run_lane(self, lane: list[Intent]) -> None:
        for intent in lane:
            async with self._slots:
                if self._stop is not None and self._stop.is_set():
                    return  # shutting down: what has not started stays pending
                closed = await self._attempt(intent)
            if not closed:
                return  # it waits for a retry: the rest of its target waits behind it

    async def _attempt(self, intent: Intent) -> bool:
        """One attempt; True when the intent is closed (done, failed, dead), False when it
        waits for another attempt."""
        assert intent.id is not None
        action = ACTIONS.get(intent.kind)
        if action is None:
            self._finish(intent, IntentStatus.FAILED, "failed", f"unknown action {intent.kind!r}")
            return True
        now = self.clock()
        history = self.store.attempt_history(intent.id)
        if not action.repeatable and history is not None:
            settled = history.last_at + self.policy.settle_time
            if now < settled:
                # An earlier attempt may still be landing (a timed-out request, a crash
                # mid-call): look only once it would have.
                self.store.finish_intent(
                    intent, IntentStatus.PENDING, error=intent.last_error, due_at=settled
                )
                return False
        attempt = self.store.start_attempt(intent.id)
        ctx = self._context(intent, action, history, now)
        planned = PlannedAction(intent.kind, intent.params, intent.target)
        started = time.monotonic()
        try:
            outcome = await action.run(planned, ctx)
        except asyncio.CancelledError:
            # Shutdown mid-call: leave it due again; the attempt counter already says it ran.
            self.store.finish_intent(intent, IntentStatus.PENDING, error="interrupted")
            raise
        except (ActionError, ApiError) as error:
            self._attempted(intent, False, started)
            retry_after = error.retry_after if isinstance(error, ApiError) else None
            deadline_from = history.deadline_from if history is not None else now
            return self._failed(
                intent,
                attempt,
                _transient(error),
                secrets.redact(str(error)),
                deadline_from=deadline_from,
                retry_after=retry_after,
            )
        except Exception as error:  # a bug must not stop the daemon; keep the intent
            self._attempted(intent, False, started)
            _log.exception("action crashed", intent_id=intent.id, action=intent.kind)
            deadline_from = history.deadline_from if history is not None else now
            return self._failed(
                intent,
                attempt,
                True,
                f"internal error: {type(error).__name__}",
                deadline_from=deadline_from,
            )
        self._attempted(intent, True, started)
        self._finish(intent, IntentStatus.DONE, outcome, None)
        return True

    def _context(
        self,
        intent: Intent,
        action: type[Action],
        history: AttemptHistory | None,
        now: datetime,
    ) -> ActionContext:
        assert intent.id is not None
        first_attempt_at = history.first_at if history is not None else now
        siblings: tuple[str, ...] = ()
        endpoint_id = intent.target.get("endpoint_id")
        if not action.repeatable and history is not None and isinstance(endpoint_id, int):
            siblings = tuple(
                self.store.outcomes_on_endpoint(
                    intent.kind,
                    endpoint_id,
                    first_attempt_at - _SIBLING_MARGIN,
                    excluding_intent=intent.id,
                )
            )
        return ActionContext(
            client=self.client,
            http=self.http,
            idempotency_key=intent.idempotency_key,
            attempt=(history.total if history is not None else 0) + 1,
            created_at=intent.created_at or now,
            first_attempt_at=first_attempt_at,
            sibling_outcomes=siblings,
        )

    def _attempted(self, intent: Intent, ok: bool, started: float) -> None:
        if self._on_attempt is not None:
            self._on_attempt(intent.kind, ok, time.monotonic() - started)

    def _failed(
        self,
        intent: Intent,
        attempt: int,
        retryable: bool,
        reason: str,
        *,
        deadline_from: datetime,
        retry_after: float | None = None,
    ) -> bool:
        """Record a failed attempt; True when that closed the intent."""
        now = self.clock()
        if not retryable:
            self._finish(intent, IntentStatus.FAILED, "failed", reason)
            return True
        due = self.policy.next_try(attempt, now, self._rng)
        if retry_after is not None:
            wait = min(retry_after, self.policy.max_backoff.total_seconds())
            due = max(due, now + timedelta(seconds=wait))
        if attempt >= self.policy.max_attempts:
            self._finish(intent, IntentStatus.DEAD, "dead", f"gave up after {attempt}: {reason}")
            return True
        if due - deadline_from > self.policy.deadline:
            self._finish(
                intent,
                IntentStatus.DEAD,
                "dead",
                f"gave up after {attempt} (deadline {self.policy.deadline} passed): {reason}",
            )
            return True
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
        return False

    def _finish(
        self, intent: Intent, status: IntentStatus, outcome: str, error: str | None
    ) -> None:
        self.store.finish_intent(intent, status, error=error, audit=_audit(intent, outcome, error))
        if self._on_outcome:
            self._on_outcome(intent.kind, outcome)
        log = _log.info if status is IntentStatus.DONE else _log.warning
        log(
            "action dead-lettered" if status is IntentStatus.DEAD else "action " + status.value,
            intent_id=intent.id,
            rule=intent.rule_id,
            action=intent.kind,
            event_id=intent.event_id,
            outcome=outcome,
            **({"error": error} if error else {}),
            **{k: v for k, v in intent.target.items() if v is not None},
        )


def _transient(error: ActionError | ApiError) -> bool:
    """Worth another attempt later. A 401 that survived the client's fresh login (tokens
    revoked twice in a row, a login that keeps failing) is the engine's trouble, not the
    action's: it is retried, and dead-lettered if it never clears."""
    return error.retryable or (isinstance(error, ApiError) and error.status == 401)


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
