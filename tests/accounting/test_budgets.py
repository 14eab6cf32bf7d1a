"""Budgets computed from the rollups (SQLite and PostgreSQL): what each subscription spent in
its own period (in its time zone) at the prices of the price table, which budget applies
(product, override, lifted), the refused set the request path checks, and a new period."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from sluicegate.accounting.budgets import Budgets, budget_of
from sluicegate.accounting.periods import HOUR
from sluicegate.accounting.records import UsageRecord
from sluicegate.accounting.rollups import Rollups
from sluicegate.auth.subscriptions import Subscription, SubscriptionState
from sluicegate.clock import FakeClock
from sluicegate.config.loader import ConfigError, parse_config
from sluicegate.proxy.errors import GatewayError
from tests.accounting.conftest import chat_record, write_ledger

# 1 USD per 1,000 tokens (input and output alike): 1,000 tokens = 1.00 USD.
CONFIG: dict[str, Any] = {
    "backends": [{"name": "east", "url": "http://e"}],
    "deployments": [{"name": "gpt-4o", "backend": "east", "model": "gpt-4o"}],
    "products": [
        {"name": "p", "budget": {"amount": "5", "period": "daily", "warn_at": [0.5]}},
        {"name": "free"},
    ],
    "prices": [{"model": "gpt-4o", "input": 1000, "output": 1000}],
}
# 2026-03-10 is a Tuesday; Tokyo is UTC+9 (no daylight saving).
TUESDAY = datetime(2026, 3, 10, tzinfo=UTC).timestamp()


def sub(sid: str, product: str = "p", overrides: dict[str, Any] | None = None) -> Subscription:
    return Subscription(
        id=sid,
        name=sid,
        owner="o",
        product=product,
        state=SubscriptionState.ACTIVE,
        primary_key_hash=sid.encode() + b"1",
        secondary_key_hash=sid.encode() + b"2",
        primary_key_prefix="sg-",
        secondary_key_prefix="sg-",
        created_at=0,
        updated_at=0,
        overrides=overrides or {},
    )


def rec(sid: str, ts: float, tokens: int) -> UsageRecord:
    half = tokens // 2
    return chat_record(f"{sid}-{ts}-{tokens}", ts, sid, half, tokens - half, owner="o")


def budgets_over(engine: Engine, clock: FakeClock, subs: list[Subscription]) -> Budgets:
    return Budgets(parse_config(CONFIG), engine, clock, lambda: subs)


def caught_up(engine: Engine, clock: FakeClock) -> None:
    Rollups(engine, Budgets(parse_config(CONFIG), engine, clock, list).prices, clock).catch_up()


def test_spent_is_priced_per_period_and_time_zone(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokyo = {"budget": {"amount": "3", "period": "daily", "timezone": "Asia/Tokyo"}}
    weekly = {"budget": {"amount": "100", "period": "weekly", "action": "warn"}}
    subs = [sub("A"), sub("B"), sub("T", overrides=tokyo), sub("W", overrides=weekly)]
    subs += [sub("L", overrides={"budget": None}), sub("F", product="free")]
    write_ledger(
        engine,
        tmp_path,
        [
            rec("A", TUESDAY - 60, 9_000),  # yesterday (UTC): not in today's budget
            rec("A", TUESDAY + 1 * HOUR, 2_000),
            rec("A", TUESDAY + 2 * HOUR + 30, 3_500),  # 5.50 today: over 5
            rec("B", TUESDAY + 3 * HOUR, 4_999),  # 4.999: under
            # Tokyo's day began at 15:00 UTC the day before: both count, not the one before.
            rec("T", TUESDAY - 10 * HOUR, 7_000),
            rec("T", TUESDAY - 8 * HOUR, 1_000),
            rec("T", TUESDAY + 1 * HOUR, 2_500),
            rec("W", TUESDAY - 1 * 86400, 50_000),  # Monday: same ISO week
            rec("W", TUESDAY - 2 * 86400, 70_000),  # Sunday: the week before
            rec("L", TUESDAY + HOUR, 99_000),
            rec("F", TUESDAY + HOUR, 99_000),
        ],
    )
    clock = FakeClock(TUESDAY + 5 * HOUR)
    caught_up(engine, clock)
    budgets = budgets_over(engine, clock, subs)
    caplog.set_level(logging.WARNING, logger="sluicegate.budgets")
    budgets.refresh()
    spent = {k: s.spent_nanos for k, s in budgets.statuses.items()}
    assert spent == {
        "A": 5_500_000_000,
        "B": 4_999_000_000,
        "T": 3_500_000_000,
        "W": 50_000_000_000,
    }
    assert set(budgets.refused) == {"A", "T"}
    assert budgets.statuses["T"].period_start == TUESDAY - 9 * HOUR
    assert budgets.statuses["W"].period_start == TUESDAY - 86400
    with pytest.raises(GatewayError) as refused:
        budgets.check("A", clock.now())
    assert refused.value.status == 403 and refused.value.code == "BudgetExceeded"
    headers = dict(refused.value.headers)
    assert headers["retry-after"] == str(19 * 3600) and headers["x-should-retry"] == "false"
    assert "renews at 2026-03-11T00:00:00+00:00" in refused.value.message
    budgets.check("B", clock.now())  # under: no refusal
    budgets.check("W", clock.now())  # warn: no refusal
    lines = [r.getMessage() for r in caplog.records]
    assert sum("subscription A " in line for line in lines) == 2  # 50 %, then all of it
    assert sum("subscription B " in line for line in lines) == 1  # 50 % only

    # Wednesday: A's day renewed (served before any refresh); T's Tokyo day renewed at
    # 15:00 UTC on Tuesday already.
    clock.set(TUESDAY + 86400 + 60)
    budgets.check("A", clock.now())
    budgets.check("T", clock.now())
    caught_up(engine, clock)
    budgets.refresh()
    assert budgets.refused == {}
    assert budgets.statuses["A"].spent_nanos == 0


def test_which_budget_applies() -> None:
    config = parse_config(CONFIG)
    products = {p.name: p for p in config.products}
    found = budget_of(sub("A"), products)
    assert found is not None and found[1] == "product" and found[0].amount == 5
    own = budget_of(sub("A", overrides={"budget": {"amount": "7.25"}}), products)
    assert own is not None and own[1] == "subscription" and str(own[0].amount) == "7.25"
    assert own[0].period == "monthly" and own[0].action == "refuse"
    assert budget_of(sub("A", overrides={"budget": None}), products) is None
    assert budget_of(sub("F", product="free"), products) is None
    assert budget_of(sub("X", product="gone"), products) is None


@pytest.mark.parametrize(
    ("budget", "field"),
    [
        ({"amount": 0}, "amount"),
        ({"amount": "1.0000001"}, "amount"),
        ({"amount": 1, "period": "yearly"}, "period"),
        ({"amount": 1, "timezone": "Nowhere/City"}, "timezone"),
        ({"amount": 1, "warn_at": [-0.1]}, "warn_at"),
        ({"amount": 1, "action": "suspend"}, "action"),
        ({"amount": 1, "typo": 1}, "typo"),
    ],
)
def test_invalid_product_budgets_are_configuration_errors(
    budget: dict[str, Any], field: str
) -> None:
    data = {**CONFIG, "products": [{"name": "p", "budget": budget}]}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert field in str(err.value)


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_overrides_of_subscriptions_gone_leave_the_cache(engine: Engine) -> None:
    # The parsed overrides are kept between runs; a subscription no longer seen (deleted,
    # cancelled, its override removed) must not stay in memory for the process's life.
    clock = FakeClock(TUESDAY)
    subs = [sub(f"S{i}", overrides={"budget": {"amount": "7"}}) for i in range(3)]
    budgets = budgets_over(engine, clock, subs)
    assert len(budgets.budgeted()) == 3
    first = budgets.budgeted()[0][1]
    del subs[1:]
    (only,) = budgets.budgeted()
    assert only[1] is first  # still reused while it is seen
    assert set(budgets._overrides) == {"S0"}
