"""The engine's config file: YAML, checked once into frozen settings, errors with file:line.

Secrets never live in the file itself: the application token comes from `${NAME}` (an
environment variable, or a file named by `NAME_FILE`) or from `application_token_file`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from engine import secrets
from engine.dispatch import RetryPolicy
from engine.echoes import DEFAULT_ECHOES, DEFAULT_LOOP_BREAKER, Echoes, LoopBreaker
from engine.emnify import ClientSettings
from engine.errors import ConfigError, Location
from engine.health import HealthSettings, HeartbeatSettings
from engine.http.settings import HttpSettings
from engine.leadership import ClusterSettings
from engine.lookup_fetch import LookupSettings
from engine.mute_windows import MuteWindow, read_mute_windows
from engine.organisations import Organisation, read_organisations
from engine.retention import RetentionSettings
from engine.rules.model import MaxActions
from engine.section import (
    Check,
    Section,
    as_flag,
    as_text,
    describe,
    did_you_mean,
    duration,
    number,
    one_of,
    whole_number,
)
from engine.sources import registered as registered_sources
from engine.store.settings import (
    DEFAULT_PATH,
    PostgresSettings,
    StoreSettings,
    conninfo_fields,
    is_postgres_url,
    sqlite_path,
)
from engine.yamlfile import YamlMapping, load_yaml, read_yaml_file, shown_key

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
    # `store.url: postgresql://...`: the state in PostgreSQL instead of the SQLite file.
    store_postgres: PostgresSettings | None = None
    store_migrate: bool = True  # `store.migrate: auto` (apply schema steps at start)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    concurrency: int = 4
    webhook_concurrency: int = 8
    webhook_per_host: int = 2
    dry_run: bool = False
    log_level: str = "info"
    log_format: str = "auto"
    source: Path | None = None
    http: HttpSettings = field(default_factory=HttpSettings)
    ui: UiSettings = field(default_factory=lambda: UiSettings())
    # The sources to run, by registered name, and every registered source's settings (read
    # from the section named like it, whether listed or not), by name.
    sources: tuple[str, ...] = DEFAULT_SOURCES
    source_settings: Mapping[str, object] = field(default_factory=dict)
    # The global blast-radius guard: destructive actions of all rules together.
    guard_max_actions: MaxActions | None = None
    # Never fight yourself: echoes of the engine's own status changes, and the loop breaker.
    echoes: Echoes = DEFAULT_ECHOES
    loop_breaker: LoopBreaker | None = DEFAULT_LOOP_BREAKER
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    # Recurring windows in which matches run no action (`engine.mute_windows`).
    mute_windows: tuple[MuteWindow, ...] = ()
    # The engine's own health as engine events, and the heartbeat to a dead-man's switch.
    health: HealthSettings = field(default_factory=HealthSettings)
    heartbeat: HeartbeatSettings = field(default_factory=HeartbeatSettings)
    # Rules' `lookup:` facts: cache TTL, API calls per second, the longest a batch waits.
    lookups: LookupSettings = field(default_factory=LookupSettings)
    # `organisations:`: several organisations, each with its own token, cursor and seen
    # ids (`engine.organisations`); empty: the single one of `api.application_token`.
    organisations: tuple[Organisation, ...] = ()

    @property
    def rule_scopes(self) -> dict[str, Path | None]:
        """The organisations rules may name, each with its own rule folder (or None)."""
        return {organisation.name: organisation.rules for organisation in self.organisations}

    @property
    def store(self) -> StoreSettings:
        """The store to open (`engine.store.open_store`)."""
        return StoreSettings(self.store_path, self.store_postgres, self.store_migrate)

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


def _reference_only(what: str, hint: str) -> Check[str]:
    """A secret option: only `${NAME}` references, never the secret itself."""

    def check(value: Any, name: str) -> str:
        text = as_text(value, name)
        if not secrets.is_reference_only(text):
            raise ConfigError(
                f"`{name}` must reference an environment variable, not hold the {what} itself",
                hint=hint,
            )
        return text

    return check


# Durations in the config may also be a number of seconds, and zero where an option allows
# it (each option that needs more says so where it is read).
_duration = duration(longer_than_zero=False, seconds=True)


_token_reference = _reference_only(
    "token",
    f"write `application_token: ${{{DEFAULT_TOKEN_VARIABLE}}}` or use `application_token_file`",
)


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and check a config file; `None` gives the defaults (plus `overrides`)."""
    data = YamlMapping(1)
    name = "<defaults>"
    base = Path.cwd()
    if path is not None:
        file = Path(path)
        name = str(file)
        base = file.parent
        data = _parse(read_yaml_file(file), name)
    for key, value in (overrides or {}).items():
        data[key] = value
    return _build(Section.config_file(data, name), base)


