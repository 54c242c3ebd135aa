"""Rule files → a validated, indexed `RuleSet`, or every problem in them at once.

A rule set is one YAML file or a folder of `*.yaml`/`*.yml` files (not recursive, read in
name order). A file holds `rules: [...]` or is itself a list of rules.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from engine.errors import ConfigError, Location, RuleSetError
from engine.rules.catalog import EventTypeCatalog
from engine.rules.model import Rule
from engine.rules.rule_parser import parse_rule, rule_id
from engine.rules.ruleset import RuleSet
from engine.rules.schedule import CronCheck
from engine.section import describe, did_you_mean
from engine.yamlfile import (
    MAX_REPORTED,
    YamlList,
    YamlMapping,
    load_yaml,
    read_yaml_file,
    shown_key,
)

RULE_FILE_SUFFIXES = (".yaml", ".yml")


def load_rules(
    path: str | Path,
    *,
    catalog: EventTypeCatalog | None = None,
    cron: CronCheck | None = None,
    organisations: Mapping[str, Path | None] | None = None,
) -> RuleSet:
    """Load and validate the rules at `path` (a file or a folder); raise RuleSetError
    listing every problem, each with `file:line`. `cron` checks digest schedules' fields
    (`engine.cron.check_crontab` wherever rules are loaded to run; without it, only that a
    schedule has five fields). `organisations`: the config's organisations by name, each
    with its own rule folder or None; their folders' rules judge their events alone, and
    `organisation:` must name one of them (None: not known, any name is taken)."""
    files: list[tuple[Path, str | None]] = [(file, None) for file in _rule_files(Path(path))]
    for name, folder in (organisations or {}).items():
        if folder is not None:
            files.extend((file, name) for file in _rule_files(folder))
    known = None if organisations is None else tuple(organisations)
    return _build(
        [(str(file), partial(_read, file), scope) for file, scope in files], catalog, cron, known
    )


def load_rules_text(
    text: str,
    name: str = "<rules>",
    *,
    catalog: EventTypeCatalog | None = None,
    cron: CronCheck | None = None,
) -> RuleSet:
    """Like `load_rules`, from YAML text; `name` stands for the file in messages."""
    return _build([(name, lambda: text, None)], catalog, cron)


def _rule_files(path: Path) -> list[Path]:
    try:
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir() if p.suffix in RULE_FILE_SUFFIXES and p.is_file()
            )
            if not files:
                raise RuleSetError([ConfigError(f"no rule files (*.yaml, *.yml) in {path}")])
            return files
        exists = path.exists()
    except OSError as error:  # e.g. a name too long, a folder the engine's user may not enter
        shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "..."
        raise RuleSetError(
            [
                ConfigError(
                    f"{shown}: cannot read: {error.strerror or error}",
                    hint="the user the engine runs as needs to read the rules and enter "
                    "their folders: see docs/service.md",
                )
            ]
        ) from None
    if not exists:
        raise RuleSetError(
            [ConfigError(f"{path} does not exist", hint="give a rule file or folder")]
        )
    return [path]


def _read(file: Path) -> str | ConfigError:
    try:
        return read_yaml_file(file, "split the rules over several files in one folder")
    except ConfigError as error:
        return error


def _build(
    sources: list[tuple[str, Callable[[], str | ConfigError], str | None]],
    catalog: EventTypeCatalog | None,
    cron: CronCheck | None,
    organisations: Collection[str] | None = None,
) -> RuleSet:
    catalog = catalog or EventTypeCatalog.bundled()
    errors: list[ConfigError] = []
    warnings: list[ConfigError] = []
    rules: list[Rule] = []
    first_seen: dict[str, Location] = {}
    for name, read, scope in sources:
        # Read one file at a time: a folder's texts are never all in memory at once.
        text = read()
        if isinstance(text, ConfigError):
            errors.append(text)
            continue
        found: list[ConfigError] = []
        try:
            _load_file(
                name,
                text,
                _Scope(catalog, cron, organisations, scope),
                first_seen,
                rules,
                found,
                warnings,
            )
        except Exception as error:  # a bug must not hide the other files' problems (or crash)
            found.append(_unexpected(name, error))
        errors.extend(found)
    if errors:
        order = {name: position for position, (name, _, _) in enumerate(sources)}
        errors.sort(
            key=lambda e: (order.get(e.where.file, 0), e.where.line or 0) if e.where else (-1, 0)
        )
        raise RuleSetError(errors)
    return RuleSet(rules, warnings=warnings)


@dataclass(frozen=True, slots=True)
class _Scope:
    """What a file's rules are checked against: the catalog, the schedule check, the
    configured organisations, and the organisation whose folder the file is in."""

    catalog: EventTypeCatalog
    cron: CronCheck | None
    organisations: Collection[str] | None
    organisation: str | None


def _load_file(
    name: str,
    text: str,
    scope: _Scope,
    first_seen: dict[str, Location],
    rules: list[Rule],
    errors: list[ConfigError],
    warnings: list[ConfigError],
) -> None:
    """The rules of one file into `rules`, its problems into `errors` (and what only
    deserves a warning into `warnings`): at most
    MAX_REPORTED of them, since more would only bury the first."""
    for where, data, number in _rule_items(name, text, errors):
        if len(errors) >= MAX_REPORTED:
            errors[MAX_REPORTED:] = []
            errors.append(
                ConfigError(
                    f"more problems after these {MAX_REPORTED}, not listed",
                    where,
                    "fix these first",
                )
            )
            return
        if isinstance(data, YamlMapping):
            _check_unique(data, where.file, first_seen, errors)
        parsed = parse_rule(
            data, where, number, scope.catalog, warnings, scope.cron, scope.organisations
        )
        if isinstance(parsed, Rule):
            scoped = _in_folder_of(parsed, scope.organisation)
            if isinstance(scoped, Rule):
                rules.append(scoped)
            else:
                errors.append(scoped)
        else:
            errors.extend(parsed)


def _in_folder_of(rule: Rule, organisation: str | None) -> Rule | ConfigError:
    """A rule from an organisation's own folder judges that organisation's events alone."""
    if organisation is None or rule.organisation == organisation:
        return rule
    if rule.organisation is None:
        return replace(rule, organisation=organisation)
    return ConfigError(
        f"rule `{rule.id}` names organisation {rule.organisation!r}, but is in the rule"
        f" folder of organisation {organisation!r}",
        rule.where,
        "move it to the shared rules or that organisation's folder, or drop `organisation:`",
    )


def _unexpected(name: str, error: Exception) -> ConfigError:
    if isinstance(error, RecursionError | MemoryError):
        return ConfigError(f"too costly to load ({type(error).__name__})", Location(name))
    return ConfigError(
        f"internal error while loading: {type(error).__name__}: {str(error)[:200]}",
        Location(name),
        "this is a bug in the engine; please report it with the file",
    )


def _check_unique(
    data: YamlMapping, file: str, first_seen: dict[str, Location], errors: list[ConfigError]
) -> None:
    ident = rule_id(data)
    if ident is None:
        return
    here = Location(file, data.line_of("id"))
    if ident not in first_seen:
        first_seen[ident] = here
        return
    errors.append(
        ConfigError(
            f"duplicate rule id `{ident}`, first defined at {first_seen[ident]}",
            here,
            "rule ids must be unique across all rule files: state is keyed on them",
        )
    )


def _rule_items(
    file: str, text: str, errors: list[ConfigError]
) -> Iterable[tuple[Location, object, int]]:
    """The rule entries of one file with their locations; problems with the file's shape
    go to `errors`."""
    try:
        data, duplicates = load_yaml(text, file)
    except ConfigError as error:
        errors.append(error)
        return []
    errors.extend(duplicates)
    items: object = data
    items_at = Location(file, 1)
    if isinstance(data, YamlMapping):
        for key in data:
            if key != "rules":
                errors.append(
                    ConfigError(
                        f"unknown top-level key `{shown_key(key)}`",
                        Location(file, data.line_of(key)),
                        did_you_mean(key, ["rules"]) or "a rule file holds `rules:` and a list",
                    )
                )
        items = data.get("rules")
        items_at = Location(file, data.line_of("rules"))
    if items is None or (isinstance(items, YamlList) and not items):
        errors.append(
            ConfigError(
                f"no rules found in {file}",
                items_at,
                "add rules under `rules:`, each with an `id` and `actions`",
            )
        )
        return []
    if not isinstance(items, YamlList):
        errors.append(
            ConfigError(
                f"a rule file holds `rules:` and a list of rules, got {describe(items)}", items_at
            )
        )
        return []
    return ((Location(file, items.line_of(i)), item, i + 1) for i, item in enumerate(items))
