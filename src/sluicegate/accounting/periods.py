"""Calendar arithmetic for reports (all UTC, epoch seconds). Pure functions."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Literal

HOUR = 3600
DAY = 86400

Granularity = Literal["hour", "day", "month"]


def floor_hour(t: float) -> int:
    return math.floor(t / HOUR) * HOUR


def ceil_hour(t: float) -> int:
    return math.ceil(t / HOUR) * HOUR


def floor_day(t: float) -> int:
    return math.floor(t / DAY) * DAY


def ceil_day(t: float) -> int:
    return math.ceil(t / DAY) * DAY


def month_start(t: float) -> int:
    d = datetime.fromtimestamp(t, UTC)
    return int(datetime(d.year, d.month, 1, tzinfo=UTC).timestamp())


def next_month(t: float) -> int:
    d = datetime.fromtimestamp(t, UTC)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp())


def month_bounds(t: float) -> tuple[int, int]:
    """``[start, end)`` of the calendar month that contains ``t``."""
    return month_start(t), next_month(t)


def whole_hours(start: float, end: float) -> tuple[int, int]:
    """The report range actually covered: ``start`` rounded down and ``end`` rounded up to
    whole hours (rollups hold hours). Raises ``ValueError`` if the range is empty."""
    a, b = floor_hour(start), ceil_hour(end)
    if b <= a:
        raise ValueError("the range is empty: 'to' must be after 'from'")
    return a, b


def buckets(start: int, end: int, granularity: Granularity) -> list[int]:
    """Every bucket start of ``granularity`` that overlaps ``[start, end)``."""
    out: list[int] = []
    if granularity == "hour":
        t = floor_hour(start)
        step = HOUR
    elif granularity == "day":
        t = floor_day(start)
        step = DAY
    else:
        t = month_start(start)
        while t < end:
            out.append(t)
            t = next_month(t)
        return out
    while t < end:
        out.append(t)
        t += step
    return out


def iso(t: float) -> str:
    """``2026-11-28T10:00:00Z``."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