def _parse(text: str, name: str) -> YamlMapping:
    """The file's top mapping; ConfigError at the first problem of its YAML."""
    data, duplicates = load_yaml(text, name, json_values=False)
    if duplicates:
        raise duplicates[0]
    if data is None:
        return YamlMapping(1)
    if not isinstance(data, YamlMapping):
        raise ConfigError(
            f"a config file is a mapping of options, got {describe(data)}",
            Location(name, 1),
            "see config.example.yaml",
        )
    return data


def _build(top: Section, base: Path) -> Config:
    api = top.section("api")
    defaults = ClientSettings()
    client = ClientSettings(
        base_url=api.get("base_url", as_text, defaults.base_url).rstrip("/"),
        connect_timeout=api.get("connect_timeout", number(0.1), defaults.connect_timeout),
        read_timeout=api.get("read_timeout", number(0.1), defaults.read_timeout),
        event_rate_limit=api.get("event_rate_limit", number(0.1), defaults.event_rate_limit),
        action_rate_limit=api.get("action_rate_limit", number(0.1), defaults.action_rate_limit),
        max_retries=api.get("max_retries", whole_number(0), defaults.max_retries),
        backoff_initial=api.get("backoff_initial", number(0.01), defaults.backoff_initial),
        backoff_max=api.get("backoff_max", number(0.01), defaults.backoff_max),
        per_page=api.get("per_page", whole_number(1), defaults.per_page),
    )
    token_reference = api.get(
        "application_token", _token_reference, f"${{{DEFAULT_TOKEN_VARIABLE}}}"
    )
    token_file = api.get("application_token_file", as_text, "")
    token_given = next(
        (key for key in ("application_token", "application_token_file") if api.data.get(key)),
        None,
    )
    api.finish()
    organisations = read_organisations(top, client, base)
    if organisations and token_given is not None:
        raise ConfigError(
            f"`api.{token_given}` and `organisations:` both give application tokens",
            api.at(token_given),
            "with `organisations:`, give each organisation its own `application_token` and"
            " drop it from `api:`",
        )

    act = top.section("actions")
    retry_defaults = RetryPolicy()
    retry = RetryPolicy(
        max_attempts=act.get("max_attempts", whole_number(1), retry_defaults.max_attempts),
        initial_backoff=act.get("initial_backoff", _duration, retry_defaults.initial_backoff),
        max_backoff=act.get("max_backoff", _duration, retry_defaults.max_backoff),
        deadline=act.get("deadline", _duration, retry_defaults.deadline),
        settle_time=act.get("settle_time", _duration, retry_defaults.settle_time),
    )
    concurrency = act.get("concurrency", whole_number(1), 4)
    webhook_concurrency = act.get("webhook_concurrency", whole_number(1), 8)
    webhook_per_host = act.get("webhook_per_host", whole_number(1), 2)
    act.finish()

    store = top.section("store")
    store_path, store_postgres = _store_location(store, base)
    store_migrate = store.get("migrate", one_of("auto", "never"), "auto") == "auto"
    retention = _retention(store)
    store.finish()

    log = top.section("log")
    log_level = log.get("level", one_of("debug", "info", "warning", "error"), "info")
    log_format = log.get("format", one_of("auto", "json", "console"), "auto")
    log.finish()

    cluster = _cluster_section(top)

    rules = top.get("rules", as_text, "rules")
    dry_run = top.get("dry_run", as_flag, False)
    guard_max_actions = _guard_section(top)
    echoes = _echoes_section(top)
    loop_breaker = _loop_breaker_section(top)
    mute_windows = read_mute_windows(top)
    http = _http_section(top)
    ui = _ui_section(top, base)
    health = _health_section(top)
    heartbeat = _heartbeat_section(top)
    lookups = _lookups_section(top)
    sources, source_settings = _source_sections(top, http, base)
    top.finish()
    return Config(
        api=client,
        token_reference=token_reference,
        token_file=_resolve(base, token_file) if token_file else None,
        rules=_resolve(base, rules),
        store_path=store_path,
        store_postgres=store_postgres,
        store_migrate=store_migrate,
        retry=retry,
        concurrency=concurrency,
        webhook_concurrency=webhook_concurrency,
        webhook_per_host=webhook_per_host,
        dry_run=dry_run,
        log_level=log_level,
        log_format=log_format,
        source=None,
        http=http,
        ui=ui,
        sources=sources,
        source_settings=source_settings,
        guard_max_actions=guard_max_actions,
        echoes=echoes,
        loop_breaker=loop_breaker,
        retention=retention,
        cluster=cluster,
        mute_windows=mute_windows,
        health=health,
        heartbeat=heartbeat,
        lookups=lookups,
        organisations=organisations,
    )


