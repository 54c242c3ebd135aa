"""Reading one mapping of a YAML file: its keys, their types, their lines.

Rule files, rule-test files and the config file are all read through `Section`. It wraps a
mapping from `engine.yamlfile` (which knows the line of each key) with the file it came
from, reads keys through checks that say in one way what a value must be (`as_text`,
`as_flag`, `whole_number`, `number`, `duration`, `one_of`, or a check of the caller's own),
reports keys nobody reads with a did-you-mean, and puts `file:line` on every problem.

The two kinds of file keep the conventions their readers know:
- a rule or rule-test file reports every problem of a run at once (errors are collected,
  warnings beside them), each message starting with what the mapping is ("rule `x` →
  threshold: ..."); a key left empty is a value the checks judge, except for texts, where
  it means none;
- the config file stops at its first problem (the engine starts on none of them), names
  each option by its dotted path (`poller.interval`), and an option left empty takes its
  default (`Section.config_file`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection
from datetime import timedelta
from typing import Any, TypeVar, overload

from engine.durations import DURATION_HINT, MAX_DURATION, DurationTooLong, parse_duration
from engine.errors import ConfigError, Location
from engine.yamlfile import YamlList, YamlMapping, shown_key

_T = TypeVar("_T")
_D = TypeVar("_D")

# A check turns a value into what the reader wants, or raises ConfigError saying what it
# must be; it gets the key's name as messages show it (`count`, `poller.interval`), and the
# Section adds where and whose.
Check = Callable[[Any, str], _T]


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


# --- checks --------------------------------------------------------------------------------


def as_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"`{name}` must be a string, got {describe(value)}", hint="quote it")
    return value


def as_flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"`{name}` must be true or false, got {describe(value)}")
    return value


def whole_number(minimum: int) -> Check[int]:
    def check(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(
                f"`{name}` must be a whole number of at least {minimum:,}, got {describe(value)}"
            )
        return value

    return check


def number(minimum: float) -> Check[float]:
    def check(value: Any, name: str) -> float:
        # `not >=` also refuses NaN, which no comparison lets through.
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
            raise ConfigError(
                f"`{name}` must be a number of at least {minimum:g}, got {describe(value)}"
            )
        return float(value)

    return check


def duration(*, longer_than_zero: bool = True, seconds: bool = False) -> Check[timedelta]:
    """A duration written as rule files write them (`10m`, `1h30m`); with `seconds`, a bare
    number counts as seconds too (the config file's older form)."""
    hint = f"{DURATION_HINT}, or a number of seconds" if seconds else DURATION_HINT

    def check(value: Any, name: str) -> timedelta:
        if seconds and isinstance(value, int | float) and not isinstance(value, bool):
            if not abs(value) <= MAX_DURATION.total_seconds():  # also refuses NaN
                raise ConfigError(
                    f"`{name}` must be a number of seconds up to {MAX_DURATION.days} days"
                )
            parsed = timedelta(seconds=value)
        else:
            try:
                if not isinstance(value, str):
                    raise ValueError(value)
                parsed = parse_duration(value)
            except DurationTooLong as error:
                raise ConfigError(
                    f"`{name}`: {error}", hint="no window, throttle or delay needs more"
                ) from None
            except ValueError:
                raise ConfigError(
                    f"`{name}` is not a duration: {describe(value)}", hint=hint
                ) from None
        if longer_than_zero and parsed <= timedelta(0):
            raise ConfigError(f"`{name}` must be longer than zero", hint=hint)
        return parsed

    return check


def one_of(*choices: str) -> Check[str]:
    def check(value: Any, name: str) -> str:
        if value not in choices:
            raise ConfigError(
                f"`{name}` must be one of {', '.join(choices)}, got {describe(value)}",
                hint=did_you_mean(value, choices) if isinstance(value, str) else None,
            )
        return str(value)

    return check


# --- the section ---------------------------------------------------------------------------


class Section:
    """One mapping of a YAML file under validation.

    `errors` collects the problems, `warnings` what only deserves a warning; `label` starts
    every message ("rule `x` → when"). Keys are read with `get` (or its shortcuts `text`,
    `flag`, `count`, `duration`); `check_keys` or `finish` reports the keys left over.
    """

    __slots__ = ("_options", "data", "errors", "file", "label", "path", "read", "warnings")

    def __init__(
        self,
        data: YamlMapping,
        file: str,
        label: str = "",
        errors: list[ConfigError] | None = None,
        warnings: list[ConfigError] | None = None,
    ):
        self.data = data
        self.file = file
        self.label = label
        self.errors: list[ConfigError] = [] if errors is None else errors
        self.warnings: list[ConfigError] = [] if warnings is None else warnings
        self.read: list[str] = []  # keys asked for, in order: what `finish` allows
        self.path = ""  # before a key's name in messages: "poller." (config file only)
        self._options = False  # the config file's conventions (see the module docstring)

    @classmethod
    def config_file(cls, data: YamlMapping, file: str) -> Section:
        """The top of a config file: options named by dotted path, an empty option takes its
        default, and the first problem is raised."""
        section = cls(data, file)
        section._options = True
        return section

    # --- where and what ----------------------------------------------------------------

    def at(self, key: object = None) -> Location:
        """Where `key` is written; the mapping's own line without a key."""
        return Location(self.file, self.data.line if key is None else self.data.line_of(key))

    def name_of(self, key: object) -> str:
        """A key as messages name it: `count` in a rule, `poller.interval` in the config."""
        return f"{self.path}{shown_key(key)}"

    def error(self, key: object, message: str, hint: str | None = None) -> None:
        self.error_at(self.at(key), message, hint)

    def error_at(self, where: Location, message: str, hint: str | None = None) -> None:
        error = ConfigError(self._whose(message), where, hint)
        if self._options:
            raise error
        self.errors.append(error)

    def warn(self, key: object, message: str, hint: str | None = None) -> None:
        self.warn_at(self.at(key), message, hint)

    def warn_at(self, where: Location, message: str, hint: str | None = None) -> None:
        self.warnings.append(ConfigError(self._whose(message), where, hint))

    def _whose(self, message: str) -> str:
        return f"{self.label}: {message}" if self.label else message

    # --- keys ----------------------------------------------------------------------------

    def check_keys(self, allowed: Collection[str]) -> None:
        """Report keys outside `allowed`, suggesting the closest known one."""
        noun = "option" if self._options else "key"
        for key in self.data:
            if key not in allowed:
                hint = did_you_mean(key, allowed) or f"known {noun}s: " + ", ".join(
                    f"`{k}`" for k in allowed
                )
                self.error(key, f"unknown {noun} `{self.name_of(key)}`", hint)

    def finish(self) -> None:
        """Report the keys nobody read (`check_keys` with the keys read so far)."""
        self.check_keys(self.read)

    def require(self, key: str, hint: str | None = None) -> bool:
        if key in self.data:
            return True
        self.error(None, f"missing `{key}`", hint)
        return False

    # --- values --------------------------------------------------------------------------

    def get(self, key: str, check: Check[_T], default: _D) -> _T | _D:
        """The value under `key` as `check` reads it; `default` when the key is absent (or
        empty, in the config file), or, after reporting it, when the check refuses it."""
        return self._get(key, check, default, empty_is_default=self._options)

    @overload
    def text(self, key: str) -> str | None: ...
    @overload
    def text(self, key: str, *, default: str) -> str: ...
    def text(self, key: str, *, default: str | None = None) -> str | None:
        """A string; an empty key is no text (the default)."""
        return self._get(key, as_text, default, empty_is_default=True)

    def flag(self, key: str, *, default: bool) -> bool:
        return self.get(key, as_flag, default)

    def count(self, key: str) -> int | None:
        """A whole number of at least 1 (None when absent: `require` it first if needed)."""
        return self.get(key, _COUNT, None)

    def duration(self, key: str) -> timedelta | None:
        """A duration longer than zero, written like `10m` (None when absent)."""
        return self.get(key, _SPAN, None)

    def _get(self, key: str, check: Check[_T], default: _D, *, empty_is_default: bool) -> _T | _D:
        self.read.append(key)
        value = self.data.get(key)
        if value is None and (empty_is_default or key not in self.data):
            return default
        try:
            return check(value, self.name_of(key))
        except ConfigError as error:
            self.error_at(error.where or self.at(key), error.message, error.hint)
            return default

    # --- nested mappings -----------------------------------------------------------------

    def entries(
        self, key: str, what: str, example: str | None = None, *, at_least_one: bool = False
    ) -> list[tuple[int, YamlMapping]]:
        """`key`'s list of mappings (`mute_windows`, `organisations`, `ui.users`), each with
        its index; none when the key is absent. A value that is not such a list, or an empty
        one with `at_least_one`, is refused with file:line and `example`."""
        self.read.append(key)
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, YamlList) or (at_least_one and not value):
            raise ConfigError(
                f"`{self.name_of(key)}` must be a list of {what}, got {describe(value)}",
                self.at(key),
                example,
            )
        found: list[tuple[int, YamlMapping]] = []
        for index, item in enumerate(value):
            if not isinstance(item, YamlMapping):
                raise ConfigError(
                    f"`{self.name_of(key)}[{index}]` must be a mapping, got {describe(item)}",
                    Location(self.file, value.line_of(index)),
                    example,
                )
            found.append((index, item))
        return found

    def sub(self, key: str, label: str | None = None) -> Section | None:
        """The mapping under `key` as a Section; None (with an error) when it is not one, so
        that the caller skips what it holds."""
        self.read.append(key)
        value = self.data.get(key)
        if isinstance(value, YamlMapping):
            return self._child(value, key, label)
        self._not_a_mapping(key, value)
        return None

    def section(self, key: str, label: str | None = None) -> Section:
        """The mapping under `key` as a Section, an empty one when it is absent or empty.
        When it is anything else, that is reported and an empty Section stands in, so that
        reading goes on with defaults."""
        self.read.append(key)
        value = self.data.get(key)
        if not isinstance(value, YamlMapping):
            if value is not None:
                self._not_a_mapping(key, value)
            value = YamlMapping(self.data.line_of(key))
        return self._child(value, key, label)

    def _not_a_mapping(self, key: str, value: object) -> None:
        self.error(key, f"`{self.name_of(key)}` must be a mapping, got {describe(value)}")

    def _child(self, data: YamlMapping, key: str, label: str | None) -> Section:
        child = Section(data, self.file, self.label, self.errors, self.warnings)
        child._options = self._options
        if self._options:
            child.path = f"{self.path}{key}."
        else:
            child.label = f"{self.label} → {label or key}"
        return child


_COUNT = whole_number(1)
_SPAN = duration()
