"""The engine's config file: YAML, checked once into frozen settings, errors with file:line.

Secrets never live in the file itself: the application token comes from `${NAME}` (an
environment variable, or a file named by `NAME_FILE`) or from `application_token_file`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import yaml

from engine import secrets
from engine.dispatch import RetryPolicy
from engine.emnify import ClientSettings
from engine.errors import ConfigError, Location
from engine.http.settings import HttpSettings
from engine.retention import RetentionSettings
from engine.rules.durations import MAX_DURATION, parse_duration
from engine.rules.model import MaxActions
from engine.rules.yaml_lines import MAX_DEPTH, check_cost, read_yaml_file, shown_key, syntax_hint
from engine.sources import registered as registered_sources

DEFAULT_TOKEN_VARIABLE = "EMNIFY_APPLICATION_TOKEN"
DEFAULT_SOURCES: tuple[str, ...] = ("poller",)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Config:
    api: ClientSettings = field(default_factory=ClientSettings)
    token_reference: str = f"${{{DEFAULT_TOKEN_VARIABLE}}}"
    token_file: Path | None = None
    rules: Path = Path("rules")
    store_path: Path = Path("state/engine.sqlite3")
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    concurrency: int = 4
    webhook_concurrency: int = 8
    webhook_per_host: int = 2
    dry_run: bool = False
    log_level: str = "info"
    log_format: str = "auto"
    source: Path | None = None
    http: HttpSettings = field(default_factory=HttpSettings)
    # The sources to run, by registered name, and every registered source's settings (read
    # from the section named like it, whether listed or not), by name.
    sources: tuple[str, ...] = DEFAULT_SOURCES
    source_settings: Mapping[str, object] = field(default_factory=dict)
    # The global blast-radius guard: destructive actions of all rules together.
    guard_max_actions: MaxActions | None = None
    retention: RetentionSettings = field(default_factory=RetentionSettings)

    def with_source_settings(self, **settings: object) -> Config:
        """This config with some sources' settings replaced, by source name (the demo, tests)."""
        return replace(self, source_settings={**self.source_settings, **settings})

    def application_token(self) -> str:
        """Resolve the application token now (it is needed only by `run`)."""
        if self.token_file is not None:
            try:
                token = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as error:
                raise ConfigError(
                    f"cannot read api.application_token_file {self.token_file}: {error.strerror}"
                ) from None
            return secrets.register(token)
        try:
            return secrets.expand(self.token_reference)
        except secrets.MissingSecretError as error:
            raise ConfigError(
                f"no application token: {error}",
                hint="create one in the emnify Portal (Integrations → Application Tokens) and "
                f"export it as {DEFAULT_TOKEN_VARIABLE}",
            ) from None


