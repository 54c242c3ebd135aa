"""Liveness and readiness: what `/healthz` and `/readyz` answer.

Ready means the engine can do its job right now: the store is sound and takes writes (its
file is the one it opened, the file system has room, the last write succeeded: see
`StoreHealth.condition`), every source says it is ready (the poller: it has succeeded
recently, within three intervals), and the emnify API answered the last request it was
sent. Each check says why it failed, so a probe's log explains itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.errors import StoreError
from engine.leadership import LEASE
from engine.sources.base import Check

if TYPE_CHECKING:
    from engine.services import ServiceContext

__all__ = ["Check", "Readiness", "readiness"]


@dataclass(frozen=True, slots=True)
class Readiness:
    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in self.checks},
        }


def readiness(
    context: ServiceContext, *, monotonic: Callable[[], float] = time.monotonic
) -> Readiness:
    checks = [_store(context), _lease(context)]
    for source in context.sources:
        if source.leader_only and not context.leading:
            continue  # the leader's to run (and to answer for)
        check = source.readiness()
        if check is not None:
            checks.append(check)
    checks.append(_api(context, monotonic()))
    return Readiness(tuple(checks))


def _lease(context: ServiceContext) -> Check:
    """Whether some instance leads (polls, runs the once-per-cluster jobs): this one, or
    another whose lease runs. A standby instance is ready: it takes pushes and actions."""
    if context.leading:
        return Check("lease", True, "this instance leads")
    try:
        state = context.store.lease(LEASE)
    except StoreError as error:
        return Check("lease", False, f"cannot read the leader lease: {error}")
    now = context.clock()
    if state is None or state.holder is None or state.expires_at < now:
        return Check("lease", False, "no instance holds the leader lease: nobody polls")
    return Check("lease", True, f"standby: {state.holder} leads (token {state.token})")


def _store(context: ServiceContext) -> Check:
    condition = context.store.condition(context.clock())
    return Check("store", condition.ok, condition.detail)


def _api(context: ServiceContext, now: float) -> Check:
    last = context.metrics.last_api
    base_url = context.api_url
    if last is None:
        # A first poll with nothing to catch up makes no request; that is no sign of trouble.
        return Check("api", True, f"{base_url} not contacted yet: nothing needed it so far")
    age = now - last.at
    if last.trouble is not None:  # a gateway error: emnify itself is not there
        return Check("api", False, f"{base_url} {last.trouble} ({age:.0f}s ago)")
    return Check("api", True, f"{base_url} answered HTTP {last.status} {age:.1f}s ago")