_store_password_reference = _reference_only(
    "password",
    "write `password: ${PGPASSWORD_NAME}` naming an environment variable, use "
    "`password_file`, or leave both out and export PGPASSWORD",
)


def _store_location(store: Section, base: Path) -> tuple[Path, PostgresSettings | None]:
    """`store.path` (a SQLite file) or `store.url` (`sqlite:PATH`, a path, or a PostgreSQL
    URL, whose password comes from `store.password`, `store.password_file` or PGPASSWORD)."""
    path = store.get("path", as_text, "")
    url = store.get("url", as_text, "")
    password = store.get("password", _store_password_reference, "")
    password_file = store.get("password_file", as_text, "")
    pool_size = store.get("pool_size", whole_number(1), 4)
    dispatch_threads = store.get("dispatch_threads", _auto_or_count, None)
    if path and url:
        raise ConfigError(
            "`store.path` and `store.url` both name the store",
            store.at("url"),
            "keep one: `url: sqlite:PATH` is the same as `path: PATH`",
        )
    if not is_postgres_url(url):
        if password or password_file:
            key = "password" if password else "password_file"
            raise ConfigError(
                f"`store.{key}` is for a PostgreSQL store, and `store.url` names none",
                store.at(key),
                "e.g. url: postgresql://engine@db.example:5432/engine",
            )
        return _resolve(base, sqlite_path(url) or path or str(DEFAULT_PATH)), None
    if password and password_file:
        raise ConfigError(
            "`store.password` and `store.password_file` both give the password",
            store.at("password_file"),
            "keep one",
        )
    try:
        has_password = "password" in conninfo_fields(url)
    except ValueError as error:
        raise ConfigError(
            f"`store.url` is not a PostgreSQL URL: {error}", store.at("url")
        ) from None
    if has_password:
        raise ConfigError(
            "`store.url` must not hold the password",
            store.at("url"),
            "give it in PGPASSWORD, `store.password: ${NAME}` or `store.password_file`",
        )
    postgres = PostgresSettings(
        url=url,
        password_reference=password or None,
        password_file=_resolve(base, password_file) if password_file else None,
        pool_size=pool_size,
        dispatch_threads=dispatch_threads,
    )
    return DEFAULT_PATH, postgres


def _auto_or_count(value: Any, name: str) -> int | None:
    """`auto` (None), or a whole number of at least 0."""
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"`{name}` must be auto or a whole number of at least 0, got {describe(value)}"
        )
    return value


def _retention(store: Section) -> RetentionSettings:
    """`store.retention` (how long rows are kept) and `store.decisions_per_sim`."""
    defaults = RetentionSettings()
    period = store.get("retention", _duration, defaults.period)
    if period < timedelta(days=1):
        raise ConfigError(
            "`store.retention` must be at least 1d",
            store.at("retention"),
            "the audit log explains the last days' decisions; e.g. retention: 30d",
        )
    kept = store.get("decisions_per_sim", whole_number(0), defaults.decisions_per_sim)
    return RetentionSettings(period=period, decisions_per_sim=kept)


