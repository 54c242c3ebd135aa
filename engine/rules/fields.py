"""Reading one YAML mapping of a rule file: its keys, their types, their lines.

A `Section` wraps a mapping with the file it came from and what error messages call it
("rule `x`", "rule `x` → when"), and records every problem it finds instead of stopping
at the first, so one run of the loader reports the whole rule set. Warnings (a rule that
loads but likely does not do what its author meant) are recorded beside the errors.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from datetime import timedelta

from engine.errors import ConfigError, Location
from engine.rules.durations import DURATION_HINT, DurationTooLong, parse_duration
from engine.rules.yaml_lines import YamlList, YamlMapping, shown_key

DOTTED_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def describe(value: object) -> str:
    """How a YAML value reads in an error message: `the string "yes"`, `a list`."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def did_you_mean(word: object, choices: Collection[str]) -> str | None:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


def line_of(container: object, key: object) -> int | None:
    """The line of `key` in a YamlMapping or of item `key` in a YamlList, if known."""
    if isinstance(container, YamlMapping):
        return container.line_of(key)
    if isinstance(container, YamlList) and isinstance(key, int):
        return container.line_of(key)
    return None


class Section:
    """One mapping of a rule file under validation."""

    __slots__ = ("data", "errors", "file", "label", "warnings")

    def __init__(
        self,
        data: YamlMapping,
        file: str,
        label: str,
        errors: list[ConfigError],
        warnings: list[ConfigError] | None = None,
    ):
        self.data = data
        self.file = file
        self.label = label
        self.errors = errors
        self.warnings: list[ConfigError] = [] if warnings is None else warnings

    def at(self, key: object = None) -> Location:
        """Where `key` is written; the mapping's own line without a key."""
        return Location(self.file, self.data.line if key is None else self.data.line_of(key))

    def error(self, key: object, message: str, hint: str | None = None) -> None:
        self.errors.append(ConfigError(f"{self.label}: {message}", self.at(key), hint))

    def error_at(self, where: Location, message: str, hint: str | None = None) -> None:
        self.errors.append(ConfigError(f"{self.label}: {message}", where, hint))

    def warn(self, key: object, message: str, hint: str | None = None) -> None:
        self.warnings.append(ConfigError(f"{self.label}: {message}", self.at(key), hint))

    def warn_at(self, where: Location, message: str, hint: str | None = None) -> None:
        self.warnings.append(ConfigError(f"{self.label}: {message}", where, hint))

    def check_keys(self, allowed: Collection[str]) -> None:
        """Reject keys outside `allowed`, suggesting the closest known one."""
        for key in self.data:
            if key not in allowed:
                hint = did_you_mean(key, allowed) or "known keys: " + ", ".join(
                    f"`{k}`" for k in allowed
                )
                self.error(key, f"unknown key `{shown_key(key)}`", hint)

    def require(self, key: str, hint: str | None = None) -> bool:
        if key in self.data:
            return True
        self.error(None, f"missing `{key}`", hint)
        return False

    def sub(self, key: str, label: str) -> Section | None:
        """The mapping under `key` as a Section; None (with an error) when it is not one."""
        value = self.data.get(key)
        if isinstance(value, YamlMapping):
            label = f"{self.label} → {label}"
            return Section(value, self.file, label, self.errors, self.warnings)
        self.error(key, f"`{key}` must be a mapping, got {describe(value)}")
        return None

    def text(self, key: str, *, default: str | None = None) -> str | None:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            return value
        self.error(key, f"`{key}` must be a string, got {describe(value)}", "quote it")
        return default

    def flag(self, key: str, *, default: bool) -> bool:
        value = self.data.get(key, default)
        if isinstance(value, bool):
            return value
        self.error(key, f"`{key}` must be true or false, got {describe(value)}")
        return default

    def count(self, key: str) -> int | None:
        value = self.data.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        self.error(key, f"`{key}` must be a whole number of at least 1, got {describe(value)}")
        return None

    def duration(self, key: str) -> timedelta | None:
        """A positive duration such as `10m`."""
        value = self.data.get(key)
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            parsed = parse_duration(value)
        except DurationTooLong as error:
            self.error(key, f"`{key}`: {error}", "no window, throttle or delay needs more")
            return None
        except ValueError:
            self.error(key, f"`{key}` is not a duration: {describe(value)}", DURATION_HINT)
            return None
        if parsed <= timedelta(0):
            self.error(key, f"`{key}` must be longer than zero", DURATION_HINT)
            return None
        return parsed

    def dotted_path(self, key: str) -> str | None:
        """A field of the event such as `sim.iccid` (what windows and throttles group by)."""
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, str) and DOTTED_PATH.fullmatch(value):
            return value
        self.error(
            key,
            f"`{key}` must be a dotted path into the event, got {describe(value)}",
            "e.g. sim.iccid or endpoint.id",
        )
        return None
