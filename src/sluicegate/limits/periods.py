"""Calendar periods for token quotas: where the period containing an instant starts and ends.

Periods are fixed windows aligned to the calendar of ``timezone`` (UTC by default, as APIM):
hourly (top of the hour), daily (midnight), weekly (Monday midnight, ISO weeks), monthly
(the 1st), yearly (1 January). Hours are cut in absolute time (the instant minus the local
minutes and seconds) so that a repeated hour at a daylight-saving change is two periods,
never two overlapping ones; days and longer are cut at local midnight (where a zone skips
midnight, the period starts at the transition instant, which zoneinfo gives for 00:00).
"""

from __future__ import annotations

import functools
import zoneinfo
from datetime import UTC, date, datetime, time, timedelta, tzinfo

from sluicegate.limits.policy import QuotaPeriod

PERIOD_NOUNS: dict[str, str] = {
    "hourly": "hour",
    "daily": "day",
    "weekly": "week",
    "monthly": "month",
    "yearly": "year",
}


@functools.lru_cache(maxsize=64)
def _zone(name: str) -> tzinfo:
    # UTC needs no time-zone database (slim images may lack /usr/share/zoneinfo and tzdata).
    return UTC if name == "UTC" else zoneinfo.ZoneInfo(name)


def _midnight(day: date, zone: tzinfo) -> float:
    return datetime.combine(day, time(0), zone).timestamp()


# The period last computed per (period, zone): nearly every admission falls in it.
_last: dict[tuple[str, str], tuple[int, int]] = {}


def period_bounds(period: QuotaPeriod, now: float, timezone: str = "UTC") -> tuple[int, int]:
    """``(start_ms, end_ms)`` in epoch milliseconds of the period containing ``now``.

    ``start <= now < end`` always holds. Pure (the zone and the latest period are cached).
    """
    now_ms = now * 1000
    last = _last.get((period, timezone))
    if last is not None and last[0] <= now_ms < last[1]:
        return last
    bounds = _compute(period, now, timezone)
    _last[(period, timezone)] = bounds
    return bounds


def zone(name: str) -> tzinfo:
    """The time zone called ``name`` (cached); raises ``zoneinfo.ZoneInfoNotFoundError``."""
    return _zone(name)


def _compute(period: QuotaPeriod, now: float, timezone: str) -> tuple[int, int]:
    zone = _zone(timezone)
    local = datetime.fromtimestamp(now, zone)
    if period == "hourly":
        into_hour = local.minute * 60 + local.second + local.microsecond / 1e6
        start_ms = round((now - into_hour) * 1000)
        return start_ms, start_ms + 3_600_000
    today = local.date()
    if period == "daily":
        first, following = today, today + timedelta(days=1)
    elif period == "weekly":
        first = today - timedelta(days=today.weekday())
        following = first + timedelta(days=7)
    elif period == "monthly":
        first = today.replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)
    else:
        first = date(today.year, 1, 1)
        following = date(today.year + 1, 1, 1)
    return round(_midnight(first, zone) * 1000), round(_midnight(following, zone) * 1000)
