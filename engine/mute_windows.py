"""Recurring mute windows (config `mute_windows`): a crontab line saying when a window
opens, in a time zone, and how long it stays open.

```yaml
mute_windows:
  - name: nightly-maintenance
    cron: "0 2 * * 1-5"          # opens weekdays at 02:00 ...
    for: 2h                      # ... until 04:00
    timezone: Europe/Berlin
    match: {tag: maintenance}    # optional: every match when left out
    comment: firmware rollout
```

Whether a window is open at a moment is read off APScheduler's CronTrigger (the crontab
dialect of `engine.cron`): open when the trigger fires within `for` before the moment. The
answer is remembered for the stretch it holds for, since a busy rule asks once a match.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

from engine.cron import cron_trigger
from engine.errors import ConfigError, Location
from engine.section import Section, as_text, describe, duration
from engine.silencing import MATCHER_FIELDS, describe_matchers, parse_matcher
from engine.yamlfile import YamlMapping

_TICK = timedelta(microseconds=1)
_NEVER = datetime.max.replace(tzinfo=UTC)
_FOR = duration()


class MuteWindow:
    """One configured window; `open_at` is exact to the microsecond, DST included."""

    __slots__ = ("_closed", "_open", "_trigger", "comment", "cron", "length", "matchers", "name")

    def __init__(
        self,
        name: str,
        cron: str,
        length: timedelta,
        timezone: ZoneInfo,
        matchers: tuple[tuple[str, str], ...] = (),
        comment: str = "",
    ):
        self.name = name
        self.cron = cron
        self.length = length
        self.matchers = matchers
        self.comment = comment
        self._trigger: CronTrigger = cron_trigger(cron, timezone)
        self._open: tuple[datetime, datetime] | None = None
        self._closed: tuple[datetime, datetime] | None = None

    def open_at(self, moment: datetime) -> bool:
        if self._open is not None and self._open[0] <= moment < self._open[1]:
            return True
        if self._closed is not None and self._closed[0] <= moment < self._closed[1]:
            return False
        start = self._trigger.get_next_fire_time(None, moment - self.length + _TICK)
        if start is not None and start <= moment:
            self._open = (start, start + self.length)
            return True
        # No opening within `length` before `moment`, and the next one is at `start`:
        # closed from `moment` until then.
        self._closed = (moment, start if start is not None else _NEVER)
        return False

    def describe(self) -> str:
        """How a match the window silenced is recorded."""
        return f"silenced by mute window {self.name} ({self.comment or self.summary()})"

    def summary(self) -> str:
        """One line for `status`: when it opens, for how long, and what it covers."""
        what = describe_matchers(self.matchers) or "every match"
        zone = str(self._trigger.timezone)
        return f"{self.cron} {zone} for {_span(self.length)}, {what}"

    def next_opening(self, after: datetime) -> datetime | None:
        found: datetime | None = self._trigger.get_next_fire_time(None, after)
        return found


def _span(length: timedelta) -> str:
    seconds = int(length.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def read_mute_windows(top: Section) -> tuple[MuteWindow, ...]:
    """The config's `mute_windows` list, each one checked, errors with file:line."""
    example = 'e.g. - {name: nightly, cron: "0 2 * * 1-5", for: 2h, timezone: Europe/Berlin}'
    windows: list[MuteWindow] = []
    names: set[str] = set()
    for index, item in top.entries("mute_windows", "windows", example):
        window = _window(Section.config_file(item, top.file), index)
        if window.name in names:
            raise ConfigError(
                f"two mute windows are named `{window.name}`",
                Location(top.file, item.line_of("name")),
                "give each window its own name: it is how a silenced match names it",
            )
        names.add(window.name)
        windows.append(window)
    return tuple(windows)


def _window(section: Section, index: int) -> MuteWindow:
    section.path = f"mute_windows[{index}]."
    example = 'e.g. cron: "0 2 * * 1-5" (weekdays at 02:00)'
    name = section.get("name", as_text, "")
    cron = section.get("cron", as_text, "")
    length = section.get("for", _FOR, None)
    zone_name = section.get("timezone", as_text, "UTC")
    comment = section.get("comment", as_text, "")
    matchers = _matchers(section)
    section.finish()
    for key, given, hint in (
        ("name", name, "a name of your own, e.g. nightly-maintenance"),
        ("cron", cron, example),
        ("for", length, "how long it stays open, e.g. for: 2h"),
    ):
        if not given:
            raise ConfigError(f"`mute_windows[{index}]` needs `{key}`", section.at(None), hint)
    assert length is not None
    try:
        timezone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"`mute_windows[{index}].timezone` {zone_name!r} is not a known time zone",
            section.at("timezone"),
            "an IANA name, e.g. Europe/Berlin or UTC",
        ) from None
    try:
        return MuteWindow(name, cron, length, timezone, matchers, comment)
    except ValueError as error:
        raise ConfigError(
            f"`mute_windows[{index}].cron` {cron!r}: {error}", section.at("cron"), example
        ) from None


def _matchers(section: Section) -> tuple[tuple[str, str], ...]:
    section.read.append("match")
    value = section.data.get("match")
    if value is None:
        return ()
    hint = "e.g. match: {tag: maintenance} or match: {rule: block-sim, iccid: 8988...}"
    if not isinstance(value, YamlMapping):
        raise ConfigError(
            f"`{section.name_of('match')}` must be a mapping, got {describe(value)}",
            section.at("match"),
            hint,
        )
    found: list[tuple[str, str]] = []
    for key, item in value.items():
        if isinstance(item, bool) or not isinstance(item, str | int) or item == "":
            raise ConfigError(
                f"`{section.name_of('match')}.{key}` must be one value, got {describe(item)}",
                Location(section.file, value.line_of(key)),
                hint,
            )
        try:
            found.append(parse_matcher(f"{key}={item}"))
        except ValueError as error:
            raise ConfigError(
                f"`{section.name_of('match')}`: {error}",
                Location(section.file, value.line_of(key)),
                f"known fields: {', '.join(MATCHER_FIELDS)}",
            ) from None
    return tuple(found)
