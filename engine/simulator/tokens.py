"""Auth tokens: application-token logins issue HS384 JWTs shaped like the recorded real ones.

The signature is a real HMAC with a per-simulator secret, but clients are not expected to
check it; they decode the payload to read `exp` (emnify-api.md §2.2).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import Enum

import orjson

from engine.simulator.config import ORGANISATION_ID, ORGANISATION_NAME

_APP_TOKEN_ID = 4711


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenCheck(Enum):
    VALID = "valid"
    MALFORMED = "malformed"  # what the API Gateway rejects before the API sees it
    UNKNOWN = "unknown"  # well-formed, but not signed by this simulator
    EXPIRED = "expired"  # past `exp`, or revoked


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    issued_at: int
    expires_at: int


class TokenIssuer:
    """Not thread-safe on its own; `SimulatorState` holds the lock."""

    def __init__(
        self, ttl: float, organisation: tuple[int, str] = (ORGANISATION_ID, ORGANISATION_NAME)
    ) -> None:
        self._ttl = ttl
        self._organisation = organisation
        self._secret = secrets.token_bytes(32)
        self._issued: dict[str, IssuedToken] = {}
        self._serial = 0

    def issue(self, now: float) -> IssuedToken:
        self._serial += 1
        issued_at = int(now)
        expires_at = issued_at + int(self._ttl)
        header = _b64(orjson.dumps({"alg": "HS384"}))
        payload = _b64(
            orjson.dumps(
                {
                    "aud": "/api/v1/authentication",
                    "esc.app": _APP_TOKEN_ID,
                    "esc.org": self._organisation[0],
                    "esc.orgName": self._organisation[1],
                    "iss": "https://cdn.emnify.net/api/v1/authenticate",
                    "iat": issued_at,
                    "exp": expires_at,
                    # Two logins in the same second must still give different tokens.
                    "jti": f"{self._serial}-{secrets.token_hex(4)}",
                }
            )
        )
        signing_input = f"{header}.{payload}".encode("ascii")
        signature = _b64(hmac.new(self._secret, signing_input, hashlib.sha384).digest())
        token = IssuedToken(f"{header}.{payload}.{signature}", issued_at, expires_at)
        self._issued[token.token] = token
        return token

    def check(self, token: str | None, now: float) -> TokenCheck:
        if not token or token.count(".") != 2:
            return TokenCheck.MALFORMED
        issued = self._issued.get(token)
        if issued is None:
            return TokenCheck.UNKNOWN
        if now >= issued.expires_at:
            return TokenCheck.EXPIRED
        return TokenCheck.VALID

    def revoke_all(self) -> int:
        """Make every issued token expire now; the next call with one gets `TokenExpired`."""
        for token in list(self._issued.values()):
            self._issued[token.token] = IssuedToken(token.token, token.issued_at, 0)
        return len(self._issued)

    def issued(self) -> list[IssuedToken]:
        return list(self._issued.values())
