"""Reports over days whose hourly rollups are purged (``retention.hourly_rollups_days``): an
edge in such a day is widened to the whole day (read from the daily rollup) and the report
says it covers that range, instead of counting the purged hours as zero; a series by hour
refuses such days (422 in the admin API), and the dashboard shows them by day. A series by
hour reads every bucket from the hourly rollups."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine

from sluicegate.accounting.chargeback import charge_report, usage_series
from sluicegate.accounting.periods import DAY, HOUR, iso
from sluicegate.accounting.pricing import PriceTable
from sluicegate.accounting.records import UsageRecord
from sluicegate.accounting.rollups import Rollups
from sluicegate.clock import FakeClock
from sluicegate.config.loader import parse_config
from tests.accounting.conftest import chat_record, write_ledger
from tests.admin.harness import ADMIN_TOKEN, admin_gateway

DAY0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
NOW = DAY0 + 12 * DAY + 15 * HOUR  # 2026-01-13T15:00Z
CONFIG = {
    "backends": [{"name": "east", "url": "http://e"}],
    "deployments": [{"name": "gpt-4o", "backend": "east", "model": "gpt-4o"}],
    "products": [{"name": "p"}],
    "prices": [{"model": "gpt-4o", "input": 2.5, "output": 10}],
}


def hourly_records(sub: str = "A") -> list[UsageRecord]:
    """One record of 1,000 tokens five seconds into every hour from DAY0 until NOW."""
    return [
        chat_record(f"r{h}", DAY0 + h * HOUR + 5, sub, 1000)
        for h in range(int((NOW - DAY0) // HOUR))
    ]


def tokens_in(recs: list[UsageRecord], start: float, end: float) -> int:
    return sum(r.total_tokens for r in recs if start <= r.ts < end)


def purged(engine: Engine, tmp: Path) -> tuple[PriceTable, list[UsageRecord]]:
    """A ledger of ``hourly_records`` rolled up, then purged as of NOW with three days of
    raw records and hourly rollups: hours before 2026-01-10 are gone."""
    prices = PriceTable(parse_config(CONFIG))
    recs = hourly_records()
    write_ledger(engine, tmp, recs)
    rollups = Rollups(engine, prices, FakeClock(NOW))
    rollups.catch_up()
    run = rollups.purge(raw_days=3, hourly_days=3)
    assert run.raw_purged_before == DAY0 + 9 * DAY and run.hourly_deleted > 0
    return prices, recs


def test_a_report_widens_an_edge_in_a_purged_day_to_the_whole_day(
    engine: Engine, tmp_path: Path
) -> None:
    """The CLI's default range (now − 30 days) scaled down: from 2026-01-03T15:00, ten days
    back. Before the purge it covers from 15:00; after, the first day's hours are gone, so it
    covers the whole of 2026-01-03 (and says so) instead of losing its last nine hours."""
    prices = PriceTable(parse_config(CONFIG))
    recs = hourly_records()
    write_ledger(engine, tmp_path, recs)
    rollups = Rollups(engine, prices, FakeClock(NOW))
    rollups.catch_up()
    start = NOW - 10 * DAY
    before = charge_report(engine, prices, start=start, end=NOW)
    assert (before.start, before.end) == (start, NOW)
    assert before.total.total_tokens == tokens_in(recs, start, NOW)
    rollups.purge(raw_days=3, hourly_days=3)

    after = charge_report(engine, prices, start=start, end=NOW)
    assert (after.start, after.end) == (DAY0 + 2 * DAY, NOW)
    assert after.total.total_tokens == tokens_in(recs, DAY0 + 2 * DAY, NOW)
    assert after.total.requests == len([r for r in recs if DAY0 + 2 * DAY <= r.ts < NOW])
    assert before.note == ""
    assert "2026-01-03" in after.note and "hourly_rollups_days" in after.note
    assert iso(after.start) in after.note


D3, D4, D5, D8, D9, D10, D11 = (DAY0 + n * DAY for n in (3, 4, 5, 8, 9, 10, 11))


@pytest.mark.parametrize(
    ("start", "end", "covered"),
    [
        # both edges in purged days, two days apart
        (D3 + 10 * HOUR, D4 + 5 * HOUR, (D3, D5)),
        # a few hours of one purged day
        (D3 + 10 * HOUR, D3 + 12 * HOUR, (D3, D4)),
        # the start in a purged day, the end in a kept one: only the start moves
        (D8 + 10 * HOUR, D9 + 7 * HOUR, (D8, D9 + 7 * HOUR)),
        # hours of kept days: as asked
        (D10 + 5 * HOUR, D11 + 7 * HOUR, (D10 + 5 * HOUR, D11 + 7 * HOUR)),
    ],
)
def test_each_edge_moves_only_where_its_day_is_purged(
    engine: Engine, tmp_path: Path, start: float, end: float, covered: tuple[float, float]
) -> None:
    prices, recs = purged(engine, tmp_path)
    report = charge_report(engine, prices, start=start, end=end, by="owner")
    assert (report.start, report.end) == covered
    assert report.total.total_tokens == tokens_in(recs, *covered)
    assert bool(report.note) == (covered != (start, end))


def test_a_late_record_for_a_purged_day_keeps_the_day_whole(engine: Engine, tmp_path: Path) -> None:
    """A record replayed late for a purged day gives that day an hourly row again (and the
    same to its daily one): the day is still read whole, the late record included."""
    prices, recs = purged(engine, tmp_path)
    late = chat_record("late", DAY0 + 3 * DAY + 10 * HOUR + 1800, "A", 7)
    write_ledger(engine, tmp_path, [late])
    Rollups(engine, prices, FakeClock(NOW)).catch_up()
    report = charge_report(
        engine, prices, start=DAY0 + 3 * DAY + 10 * HOUR, end=DAY0 + 3 * DAY + 11 * HOUR
    )
    assert (report.start, report.end) == (DAY0 + 3 * DAY, DAY0 + 4 * DAY)
    assert report.total.total_tokens == tokens_in([*recs, late], DAY0 + 3 * DAY, DAY0 + 4 * DAY)


def test_series_by_day_widen_and_by_hour_refuse_purged_days(engine: Engine, tmp_path: Path) -> None:
    prices, recs = purged(engine, tmp_path)
    start = NOW - 10 * DAY
    by_day = usage_series(engine, prices, start=start, end=NOW, granularity="day")
    assert by_day.start == DAY0 + 2 * DAY and "2026-01-03" in by_day.note
    assert by_day.buckets[0] == DAY0 + 2 * DAY
    assert by_day.values["A"]["total_tokens"][0] == 24_000
    assert sum(by_day.values["A"]["total_tokens"]) == tokens_in(recs, DAY0 + 2 * DAY, NOW)
    with pytest.raises(ValueError, match="granularity day") as refused:
        usage_series(engine, prices, start=start, end=NOW, granularity="hour")
    assert "2026-01-03 to 2026-01-09" in str(refused.value)
    with pytest.raises(ValueError, match="2026-01-09"):
        usage_series(
            engine,
            prices,
            start=DAY0 + 8 * DAY + 20 * HOUR,
            end=DAY0 + 9 * DAY + 3 * HOUR,
            granularity="hour",
        )


def test_a_series_by_hour_reads_every_hour_from_the_hourly_rollups(
    engine: Engine, tmp_path: Path
) -> None:
    """Two whole kept days and a bit, by hour: one bucket per hour with that hour's tokens
    (a day's rollup cannot be split into hours: it is not read)."""
    prices, _ = purged(engine, tmp_path)
    start, end = DAY0 + 10 * DAY - 3 * HOUR, DAY0 + 12 * DAY
    series = usage_series(engine, prices, start=start, end=end, granularity="hour")
    assert series.values["A"]["total_tokens"] == [1000] * 51
    assert (series.start, series.end, series.note) == (start, end, "")


def test_admin_api_and_dashboard_over_purged_hours(tmp_path: Path) -> None:
    """Through a real gateway: GET /usage and /usage.csv report the range covered; GET
    /usage/series by hour over purged days is 422 in Azure's error shape, by day it is
    widened; the dashboard's overview of a few purged hours shows them by day, with the
    range covered, and its charge-back page shows that range too."""
    clock = FakeClock(NOW)
    with admin_gateway(
        tmp_path,
        clock,
        deployments=CONFIG["deployments"],
        products=[{"name": "starter", "deployments": ["*"]}],
        prices=CONFIG["prices"],
        backends={"east": "SIM"},
    ) as h:
        engine = h.gw.gateway.engine
        assert engine is not None
        recs = hourly_records()
        write_ledger(engine, tmp_path, recs)
        rollups = Rollups(engine, PriceTable(h.gw.gateway.config), clock)
        rollups.catch_up()
        rollups.purge(raw_days=3, hourly_days=3)

        start = NOW - 10 * DAY
        r = h.api.get("/usage", params={"from": start, "to": NOW, "by": "owner"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["start"], body["end"]) == (DAY0 + 2 * DAY, NOW)
        assert body["note"] and "no longer kept" in body["note"]
        assert body["total"]["total_tokens"] == tokens_in(recs, DAY0 + 2 * DAY, NOW)
        r = h.api.get("/usage.csv", params={"from": start, "to": NOW})
        assert (
            r.status_code == 200
            and "usage-by-subscription-2026010300" in (r.headers["content-disposition"])
        )
        assert r.text.splitlines()[-1].startswith("(total),")
        assert f",{tokens_in(recs, DAY0 + 2 * DAY, NOW)}," in r.text.splitlines()[-1]

        few = {"from": DAY0 + 3 * DAY + 10 * HOUR, "to": DAY0 + 3 * DAY + 14 * HOUR}
        r = h.api.get("/usage/series", params={**few, "granularity": "hour"})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "InvalidRequest"
        assert "2026-01-04" in error["message"] and "granularity day" in error["message"]
        r = h.api.get("/usage/series", params={**few, "granularity": "day"})
        assert r.status_code == 200, r.text
        assert r.json()["start"] == DAY0 + 3 * DAY
        assert r.json()["note"] and "no longer kept" in r.json()["note"]
        assert r.json()["series"][0]["total_tokens"] == [24_000]
        r = h.api.get("/usage", params={"from": NOW - DAY, "to": NOW})
        assert r.status_code == 200 and r.json()["note"] is None  # nothing widened

        with httpx.Client(base_url=h.url, timeout=30) as client:
            login = client.post("/dashboard/login", data={"token": ADMIN_TOKEN})
            assert login.status_code == 303, login.text
            page = client.get("/dashboard/", params=few)
            assert page.status_code == 200, page.text
            assert "Tokens per day" in page.text
            covered = re.search(r'<span class="range">([^<]*)</span>', page.text)
            assert covered is not None
            assert covered.group(1) == "2026-01-04 00:00 UTC → 2026-01-05 00:00 UTC"
            page = client.get("/dashboard/usage", params=few)
            assert page.status_code == 200, page.text
            assert "2026-01-04 00:00 UTC → 2026-01-05 00:00 UTC" in page.text
            assert 'id="range-note"' in page.text and "no longer kept" in page.text
