"""The auth token: log in lazily, once for all concurrent callers, and again before it expires.

emnify issues a JWT for the application token and no refresh token (§2.1), so "refresh" means
logging in again. Its lifetime is not hard-coded (the docs say 4 h, real tokens lasted 7 days):
the payload's `exp` is read, without checking the signature.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from engine.errors import ApiError

_log = structlog.get_logger(__name__)

_REFRESH_RETRY = 60.0  # seconds between early re-login attempts after one failed


class Secret:
    """A string that never shows itself in a repr, a str, a log line or a traceback's locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class JwtTimes:
    """The `exp` and `iat` claims of a JWT, in epoch seconds, where present and numeric."""

    expires_at: float | None
    issued_at: float | None


def read_jwt_times(token: str) -> JwtTimes:
    """Decode a JWT's payload (no signature check) for `exp` and `iat`; never raises."""
    parts = token.split(".")
    if len(parts) != 3:
        return JwtTimes(None, None)
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims: Any = orjson.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):  # orjson.JSONDecodeError is a ValueError
        return JwtTimes(None, None)
    if not isinstance(claims, dict):
        return JwtTimes(None, None)
    return JwtTimes(_number(claims.get("exp")), _number(claims.get("iat")))


def refresh_time(times: JwtTimes, obtained_at: float, margin: float) -> float | None:
    """When to log in again: `margin` before `exp`, the margin capped to half the lifetime.

    None means "no proactive login; rely on a 401": the token has no readable `exp`, or by the
    local clock it expired before it arrived (clock skew).
    """
    exp = times.expires_at
    if exp is None or exp <= obtained_at:
        return None
    start = (
        times.issued_at if times.issued_at is not None and times.issued_at < exp else obtained_at
    )
    at = exp - min(margin, (exp - start) / 2)
    if at <= obtained_at:
        # Local clock ahead of the issuer's: keep the token for half of what is left to it here.
        at = obtained_at + (exp - obtained_at) / 2
    return at


class AuthSession:
    """Holds the current auth token and logs in when there is none, it is due, or it was refused.

    `login` performs `POST /api/v1/authenticate` and returns the new token; it raises `ApiError`.
    A lock makes concurrent callers share one login, and share its failure too: emnify blocks an
    application token for 5 minutes after 3 failed logins in a row (§2.4).
    """

    def __init__(
        self,
        login: Callable[[], Awaitable[Secret]],
        *,
        relogin_margin: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._login = login
        self._margin = relogin_margin
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: Secret | None = None
        self._refresh_at: float | None = None
        self._expires_at: float | None = None
        self._finished = 0  # logins finished so far; tells a waiter that one ended meanwhile
        self._last_failure: ApiError | None = None

    @property
    def refresh_at(self) -> float | None:
        """Epoch seconds at which the current token is renewed (None: only on a 401)."""
        return self._refresh_at

    @property
    def ready(self) -> bool:
        """Whether `token()` answers at once, without logging in first."""
        return self._usable() is not None

    async def token(self) -> Secret:
        """A token fit to use now, logging in first if there is none or it is due."""
        current = self._usable()
        if current is not None:
            return current
        seen = self._finished
        async with self._lock:
            current = self._usable()
            if current is not None:
                return current
            if self._finished != seen and self._last_failure is not None:
                raise self._last_failure  # the login this caller waited for just failed
            if self._token is None:
                return await self._login_now("first call")
            try:
                return await self._login_now("token expires soon")
            except ApiError:
                return self._keep_after_failed_refresh()

    async def renew(self, rejected: Secret) -> Secret:
        """Log in again because the API refused `rejected` (a 401), unless someone already did."""
        seen = self._finished
        async with self._lock:
            if self._token is not None and self._token is not rejected:
                return self._token
            if self._finished != seen and self._last_failure is not None:
                raise self._last_failure
            self._token = None
            return await self._login_now("token refused (401)")

    def _usable(self) -> Secret | None:
        if self._token is None:
            return None
        if self._refresh_at is not None and self._clock() >= self._refresh_at:
            return None
        return self._token

    def _keep_after_failed_refresh(self) -> Secret:
        """An early re-login failed: the current token still works until `exp` (emnify keeps
        issued tokens valid even when the application token is revoked), so keep it, and try
        again after a while rather than on every call. Past `exp` the failure stands."""
        now, token, expires_at = self._clock(), self._token, self._expires_at
        if token is None or expires_at is None or now >= expires_at:
            assert self._last_failure is not None
            self._token = None
            raise self._last_failure
        self._refresh_at = now + min(_REFRESH_RETRY, (expires_at - now) / 2)
        _log.warning(
            "emnify re-login failed; keeping the current token until it expires",
            error=str(self._last_failure),
            expires_in=round(expires_at - now),
            next_try_in=round(self._refresh_at - now),
        )
        return token

    async def _login_now(self, reason: str) -> Secret:
        self._last_failure = None
        try:
            token = await self._login()
        except ApiError as exc:
            self._last_failure = exc
            raise
        finally:
            self._finished += 1
        obtained_at = self._clock()
        times = read_jwt_times(token.reveal())
        self._token, self._expires_at = token, times.expires_at
        self._refresh_at = refresh_time(times, obtained_at, self._margin)
        if times.expires_at is None:
            _log.warning("emnify auth token has no readable exp; will log in again only on a 401")
        elif self._refresh_at is None:
            _log.warning(
                "emnify auth token looks expired by the local clock (clock skew?)",
                expires_in=round(times.expires_at - obtained_at, 1),
            )
        _log.info(
            "emnify login",
            reason=reason,
            expires_in=None if times.expires_at is None else round(times.expires_at - obtained_at),
            relogin_in=None if self._refresh_at is None else round(self._refresh_at - obtained_at),
        )
        return token


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