def _cluster_section(top: Section) -> ClusterSettings:
    """`cluster: {instance_id, lease_ttl}`: how this instance takes part when several share
    the store (one alone leads at once)."""
    section = top.section("cluster")
    defaults = ClusterSettings()
    lease_ttl = section.get("lease_ttl", _duration, defaults.lease_ttl)
    if lease_ttl < timedelta(seconds=3):
        raise ConfigError(
            "`cluster.lease_ttl` must be at least 3s",
            section.at("lease_ttl"),
            "the leader renews its lease every third of it; 10s replaces a dead one in ~13s",
        )
    settings = ClusterSettings(
        instance_id=section.get("instance_id", as_text, defaults.instance_id),
        lease_ttl=lease_ttl,
    )
    section.finish()
    return settings


def _health_section(top: Section) -> HealthSettings:
    """`health:`: how often the engine looks at its own health, and how long each condition
    must hold before it is said as an engine event (`engine.health`)."""
    section = top.section("health")
    defaults = HealthSettings()
    longer = duration(longer_than_zero=True, seconds=True)
    settings = HealthSettings(
        check_every=section.get("check_every", longer, defaults.check_every),
        poll_failing_after=section.get(
            "poll_failing_after", _duration, defaults.poll_failing_after
        ),
        api_unreachable_after=section.get(
            "api_unreachable_after", _duration, defaults.api_unreachable_after
        ),
        poll_lag=section.get("poll_lag", longer, defaults.poll_lag),
        stream_silent_after=section.get(
            "stream_silent_after", _duration, defaults.stream_silent_after
        ),
    )
    section.finish()
    return settings


def _lookups_section(top: Section) -> LookupSettings:
    """`lookups:`: how long a looked-up fact is used again (`ttl`), how many API calls
    lookups may make per second (`per_second`, well inside emnify's limits) and how long a
    batch waits for that budget before the rest is `lookup unavailable` (`max_wait`)."""
    section = top.section("lookups")
    defaults = LookupSettings()
    longer = duration(longer_than_zero=True, seconds=True)
    settings = LookupSettings(
        ttl=section.get("ttl", longer, defaults.ttl),
        per_second=section.get("per_second", number(0.1), defaults.per_second),
        max_wait=section.get("max_wait", longer, defaults.max_wait),
    )
    section.finish()
    return settings


def _heartbeat_url(value: Any, name: str) -> str:
    text = as_text(value, name).strip()
    shown = text if secrets.is_reference_only(text) else text.split("?")[0]
    if not secrets.is_reference_only(text) and not text.startswith(("http://", "https://")):
        raise ConfigError(
            f"`{name}` must be an http(s) URL, got {shown[:60]!r}",
            hint="the ping URL your dead-man's switch gives you (e.g. https://hc-ping.com/…),"
            " or `${HEARTBEAT_URL}` naming an environment variable that holds it",
        )
    return text


def _heartbeat_section(top: Section) -> HeartbeatSettings:
    """`heartbeat: {url, every, timeout}`: a ping while the engine is healthy."""
    section = top.section("heartbeat")
    defaults = HeartbeatSettings()
    longer = duration(longer_than_zero=True, seconds=True)
    url = section.get("url", _heartbeat_url, "")
    every = section.get("every", longer, defaults.every)
    timeout = section.get("timeout", longer, defaults.timeout)
    section.finish()
    if (every != defaults.every or timeout != defaults.timeout) and not url:
        raise ConfigError(
            "`heartbeat` needs a `url`",
            section.at("every") if every != defaults.every else section.at("timeout"),
            "e.g. heartbeat: {url: ${HEARTBEAT_URL}, every: 1m}",
        )
    if url and timeout >= every:
        raise ConfigError(
            "`heartbeat.timeout` must be shorter than `heartbeat.every`",
            section.at("timeout"),
        )
    return HeartbeatSettings(url or None, every, timeout)


def _guard_section(top: Section) -> MaxActions | None:
    """`guard: {max_actions: {count: 200, within: 10m}}`: absent means no global guard."""
    guard = top.section("guard")
    limit = guard.section("max_actions")
    count = limit.get("count", whole_number(1), 0)
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
            guard.at("max_actions"),
            "e.g. max_actions: {count: 50, within: 10m}",
        )
    return MaxActions(count, within)


def _echoes_section(top: Section) -> Echoes:
    """`echoes: {within: 10m}`: how far in time an event may be from the engine's status
    change it echoes."""
    echoes = top.section("echoes")
    within = echoes.get("within", duration(), DEFAULT_ECHOES.within)
    echoes.finish()
    return Echoes(within)


