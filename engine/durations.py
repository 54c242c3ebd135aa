"""Durations as operators write them: `30s`, `10m`, `24h`, `7d`, `2w`, or combined (`1h30m`)."""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(
    r"(?:(?P<w>\d+)\s*w)?\s*(?:(?P<d>\d+)\s*d)?\s*(?:(?P<h>\d+)\s*h)?\s*"
    r"(?:(?P<m>\d+)\s*m)?\s*(?:(?P<s>\d+)\s*s)?"
)
_UNIT_SECONDS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}

DURATION_HINT = "write a whole number and a unit (s, m, h, d, w), e.g. 30s, 10m, 24h, 7d or 1h30m"
# Longer than any window, throttle or follow-up can mean, and short enough that a moment
# plus or minus it stays within the years `datetime` can hold.
MAX_DURATION = timedelta(days=3650)


class DurationTooLong(ValueError):
    """A well-formed duration longer than MAX_DURATION."""


def parse_duration(text: str) -> timedelta:
    """Parse `1h30m` and friends; units largest first, each at most once.

    Raises ValueError for anything else (a bare number, `1.5h`, `30 minutes`, ...), so a
    typo never turns into a surprising default, and for more than `MAX_DURATION`. Zero
    (`0s`) parses; callers that need a positive span check for it.
    """
    if not isinstance(text, str):
        raise ValueError(f"a duration must be text like `10m`, got {type(text).__name__}")
    stripped = text.strip()
    found = _DURATION.fullmatch(stripped) if stripped else None
    if found is None or not any(found.groupdict().values()):
        raise ValueError(f"invalid duration {text!r}: {DURATION_HINT}")
    seconds = sum(
        int(amount) * _UNIT_SECONDS[unit]
        for unit, amount in found.groupdict().items()
        if amount is not None
    )
    if seconds > MAX_DURATION.total_seconds():
        raise DurationTooLong(f"{text[:40]!r} is longer than {MAX_DURATION.days // 365} years")
    return timedelta(seconds=seconds)
