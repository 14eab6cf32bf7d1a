"""Calendar periods of token quotas, including daylight-saving days (pure, no store)."""

from __future__ import annotations

import pytest

from sluicegate.limits.periods import period_bounds
from tests.limits.conftest import epoch


@pytest.mark.parametrize(
    ("period", "timezone", "now", "start", "end"),
    [
        ("hourly", "UTC", "2024-05-05T10:59:59", "2024-05-05T10:00:00", "2024-05-05T11:00:00"),
        ("daily", "UTC", "2024-02-29T00:00:00", "2024-02-29T00:00:00", "2024-03-01T00:00:00"),
        ("weekly", "UTC", "2024-03-11T00:00:00", "2024-03-11T00:00:00", "2024-03-18T00:00:00"),
        ("weekly", "UTC", "2024-12-31T12:00:00", "2024-12-30T00:00:00", "2025-01-06T00:00:00"),
        ("monthly", "UTC", "2024-02-15T00:00:00", "2024-02-01T00:00:00", "2024-03-01T00:00:00"),
        ("monthly", "UTC", "2024-12-31T23:59:59", "2024-12-01T00:00:00", "2025-01-01T00:00:00"),
        ("yearly", "UTC", "2024-07-01T00:00:00", "2024-01-01T00:00:00", "2025-01-01T00:00:00"),
        # India is UTC+05:30: its hours start at half past in UTC.
        ("hourly", "Asia/Kolkata", "2024-05-05T10:10:00", "2024-05-05T09:30:00",
         "2024-05-05T10:30:00"),
        # Berlin falls back on 2024-10-27: that local day has 25 hours.
        ("daily", "Europe/Berlin", "2024-10-27T12:00:00", "2024-10-26T22:00:00",
         "2024-10-27T23:00:00"),
        ("weekly", "Europe/Berlin", "2024-10-27T12:00:00", "2024-10-20T22:00:00",
         "2024-10-27T23:00:00"),
    ],
)  # fmt: skip
def test_period_bounds(period: str, timezone: str, now: str, start: str, end: str) -> None:
    bounds = period_bounds(period, epoch(now), timezone)  # type: ignore[arg-type]
    assert bounds == (int(epoch(start) * 1000), int(epoch(end) * 1000))


def test_the_repeated_hour_at_a_dst_change_is_two_periods() -> None:
    # New York, 2024-11-03: 01:00-02:00 local happens twice (05:00Z-06:00Z and 06:00Z-07:00Z).
    first = period_bounds("hourly", epoch("2024-11-03T05:30:00"), "America/New_York")
    second = period_bounds("hourly", epoch("2024-11-03T06:30:00"), "America/New_York")
    assert first == (
        int(epoch("2024-11-03T05:00:00") * 1000),
        int(epoch("2024-11-03T06:00:00") * 1000),
    )
    assert second[0] == first[1]
    assert second[1] - second[0] == 3_600_000


def test_every_instant_lies_inside_its_period() -> None:
    now = epoch("2024-01-01T00:00:00")
    for step in range(0, 400 * 86_400, 86_400 * 3 + 3_607):
        for period in ("hourly", "daily", "weekly", "monthly", "yearly"):
            for zone in ("UTC", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu"):
                start, end = period_bounds(period, now + step, zone)
                assert start <= (now + step) * 1000 < end