def _loop_breaker_section(top: Section) -> LoopBreaker | None:
    """`loop_breaker: {max_status_changes: 4, within: 10m, hold_for: 1h}`, or `enabled:
    false` for none."""
    breaker = top.section("loop_breaker")
    enabled = breaker.flag("enabled", default=True)
    defaults = DEFAULT_LOOP_BREAKER
    settings = LoopBreaker(
        max_changes=breaker.get("max_status_changes", whole_number(1), defaults.max_changes),
        within=breaker.get("within", duration(), defaults.within),
        hold_for=breaker.get("hold_for", duration(), defaults.hold_for),
    )
    breaker.finish()
    return settings if enabled else None


@dataclass(frozen=True, slots=True)
class UiUser:
    """One named console login (`ui.users`): the audit log names the person, not only the
    role. Its token comes from `${NAME}` (or `NAME_FILE`) or from `token_file`, never the
    config; `where` is its place in the config, for the errors found when it is read."""

    name: str
    role: str  # operator or viewer
    token_reference: str | None = None
    token_file: Path | None = None
    where: Location | None = None


@dataclass(frozen=True, slots=True)
class UiSettings:
    """`ui:`: the web console (engine.console), served by the HTTP server at /ui when
    enabled. Its logins are read from the variables or files named here, never the config."""

    enabled: bool = False
    operator_token_env: str = "EVENT_ENGINE_UI_OPERATOR_TOKEN"
    viewer_token_env: str = "EVENT_ENGINE_UI_VIEWER_TOKEN"
    operator_token_file: str | None = None
    viewer_token_file: str | None = None
    # Failed logins one client may make in a minute; past it the login answers 429.
    login_attempts_per_minute: int = 5
    users: tuple[UiUser, ...] = ()


def _ui_section(top: Section, base: Path) -> UiSettings:
    ui = top.section("ui")
    defaults = UiSettings()
    settings = UiSettings(
        enabled=ui.get("enabled", as_flag, defaults.enabled),
        operator_token_env=ui.get("operator_token_env", as_text, defaults.operator_token_env),
        viewer_token_env=ui.get("viewer_token_env", as_text, defaults.viewer_token_env),
        operator_token_file=ui.get("operator_token_file", as_text, None),
        viewer_token_file=ui.get("viewer_token_file", as_text, None),
        login_attempts_per_minute=ui.get(
            "login_attempts_per_minute", whole_number(1), defaults.login_attempts_per_minute
        ),
        users=_ui_users(ui, base),
    )
    ui.finish()
    return settings


_USER_EXAMPLE = "e.g. - {name: alice, role: operator, token: ${UI_ALICE_TOKEN}}"
_user_token_reference = _reference_only(
    "token",
    "write `token: ${UI_ALICE_TOKEN}` naming an environment variable, or use `token_file`",
)


def _ui_users(ui: Section, base: Path) -> tuple[UiUser, ...]:
    """`ui.users`: named logins, each checked, no name twice."""
    users: list[UiUser] = []
    for index, item in ui.entries("users", "logins", _USER_EXAMPLE):
        user = _ui_user(Section.config_file(item, ui.file), index, base)
        if any(u.name == user.name for u in users):
            raise ConfigError(
                f"two console users are named `{user.name}`",
                Location(ui.file, item.line_of("name")),
                "give each person their own name: it is how the audit log names them",
            )
        users.append(user)
    return tuple(users)


def _ui_user(section: Section, index: int, base: Path) -> UiUser:
    section.path = f"ui.users[{index}]."
    name = section.get("name", as_text, "").strip()
    role = section.get("role", one_of("operator", "viewer"), "")
    reference = section.get("token", _user_token_reference, "")
    token_file = section.get("token_file", as_text, "")
    section.finish()
    for key, given, hint in (
        ("name", name, "the person's name, as the audit log shows it"),
        ("role", role, "operator (may press buttons) or viewer (may look)"),
    ):
        if not given:
            raise ConfigError(f"`ui.users[{index}]` needs `{key}`", section.at(None), hint)
    if bool(reference) == bool(token_file):
        raise ConfigError(
            f"`ui.users[{index}]` ({name}) needs one of `token` and `token_file`",
            section.at("token_file" if token_file else None),
            "token: ${UI_ALICE_TOKEN} (an environment variable) or token_file: PATH",
        )
    return UiUser(
        name=name,
        role=role,
        token_reference=reference or None,
        token_file=_resolve(base, token_file) if token_file else None,
        where=section.at(None),
    )


