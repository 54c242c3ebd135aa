"""Rule test files: YAML that names the rules under test, feeds them events, and says which
actions must (or must not) come out. Parsed once into frozen objects, every problem with
`file:line`.

```yaml
rules: ../usage-limit.yaml          # file or folder, relative to this file
only: [suspend-sim-on-quota-used-up] # optional: just these rules of it
env: {OPS_WEBHOOK_URL: "https://hooks.test/ops"}
start: "2025-05-01T10:00:00Z"       # the virtual clock's start (this is the default)
defaults: {event_source: {id: 1}}   # merged under every event
tests:
  - name: quota used up suspends the SIM
    events:
      - {event_type: {id: 19}, sim: {id: 9}, at: 5m}   # id and timestamp may be left out
      # a usage record (traffic_type, volume) feeds `usage:` rules; `at` is its end_timestamp
    expect:
      - {rule: suspend-sim-on-quota-used-up, action: suspend_sim, target: {sim_id: 9}}
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from engine.durations import parse_duration
from engine.errors import ConfigError, EventFormatError, Location
from engine.events import parse_timestamp
from engine.lookup_fixture import load_lookup_fixture
from engine.lookups import LookupTable
from engine.model import Silence
from engine.section import Section, describe
from engine.silencing import parse_matcher
from engine.sources.replay import ReplayInputError, read_records
from engine.usage import is_usage_record
from engine.yamlfile import YamlList, YamlMapping, load_yaml, plain, read_yaml_file

DEFAULT_START = datetime(2025, 1, 1, tzinfo=UTC)

FILE_KEYS = ("rules", "only", "env", "start", "defaults", "lookups", "tests")
CASE_KEYS = (
    "name",
    "defaults",
    "events",
    "events_file",
    "digest_at",
    "until",
    "expect",
    "expect_none",
    "expect_absent",
    "ordered",
    "strict",
    "silences",
)
SILENCE_KEYS = ("match", "at", "for", "comment")
EXPECT_KEYS = ("rule", "action", "event", "at", "target", "params", "due", "status", "times")
ABSENT_KEYS = ("rule", "action", "event", "target", "params")
MAX_TIMES = 10_000
NAME_HINT = "e.g. name: vip SIMs are left alone"


@dataclass(frozen=True, slots=True)
class Expectation:
    """A description of planned actions; every field given must hold (params and target
    as subsets). `due` is a moment or a delay after the planning event's timestamp."""

    where: Location
    rule: str | None = None
    action: str | None = None
    event: int | None = None
    target: Mapping[str, Any] | None = None
    params: Mapping[str, Any] | None = None
    due: datetime | timedelta | None = None
    status: str | None = None
    # The planning event's time (an absence firing's: when the silence reached `for`): a
    # moment, or a delay after the test's `start`.
    at: datetime | timedelta | None = None

    def describe(self) -> str:
        parts = [f"`{self.action}`" if self.action else "an action"]
        if self.rule:
            parts.append(f"from `{self.rule}`")
        if self.event is not None:
            parts.append(f"for event {self.event}")
        if self.target:
            parts.append(f"at {_short(self.target)}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class TestEvent:
    """A raw event as the test gives it (id and timestamp filled in), and where it is."""

    record: Any
    where: Location


@dataclass(frozen=True, slots=True)
class RuleTestCase:
    name: str
    where: Location
    events: tuple[TestEvent, ...]
    expect: tuple[Expectation, ...]
    expect_absent: tuple[Expectation, ...]
    expect_none: bool
    ordered: bool
    strict: bool
    digest_at: datetime | None
    start: datetime = DEFAULT_START
    # The virtual clock's end: absence rules judge silences up to here (default: the newest
    # event's time).
    until: datetime | None = None
    # As `event-engine silence add` would have added them, at the test's virtual times.
    silences: tuple[Silence, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleTestFile:
    path: Path
    rules: Path
    only: tuple[str, ...] | None
    only_where: Location | None
    env: Mapping[str, str]
    cases: tuple[RuleTestCase, ...]
    # The facts rules with `lookup` read, from the file `lookups:` names (a lookup file:
    # `engine.lookup_fixture`); None: every lookup is unavailable.
    lookups: LookupTable | None = None


def is_test_file(path: Path) -> bool:
    """Whether a YAML file found in a folder is a rule test file rather than a rule file:
    it has top-level `tests:`, or its `rules:` names a path instead of listing rules."""
    try:
        data, _ = load_yaml(read_yaml_file(path), str(path))
    except ConfigError:
        return False
    if not isinstance(data, YamlMapping):
        return False
    return "tests" in data or isinstance(data.get("rules"), str)


def load_test_file(path: Path) -> RuleTestFile:
    """Parse a rule test file; RuleSetError-like ConfigErrors are raised as a list."""
    errors: list[ConfigError] = []
    name = str(path)
    try:
        data, duplicates = load_yaml(read_yaml_file(path), name)
    except ConfigError as error:
        raise TestFileError([error]) from None
    errors.extend(duplicates)
    if not isinstance(data, YamlMapping):
        raise TestFileError(
            [
                ConfigError(
                    f"a rule test file is a mapping with `rules` and `tests`, got {describe(data)}",
                    Location(name, 1),
                )
            ]
        )
    if isinstance(data.get("rules"), YamlList) and "tests" not in data:
        raise TestFileError(
            [
                ConfigError(
                    "this is a rule file, not a rule test file",
                    Location(name, data.line_of("rules")),
                    "a test file names its rules by path (`rules: ../usage-limit.yaml`) and "
                    "lists `tests:`; see docs/rule-tests.md",
                )
            ]
        )
    top = Section(data, name, "test file", errors)
    top.check_keys(FILE_KEYS)
    rules_path = path.parent
    if top.require("rules", "e.g. rules: ../usage-limit.yaml (a file or folder)"):
        text_value = top.text("rules")
        if text_value:
            rules_path = (path.parent / text_value).resolve()
            if not rules_path.exists():
                top.error("rules", f"`rules`: {text_value} does not exist (looked at {rules_path})")
    only = _names(top, "only") if "only" in data else None
    env = _env(top) if "env" in data else {}
    start = _moment(top, "start") if "start" in data else DEFAULT_START
    defaults = _mapping(top, "defaults")
    lookups = _lookups(top, path) if "lookups" in data else None
    cases: list[RuleTestCase] = []
    if top.require("tests", "e.g. tests: [{name: ..., events: [...], expect: [...]}]"):
        cases = _cases(top, path, start or DEFAULT_START, defaults)
    if errors:
        raise TestFileError(errors)
    return RuleTestFile(
        path=path,
        rules=rules_path,
        only=only,
        only_where=top.at("only") if only is not None else None,
        env=env,
        cases=tuple(cases),
        lookups=lookups,
    )


def _lookups(top: Section, path: Path) -> LookupTable | None:
    """`lookups: lookups.yaml`: the lookup file, relative to the test file."""
    text_value = top.text("lookups")
    if not text_value:
        top.error("lookups", "`lookups` names a lookup file, e.g. `lookups: lookups.yaml`")
        return None
    try:
        return load_lookup_fixture((path.parent / text_value).resolve())
    except ConfigError as error:
        top.error_at(error.where or top.at("lookups"), f"lookup file: {error.message}", error.hint)
        return None


class TestFileError(Exception):
    """A rule test file that cannot be used; carries every problem found."""

    __test__ = False  # not a pytest class

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def _cases(
    top: Section, path: Path, start: datetime, defaults: dict[str, Any]
) -> list[RuleTestCase]:
    items = top.data["tests"]
    if not isinstance(items, YamlList) or not items:
        top.error("tests", f"`tests` must be a non-empty list of tests, got {describe(items)}")
        return []
    cases: list[RuleTestCase] = []
    seen_names: set[str] = set()
    for index, item in enumerate(items):
        where = Location(top.file, items.line_of(index))
        if not isinstance(item, YamlMapping):
            top.error_at(where, f"test #{index + 1} must be a mapping, got {describe(item)}")
            continue
        label = item.get("name") if isinstance(item.get("name"), str) else f"#{index + 1}"
        case = _case(Section(item, top.file, f"test `{label}`", top.errors), path, start, defaults)
        if case is None:
            continue
        if case.name in seen_names:
            top.error_at(where, f"two tests are named `{case.name}`", "give each test its own name")
        seen_names.add(case.name)
        cases.append(case)
    return cases


def _case(
    section: Section, path: Path, start: datetime, file_defaults: dict[str, Any]
) -> RuleTestCase | None:
    errors_before = len(section.errors)
    section.check_keys(CASE_KEYS)
    name = None
    if section.require("name", NAME_HINT):
        name = section.text("name")
        if section.data["name"] is None:  # else a test that runs nothing would pass silently
            section.error("name", "`name` is empty", NAME_HINT)
    defaults = _merge(file_defaults, _mapping(section, "defaults"))
    events = _events(section, path, start, defaults)
    digest_at = _moment(section, "digest_at") if "digest_at" in section.data else None
    until = _until(section, start) if "until" in section.data else None
    expect = _expectations(section, "expect", EXPECT_KEYS)
    absent = _expectations(section, "expect_absent", ABSENT_KEYS)
    expect_none = section.flag("expect_none", default=False)
    if expect_none and expect:
        section.error("expect_none", "`expect_none` and `expect` contradict each other")
    if not (expect or absent or expect_none or "expect" in section.data):
        section.error(
            None,
            "a test needs `expect`, `expect_absent` or `expect_none: true`",
            "say what the rules should (or should not) do with the events",
        )
    ordered = section.flag("ordered", default=False)
    strict = section.flag("strict", default=True)
    silences = _silences(section, start) if "silences" in section.data else []
    if len(section.errors) > errors_before or name is None:
        return None
    return RuleTestCase(
        name=name,
        where=section.at(),
        events=tuple(events),
        expect=tuple(expect),
        expect_absent=tuple(absent),
        expect_none=expect_none,
        ordered=ordered,
        strict=strict,
        digest_at=digest_at,
        start=start,
        until=until,
        silences=tuple(silences),
    )


def _silences(section: Section, start: datetime) -> list[Silence]:
    """`silences: [{match: {iccid: ...}, at: 10m, for: 1h, comment: ...}]`: numbered #1, #2..
    in the order written, each from `start` plus `at` for `for`."""
    items = section.data["silences"]
    hint = "e.g. silences: [{match: {tag: maintenance}, at: 10m, for: 1h, comment: rollout}]"
    if not isinstance(items, YamlList):
        section.error("silences", f"`silences` must be a list, got {describe(items)}", hint)
        return []
    found: list[Silence] = []
    for index, item in enumerate(items):
        where = Location(section.file, items.line_of(index))
        if not isinstance(item, YamlMapping):
            section.error_at(where, f"a silence is a mapping, got {describe(item)}", hint)
            continue
        entry = Section(
            item, section.file, f"{section.label} → silence #{index + 1}", section.errors
        )
        entry.check_keys(SILENCE_KEYS)
        matchers: list[tuple[str, str]] = []
        match = item.get("match")
        if not isinstance(match, YamlMapping) or not match:
            entry.error("match", "`match` must be a mapping like {iccid: ...}", hint)
        else:
            for key, value in match.items():
                try:
                    matchers.append(parse_matcher(f"{key}={value}"))
                except ValueError as error:
                    entry.error_at(Location(section.file, match.line_of(key)), str(error))
        offset = _offset(entry, item.get("at"), entry.at("at"))
        length = entry.duration("for") if entry.require("for", "e.g. for: 1h") else None
        comment = entry.text("comment") if entry.require("comment", "why: it is required") else None
        if offset is None or length is None or not comment or len(matchers) != len(match or ()):
            continue
        found.append(
            Silence(
                tuple(matchers), comment, "test", start + offset, start + offset + length, index + 1
            )
        )
    return found


def _events(
    section: Section, path: Path, start: datetime, defaults: dict[str, Any]
) -> list[TestEvent]:
    data = section.data
    if ("events" in data) == ("events_file" in data):
        section.error(None, "a test needs either `events` (a list) or `events_file` (a path)")
        return []
    raw: list[tuple[Any, Location]] = []
    if "events" in data:
        items = data["events"]
        if not isinstance(items, YamlList):
            section.error("events", f"`events` must be a list of events, got {describe(items)}")
            return []
        raw = [(item, Location(section.file, items.line_of(i))) for i, item in enumerate(items)]
    else:
        file_name = section.text("events_file")
        if not file_name:
            return []
        raw = _events_from_file(section, path.parent / file_name)
    explicit_ids = {item.get("id") for item, _ in raw if isinstance(item, Mapping) and "id" in item}
    next_id = 1
    events: list[TestEvent] = []
    for item, where in raw:
        if not isinstance(item, Mapping):
            # Handed on as it is: the pipeline rejects it the way `run` would.
            events.append(TestEvent(plain(item), where))
            continue
        given = plain(item)
        record = _merge(defaults, given)
        usage = is_usage_record(given) or is_usage_record(record)
        if usage:
            # A usage record takes the defaults it can use, not an event's own fields.
            for key in _EVENT_ONLY:
                if key not in given:
                    record.pop(key, None)
        stamp = "end_timestamp" if usage else "timestamp"
        if "id" not in record:
            while next_id in explicit_ids:
                next_id += 1
            record["id"] = next_id
            explicit_ids.add(next_id)
        at = record.pop("at", None)
        if stamp not in record:
            offset = _offset(section, at, where)
            if offset is None:
                continue
            try:
                record[stamp] = (start + offset).isoformat().replace("+00:00", "Z")
            except OverflowError:
                section.error_at(where, "`start` plus `at` is past the year 9999")
                continue
        elif at is not None:
            what = "a usage record" if usage else "an event"
            section.error_at(where, f"{what} takes `{stamp}` or `at`, not both")
            continue
        events.append(TestEvent(record, where))
    return events


# What a usage record does not take from `defaults` written for events.
_EVENT_ONLY = ("event_type", "event_source", "event_severity", "alert", "description", "timestamp")


def _events_from_file(section: Section, file: Path) -> list[tuple[Any, Location]]:
    found: list[tuple[Any, Location]] = []

    def bad_line(line: int, reason: str) -> None:
        section.error_at(Location(str(file), line), reason)

    try:
        for line, value in read_records(file, bad_line):
            found.append((value, Location(str(file), line)))
    except ReplayInputError as error:
        section.error("events_file", str(error))
    return found


def _offset(section: Section, at: object, where: Location) -> timedelta | None:
    if at is None:
        return timedelta(0)
    try:
        if not isinstance(at, str):
            raise ValueError(at)
        return parse_duration(at)
    except ValueError:
        section.error_at(where, f"`at` must be a delay after `start` like 5m, got {describe(at)}")
        return None


def _expectations(section: Section, key: str, allowed: tuple[str, ...]) -> list[Expectation]:
    if key not in section.data:
        return []
    items = section.data[key]
    if not isinstance(items, YamlList):
        section.error(key, f"`{key}` must be a list, got {describe(items)}")
        return []
    found: list[Expectation] = []
    for index, item in enumerate(items):
        where = Location(section.file, items.line_of(index))
        if not isinstance(item, YamlMapping) or not item:
            section.error_at(
                where,
                f"`{key}` items are mappings like {{rule: ..., action: ...}}, got {describe(item)}",
            )
            continue
        sub = Section(item, section.file, f"{section.label} → {key}", section.errors)
        errors_before = len(sub.errors)
        sub.check_keys(allowed)
        expectation = Expectation(
            where=where,
            rule=sub.text("rule"),
            action=sub.text("action"),
            event=_event_id(sub),
            target=_mapping(sub, "target") or None,
            params=_mapping(sub, "params") or None,
            due=_due(sub) if "due" in item else None,
            status=sub.text("status"),
            at=_time_or_delay(sub, "at") if "at" in item else None,
        )
        times = sub.count("times") if "times" in item else 1
        if times is not None and times > MAX_TIMES:
            # Each one is an expectation in memory: a typo must not ask for a billion.
            sub.error("times", f"`times` must be at most {MAX_TIMES:,}, got {times:,}")
        if len(sub.errors) == errors_before and times:
            found.extend([expectation] * times)
    return found


def _event_id(section: Section) -> int | None:
    value = section.data.get("event")
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    section.error("event", f"`event` is an event id, got {describe(value)}")
    return None


def _due(section: Section) -> datetime | timedelta | None:
    value = section.data.get("due")
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError:
            pass
        try:
            return parse_timestamp(value, "due")
        except EventFormatError:
            pass
    section.error(
        "due",
        f"`due` is a time or a delay after the event, got {describe(value)}",
        'e.g. due: 24h or due: "2025-05-02T10:00:00Z"',
    )
    return None


def _time_or_delay(section: Section, key: str) -> datetime | timedelta | None:
    """A moment, or a delay after the test's `start`."""
    value = section.data.get(key)
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError:
            pass
        try:
            return parse_timestamp(value, key)
        except EventFormatError:
            pass
    section.error(
        key,
        f"`{key}` is a time or a delay after `start`, got {describe(value)}",
        f'e.g. {key}: 8h or {key}: "2025-05-01T18:00:00Z"',
    )
    return None


def _until(section: Section, start: datetime) -> datetime | None:
    value = _time_or_delay(section, "until")
    return start + value if isinstance(value, timedelta) else value


def _moment(section: Section, key: str) -> datetime | None:
    value = section.data.get(key)
    try:
        return parse_timestamp(value, key)
    except EventFormatError:
        section.error(
            key, f"`{key}` must be a time like 2025-05-01T10:00:00Z, got {describe(value)}"
        )
        return None


def _names(section: Section, key: str) -> tuple[str, ...] | None:
    value = section.data.get(key)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, YamlList) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    section.error(key, f"`{key}` must be a rule id or a list of them, got {describe(value)}")
    return None


def _env(section: Section) -> dict[str, str]:
    value = section.data.get("env")
    if isinstance(value, YamlMapping) and all(
        isinstance(k, str) and isinstance(v, str | int | float) for k, v in value.items()
    ):
        return {k: str(v) for k, v in value.items()}
    section.error(
        "env",
        "`env` maps secret names to the values tests use",
        'e.g. env: {OPS_WEBHOOK_URL: "https://hooks.test/ops"}',
    )
    return {}


def _mapping(section: Section, key: str) -> dict[str, Any]:
    if key not in section.data:
        return {}
    value = section.data[key]
    if isinstance(value, YamlMapping):
        return dict(plain(value))
    section.error(key, f"`{key}` must be a mapping, got {describe(value)}")
    return {}


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`; nested mappings merge, anything else replaces."""
    merged = dict(base)
    for key, value in over.items():
        below = merged.get(key)
        if isinstance(below, Mapping) and isinstance(value, Mapping):
            merged[key] = _merge(below, value)
        else:
            merged[key] = value
    return merged


def _short(value: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v!r}" for k, v in value.items()) + "}"
