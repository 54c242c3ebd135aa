"""Secrets: `${NAME}` references resolved from the environment (or a `NAME_FILE` file), and
remembered so that the log redactor can blank them wherever they would appear."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from engine.errors import EngineError

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_known: set[str] = set()
# Longest first: a secret that holds another (a base URL and the same URL with its token)
# is blanked whole before the shorter one could cut it and leave the rest showing.
_by_length: tuple[str, ...] = ()
_MIN_SECRET_LENGTH = 4  # shorter values would blank ordinary words in log lines


class MissingSecretError(EngineError):
    """A `${NAME}` reference whose variable (and `NAME_FILE`) is not set."""


def register(value: str) -> str:
    """Remember a secret value so it is redacted from every log line; returns it unchanged."""
    global _by_length
    if len(value) >= _MIN_SECRET_LENGTH and value not in _known:
        _known.add(value)
        _by_length = tuple(sorted(_known, key=len, reverse=True))
    return value


def read_secret(name: str, env: Mapping[str, str] | None = None) -> str:
    """Value of `name` from the environment, or from the file named by `name_FILE`."""
    env = os.environ if env is None else env
    if name in env:
        return register(env[name])
    path = env.get(f"{name}_FILE")
    if path:
        try:
            return register(Path(path).read_text(encoding="utf-8").strip())
        except OSError as error:
            raise MissingSecretError(f"cannot read {name}_FILE={path}: {error.strerror}") from None
    raise MissingSecretError(f"environment variable {name} (or {name}_FILE) is not set")


def references(text: str) -> list[str]:
    """Names of the `${NAME}` references in `text`."""
    return _REF.findall(text)


def is_reference_only(text: str) -> bool:
    """True when `text` holds `${NAME}` references and nothing else."""
    return bool(references(text)) and not _REF.sub("", text).strip()


def expand(text: str, env: Mapping[str, str] | None = None) -> str:
    """Replace every `${NAME}` in `text` with its secret value."""
    if "${" not in text:
        return text
    return _REF.sub(lambda m: read_secret(m.group(1), env), text)


def redact(text: str) -> str:
    """`text` with every known secret value replaced by `***`."""
    for value in _by_length:
        if value in text:
            text = text.replace(value, "***")
    return text