class _Lines(yaml.SafeLoader):
    """A YAML loader that remembers each mapping's key lines (`__lines__`)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as error:
            # E.g. `!!int abc`, a date that does not exist, an unhashable key: located here.
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {error}", node.start_mark
            ) from None


def _construct_mapping(loader: _Lines, node: yaml.MappingNode) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise ConfigError(
                f"duplicate key `{shown_key(key)}` (first at line {lines[key]})",
                Location(loader.name, key_node.start_mark.line + 1),
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
        lines[key] = key_node.start_mark.line + 1
    mapping["__lines__"] = lines
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_Lines.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Section:
    """Reads one mapping of the config, consuming keys so the leftovers can be reported."""

    def __init__(self, data: Any, name: str, file: str, line: int):
        if data is None:
            data = {"__lines__": {}, "__line__": line}
        if not isinstance(data, dict):
            raise ConfigError(f"`{name}` must be a mapping", Location(file, line))
        self.data = data
        self.name = name
        self.file = file
        self.lines: dict[str, int] = data.get("__lines__", {})
        self.line = data.get("__line__", line)
        self.known: list[str] = []

    def where(self, key: str) -> Location:
        return Location(self.file, self.lines.get(key, self.line))

    def get(self, key: str, convert: Callable[[Any, str], _T], default: _T) -> _T:
        self.known.append(key)
        if key not in self.data or self.data[key] is None:
            return default
        try:
            return convert(self.data[key], self._path(key))
        except ConfigError as error:
            raise ConfigError(error.message, self.where(key), error.hint) from None

    def section(self, key: str) -> _Section:
        self.known.append(key)
        return _Section(self.data.get(key), self._path(key), self.file, self.lines.get(key, 1))

    def finish(self) -> None:
        for key in self.data:
            if key in ("__lines__", "__line__") or key in self.known:
                continue
            close = difflib.get_close_matches(str(key), self.known, n=1)
            hint = f"did you mean `{close[0]}`?" if close else "allowed: " + ", ".join(self.known)
            raise ConfigError(
                f"unknown option `{self._path(shown_key(key))}`", self.where(key), hint
            )

    def _path(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"`{path}` must be a string")
    return value


def _number(minimum: float) -> Callable[[Any, str], float]:
    def convert(value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise ConfigError(
                f"`{path}` must be a number ≥ {minimum}, got {shown_key(repr(value))}"
            )
        return float(value)

    return convert


def _int(minimum: int) -> Callable[[Any, str], int]:
    def convert(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(
                f"`{path}` must be an integer ≥ {minimum}, got {shown_key(repr(value))}"
            )
        return value

    return convert


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"`{path}` must be true or false, got {shown_key(repr(value))}")
    return value


def _duration(value: Any, path: str) -> timedelta:
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not abs(value) <= MAX_DURATION.total_seconds():  # also refuses NaN
            raise ConfigError(
                f"`{path}` must be a number of seconds up to {MAX_DURATION.days} days"
            )
        return timedelta(seconds=value)
    if not isinstance(value, str):
        raise ConfigError(f"`{path}` must be a duration like 10s, 5m or 24h")
    try:
        return parse_duration(value)
    except ConfigError as error:
        raise ConfigError(f"`{path}`: {error.message}", hint=error.hint) from None
    except ValueError as error:  # parse_duration's own complaint, e.g. `5 minutes`
        raise ConfigError(f"`{path}`: {error}") from None


def _choice(*choices: str) -> Callable[[Any, str], str]:
    def convert(value: Any, path: str) -> str:
        if value not in choices:
            raise ConfigError(
                f"`{path}` must be one of {', '.join(choices)}, got {shown_key(repr(value))}"
            )
        return str(value)

    return convert


def _reference_only(what: str, hint: str) -> Callable[[Any, str], str]:
    """A secret option: only `${NAME}` references, never the secret itself."""

    def convert(value: Any, path: str) -> str:
        text = _str(value, path)
        if not secrets.is_reference_only(text):
            raise ConfigError(
                f"`{path}` must reference an environment variable, not hold the {what} itself",
                hint=hint,
            )
        return text

    return convert


_token_reference = _reference_only(
    "token",
    f"write `application_token: ${{{DEFAULT_TOKEN_VARIABLE}}}` or use `application_token_file`",
)


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and check a config file; `None` gives the defaults (plus `overrides`)."""
    if path is None:
        data: Any = {"__lines__": {}, "__line__": 1}
        name = "<defaults>"
        base = Path.cwd()
    else:
        file = Path(path)
        name = str(file)
        base = file.parent
        data = _parse(read_yaml_file(file), name) or {"__lines__": {}, "__line__": 1}
    for key, value in (overrides or {}).items():
        data[key] = value
    return _build(_Section(data, "", name, 1), base)


def _parse(text: str, name: str) -> Any:
    loader = _Lines(text)
    loader.name = name
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_cost(node, name)  # aliases, depth and numbers bounded, as in rule files
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        line = mark.line + 1 if mark else None
        if isinstance(error, yaml.constructor.ConstructorError):
            raise ConfigError(f"YAML value error: {error.problem}", Location(name, line)) from None
        problem = f"{error.problem} ({error.context})" if error.context else str(error.problem)
        raise ConfigError(
            f"YAML syntax error: {error.problem}",
            Location(name, line),
            syntax_hint(problem, text, line),
        ) from None
    except yaml.YAMLError as error:  # e.g. a character YAML does not allow
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"YAML syntax error: {first}", Location(name)) from None
    except RecursionError:
        # The pure-Python parser recurses per level; check_cost never sees such a document.
        raise ConfigError(f"nested more than {MAX_DEPTH} levels deep", Location(name)) from None
    finally:
        loader.dispose()