def _http_section(top: Section) -> HttpSettings:
    http = top.section("http")
    http_defaults = HttpSettings()
    http_settings = HttpSettings(
        enabled=http.get("enabled", as_flag, http_defaults.enabled),
        host=http.get("host", as_text, http_defaults.host),
        port=http.get("port", whole_number(0), http_defaults.port),
        max_connections=http.get("max_connections", whole_number(1), http_defaults.max_connections),
        header_timeout=_seconds(http, "header_timeout", http_defaults.header_timeout),
        max_header_bytes=http.get(
            "max_header_bytes", whole_number(1024), http_defaults.max_header_bytes
        ),
        body_timeout=_seconds(http, "body_timeout", http_defaults.body_timeout),
    )
    if http_settings.port > 65535:
        raise ConfigError("`http.port` must be a port number ≤ 65535", http.at("port"))
    http.finish()
    return http_settings


# -- sources: `sources:` names registered sources; each reads its own section -----------------


def _source_sections(
    top: Section, http: HttpSettings, base: Path
) -> tuple[tuple[str, ...], dict[str, object]]:
    """`sources:` checked against the registry, and every registered source's settings read
    by the source itself from the section named like it (engine.sources.base)."""
    kinds = registered_sources()
    sources = top.get("sources", _source_names(sorted(kinds)), DEFAULT_SOURCES)
    listed_at = top.at("sources")
    settings: dict[str, object] = {}
    for name, kind in sorted(kinds.items()):
        enabled = name in sources
        section = top.section(name)
        settings[name] = kind.read_settings(
            _SourceSection(name, section, listed_at if enabled else None, base), enabled=enabled
        )
        section.finish()
        if enabled and kind.serves_http and not http.enabled:
            raise ConfigError(
                f"the {name} source needs the HTTP server, but `http.enabled` is false",
                top.section("http").at("enabled"),
            )
    return sources, settings


def _source_names(known: list[str]) -> Check[tuple[str, ...]]:
    def check(value: Any, name: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise ConfigError(f"`{name}` must be a list of sources: {', '.join(known)}")
        for item in items:
            if item not in known:
                raise ConfigError(
                    f"`{name}`: unknown source {shown_key(repr(item))}",
                    hint=did_you_mean(item, known) or "allowed: " + ", ".join(known),
                )
        return tuple(dict.fromkeys(items))

    return check


class _SourceSection:
    """A source's section as the source reads it (`engine.sources.base.SettingsSection`)."""

    def __init__(self, name: str, section: Section, listed_at: Location | None, base: Path) -> None:
        self._name = name
        self._section = section
        self._listed_at = listed_at  # the `sources:` line, when the source is listed
        self._base = base  # the config file's folder

    @property
    def name(self) -> str:
        return self._name

    def get(self, key: str, convert: Check[_T], default: _T) -> _T:
        return self._section.get(key, convert, default)

    def text(self, key: str, default: str) -> str:
        return self._section.get(key, as_text, default)

    def flag(self, key: str, default: bool) -> bool:
        return self._section.get(key, as_flag, default)

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        return self._section.get(key, whole_number(minimum), default)

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        return self._section.get(key, number(minimum), default)

    def duration(self, key: str, default: timedelta) -> timedelta:
        return self._section.get(key, _duration, default)

    def path(self, key: str) -> Path | None:
        text = self._section.get(key, as_text, "")
        return _resolve(self._base, text) if text else None

    def secret(self, key: str, *, hint: str) -> str | None:
        return self._section.get(key, _reference_only("secret", hint), None)

    def where(self, key: str) -> Location:
        if key in self._section.data or self._listed_at is None:
            return self._section.at(key)
        return self._listed_at


def _seconds(section: Section, key: str, default: float) -> float:
    seconds = section.get(key, _duration, timedelta(seconds=default)).total_seconds()
    if seconds <= 0:
        raise ConfigError(f"`{section.name_of(key)}` must be longer than 0s", section.at(key))
    return seconds


def _resolve(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path
