"""Pure parts of accounting: price resolution, cost arithmetic, allocation, projection."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from sluicegate.accounting.chargeback import UNALLOCATED, allocate
from sluicegate.accounting.forecast import project_month
from sluicegate.accounting.periods import DAY, month_bounds
from sluicegate.accounting.pricing import PriceTable, format_money, nanos_text
from sluicegate.config.loader import parse_config

T0 = datetime(2026, 3, 1, tzinfo=UTC).timestamp()


def table(**extra: object) -> PriceTable:
    data = {
        "backends": [{"name": "east", "url": "http://e"}, {"name": "ptu", "url": "http://p"}],
        "deployments": [
            {"name": "mini", "backend": "east", "model": "gpt-4o-mini"},
            {"name": "big", "backend": "east", "model": "gpt-4o"},
            {"name": "big-ptu", "backend": "ptu", "model": "gpt-4o"},
            {"name": "odd", "backend": "east", "model": "mystery"},
        ],
        "products": [{"name": "p"}],
        "prices": [
            {"model": "gpt-4o", "input": 2.5, "cached_input": 1.25, "output": 10},
            {"deployment": "mini", "input": 0.15, "cached_input": 0.075, "output": 0.6},
            {
                "deployment": "mini",
                "input": 0.1,
                "output": 0.4,
                "effective_from": "2026-03-10T10:30:00Z",
            },
        ],
        "ptu": [{"backend": "ptu", "monthly_cost": 3100}],
        **extra,
    }
    return PriceTable(parse_config(data))


def test_price_in_force_at_the_records_time() -> None:
    t = table()
    change = datetime(2026, 3, 10, 10, 30, tzinfo=UTC).timestamp()
    before = t.resolve("mini", "gpt-4o-mini-2024-07-18", "east", change - 0.001)
    after = t.resolve("mini", "gpt-4o-mini-2024-07-18", "east", change)
    assert before is not None and after is not None
    # 1M uncached + 1M cached input + 1M output tokens
    assert before.cost_nanos(2_000_000, 1_000_000, 1_000_000) == 825_000_000
    assert after.cost_nanos(2_000_000, 1_000_000, 1_000_000) == 600_000_000  # cached = input
    assert t.segments(change - 1800, change + 1800) == [
        (change - 1800, change),
        (change, change + 1800),
    ]


def test_model_price_ptu_and_unpriced() -> None:
    t = table()
    big = t.resolve("big", "gpt-4o-2024-08-06", "east", T0)
    assert big is not None and big.cost_nanos(1000, 0, 100) == 3_500_000
    ptu = t.resolve("big-ptu", "gpt-4o-2024-08-06", "ptu", T0)
    assert ptu is not None and ptu.ptu and ptu.cost_nanos(10**6, 0, 10**6) == 0
    assert t.resolve("odd", "mystery-1", "east", T0) is None
    assert t.unpriced_deployments() == [
        "deployment 'odd' (model mystery) has no price: its records will be flagged as unpriced"
    ]


def test_ptu_cost_accrues_per_calendar_month() -> None:
    t = table()
    start, end = month_bounds(T0)  # March: 31 days
    (whole,) = t.ptu_intervals(start, end)
    assert whole.cost_nanos == 3100 * 10**9
    (one_day,) = t.ptu_intervals(T0, T0 + DAY)
    assert one_day.cost_nanos == 100 * 10**9
    two = t.ptu_intervals(end - DAY, end + DAY)  # last day of March, first of April (30 days)
    assert [i.cost_nanos for i in two] == [100 * 10**9, round(3100 * 10**9 / 30)]


def test_allocation_adds_up_exactly() -> None:
    shares = allocate(10**9, {"a": 1, "b": 1, "c": 1})
    assert sum(shares.values()) == 10**9 and max(shares.values()) - min(shares.values()) == 1
    assert allocate(500, {"a": 0}) == {UNALLOCATED: 500}
    assert allocate(0, {"a": 3}) == {}


def test_money_text_is_exact() -> None:
    assert nanos_text(0) == "0.000000000"
    assert nanos_text(1_234_567_890_123) == "1234.567890123"
    assert nanos_text(-5) == "-0.000000005"
    assert Decimal(nanos_text(7)) == Decimal("7e-9")


def test_projection_run_rate_then_trend() -> None:
    m0, m1 = month_bounds(T0)  # 31 days
    # Half-way through day 2 (1.5 days elapsed), 150 tokens so far: run rate.
    total, method = project_month([100], 150, m0, m1, m0 + 1.5 * DAY)
    assert method == "run-rate" and total == round(150 * 31 / 1.5)
    # Ten complete days growing by 10 a day (10, 20, ..., 100), nothing yet today.
    daily = [10 * (i + 1) for i in range(10)]
    total, method = project_month(daily, sum(daily), m0, m1, m0 + 10 * DAY)
    expected = sum(daily) + sum(10 * (j + 1) for j in range(10, 31))
    assert method == "trend" and total == expected
    # A subscription that started on day 5 is projected from its own start.
    late = [0, 0, 0, 0, 0, 50]
    total, method = project_month(late, 50, m0, m1, m0 + 6 * DAY)
    assert method == "run-rate" and total == round(50 * 26 / 1)


def test_money_that_would_show_as_zero_keeps_two_significant_digits() -> None:
    # Two demo requests cost ~$0.00002: the CLI's table (4 decimals) showed 0.0000.
    assert format_money(20_000, 4) == "0.000020"
    assert format_money(5_000_000) == "0.0050"
    assert format_money(-5_000) == "-0.0000050"
    assert format_money(1) == "0.000000001"  # one nano: at most 9 decimals
    assert format_money(0, 4) == "0.0000"
    assert format_money(123_456, 4) == "0.0001"  # not zero at 4 decimals: as asked
    assert format_money(1_234_567_890_000) == "1,234.57"
