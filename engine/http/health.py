"""Liveness and readiness: what `/healthz` and `/readyz` answer.

Ready means the engine can do its job right now: the store is sound and takes writes (its
file is the one it opened, the file system has room, the last write succeeded: see
`SqliteStore.condition`), the poller has succeeded recently (within three intervals), and
the emnify API answered the last request it was sent. Each check says why it failed, so a
probe's log explains itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.daemon import Daemon

# A gateway error means emnify itself is not there, whatever the network says.
_UNREACHABLE_STATUSES = frozenset({502, 503, 504})
POLL_STALE_AFTER_INTERVALS = 3


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


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


def readiness(daemon: Daemon, *, monotonic: Callable[[], float] = time.monotonic) -> Readiness:
    polling = "poller" in daemon.config.sources
    checks = [_store(daemon)]
    if polling:
        checks.append(_poll(daemon, monotonic()))
    checks.append(_api(daemon, monotonic(), polling))
    return Readiness(tuple(checks))


def _store(daemon: Daemon) -> Check:
    condition = daemon.store.condition(daemon.clock())
    return Check("store", condition.ok, condition.detail)


def _poll(daemon: Daemon, now: float) -> Check:
    poller = daemon.poller
    limit = POLL_STALE_AFTER_INTERVALS * daemon.config.poller.interval.total_seconds()
    if poller.last_success is None:
        reason = f"last poll failed: {poller.last_error}" if poller.last_error else "not yet"
        return Check("poll", False, f"no successful poll yet ({reason})")
    age = now - poller.last_success
    if age > limit:
        why = f"; last error: {poller.last_error}" if poller.last_error else ""
        return Check(
            "poll", False, f"last successful poll {age:.0f}s ago (limit {limit:.0f}s){why}"
        )
    return Check("poll", True, f"last successful poll {age:.1f}s ago")


def _api(daemon: Daemon, now: float, polling: bool) -> Check:
    last = daemon.metrics.last_api
    base_url = daemon.config.api.base_url
    if last is None:
        # A first poll with nothing to catch up makes no request; that is no sign of trouble.
        if polling and daemon.poller.last_success is None:
            return Check("api", False, f"no request to {base_url} has finished yet")
        return Check("api", True, f"{base_url} not contacted yet: nothing needed it so far")
    age = now - last.at
    if last.status is None:
        return Check("api", False, f"{base_url} did not respond ({age:.0f}s ago)")
    if last.status in _UNREACHABLE_STATUSES:
        return Check("api", False, f"{base_url} answered HTTP {last.status} ({age:.0f}s ago)")
    return Check("api", True, f"{base_url} answered HTTP {last.status} {age:.1f}s ago")
