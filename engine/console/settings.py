"""The console's logins, read from the environment variables or files `ui:` names (never
from the config itself, so a config file can be shared without handing out the console)."""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from engine import secrets
from engine.config import UiSettings
from engine.errors import EngineError

OPERATOR = "operator"
VIEWER = "viewer"


@dataclass(frozen=True, slots=True)
class Logins:
    """The console's passwords (or tokens: the same string opens a page and `/api/...`)."""

    operator: str | None
    viewer: str | None

    def role_of(self, given: str) -> str | None:
        """The role `given` logs in as, compared in constant time; None when it opens none."""
        role = None
        for name, token in ((OPERATOR, self.operator), (VIEWER, self.viewer)):
            if token and hmac.compare_digest(token.encode(), given.encode()):
                role = role or name
        return role


def read_logins(settings: UiSettings, env: dict[str, str] | None = None) -> Logins:
    """The logins from their files or variables; EngineError when the console is on and no
    login is set, since a console nobody can open is a mistake worth stopping for."""
    env = dict(os.environ) if env is None else env
    operator = _read(settings.operator_token_file, settings.operator_token_env, env)
    viewer = _read(settings.viewer_token_file, settings.viewer_token_env, env)
    if operator is None and viewer is None:
        raise EngineError(
            "ui: the console is enabled but has no login: set "
            f"{settings.operator_token_env} (or ui.operator_token_file) and/or "
            f"{settings.viewer_token_env} (or ui.viewer_token_file)"
        )
    for token in (operator, viewer):
        if token is not None:
            secrets.register(token)  # never logged
    return Logins(operator=operator, viewer=viewer)


def _read(path: str | None, variable: str, env: dict[str, str]) -> str | None:
    if path is not None:
        try:
            text = Path(path).read_text().strip()
        except OSError as error:
            raise EngineError(f"ui: cannot read the login file {path}: {error.strerror}") from None
        return text or None
    return env.get(variable, "").strip() or None
