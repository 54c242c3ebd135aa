"""A digest rule's schedule as the rule file states it: five crontab fields and a time zone.

The rules read the schedule's shape here; what its fields mean is the scheduler's to say
(`engine.cron`, on APScheduler), and the loader is handed that check (`CronCheck`) by
whoever loads rules for real (the daemon, `validate`, `replay`, `test`), so the rules
themselves never load a scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# Raises ValueError saying what is wrong with a five-field crontab expression.
CronCheck = Callable[[str], None]

SCHEDULE_HINT = (
    'five crontab fields: minute hour day month weekday, e.g. "0 8 * * *" or "0 8 * * 1-5"'
)


def parse_timezone(name: str) -> tzinfo:
    """A zone such as `UTC` or `Europe/Berlin`; ValueError for an unknown name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


def check_fields(expression: str) -> None:
    """The shape every schedule must have, whatever checks its fields: five of them."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"a schedule has 5 fields, got {len(fields)}")
