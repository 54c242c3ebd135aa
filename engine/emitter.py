"""Saying an engine event: the door adapters and services use (`ServiceContext.emit_engine_event`,
`SourceContext.emit_engine_event`), and the one the daemon uses for what the core drafted.

An engine event (`engine.engine_events`) is handed to the pipeline as a batch of its own
under the source `engine`: judged against the rules, recorded in the audit log, counted. A
rule that acts on one may make the core draft another (a guard tripping on it); those are
said after, in order, up to `CHAIN_LIMIT` in one go, so that no rule can make the engine talk
to itself forever. When the store cannot take one, it is kept (up to `PENDING_LIMIT`) and
handed over again with the next one, under the same id: judged once however often tried.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from engine.clock import Clock, system_clock
from engine.engine_events import EngineEventDraft, engine_event_record, kind_of
from engine.errors import StoreError

if TYPE_CHECKING:
    from engine.sources.base import Ingest

_log = structlog.get_logger(__name__)

SOURCE = "engine"  # the source name engine events are judged and counted under
CHAIN_LIMIT = 50  # engine events said in one go, those their own batches drafted included
PENDING_LIMIT = 100  # engine events kept while the store cannot take them


class EngineEvents:
    """Builds engine events and hands each to `ingest` (the daemon's) as one batch."""

    def __init__(
        self,
        ingest: Ingest,
        *,
        instance: str,
        clock: Clock = system_clock,
        on_emitted: Callable[[str], None] | None = None,
    ) -> None:
        """`instance`: this instance's id, in every event's `detail.instance`.
        `on_emitted(kind)`: each event once its batch is committed (a metric)."""
        self._ingest = ingest
        self.instance = instance
        self._clock = clock
        self._on_emitted = on_emitted
        self._queue: deque[EngineEventDraft] = deque()
        self._pending: deque[tuple[str, dict[str, Any]]] = deque(maxlen=PENDING_LIMIT)
        self._emitting = False

    def emit(
        self,
        kind: str,
        *,
        detail: Mapping[str, Any] | None = None,
        sim: Mapping[str, Any] | None = None,
        endpoint: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> None:
        """Say one engine event now. `kind` must be one of `engine_events.KINDS` (a
        ValueError otherwise: a typo in the engine, not something to carry on past)."""
        kind_of(kind)
        self.emit_drafts([EngineEventDraft(kind, detail or {}, sim, endpoint, at)])

    def emit_drafts(self, drafts: Sequence[EngineEventDraft]) -> None:
        """Say what a committed batch drafted, in order (and whatever they draft in turn)."""
        self._queue.extend(drafts)
        if self._emitting:  # called from a batch this loop is handing over: said below
            return
        self._emitting = True
        try:
            self._drain()
        finally:
            self._emitting = False

    def retry_pending(self) -> None:
        """Hand over again what the store could not take before."""
        self.emit_drafts(())

    @property
    def pending(self) -> int:
        """Engine events waiting for the store to take them."""
        return len(self._pending)

    def _drain(self) -> None:
        said = 0
        while self._pending:
            kind, record = self._pending[0]
            if not self._hand_over(kind, record):
                break
            self._pending.popleft()
        while self._queue:
            draft = self._queue.popleft()
            if said >= CHAIN_LIMIT:
                dropped = 1 + len(self._queue)
                self._queue.clear()
                _log.error(
                    "engine events drafted by engine events' own batches went past the limit;"
                    " the rest are dropped (a rule that acts on engine events keeps tripping)",
                    limit=CHAIN_LIMIT,
                    dropped=dropped,
                    kind=draft.kind,
                )
                return
            said += 1
            record = engine_event_record(draft, at=self._clock(), instance=self.instance)
            if not self._hand_over(draft.kind, record):
                self._pending.append((draft.kind, record))

    def _hand_over(self, kind: str, record: dict[str, Any]) -> bool:
        """Judge and commit one engine event; False when the store could not take it."""
        log = _log.info if kind.endswith("_recovered") else _log.warning
        try:
            self._ingest([record], source=SOURCE)
        except StoreError as error:
            _log.error(
                "an engine event could not be recorded; it is tried again with the next one",
                kind=kind,
                event_id=record["id"],
                error=str(error),
            )
            return False
        except Exception as error:  # a bug: the engine goes on, and says so
            _log.error(
                "an engine event could not be judged; it is dropped",
                kind=kind,
                event_id=record["id"],
                exc_info=error,
            )
            return True
        log(
            "engine event",
            kind=kind,
            event_id=record["id"],
            description=record["description"],
            detail=record["detail"],
        )
        if self._on_emitted is not None:
            self._on_emitted(kind)
        return True
