"""Who is asking: signed session cookies, CSRF tokens, bearer tokens, and the login's rate.

The cookie holds the role, the person's name (a named user's) and the session's CSRF token,
signed with a key made at start (a restart logs everyone out, which is the safe failure).
It is HttpOnly and SameSite=Strict; a form must also carry the session's CSRF token, so a
page elsewhere cannot press a button.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

from engine.console.settings import Login, Logins

COOKIE = "engine_console"
SESSION_SECONDS = 12 * 3600
_LOGIN_FORM_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class Session:
    role: str
    csrf: str
    who: str  # how the audit log names the person: name (a named user's), role and address
    name: str | None = None


def _who(login: Login, client: str) -> str:
    """`alice (operator)@10.0.0.7` for a named user, `operator@10.0.0.7` for a shared login."""
    return f"{login.name} ({login.role})@{client}" if login.name else f"{login.role}@{client}"


class Sessions:
    def __init__(self, logins: Logins, attempts_per_minute: int) -> None:
        self.logins = logins
        self._signer = URLSafeTimedSerializer(secrets.token_bytes(32), salt="console-session")
        self._form_signer = URLSafeTimedSerializer(secrets.token_bytes(32), salt="console-login")
        self._attempts_per_minute = attempts_per_minute
        self._failures: dict[str, deque[float]] = {}

    def open(self, login: Login, client: str) -> tuple[Session, str]:
        """A new session and its cookie value."""
        session = Session(
            role=login.role,
            csrf=secrets.token_urlsafe(24),
            who=_who(login, client),
            name=login.name,
        )
        value = self._signer.dumps(
            {"role": login.role, "csrf": session.csrf, "who": session.who, "name": login.name}
        )
        return session, value

    def read(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        try:
            data = self._signer.loads(cookie, max_age=SESSION_SECONDS)
        except BadSignature:
            return None
        return Session(role=data["role"], csrf=data["csrf"], who=data["who"], name=data.get("name"))

    def bearer(self, authorization: str | None, client: str) -> Session | None:
        """A script's session from `Authorization: Bearer TOKEN` (no CSRF: no cookie). A
        wrong token counts as a failed login, and past the limit none is accepted."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        if not self.login_allowed(client):
            return None
        login = self.logins.login_of(authorization[7:].strip())
        if login is None:
            self.login_failed(client)
            return None
        return Session(role=login.role, csrf="", who=_who(login, client), name=login.name)

    def login_form_token(self) -> str:
        return self._form_signer.dumps("login")

    def login_form_token_valid(self, token: str) -> bool:
        try:
            self._form_signer.loads(token, max_age=_LOGIN_FORM_SECONDS)
        except BadSignature:
            return False
        return True

    def login_allowed(self, client: str, now: float | None = None) -> bool:
        """False while `client` has used up its failed logins of the last minute."""
        now = time.monotonic() if now is None else now
        failures = self._failures.get(client)
        if failures is None:
            return True
        while failures and failures[0] <= now - 60.0:
            failures.popleft()
        return len(failures) < self._attempts_per_minute

    def login_failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._failures.setdefault(client, deque()).append(now)


def csrf_matches(session: Session, given: str | None) -> bool:
    return bool(session.csrf) and given is not None and hmac.compare_digest(session.csrf, given)
