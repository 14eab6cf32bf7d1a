"""Month-end forecasts with PTU reservations: a reservation is a fixed monthly cost (projected
whole, used or not), pay-as-you-go cost follows the projected tokens, a subscription's
projected PTU share follows its projected tokens on the reservation, and the unallocated
part is a marked row, not a subscription."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import Engine

from sluicegate.accounting.chargeback import UNALLOCATED
from sluicegate.accounting.forecast import forecast
from sluicegate.accounting.periods import DAY
from sluicegate.accounting.pricing import NANOS, PriceTable
from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.accounting.rollups import Rollups
from sluicegate.clock import FakeClock
from sluicegate.config.loader import parse_config
from tests.accounting.conftest import write_ledger

JANUARY = datetime(2026, 1, 1, tzinfo=UTC).timestamp()  # 31 days
FEBRUARY = datetime(2026, 2, 1, tzinfo=UTC).timestamp()  # 28 days
CONFIG = {
    "backends": [{"name": "ptu", "url": "http://p"}, {"name": "paygo", "url": "http://g"}],
    "deployments": [
        {"name": "big", "backend": "ptu", "model": "gpt-4o"},
        {"name": "mini", "backend": "paygo", "model": "gpt-4o-mini"},
    ],
    "products": [{"name": "p"}],
    "prices": [{"model": "gpt-4o-mini", "input": 0.15, "output": 0.6}],
    "ptu": [{"backend": "ptu", "monthly_cost": 31000}],
}
PTU_MONTH = 31000 * NANOS


def record(n: int, sub: str, deployment: str, tokens: int, ts: float) -> UsageRecord:
    return UsageRecord(
        request_id=f"r{n}",
        ts=ts,
        subscription_id=sub,
        owner=sub,
        product="p",
        deployment=deployment,
        backend="ptu" if deployment == "big" else "paygo",
        operation="chat/completions",
        status=200,
        outcome=Outcome.OK,
        model="gpt-4o" if deployment == "big" else "gpt-4o-mini",
        prompt_tokens=tokens,
        total_tokens=tokens,
    )


def load(engine: Engine, tmp: Path, recs: list[UsageRecord], now: float) -> PriceTable:
    write_ledger(engine, tmp, recs)
    prices = PriceTable(parse_config(CONFIG))
    Rollups(engine, prices, FakeClock(now)).catch_up()
    return prices


def test_an_unused_reservation_is_projected_whole_and_is_no_subscription(
    engine: Engine, tmp_path: Path
) -> None:
    """The reviewer's case: $31,000 a month of PTU nobody used, A on pay-as-you-go with
    1 M tokens a day for ten days, as of 11 January 12:00."""
    now = JANUARY + 10 * DAY + 12 * 3600
    recs = [record(d, "A", "mini", 1_000_000, JANUARY + d * DAY + 100) for d in range(10)]
    prices = load(engine, tmp_path, recs, now)
    items, total, count = forecast(engine, prices, now)
    assert count == 1  # subscriptions with usage: A
    by_key = {p.key: p for p in items}
    assert list(by_key) == ["A", UNALLOCATED]  # the unallocated row last
    a = by_key["A"]
    # A flat trend: 10 M so far, 1 M a day for the rest of today (half) and 20 more days.
    assert (a.mtd_tokens, a.projected_tokens, a.method) == (10_000_000, 30_500_000, "trend")
    assert a.mtd_cost_nanos == 1_500_000_000
    assert a.projected_cost_nanos == 4_575_000_000  # 30.5 M x $0.15 per million
    unallocated = by_key[UNALLOCATED]
    assert unallocated.method == "unallocated"
    assert unallocated.mtd_cost_nanos == 10_500 * NANOS  # 10.5 of 31 days
    assert unallocated.projected_cost_nanos == PTU_MONTH
    assert total.mtd_cost_nanos == 10_500 * NANOS + 1_500_000_000
    assert total.projected_cost_nanos == PTU_MONTH + 4_575_000_000


def test_a_month_without_tokens_projects_the_whole_reservation(
    engine: Engine, tmp_path: Path
) -> None:
    """Nothing this month yet (January's traffic does not count): the projection is the
    reservation's month, not zero."""
    now = FEBRUARY + 2 * DAY
    prices = load(engine, tmp_path, [record(0, "A", "mini", 1000, JANUARY + DAY)], now)
    items, total, count = forecast(engine, prices, now)
    assert count == 0
    assert [(p.key, p.method, p.projected_cost_nanos) for p in items] == [
        (UNALLOCATED, "unallocated", PTU_MONTH)
    ]
    assert (total.mtd_tokens, total.projected_tokens) == (0, 0)
    assert total.projected_cost_nanos == PTU_MONTH
    # At the first second of the month too (an empty month to date).
    _, total, count = forecast(engine, prices, FEBRUARY)
    assert (total.projected_cost_nanos, count) == (PTU_MONTH, 0)


def test_projected_ptu_shares_follow_projected_tokens(engine: Engine, tmp_path: Path) -> None:
    """A used the reservation on 1 January, B (as much) from 2 January: as of 2 January
    12:00 both are projected at their run rate from their own first day, so B, with half a
    day behind it, is projected to send about three times A's tokens, and its share of the
    month's $31,000 follows (not the 50/50 of the tokens so far). Shares add up to the
    month's cost to the nano, and to the total, which has no unallocated part."""
    now = JANUARY + DAY + 12 * 3600
    recs = [
        record(0, "A", "big", 1000, JANUARY + 3600),
        record(1, "B", "big", 1000, JANUARY + DAY + 3600),
    ]
    prices = load(engine, tmp_path, recs, now)
    items, total, count = forecast(engine, prices, now)
    by_key = {p.key: p for p in items}
    assert count == 2 and set(by_key) == {"A", "B"}
    # Run rate: MTD x (month end - first active day) / elapsed.
    projected_a = round(1000 * 31 / 1.5)
    projected_b = round(1000 * 30 / 0.5)
    assert (by_key["A"].projected_tokens, by_key["B"].projected_tokens) == (
        projected_a,
        projected_b,
    )
    share_a = PTU_MONTH * projected_a / (projected_a + projected_b)
    assert abs(by_key["A"].projected_cost_nanos - share_a) < 1
    assert by_key["A"].projected_cost_nanos + by_key["B"].projected_cost_nanos == PTU_MONTH
    assert total.projected_cost_nanos == PTU_MONTH
    # One subscription's forecast: the same projection, its share against everybody's.
    mine, own, n = forecast(engine, prices, now, subscription_id="B")
    assert mine == [by_key["B"]] and own == by_key["B"] and n == 1
