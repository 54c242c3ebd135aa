"""Several emnify organisations watched by one engine: the config's `organisations:` list.

Each organisation has a name (how the engine, its audit log, `status` and `/metrics` call
it), its own application token (`${NAME}` or `application_token_file`, never in the file),
optionally its own rule folder and its own rate limits. The daemon gives each its own
client (its own login and rate budget) and its own poller (its own cursor and seen ids);
one whose token is refused is paused alone. A config without `organisations:` watches the
single organisation of `api.application_token`, exactly as before the list existed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine import secrets
from engine.emnify import ClientSettings
from engine.errors import ConfigError, Location
from engine.section import Section, as_text, number
from engine.yamlfile import YamlMapping

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_EXAMPLE = "e.g. - {name: acme, application_token: ${ACME_TOKEN}}"


@dataclass(frozen=True, slots=True)
class Organisation:
    """One organisation of `organisations:`, checked."""

    name: str
    api: ClientSettings
    token_reference: str | None = None  # `${NAME}`
    token_file: Path | None = None
    rules: Path | None = None  # its own rule folder (or file)
    where: Location | None = None

    def application_token(self) -> str:
        """Resolve its application token now (it is needed only by `run`)."""
        if self.token_file is not None:
            try:
                token = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as error:
                raise ConfigError(
                    f"cannot read the application token of organisation {self.name!r}"
                    f" ({self.token_file}): {error.strerror}",
                    self.where,
                ) from None
            return secrets.register(token)
        assert self.token_reference is not None
        try:
            return secrets.expand(self.token_reference)
        except secrets.MissingSecretError as error:
            raise ConfigError(
                f"no application token for organisation {self.name!r}: {error}",
                self.where,
                "create one in that organisation's emnify Portal (Integrations → Application"
                " Tokens) and export it as the variable its `application_token` names",
            ) from None


def read_organisations(top: Section, api: ClientSettings, base: Path) -> tuple[Organisation, ...]:
    """The config's `organisations:` list (empty when absent), each entry checked with
    file:line; `api` is what each starts from (its own `api:` may change the rate limits)."""
    found: list[Organisation] = []
    for index, item in top.entries("organisations", "organisations", _EXAMPLE, at_least_one=True):
        organisation = _organisation(item, index, top.file, api, base)
        for earlier in found:
            if earlier.name == organisation.name:
                raise ConfigError(
                    f"two organisations are named {organisation.name!r}"
                    f" (`organisations[{index}].name`)",
                    organisation.where,
                    "give each its own name: its cursor, seen ids and audit rows are kept under it",
                )
        found.append(organisation)
    return tuple(found)


def _organisation(
    item: YamlMapping, index: int, file: str, api: ClientSettings, base: Path
) -> Organisation:
    section = Section.config_file(item, file)
    section.path = f"organisations[{index}]."
    where = Location(file, item.line_of("name"))  # the entry's own line without a name
    name = section.get("name", _name, "")
    if not name:
        raise ConfigError(
            f"`organisations[{index}]` needs a `name`",
            Location(file, item.line),
            "e.g. name: acme (lower-case letters, digits, - and _)",
        )
    reference = section.get("application_token", _token_reference, None)
    token_file = section.get("application_token_file", as_text, "")
    rules = section.get("rules", as_text, "")
    own_api = replace(
        _own_api(section, api), token_source=f"the application token of organisation {name}"
    )
    section.finish()
    if reference and token_file:
        raise ConfigError(
            f"organisation {name!r} has both `application_token` and `application_token_file`",
            section.at("application_token_file"),
            "keep one",
        )
    if not reference and not token_file:
        raise ConfigError(
            f"organisation {name!r} has no application token"
            f" (`organisations[{index}].application_token`)",
            where,
            "add `application_token: ${NAME}` naming an environment variable, or"
            " `application_token_file: /run/secrets/...`",
        )
    return Organisation(
        name=name,
        api=own_api,
        token_reference=reference,
        token_file=_resolve(base, token_file) if token_file else None,
        rules=_resolve(base, rules) if rules else None,
        where=where,
    )


def _own_api(section: Section, api: ClientSettings) -> ClientSettings:
    """An organisation's own rate limits (`api: {event_rate_limit, action_rate_limit}`)."""
    own = section.section("api")
    changed = replace(
        api,
        event_rate_limit=own.get("event_rate_limit", number(0.1), api.event_rate_limit),
        action_rate_limit=own.get("action_rate_limit", number(0.1), api.action_rate_limit),
    )
    own.finish()
    return changed


def _name(value: Any, name: str) -> str:
    text = as_text(value, name)
    if not _NAME.fullmatch(text):
        raise ConfigError(
            f"`{name}` must be lower-case letters, digits, - and _ (at most 40), got {text!r}",
            hint="it names the organisation in metrics labels, the audit log and `status`",
        )
    return text


def _token_reference(value: Any, name: str) -> str:
    text = as_text(value, name)
    if not secrets.is_reference_only(text):
        raise ConfigError(
            f"`{name}` must reference an environment variable, not hold the token itself",
            hint="write `application_token: ${ACME_TOKEN}` or use `application_token_file`",
        )
    return text


def _resolve(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path