def _build(top: _Section, base: Path) -> Config:
    api = top.section("api")
    defaults = ClientSettings()
    client = ClientSettings(
        base_url=api.get("base_url", _str, defaults.base_url).rstrip("/"),
        connect_timeout=api.get("connect_timeout", _number(0.1), defaults.connect_timeout),
        read_timeout=api.get("read_timeout", _number(0.1), defaults.read_timeout),
        event_rate_limit=api.get("event_rate_limit", _number(0.1), defaults.event_rate_limit),
        action_rate_limit=api.get("action_rate_limit", _number(0.1), defaults.action_rate_limit),
        max_retries=api.get("max_retries", _int(0), defaults.max_retries),
        backoff_initial=api.get("backoff_initial", _number(0.01), defaults.backoff_initial),
        backoff_max=api.get("backoff_max", _number(0.01), defaults.backoff_max),
        per_page=api.get("per_page", _int(1), defaults.per_page),
    )
    token_reference = api.get(
        "application_token", _token_reference, f"${{{DEFAULT_TOKEN_VARIABLE}}}"
    )
    token_file = api.get("application_token_file", _str, "")
    api.finish()

    act = top.section("actions")
    retry_defaults = RetryPolicy()
    retry = RetryPolicy(
        max_attempts=act.get("max_attempts", _int(1), retry_defaults.max_attempts),
        initial_backoff=act.get("initial_backoff", _duration, retry_defaults.initial_backoff),
        max_backoff=act.get("max_backoff", _duration, retry_defaults.max_backoff),
        deadline=act.get("deadline", _duration, retry_defaults.deadline),
        settle_time=act.get("settle_time", _duration, retry_defaults.settle_time),
    )
    concurrency = act.get("concurrency", _int(1), 4)
    webhook_concurrency = act.get("webhook_concurrency", _int(1), 8)
    webhook_per_host = act.get("webhook_per_host", _int(1), 2)
    act.finish()

    store = top.section("store")
    store_path = store.get("path", _str, "state/engine.sqlite3")
    retention = _retention(store)
    store.finish()

    log = top.section("log")
    log_level = log.get("level", _choice("debug", "info", "warning", "error"), "info")
    log_format = log.get("format", _choice("auto", "json", "console"), "auto")
    log.finish()

    rules = top.get("rules", _str, "rules")
    dry_run = top.get("dry_run", _bool, False)
    guard_max_actions = _guard_section(top)
    http = _http_section(top)
    sources, source_settings = _source_sections(top, http, base)
    top.finish()
    return Config(
        api=client,
        token_reference=token_reference,
        token_file=_resolve(base, token_file) if token_file else None,
        rules=_resolve(base, rules),
        store_path=_resolve(base, store_path),
        retry=retry,
        concurrency=concurrency,
        webhook_concurrency=webhook_concurrency,
        webhook_per_host=webhook_per_host,
        dry_run=dry_run,
        log_level=log_level,
        log_format=log_format,
        source=None,
        http=http,
        sources=sources,
        source_settings=source_settings,
        guard_max_actions=guard_max_actions,
        retention=retention,
    )


def _retention(store: _Section) -> RetentionSettings:
    """`store.retention` (how long rows are kept) and `store.decisions_per_sim`."""
    defaults = RetentionSettings()
    period = store.get("retention", _duration, defaults.period)
    if period < timedelta(days=1):
        raise ConfigError(
            "`store.retention` must be at least 1d",
            store.where("retention"),
            "the audit log explains the last days' decisions; e.g. retention: 30d",
        )
    kept = store.get("decisions_per_sim", _int(0), defaults.decisions_per_sim)
    return RetentionSettings(period=period, decisions_per_sim=kept)


def _guard_section(top: _Section) -> MaxActions | None:
    """`guard: {max_actions: {count: 200, within: 10m}}`: absent means no global guard."""
    guard = top.section("guard")
    limit = guard.section("max_actions")
    count = limit.get("count", _int(1), 0)
    within = limit.get("within", _duration, timedelta(0))
    limit.finish()
    guard.finish()
    if not count and not within:
        return None
    if not count or within <= timedelta(0):
        missing = "count" if not count else "within"
        raise ConfigError(
            f"`guard.max_actions` needs `count` and `within` (longer than zero); `{missing}` "
            "is missing",
            guard.where("max_actions"),
            "e.g. max_actions: {count: 50, within: 10m}",
        )
    return MaxActions(count, within)


