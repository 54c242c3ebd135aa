"""Crontab schedules (`schedule: "0 8 * * *"`) as APScheduler triggers, read the way cron
reads them.

APScheduler 3 counts weekdays from Monday = 0, while crontab counts from Sunday = 0 (and
allows 7 for Sunday); `"0 8 * * 1"` would fire on Tuesdays. Numeric weekdays are therefore
turned into names (`mon`, `tue`, ...) before the trigger is built, so an expression copied
from a crontab means what it meant there.
"""

from __future__ import annotations

import re
from datetime import UTC, tzinfo

from apscheduler.triggers.cron import CronTrigger

from engine.rules.schedule import check_fields

_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_NUMERIC_PART = re.compile(r"(\*|\d+)(?:-(\d+))?(?:/(\d+))?")


def check_crontab(expression: str) -> None:
    """The `CronCheck` rules are loaded with: ValueError when the scheduler cannot read
    the expression."""
    cron_trigger(expression, UTC)


def cron_trigger(expression: str, timezone: tzinfo) -> CronTrigger:
    """The trigger for a five-field crontab expression; ValueError says what is wrong."""
    check_fields(expression)
    minute, hour, day, month, weekday = expression.split()
    return CronTrigger(
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=_cron_weekdays(weekday),
        timezone=timezone,
    )


def _cron_weekdays(field: str) -> str:
    """Crontab weekday numbers (0 or 7 = Sunday) as APScheduler's weekday names."""
    parts: list[str] = []
    for part in field.split(","):
        found = _NUMERIC_PART.fullmatch(part)
        if found is None or part == "*":
            parts.append(part)  # names, ranges of names, `*`: APScheduler reads them as cron
            continue
        start_text, end_text, step_text = found.groups()
        if start_text == "*":
            start, end = 0, 6
        else:
            start = int(start_text)
            end = int(end_text) if end_text is not None else (6 if step_text else start)
        step = int(step_text) if step_text else 1
        if not (0 <= start <= 7 and 0 <= end <= 7) or start > end or step < 1:
            raise ValueError(f"weekday {part!r} is not within 0-7 (0 and 7 are Sunday)")
        parts.extend(_WEEKDAYS[day % 7] for day in range(start, end + 1, step))
    return ",".join(dict.fromkeys(parts))
