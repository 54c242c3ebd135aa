"""A backend's own errors leave its store as StoreError, and are remembered for `condition`.

Every public method of a store class is wrapped: a failing database call leaves as one
StoreError whose message names the store and says what to do, and is remembered until the
same method succeeds again. The poller, the dispatcher, the ingress and `/metrics` then
catch one exception, and `/readyz` can tell that the store failed a minute ago even when
the operation that failed is not tried again soon (a delivery the stream has not resent)."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from engine.errors import StoreError

# How long `condition` holds a failure against the store when the operation that failed is
# not tried again.
FAILURE_MEMORY = 60.0

_P = ParamSpec("_P")
_R = TypeVar("_R")
_Store = TypeVar("_Store", bound=type)


@dataclass(frozen=True, slots=True)
class Failure:
    at: float  # monotonic
    error: str


def failures_as_store_errors(
    errors: tuple[type[BaseException], ...], describe: Callable[[Any, Any], str]
) -> Callable[[_Store], _Store]:
    """A class decorator: each public method turns `errors` into StoreError with the message
    `describe(store, error)`, kept in the store's `_failures` (by method name) until that
    method succeeds."""

    def wrap(method: Callable[_P, _R]) -> Callable[_P, _R]:
        name = method.__name__

        @functools.wraps(method)
        def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            store = args[0]
            failures: dict[str, Failure] = store._failures  # type: ignore[attr-defined]
            try:
                result = method(*args, **kwargs)
            except errors as error:
                message = describe(store, error)
                failures[name] = Failure(time.monotonic(), message)
                raise StoreError(message) from error
            if failures:
                failures.pop(name, None)
            return result

        return call

    def decorate(cls: _Store) -> _Store:
        for name, member in list(vars(cls).items()):
            if _is_interface(name) and inspect.isfunction(member):
                setattr(cls, name, wrap(member))
        return cls

    return decorate


def _is_interface(name: str) -> bool:
    """A public method a caller names. Mutation testing (docs/testing.md) adds each method's
    variants to the class under names of its own, with a non-ASCII separator; wrapping them
    too would wrap `__init__`'s body, which runs before `_failures` exists."""
    return not name.startswith("_") and name.isascii()


def recent_failure(failures: dict[str, Failure]) -> str | None:
    """The latest failure still remembered, in words (None when there is none)."""
    tick = time.monotonic()
    recent = [f for f in failures.values() if tick - f.at < FAILURE_MEMORY]
    if not recent:
        return None
    latest = max(recent, key=lambda failure: failure.at)
    return f"failed {tick - latest.at:.0f}s ago: {latest.error}"
