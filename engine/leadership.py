"""The leader lease: instances sharing a store elect one to poll and to run the jobs that
must run once per cluster, and each says it is alive.

Every `lease_ttl / 3` an instance renews its lease (the leader) or tries to take it (the
others): the store hands the lease to a new holder only once the last one's has run out,
and bumps its fencing token then. The leader commits its batches under that token
(`engine.model.Fence`), and the store refuses them once the lease has moved on, so a leader
that was paused or cut off past its lease can neither move the cursor nor plan actions
when it wakes up. With the default 10 s a dead leader is replaced within about 13 s.

A change of leadership starts or stops the leader-only parts through the callbacks the
daemon gives (the poller, the digests, the retention). Each round also writes the
instance's heartbeat (`event-engine status` lists the members).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import structlog

from engine import __version__
from engine.clock import Clock
from engine.errors import StoreError
from engine.model import Fence, Member
from engine.ports import Leases, Members

_log = structlog.get_logger(__name__)

LEASE = "leader"
DEFAULT_TTL = timedelta(seconds=10)


def default_instance_id() -> str:
    """`host-pid`: unique among the instances of one machine, readable in `status`."""
    return f"{socket.gethostname()}-{os.getpid()}"


class ClusterStore(Leases, Members, Protocol):
    """What leadership needs of the store."""


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    instance_id: str = ""  # empty: `default_instance_id()`
    lease_ttl: timedelta = DEFAULT_TTL


class Leadership:
    """One instance's side of the lease (see the module docstring)."""

    def __init__(
        self,
        store: ClusterStore,
        settings: ClusterSettings,
        *,
        clock: Clock,
        rules_hash: Callable[[], str],
        on_gained: Callable[[], Awaitable[None]],
        on_lost: Callable[[], Awaitable[None]],
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.store = store
        self.instance_id = settings.instance_id or default_instance_id()
        self.ttl = settings.lease_ttl
        self.clock = clock
        self._rules_hash = rules_hash
        self._on_gained = on_gained
        self._on_lost = on_lost
        self._on_change = on_change
        self.leading = False
        self.token: int | None = None  # the last token held, kept after losing it
        self.last_error: str | None = None
        self._started_at = clock()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def every(self) -> float:
        return self.ttl.total_seconds() / 3

    def fence(self) -> Fence | None:
        """What the leader's batches are committed under: the token last held (a stale one
        once the lease is lost, which the store refuses), or None before it ever held it."""
        return Fence(LEASE, self.instance_id, self.token) if self.token is not None else None

    async def start(self) -> None:
        """Take part: one round now (so a single instance leads before its sources start),
        then one every `ttl / 3`."""
        self._stop.clear()
        await self.round()
        self._task = asyncio.create_task(self._run(), name="leadership")

    async def stop(self) -> None:
        """Stop taking part, give the lease up (another instance takes over at once rather
        than after the lease ran out) and leave the members' list."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.leading:
            await self._lose("stopping")
        with contextlib.suppress(StoreError):
            self.store.release_lease(LEASE, self.instance_id, self.clock())
            self.store.forget_member(self.instance_id)

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.every)
            if not self._stop.is_set():
                await self.round()

    async def round(self) -> None:
        """Renew or try to take the lease, act on a change, and beat the heart."""
        now = self.clock()
        try:
            token = self.store.acquire_lease(LEASE, self.instance_id, self.ttl, now)
        except StoreError as error:
            # Cut off from the store: nothing it commits would count; others take over
            # once the lease runs out.
            self.last_error = str(error)
            if self.leading:
                await self._lose(f"the store cannot be reached: {error}")
            return
        self.last_error = None
        if token is not None and not self.leading:
            self.token = token
            self.leading = True
            _log.info(
                "this instance leads: it polls and runs the once-per-cluster jobs",
                instance=self.instance_id,
                token=token,
            )
            self._changed()
            await self._on_gained()
        elif token is None and self.leading:
            await self._lose("another instance holds the lease")
        elif token is not None:
            self.token = token
        self._beat(now)

    async def _lose(self, why: str) -> None:
        self.leading = False
        _log.warning("this instance no longer leads", instance=self.instance_id, reason=why)
        self._changed()
        await self._on_lost()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.leading)

    def _beat(self, now: datetime) -> None:
        member = Member(
            instance_id=self.instance_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            rules_hash=self._rules_hash(),
            started_at=self._started_at,
            heartbeat_at=now,
            leader=self.leading,
        )
        with contextlib.suppress(StoreError):  # the lease round says what is wrong
            self.store.heartbeat(member)
