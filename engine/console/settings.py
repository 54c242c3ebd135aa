"""The console's logins, read from the environment variables or files `ui:` names (never
from the config itself, so a config file can be shared without handing out the console).

Two kinds: one shared token per role (`operator_token_env`, `viewer_token_env` or their
files), and named users (`ui.users`), whose presses the audit log names by person."""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from engine import secrets
from engine.config import UiSettings, UiUser
from engine.errors import ConfigError, EngineError

OPERATOR = "operator"
VIEWER = "viewer"


@dataclass(frozen=True, slots=True)
class Login:
    """Who a token logs in as: a role, and the person's name for a named user."""

    role: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Logins:
    """The console's passwords (or tokens: the same string opens a page and `/api/...`)."""

    tokens: tuple[tuple[str, Login], ...]

    def login_of(self, given: str) -> Login | None:
        """Who `given` logs in as, None when it opens nothing. Every token is compared, each
        in constant time, so the answer's timing says nothing about which one matched."""
        found = None
        for token, login in self.tokens:
            if hmac.compare_digest(token.encode(), given.encode()) and found is None:
                found = login
        return found


def read_logins(settings: UiSettings, env: dict[str, str] | None = None) -> Logins:
    """The logins from their files or variables; EngineError when the console is on and no
    login is set, since a console nobody can open is a mistake worth stopping for, and
    ConfigError when a user's token cannot be read or two logins share a token."""
    env = dict(os.environ) if env is None else env
    tokens: list[tuple[str, Login]] = []
    for role, path, variable in (
        (OPERATOR, settings.operator_token_file, settings.operator_token_env),
        (VIEWER, settings.viewer_token_file, settings.viewer_token_env),
    ):
        token = _read(path, variable, env)
        if token is not None:
            tokens.append((token, Login(role)))
    if not tokens and not settings.users:
        raise EngineError(
            "ui: the console is enabled but has no login: set "
            f"{settings.operator_token_env} (or ui.operator_token_file) and/or "
            f"{settings.viewer_token_env} (or ui.viewer_token_file), or list ui.users"
        )
    for user in settings.users:
        token = _user_token(user, env)
        _refuse_taken_token(user, token, tokens)
        tokens.append((token, Login(user.role, user.name)))
    for token, _ in tokens:
        secrets.register(token)  # never logged
    return Logins(tuple(tokens))


def _read(path: str | None, variable: str, env: dict[str, str]) -> str | None:
    if path is not None:
        try:
            text = Path(path).read_text().strip()
        except OSError as error:
            raise EngineError(f"ui: cannot read the login file {path}: {error.strerror}") from None
        return text or None
    return env.get(variable, "").strip() or None


def _user_token(user: UiUser, env: dict[str, str]) -> str:
    whose = f"console user `{user.name}`"
    try:
        if user.token_file is not None:
            token = user.token_file.read_text(encoding="utf-8").strip()
        else:
            token = secrets.expand(user.token_reference or "", env).strip()
    except OSError as error:
        raise ConfigError(
            f"cannot read the token file of {whose} ({user.token_file}): {error.strerror}",
            user.where,
        ) from None
    except secrets.MissingSecretError as error:
        raise ConfigError(f"no token for {whose}: {error}", user.where) from None
    if not token:
        raise ConfigError(f"the token of {whose} is empty", user.where)
    return token


def _refuse_taken_token(user: UiUser, token: str, taken: list[tuple[str, Login]]) -> None:
    """Two logins with one token could not tell the audit log who pressed a button."""
    for other, login in taken:
        if hmac.compare_digest(other.encode(), token.encode()):
            shown = f"user `{login.name}`" if login.name else f"the shared {login.role} login"
            raise ConfigError(
                f"console user `{user.name}` has the same token as {shown}",
                user.where,
                "give each login its own token (e.g. `openssl rand -hex 24`)",
            )