def _http_section(top: _Section) -> HttpSettings:
    http = top.section("http")
    http_defaults = HttpSettings()
    http_settings = HttpSettings(
        enabled=http.get("enabled", _bool, http_defaults.enabled),
        host=http.get("host", _str, http_defaults.host),
        port=http.get("port", _int(0), http_defaults.port),
        max_connections=http.get("max_connections", _int(1), http_defaults.max_connections),
        header_timeout=_seconds(http, "header_timeout", http_defaults.header_timeout),
        max_header_bytes=http.get("max_header_bytes", _int(1024), http_defaults.max_header_bytes),
        body_timeout=_seconds(http, "body_timeout", http_defaults.body_timeout),
    )
    if http_settings.port > 65535:
        raise ConfigError("`http.port` must be a port number ≤ 65535", http.where("port"))
    http.finish()
    return http_settings


# -- sources: `sources:` names registered sources; each reads its own section -----------------


def _source_sections(
    top: _Section, http: HttpSettings, base: Path
) -> tuple[tuple[str, ...], dict[str, object]]:
    """`sources:` checked against the registry, and every registered source's settings read
    by the source itself from the section named like it (engine.sources.base)."""
    kinds = registered_sources()
    sources = top.get("sources", _source_names(sorted(kinds)), DEFAULT_SOURCES)
    listed_at = top.where("sources")
    settings: dict[str, object] = {}
    for name, kind in sorted(kinds.items()):
        enabled = name in sources
        section = top.section(name)
        settings[name] = kind.read_settings(
            _SourceSection(section, listed_at if enabled else None, base), enabled=enabled
        )
        section.finish()
        if enabled and kind.serves_http and not http.enabled:
            raise ConfigError(
                f"the {name} source needs the HTTP server, but `http.enabled` is false",
                top.section("http").where("enabled"),
            )
    return sources, settings


def _source_names(known: list[str]) -> Callable[[Any, str], tuple[str, ...]]:
    def convert(value: Any, path: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise ConfigError(f"`{path}` must be a list of sources: {', '.join(known)}")
        for item in items:
            if item not in known:
                close = difflib.get_close_matches(str(item), known, n=1)
                raise ConfigError(
                    f"`{path}`: unknown source {shown_key(repr(item))}",
                    hint=f"did you mean `{close[0]}`?" if close else "allowed: " + ", ".join(known),
                )
        return tuple(dict.fromkeys(items))

    return convert


class _SourceSection:
    """A source's section as the source reads it (`engine.sources.base.SettingsSection`)."""

    def __init__(self, section: _Section, listed_at: Location | None, base: Path) -> None:
        self._section = section
        self._listed_at = listed_at  # the `sources:` line, when the source is listed
        self._base = base  # the config file's folder

    @property
    def name(self) -> str:
        return self._section.name

    def get(self, key: str, convert: Callable[[Any, str], _T], default: _T) -> _T:
        return self._section.get(key, convert, default)

    def text(self, key: str, default: str) -> str:
        return self._section.get(key, _str, default)

    def flag(self, key: str, default: bool) -> bool:
        return self._section.get(key, _bool, default)

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        return self._section.get(key, _int(minimum), default)

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        return self._section.get(key, _number(minimum), default)

    def duration(self, key: str, default: timedelta) -> timedelta:
        return self._section.get(key, _duration, default)

    def path(self, key: str) -> Path | None:
        text = self._section.get(key, _str, "")
        return _resolve(self._base, text) if text else None

    def secret(self, key: str, *, hint: str) -> str | None:
        convert: Callable[[Any, str], str | None] = _reference_only("secret", hint)
        return self._section.get(key, convert, None)

    def where(self, key: str) -> Location:
        if key in self._section.data or self._listed_at is None:
            return self._section.where(key)
        return self._listed_at


def _seconds(section: _Section, key: str, default: float) -> float:
    seconds = section.get(key, _duration, timedelta(seconds=default)).total_seconds()
    if seconds <= 0:
        raise ConfigError(f"`{section.name}.{key}` must be longer than 0s", section.where(key))
    return seconds


def _resolve(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path
