"""What a budget counts as spent: nothing after now, no PTU share unless ``include_ptu``, no
hour before its period (even after the hourly rollups are purged), unpriced usage flagged
(log, metric, ``config check``), and the per-run bookkeeping that does not grow with work
that does not change between runs."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from sluicegate.accounting.budgets import Budgets
from sluicegate.accounting.periods import HOUR
from sluicegate.accounting.rollups import Rollups
from sluicegate.auth.index import SubscriptionIndex
from sluicegate.auth.keys import KeyHasher
from sluicegate.clock import FakeClock
from sluicegate.config.loader import ConfigError, budget_price_warnings, parse_config
from sluicegate.metrics.registry import GatewayMetrics
from tests.accounting.conftest import write_ledger
from tests.accounting.test_budgets import CONFIG, TUESDAY, rec, sub
from tests.integration.test_cli_output import run_cli, write_config

MAR1 = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
PTU_CONFIG: dict[str, Any] = {
    **CONFIG,
    "products": [{"name": "p", "budget": {"amount": "500", "period": "monthly"}}],
    "ptu": [{"backend": "east", "monthly_cost": 31000, "effective_from": "2026-01-01T00:00:00Z"}],
}


def refreshed(engine: Engine, config: dict[str, Any], clock: FakeClock, subs: Any) -> Budgets:
    budgets = Budgets(parse_config(config), engine, clock, lambda: subs)
    Rollups(engine, budgets.prices, clock).catch_up()
    budgets.refresh()
    return budgets


def test_ptu_cost_is_not_spent_ahead_and_counts_only_when_opted_in(
    engine: Engine, tmp_path: Path
) -> None:
    # 100 tokens on the reserved backend at 00:10 on the 1st; one hour later.
    write_ledger(engine, tmp_path, [rec("A", MAR1 + 600, 100), rec("B", MAR1 + 600, 100)])
    clock = FakeClock(MAR1 + HOUR + 60)
    opted = {"budget": {"amount": "500", "period": "monthly", "include_ptu": True}}
    budgets = refreshed(engine, PTU_CONFIG, clock, [sub("A"), sub("B", overrides=opted)])
    # By default only pay-as-you-go cost counts (none: the backend is reserved).
    assert budgets.statuses["A"].spent_nanos == 0
    # Opted in: B's share (half the tokens) of the reservation from the 1st until now, not
    # of the whole month (31,000 USD).
    so_far = Decimal(31000 * 10**9) * Decimal(HOUR + 60) / Decimal(31 * 86400)
    whole = int(so_far.to_integral_value(ROUND_HALF_EVEN))
    assert budgets.statuses["B"].spent_nanos == whole // 2
    assert budgets.refused == {}


def test_purged_first_day_never_takes_in_the_previous_period(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokyo = {"budget": {"amount": "10", "period": "monthly", "timezone": "Asia/Tokyo"}}
    feb28 = datetime(2026, 2, 28, tzinfo=UTC).timestamp()  # Tokyo's March: 15:00 UTC on
    write_ledger(
        engine,
        tmp_path,
        [
            rec("A", feb28 + 5 * HOUR, 50_000),  # 14:00 in Tokyo, February: 50 USD
            rec("A", feb28 + 20 * HOUR, 1_000),  # Tokyo's March 1st: 1 USD (purged below)
            rec("A", datetime(2026, 3, 19, tzinfo=UTC).timestamp(), 2_000),  # kept: 2 USD
        ],
    )
    clock = FakeClock(datetime(2026, 3, 20, tzinfo=UTC).timestamp())
    budgets = refreshed(engine, CONFIG, clock, [sub("A", overrides=tokyo)])
    assert budgets.statuses["A"].spent_nanos == 3 * 10**9
    Rollups(engine, budgets.prices, clock).purge(raw_days=7, hourly_days=7)
    caplog.set_level(logging.WARNING, logger="sluicegate.budgets")
    budgets.refresh()
    budgets.refresh()
    # Only the hours still kept from the period's start on: never February's 50 USD.
    assert budgets.statuses["A"].spent_nanos == 2 * 10**9
    assert budgets.refused == {}
    warned = [r.getMessage() for r in caplog.records if "hourly rollups" in r.getMessage()]
    assert len(warned) == 1 and "2026-02-28T15:00:00Z" in warned[0]


def test_hourly_retention_shorter_than_a_budget_period_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({**PTU_CONFIG, "retention": {"hourly_rollups_days": 7}})
    assert "retention.hourly_rollups_days (7) must be at least 32" in str(error.value)
    assert "monthly in product 'p'" in str(error.value)
    parse_config({**PTU_CONFIG, "retention": {"hourly_rollups_days": 32}})
    parse_config({**CONFIG, "retention": {"hourly_rollups_days": 2}})  # daily: 1 + 1 day


def test_unpriced_usage_is_logged_once_counted_and_warned_by_config_check(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = {**CONFIG, "prices": []}
    write_ledger(engine, tmp_path, [rec("A", TUESDAY + HOUR, 10_000), rec("B", TUESDAY, 1)])
    clock = FakeClock(TUESDAY + 2 * HOUR)
    metrics = GatewayMetrics()
    budgets = Budgets(
        parse_config(config), engine, clock, lambda: [sub("A"), sub("B")], observer=metrics
    )
    Rollups(engine, budgets.prices, clock).catch_up()
    caplog.set_level(logging.WARNING, logger="sluicegate.budgets")
    budgets.refresh()
    budgets.refresh()
    lines = [r.getMessage() for r in caplog.records if "no price" in r.getMessage()]
    assert sorted(line.split()[3] for line in lines) == ["A:", "B:"]  # once each
    assert "sluicegate_budget_unpriced_records 2.0" in metrics.render().decode()
    assert budgets.statuses["A"].unpriced_records == 1

    warnings = budget_price_warnings(parse_config(config))
    assert len(warnings) == 1 and "products['p'].budget" in warnings[0]
    assert "'gpt-4o'" in warnings[0]
    assert budget_price_warnings(parse_config(CONFIG)) == []


def test_per_run_work_is_reused_and_thresholds_are_logged_once_per_period(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    override = {"budget": {"amount": "10", "period": "daily", "warn_at": [0.5, 0.8]}}
    subs = [sub("A", overrides=override)]
    clock = FakeClock(TUESDAY + 5 * HOUR)
    budgets = Budgets(parse_config(CONFIG), engine, clock, lambda: subs)
    first = budgets.budgeted()[0][1]
    # A refreshed view holds an equal, new override: validated once, not at every run.
    subs = [sub("A", overrides={"budget": dict(override["budget"])})]
    assert budgets.budgeted()[0][1] is first
    subs = [sub("A", overrides={"budget": {**override["budget"], "amount": "20"}})]
    assert budgets.budgeted()[0][1].amount == 20
    subs = [sub("A", overrides=override)]

    caplog.set_level(logging.WARNING, logger="sluicegate.budgets")
    rollups = Rollups(engine, budgets.prices, clock)

    def run(ts: float, tokens: int) -> list[str]:
        caplog.clear()
        write_ledger(engine, tmp_path, [rec("A", ts, tokens)])
        clock.set(ts + 60)
        rollups.catch_up()
        budgets.refresh()
        return [r.getMessage().split(":")[0] for r in caplog.records]

    assert run(TUESDAY + HOUR, 4_000) == []  # 40 %: below the lowest threshold
    assert run(TUESDAY + 2 * HOUR, 2_000) == ["budget of subscription A 50% spent"]
    assert run(TUESDAY + 3 * HOUR, 100) == []  # 61 %: nothing new
    assert run(TUESDAY + 4 * HOUR, 5_000) == [
        "budget of subscription A 80% spent",
        "budget of subscription A spent",
    ]
    assert run(TUESDAY + 5 * HOUR, 100) == []
    # The next day is a new period: its thresholds are logged again.
    assert run(TUESDAY + 86400 + HOUR, 6_000) == ["budget of subscription A 50% spent"]


def test_subscription_index_exposes_its_current_mapping() -> None:
    index = SubscriptionIndex(KeyHasher(b"k" * 32))
    index.replace([sub("A")], 1)
    before = index.by_id()
    assert list(before) == ["A"]
    index.replace([sub("B")], 2)
    assert list(index.by_id()) == ["B"] and list(before) == ["A"]  # replaced, not mutated


def test_config_check_warns_of_a_budgeted_product_without_prices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    budget = {"amount": "5", "period": "daily"}
    path = write_config(
        tmp_path, f"sqlite:///{tmp_path / 'l.db'}", products=[{"name": "p", "budget": budget}]
    )
    code, _, err = run_cli(capsys, "config", "check", str(path))
    assert code == 0 and "budget" not in err
    path = write_config(
        tmp_path,
        f"sqlite:///{tmp_path / 'l.db'}",
        products=[{"name": "p", "budget": budget}],
        prices=[],
    )
    code, _, err = run_cli(capsys, "config", "check", str(path))
    assert code == 0 and "warning: products['p'].budget: deployment(s)" in err
