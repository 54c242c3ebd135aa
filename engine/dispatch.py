"""The dispatcher: runs the intents waiting in the outbox, with retries and a dead letter.

Each attempt is counted in the store before it is made, so after a crash the action knows
it may have run already (status actions read the state first, webhooks carry the same
`Idempotency-Key`, an SMS is looked for before it is sent again). Intents on the same SIM or
endpoint run one after another in their planned order; different targets run side by side.
An intent waiting for a retry holds back the later ones on its target (a follow-up "activate
again" never overtakes the "suspend" it follows).

Calls to receivers outside emnify (webhooks) are read from the outbox and run apart from the
emnify calls, in slots of their own and at most a few at a time per destination: receivers
that answer slowly, or not at all, cannot hold the slots a SIM suspension needs, nor keep it
unread behind a page of their own intents.

A failure is retried when it is transient (429, 5xx, timeouts, connection errors), with
exponential backoff and jitter, honouring `Retry-After`, until `max_attempts` or the
`deadline` (counted from the first attempt) runs out: then the intent is dead-lettered with
its last error and waits for `event-engine dead-letters retry|discard`. Other failures
(4xx, a template that cannot render) fail the intent at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import httpx
import structlog

from engine import secrets
from engine.actions import ACTIONS, Action, ActionContext, Target, calling_out, lane_of
from engine.clock import Clock, system_clock
from engine.errors import ActionError, ApiError, StoreError
from engine.model import AttemptHistory, AuditRow, Intent, IntentStatus
from engine.outbound import HttpReceivers
from engine.ports import EmnifyCalls, Outbox
from engine.state import format_duration

_log = structlog.get_logger(__name__)
_T = TypeVar("_T")

# How far back the outcomes of sibling intents are read, before this intent's first attempt.
_SIBLING_MARGIN = timedelta(minutes=10)
# Due intents read from the outbox at one look.
_PAGE = 200
# When the last look read a full page, the next comes once fewer than this many of it wait.
# Not at every attempt's end: most of what waits then waits for its slot (two webhooks to
# one receiver at a time, by default), and the page read again would be the same page;
# reading 200 intents after every attempt was most of an instance's CPU in B7 (5.7 ms an
# intent, 2.4 looks each).
_LOOK_AGAIN_BELOW = _PAGE // 4
# How long the intents of a look stay claimed while they wait for a slot (starting one
# claims it for `claim_for`).
_QUEUED_CLAIM = timedelta(seconds=5)
# The outcome of a change whose call got no clear answer but whose effect was read back.
CONFIRMED = "done (read back after an unclear answer)"


@dataclass(frozen=True, slots=True)
class _Queued:
    lane: str
    destination: str | None  # for an action that calls out; None for an emnify call
    intent: Intent


@dataclass(frozen=True, slots=True)
class _Running:
    intent_id: int
    task: asyncio.Task[None]
    destination: str | None


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
    """Runs due intents continuously: each starts as soon as it is due, its lane is free and
    a slot is, so an intent committed while others are in flight does not wait for them.

    Slots: `concurrency` for emnify calls; `webhook_concurrency` for calls to receivers
    outside emnify, of which at most `webhook_per_host` go to one destination at a time.
    """

    def __init__(
        self,
        store: Outbox,
        client: EmnifyCalls,
        http: httpx.AsyncClient,
        *,
        policy: RetryPolicy | None = None,
        concurrency: int = 4,
        webhook_concurrency: int = 8,
        webhook_per_host: int = 2,
        clock: Clock = system_clock,
        owner: str | None = None,
        claim_for: timedelta = timedelta(seconds=30),
        on_outcome: Callable[[str, str], None] | None = None,
        on_dead_letter: Callable[[Intent, str | None], None] | None = None,
        on_failed: Callable[[Intent, str | None], None] | None = None,
        on_attempt: Callable[[str, bool, float], None] | None = None,
        store_threads: int = 0,
        organisations: Mapping[str, EmnifyCalls] | None = None,
        on_organisation_outcome: Callable[[str, str, str], None] | None = None,
    ):
        """`owner`: the instance this dispatcher runs in; an intent it starts it claims
        for `claim_for` (renewed while the attempt runs), so that the other instances of a
        cluster leave it alone until the claim runs out (this one died). `on_dead_letter`:
        each intent dead-lettered, with its last error (the engine event that says so);
        `on_failed`: each intent that failed for good (a permanent error), with it.
        `store_threads`: above 0, an attempt's store calls run in that many threads of
        their own rather than on the event loop, for a store that allows it (PostgreSQL's
        pool): an attempt waiting on the database then holds up neither the other attempts
        nor the rest of the daemon (a round trip to a database on another machine is a
        millisecond or more, and an attempt makes three).
        `organisations`: with `organisations:` configured, each one's client: an intent
        planned for an organisation's event runs with that one's token and no other."""
        self.store = store
        self.owner = owner
        self.claim_for = claim_for
        self._renewed_at = clock()
        self.client = client
        self.organisations = organisations
        self._on_organisation_outcome = on_organisation_outcome
        self.http = http
        self.policy = policy or RetryPolicy()
        self.clock = clock
        self._on_outcome = on_outcome
        self._on_dead_letter = on_dead_letter
        self._on_failed = on_failed
        self._on_attempt = on_attempt
        self._slots = concurrency  # emnify calls in flight at most
        self._outside_slots = webhook_concurrency  # calls to receivers outside emnify
        self._per_destination = webhook_per_host
        self._in_flight: dict[str, _Running] = {}  # by lane
        self._emnify_calls = 0
        self._outside_calls: Counter[str] = Counter()  # in flight, by destination
        # Due intents read at the last look that wait for their lane or a slot, oldest first.
        self._queue: list[_Queued] = []
        # Per lane, the first intent waiting for a retry: the later ones on it wait too.
        self._held: dict[str, Intent] = {}
        # More may be due than the queue holds: the last look read a full page.
        self._look_again = False
        self._look_skipped = False  # a look was put off: every slot was busy
        self._looked_at = clock()
        self._started = 0
        self._wake = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self._rng = random.Random()
        self._store_thread_count = store_threads
        self._store_threads: ThreadPoolExecutor | None = None

    async def _stored(self, call: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """`call(*args, **kwargs)`, a store method: in a store thread when there are some.
        Cancelled meanwhile, it still waits for a call already running to end, so that what
        the call wrote is written when the cancellation goes on."""
        if self._store_thread_count <= 0:
            return call(*args, **kwargs)
        if self._store_threads is None:
            self._store_threads = ThreadPoolExecutor(
                self._store_thread_count, thread_name_prefix="dispatch-store"
            )
        running = self._store_threads.submit(call, *args, **kwargs)
        try:
            return await asyncio.wrap_future(running)
        except asyncio.CancelledError:
            if not running.cancel():  # it had started: a round trip, let it end
                with contextlib.suppress(Exception):
                    running.result()
            raise

    def wake(self) -> None:
        """New intents were committed: look at the outbox now rather than at the next tick."""
        self._wake.set()

    async def run_due(self) -> int:
        """Run every intent that is due now, each as soon as its lane and a slot are free,
        until none that can run is left; returns how many attempts were started."""
        before = self._started
        self._look()
        while self._in_flight:
            await asyncio.wait(
                [running.task for running in self._in_flight.values()],
                return_when="FIRST_COMPLETED",
            )
            if self._wake.is_set():
                self._wake.clear()
                self._look()
        return self._started - before

    async def run_forever(self, stop: asyncio.Event, idle: float = 1.0) -> None:
        """Dispatch until `stop` is set. Attempts in flight then finish; intents not yet
        started stay pending for the next start."""
        self._stop = stop
        loop = asyncio.get_running_loop()
        stopping = asyncio.ensure_future(stop.wait())
        stopping.add_done_callback(lambda _: self._wake.set())
        try:
            while not stop.is_set():
                self._wake.clear()
                self._renew_claims()
                self._look()
                timer = loop.call_later(self._idle_wait(idle), self._wake.set)
                await self._wake.wait()
                timer.cancel()
            if self._in_flight:
                # Cancelled here (the shutdown grace ran out), gather cancels the attempts,
                # which leave their intents due again.
                await asyncio.gather(*(running.task for running in self._in_flight.values()))
        finally:
            stopping.cancel()
            if self._store_threads is not None:
                self._store_threads.shutdown(wait=False)
                self._store_threads = None

    def _renew_claims(self) -> None:
        """Keep the claims on the attempts still running (a third of the claim's span before
        it would run out), so no other instance takes them over while they run."""
        now = self.clock()
        if self.owner is None or now - self._renewed_at < self.claim_for / 3:
            return
        self._renewed_at = now
        running = [r.intent_id for r in self._in_flight.values()]
        if running:
            self.store.renew_claims(self.owner, running, now + self.claim_for)

    def _look(self) -> None:
        """Read what is due now from the outbox and start what may start."""
        if self._all_slots_busy():
            self._look_skipped = True  # nothing could start: read when a slot is free
            return
        self._look_skipped = False
        self._looked_at = self.clock()
        # One page of each kind of slot, so a backlog of webhooks never hides the emnify
        # calls behind it (nor the reverse).
        kinds = calling_out()
        owner = self.owner
        # What is read is claimed for a short while, so that the other instances of a
        # cluster read other intents instead of racing this one to the same ones (two
        # instances reading the same page lost a start to each other at every other
        # intent in B7); an instance that dies leaves them to the others when it runs out.
        until = self._looked_at + min(self.claim_for, _QUEUED_CLAIM) if owner else None
        emnify = self.store.due_intents(
            self._looked_at, _PAGE, except_kinds=kinds, owner=owner, claim_until=until
        )
        outside = self.store.due_intents(
            self._looked_at, _PAGE, kinds=kinds, owner=owner, claim_until=until
        )
        self._look_again = _PAGE in (len(emnify), len(outside))
        due = sorted([*emnify, *outside], key=lambda intent: intent.id or 0)
        self._queue = [_Queued(_lane(i), _destination(i), i) for i in due]
        self._held = {}
        if self._queue:
            for waiting in self.store.retrying_intents():
                self._held.setdefault(_lane(waiting), waiting)
        self._start_queued()

    def _all_slots_busy(self) -> bool:
        return (
            self._emnify_calls >= self._slots and self._outside_calls.total() >= self._outside_slots
        )

    def _slot_free(self, destination: str | None) -> bool:
        if destination is None:
            return self._emnify_calls < self._slots
        return (
            self._outside_calls.total() < self._outside_slots
            and self._outside_calls[destination] < self._per_destination
        )

    def _take_slot(self, destination: str | None, change: int) -> None:
        if destination is None:
            self._emnify_calls += change
        else:
            self._outside_calls[destination] += change
            if self._outside_calls[destination] <= 0:
                del self._outside_calls[destination]

    def _start_queued(self) -> None:
        """Start the queued intents whose lane is free, oldest first, while slots are left."""
        if self._stop is not None and self._stop.is_set():
            return  # shutting down: what has not started stays pending
        waiting: list[_Queued] = []
        for queued in self._queue:
            lane, intent = queued.lane, queued.intent
            assert intent.id is not None
            running = self._in_flight.get(lane)
            if running is not None and running.intent_id == intent.id:
                continue  # read again while its attempt runs
            blocker = self._held.get(lane)
            if (
                running is not None
                or (blocker is not None and (blocker.id or 0) < intent.id)
                or not self._slot_free(queued.destination)
            ):
                waiting.append(queued)
                continue
            task = asyncio.create_task(self._run(lane, intent))
            self._in_flight[lane] = _Running(intent.id, task, queued.destination)
            self._take_slot(queued.destination, +1)
            self._started += 1
        self._queue = waiting

    def _idle_wait(self, idle: float) -> float:
        """Until the next intent is due (a follow-up, a retry, the one holding a lane back),
        at most `idle` seconds."""
        if self._all_slots_busy():
            return idle  # the attempt that frees a slot asks for the next look
        due = self.store.next_due(after=self._looked_at)
        if due is None:
            return idle
        return min(idle, max((due - self.clock()).total_seconds(), 0.01))

    async def _run(self, lane: str, intent: Intent) -> None:
        try:
            closed = await self._attempt(intent)
        except StoreError as error:
            # Not recorded: the intent stays as the store has it, and it and its lane wait
            # for the next look (a commit, the idle tick) rather than hammer a failing store.
            _log.error(
                "the state store failed; the action runs again later",
                intent_id=intent.id,
                error=str(error),
            )
            self._held.setdefault(lane, intent)
            return
        finally:
            self._take_slot(self._in_flight.pop(lane).destination, -1)
        blocker = self._held.get(lane)
        if not closed:
            # It waits for a retry and holds its lane; a fresh look learns when it is due.
            self._held.setdefault(lane, intent)
            self._wake.set()
        elif blocker is not None and blocker.id == intent.id:
            del self._held[lane]
        self._start_queued()
        if self._look_skipped or (self._look_again and len(self._queue) < _LOOK_AGAIN_BELOW):
            # A look was put off while every slot was busy, or what it read is nearly used
            # up and the outbox holds more.
            self._wake.set()

    async def _attempt(self, intent: Intent) -> bool:
        """One attempt; True when the intent is closed (done, failed, dead), False when it
        waits for another attempt."""
        assert intent.id is not None
        action = ACTIONS.get(intent.kind)
        if action is None:
            await self._finish(
                intent, IntentStatus.FAILED, "failed", f"unknown action {intent.kind!r}"
            )
            return True
        now = self.clock()
        history = await self._stored(self.store.attempt_history, intent.id)
        if not action.repeatable and history is not None:
            settled = history.last_at + self.policy.settle_time
            if now < settled:
                # An earlier attempt may still be landing (a timed-out request, a crash
                # mid-call): look only once it would have.
                postponed = await self._stored(
                    self.store.finish_intent,
                    intent,
                    IntentStatus.PENDING,
                    now=now,
                    error=intent.last_error,
                    due_at=settled,
                    owner=self.owner,
                )
                return not postponed  # not postponed: it was closed since it was read
        refused = self._no_client(intent, action)
        if refused is not None:
            await self._finish(intent, IntentStatus.FAILED, "failed", refused)
            return True
        try:
            params = action.decode(intent.params)
        except (TypeError, ValueError) as error:
            reason = f"the outbox holds parameters {intent.kind} cannot read: {error}"
            await self._finish(intent, IntentStatus.FAILED, "failed", secrets.redact(reason))
            return True
        try:
            attempt = await self._stored(
                self.store.start_attempt,
                intent.id,
                now,
                owner=self.owner,
                claim_until=now + self.claim_for,
            )
        except asyncio.CancelledError:
            self._interrupted(intent)  # it may have started: due again, as below
            raise
        if attempt is None:
            return True  # closed since it was read (a cancelled follow-up): nothing to run
        ctx = await self._context(intent, action, history, now)
        started = time.monotonic()
        try:
            outcome = await carry_out(action, params, ctx)
        except asyncio.CancelledError:
            self._interrupted(intent)
            raise
        except (ActionError, ApiError) as error:
            self._attempted(intent, False, started)
            retry_after = error.retry_after if isinstance(error, ApiError) else None
            deadline_from = history.deadline_from if history is not None else now
            return await self._failed(
                intent,
                attempt,
                error.retryable,  # ActionError: the action says; ApiError: see `Retry`
                secrets.redact(str(error)),
                deadline_from=deadline_from,
                retry_after=retry_after,
            )
        except Exception as error:  # a bug must not stop the daemon; keep the intent
            self._attempted(intent, False, started)
            _log.exception("action crashed", intent_id=intent.id, action=intent.kind)
            deadline_from = history.deadline_from if history is not None else now
            return await self._failed(
                intent,
                attempt,
                True,
                f"internal error: {type(error).__name__}",
                deadline_from=deadline_from,
            )
        self._attempted(intent, True, started)
        await self._finish(intent, IntentStatus.DONE, outcome, None)
        return True

    def _interrupted(self, intent: Intent) -> None:
        """Shutdown mid-attempt: leave it due again; the attempt counter already says it ran.
        On the event loop, not in a store thread: a cancelled task must not wait again."""
        self.store.finish_intent(
            intent,
            IntentStatus.PENDING,
            now=self.clock(),
            error="interrupted",
            owner=self.owner,
        )

    def _client_for(self, intent: Intent) -> EmnifyCalls:
        organisation = intent.target.get("organisation")
        if organisation and self.organisations is not None:
            return self.organisations[organisation]
        return self.client

    def _no_client(self, intent: Intent, action: type[Action]) -> str | None:
        """Why the intent cannot run without another organisation's token (None: it can)."""
        organisation = intent.target.get("organisation")
        if organisation:
            if self.organisations is None or organisation not in self.organisations:
                return (
                    f"planned for organisation {organisation!r}, which the config no longer"
                    " lists: not run with another organisation's token"
                )
            return None
        if self.organisations is not None and action.needs is not None:
            return (
                "planned for an event of no configured organisation (a Data Streamer push or"
                " an engine event): with `organisations:`, no token is known to be its own"
            )
        return None

    async def _context(
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
                await self._stored(
                    self.store.outcomes_on_endpoint,
                    intent.kind,
                    endpoint_id,
                    first_attempt_at - _SIBLING_MARGIN,
                    excluding_intent=intent.id,
                )
            )
        return ActionContext(
            emnify=self._client_for(intent),
            receivers=HttpReceivers(self.http),
            target=Target.from_json(intent.target),
            idempotency_key=intent.idempotency_key,
            attempt=(history.total if history is not None else 0) + 1,
            created_at=intent.created_at or now,
            first_attempt_at=first_attempt_at,
            sibling_outcomes=siblings,
            last_error=intent.last_error,
        )

    def _attempted(self, intent: Intent, ok: bool, started: float) -> None:
        if self._on_attempt is not None:
            self._on_attempt(intent.kind, ok, time.monotonic() - started)

    async def _failed(
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
            await self._finish(intent, IntentStatus.FAILED, "failed", reason)
            return True
        due = self.policy.next_try(attempt, now, self._rng)
        if retry_after is not None:
            wait = min(retry_after, self.policy.max_backoff.total_seconds())
            due = max(due, now + timedelta(seconds=wait))
        if attempt >= self.policy.max_attempts:
            await self._finish(
                intent, IntentStatus.DEAD, "dead", f"gave up after {attempt}: {reason}"
            )
            return True
        if due - deadline_from > self.policy.deadline:
            await self._finish(
                intent,
                IntentStatus.DEAD,
                "dead",
                f"gave up after {attempt} (deadline {format_duration(self.policy.deadline)}"
                f" passed): {reason}",
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
        await self._stored(
            self.store.finish_intent,
            intent,
            IntentStatus.PENDING,
            now=now,
            error=reason,
            due_at=due,
            audit=_audit(intent, "retry", f"attempt {attempt}: {reason}"),
            owner=self.owner,
        )
        return False

    async def _finish(
        self, intent: Intent, status: IntentStatus, outcome: str, error: str | None
    ) -> None:
        await self._stored(
            self.store.finish_intent,
            intent,
            status,
            now=self.clock(),
            error=error,
            audit=_audit(intent, outcome, error),
            owner=self.owner,
        )
        if self._on_outcome:
            self._on_outcome(intent.kind, outcome)
        organisation = intent.target.get("organisation")
        if organisation and self._on_organisation_outcome:
            self._on_organisation_outcome(organisation, intent.kind, outcome)
        if status is IntentStatus.DEAD and self._on_dead_letter:
            self._on_dead_letter(intent, error)
        if status is IntentStatus.FAILED and self._on_failed:
            self._on_failed(intent, error)
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


async def carry_out(action: type[Action], params: Any, ctx: ActionContext) -> str:
    """One attempt of an action, with its effect check: the outcome, or the error raised.

    Before an attempt that may follow one that took effect (and before every attempt of an
    action that `looks_first`), `effect` says whether it is in place already. An emnify call
    that got no clear answer (no answer after the request went out, a 5xx) may have been
    carried out: an action that can be repeated reads its effect back at once; one that
    cannot (an SMS) fails retryably, and its next attempt, after the settle time, looks.
    """
    if action.looks_first or ctx.attempt > 1:
        found = await action.effect(params, ctx)
        if found is not None:
            return found
    try:
        return await action.run(params, ctx)
    except ApiError as error:
        if not _may_have_taken_effect(error):
            raise
        if not action.repeatable:
            raise ActionError(
                f"{action.kind}: {error}; {action.unclear}, so it will be looked for before"
                " any resend",
                retryable=True,
            ) from None
        try:
            found = await action.effect(params, ctx)
        except ApiError:
            raise error from None  # still unclear: the next attempt looks first
        if found is None:
            raise
        return CONFIRMED


def _may_have_taken_effect(error: ApiError) -> bool:
    """Whether a failed call may still have done its work: no answer after the request went
    out (timeout, dropped connection) or a server-side failure. A 429, a 4xx or a connection
    that was never made mean it surely did not."""
    if error.status is None:
        return not error.unsent
    return error.status >= 500


def _lane(intent: Intent) -> str:
    """The lane the intent's action says serializes it: its SIM's, its endpoint's, its own."""
    return lane_of(intent.kind, intent.target) or f"intent:{intent.id}"


def _destination(intent: Intent) -> str | None:
    action = ACTIONS.get(intent.kind)
    if action is None or not action.calls_out:
        return None
    try:
        return action.destination(action.decode(intent.params))
    except (TypeError, ValueError):
        return action.kind  # unreadable: its attempt fails it


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
        organisation=target.get("organisation") or "",
    )
