"""The one clock: tests pass a `FixedClock` and move it; it tells time in UTC only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from engine.clock import FixedClock, system_clock


def test_a_fixed_clock_stands_still_until_moved():
    clock = FixedClock(datetime(2025, 5, 1, 12, 0, tzinfo=UTC))
    assert clock() == clock() == datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
    assert clock.advance(timedelta(minutes=5)) == datetime(2025, 5, 1, 12, 5, tzinfo=UTC)
    assert clock() == datetime(2025, 5, 1, 12, 5, tzinfo=UTC)


def test_a_fixed_clock_refuses_a_time_without_its_zone():
    with pytest.raises(ValueError) as refused:
        FixedClock(datetime(2025, 5, 1, 12, 0))
    assert str(refused.value) == "a clock tells time in UTC: give an aware datetime"


def test_the_system_clock_tells_now_in_utc():
    before = datetime.now(UTC)
    now = system_clock()
    assert now.tzinfo is UTC
    assert before <= now <= datetime.now(UTC)
