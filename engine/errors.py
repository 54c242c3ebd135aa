"""The engine's exception hierarchy. Every error that leaves a module is one of these."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


@dataclass(frozen=True, slots=True)
class Location:
    """Where in an input file something is: `file:line`."""

    file: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file


class ConfigError(EngineError):
    """A problem in a config or rule file, with its location and a hint on how to fix it."""

    def __init__(self, message: str, where: Location | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text} ({self.hint})" if self.hint else text


class RuleSetError(EngineError):
    """A rule set that failed validation: carries every problem found, not just the first."""

    def __init__(self, errors: Sequence[ConfigError]):
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class EventFormatError(EngineError):
    """An event record that cannot be normalized; `field` names the offending part."""

    def __init__(self, reason: str, field: str | None = None):
        self.reason = reason
        self.field = field
        super().__init__(f"{field}: {reason}" if field else reason)


class Retry(Enum):
    """Whether a failed emnify call is worth another try, and how soon: the one answer the
    client (repeating a call at once, with backoff) and the dispatcher (attempting an action
    again later) both read, from `ApiError.retry`."""

    # emnify surely did not act on it (429: refused before any work; no connection made):
    # any call may be sent again at once.
    AT_ONCE = "at once"
    # It may have reached emnify (no answer, or the gateway's 502, 503, 504): at once only a
    # call that is safe to repeat; an action that is not is looked for before it is redone.
    AT_ONCE_IF_IDEMPOTENT = "at once if idempotent"
    # Not worth repeating at once, but may clear: a plain 500 (more often the request's own
    # fault than a service briefly away), a 401 that outlived a fresh login (the engine's
    # trouble, not the action's), a login that failed after its own retries.
    LATER = "later"
    # The request itself is refused (any other status): no attempt will do better.
    NEVER = "never"


# A gateway's answer: emnify itself did not take the call (it may or may not have acted).
GATEWAY_ERRORS = frozenset({502, 503, 504})


class ApiError(EngineError):
    """A failed emnify API call, from whatever error body the API (or its gateway) sent.

    `status` is None when no answer came; `unsent` is True only when the request surely
    never left (no connection was made)."""

    def __init__(
        self,
        status: int | None,
        message: str,
        *,
        method: str = "",
        path: str = "",
        error_code: int | None = None,
        error_token: str | None = None,
        errors: Sequence[object] = (),
        retry_after: float | None = None,
        unsent: bool = False,
    ):
        self.status = status
        self.message = message
        self.method = method
        self.path = path
        self.error_code = error_code
        self.error_token = error_token
        self.errors = list(errors)
        self.retry_after = retry_after
        self.unsent = unsent
        super().__init__(str(self))

    @property
    def retry(self) -> Retry:
        """How this failure may be tried again (see `Retry`)."""
        status = self.status
        if status == 429 or (status is None and self.unsent):
            return Retry.AT_ONCE
        if status is None or status in GATEWAY_ERRORS:
            return Retry.AT_ONCE_IF_IDEMPOTENT
        if status >= 500 or status == 401:
            return Retry.LATER
        return Retry.NEVER

    @property
    def retryable(self) -> bool:
        """Worth another attempt, now or later: what the dispatcher asks of a failed action
        (as of `ActionError.retryable`)."""
        return self.retry is not Retry.NEVER

    def __str__(self) -> str:
        where = f"{self.method} {self.path} " if self.method else ""
        status = f"HTTP {self.status}" if self.status is not None else "no response"
        code = (
            f" [{self.error_code} {self.error_token}]"
            if self.error_code or self.error_token
            else ""
        )
        return f"{where}{status}{code}: {self.message}"


class ActionError(EngineError):
    """An action that failed; `retryable` tells the dispatcher whether to try again."""

    def __init__(self, message: str, *, retryable: bool = False):
        self.retryable = retryable
        super().__init__(message)


class StoreError(EngineError):
    """The state store cannot be opened, read or written. A store raises it, never its
    backend's own errors, naming the store and what to do."""


class StaleRuleState(StoreError):
    """What a batch was judged on changed before it was committed (another batch of this
    or another instance changed the rules' state, recorded one of its events, or `rules
    resume` ran): judge it again."""


class LeaseLost(StoreError):
    """A batch was to be committed under a lease this instance no longer holds: it is
    refused (another instance took over while this one was paused or cut off)."""
