"""Month-end forecasts per subscription, and PTU against pay-as-you-go per deployment.

Method (documented in docs/chargeback.md, tested in tests/accounting):

- *Month to date* (MTD) is everything from the first of the month (UTC) to ``now`` (the
  injected clock), read from the rollups like any report.
- With at least ``TREND_MIN_DAYS`` complete days, a least-squares line is fitted to the daily
  totals of the complete days (x = the day's midpoint). Each remaining day (and the rest of
  today) is projected from that line, clamped at zero, so a growing or shrinking subscription
  is projected along its trend. With fewer complete days, the run rate is used:
  ``MTD * month_length / elapsed``.
- Projected cost = projected tokens x the MTD cost per token (pay-as-you-go plus PTU share).
- Break-even (per deployment): the pay-as-you-go cost of the projected month (at the current
  price, with the MTD mix of input/cached/output tokens) against the PTU cost: the actual
  reservation if the deployment is on one, else a quote (``ptu_quotes``) sized for the busiest
  hour so far (input-equivalent tokens per minute, output tokens weighted). The break-even
  volume is the monthly token count at which both cost the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from sluicegate.accounting.chargeback import ChargeRow, charge_report
from sluicegate.accounting.periods import DAY, HOUR, floor_day, floor_hour, month_bounds
from sluicegate.accounting.pricing import NANOS, PriceTable
from sluicegate.config.model import GatewayConfig
from sluicegate.storage.schema import usage_daily, usage_hourly

TREND_MIN_DAYS = 3


def project_month(
    daily: list[int], mtd: int, month_start: float, month_end: float, now: float
) -> tuple[int, str]:
    """Projected month-end total from the complete days' totals ``daily`` (oldest first) and
    the month-to-date total ``mtd`` (complete days + today so far). Returns (total, method).

    Days before the first day with usage do not count (a subscription created mid-month is
    projected from its own start, not from the first of the month)."""
    if now <= month_start or mtd <= 0:
        return max(mtd, 0), "none"
    days_in_month = round((month_end - month_start) / DAY)
    k = min(len(daily), int((now - month_start) // DAY))
    first = next((i for i in range(k) if daily[i] > 0), k)
    active_start = month_start + first * DAY
    elapsed = now - active_start
    if k - first < TREND_MIN_DAYS:
        return round(mtd * (month_end - active_start) / elapsed), "run-rate"
    xs = [i + 0.5 for i in range(first, k)]
    ys = daily[first:k]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = mean_y - slope * mean_x

    def rate(day: int) -> float:
        return max(0.0, intercept + slope * (day + 0.5))

    frac_today = (now - month_start - k * DAY) / DAY
    remaining = rate(k) * (1 - frac_today) + sum(rate(j) for j in range(k + 1, days_in_month))
    return mtd + round(remaining), "trend"


@dataclass(frozen=True, slots=True)
class Projection:
    key: str | None
    mtd_tokens: int
    mtd_cost_nanos: int
    projected_tokens: int
    projected_cost_nanos: int
    method: str
    daily: tuple[int, ...]


def _scale(cost: int, tokens: int, projected: int) -> int:
    return 0 if tokens <= 0 else cost * projected // tokens


def _daily_by_key(
    engine: Engine, column: str, keys: list[str | None], start: int, end: int
) -> dict[str | None, list[int]]:
    days = (end - start) // DAY
    out: dict[str | None, list[int]] = {k: [0] * days for k in keys}
    if days <= 0 or not keys:
        return out
    d = usage_daily.c
    named = [k for k in keys if k is not None]
    query = (
        select(d[column], d.bucket, func.sum(d.total_tokens))
        .where(d.bucket >= start, d.bucket < end)
        .group_by(d[column], d.bucket)
    )
    if None in keys and named:
        query = query.where(d[column].in_(named) | d[column].is_(None))
    elif named:
        query = query.where(d[column].in_(named))
    else:
        query = query.where(d[column].is_(None))
    with engine.connect() as conn:
        for key, bucket, tokens in conn.execute(query):
            i = (int(bucket) - start) // DAY
            if key in out and 0 <= i < days:
                out[key][i] += int(tokens or 0)
    return out


def forecast(
    engine: Engine,
    prices: PriceTable,
    now: float,
    *,
    by: str = "subscription",
    offset: int = 0,
    limit: int = 50,
    subscription_id: str | None = None,
) -> tuple[list[Projection], Projection, int]:
    """Projections for one page of keys (ordered by MTD cost), the projection of the total,
    and how many keys have usage this month."""
    m0, m1 = month_bounds(now)
    report = charge_report(
        engine, prices, start=m0, end=now, by=by, subscription_id=subscription_id
    )
    column = {"subscription": "subscription_id"}.get(by, by)
    page = report.rows[offset : offset + limit]
    today = floor_day(now)
    daily = _daily_by_key(engine, column, [r.key for r in page], m0, today)
    totals = _daily_totals(engine, m0, today, subscription_id)
    out = [_project(r, daily.get(r.key, []), m0, m1, now) for r in page]
    total = _project(report.total, totals, m0, m1, now)
    return out, total, len(report.rows)


def _daily_totals(engine: Engine, start: int, end: int, subscription_id: str | None) -> list[int]:
    days = (end - start) // DAY
    values = [0] * max(days, 0)
    d = usage_daily.c
    query = select(d.bucket, func.sum(d.total_tokens)).where(d.bucket >= start, d.bucket < end)
    if subscription_id is not None:
        query = query.where(d.subscription_id == subscription_id)
    with engine.connect() as conn:
        for bucket, tokens in conn.execute(query.group_by(d.bucket)):
            i = (int(bucket) - start) // DAY
            if 0 <= i < days:
                values[i] += int(tokens or 0)
    return values


def _project(row: ChargeRow, daily: list[int], m0: int, m1: int, now: float) -> Projection:
    projected, method = project_month(daily, row.total_tokens, m0, m1, now)
    return Projection(
        row.key,
        row.total_tokens,
        row.cost_nanos,
        projected,
        _scale(row.cost_nanos, row.total_tokens, projected),
        method,
        tuple(daily),
    )


@dataclass(frozen=True, slots=True)
class BreakEven:
    deployment: str
    backend: str
    on_ptu: bool
    mtd_prompt_tokens: int
    mtd_completion_tokens: int
    projected_tokens: int
    peak_tokens_per_minute: int
    paygo_monthly_nanos: int | None
    ptu_monthly_nanos: int | None
    ptu_units: int | None
    break_even_tokens: int | None
    cheaper: str | None  # "ptu" | "paygo" | None (cannot tell)
    note: str


def break_even(
    engine: Engine, prices: PriceTable, config: GatewayConfig, now: float
) -> list[BreakEven]:
    """PTU against pay-as-you-go for every configured deployment (see the module docstring)."""
    m0, m1 = month_bounds(now)
    report = {
        r.key: r for r in charge_report(engine, prices, start=m0, end=now, by="deployment").rows
    }
    today = floor_day(now)
    names = [d.name for d in config.deployments]
    daily = _daily_by_key(engine, "deployment", list(names), m0, today)
    peaks = _peak_hours(engine, m0, floor_hour(now) + HOUR)
    out: list[BreakEven] = []
    for dep in config.deployments:
        row = report.get(dep.name, ChargeRow(dep.name))
        projected, _ = project_month(daily.get(dep.name, []), row.total_tokens, m0, m1, now)
        ratio = projected / row.total_tokens if row.total_tokens else 0.0
        rate = prices.paygo_rate(dep.name, dep.model, now)
        paygo = None
        if rate is not None:
            paygo = rate.cost_nanos(
                round(row.prompt_tokens * ratio),
                round(row.cached_tokens * ratio),
                round(row.completion_tokens * ratio),
            )
        entry = prices.ptu_entry(dep.backend, dep.name, now)
        quote = prices.quote_for(dep.name)
        peak_prompt, peak_completion = peaks.get(dep.name, (0, 0))
        weight = quote.output_token_weight if quote is not None else Decimal(1)
        peak_tpm = math.ceil((peak_prompt + peak_completion * weight) / 60)
        units: int | None = None
        ptu_cost: int | None = None
        note = ""
        if entry is not None:
            ptu_cost = int(entry.monthly_cost * NANOS)
            units = entry.units
            note = "on a PTU reservation"
        elif quote is not None:
            raw_units = math.ceil(peak_tpm / quote.tokens_per_minute_per_unit)
            steps = math.ceil(max(raw_units - quote.min_units, 0) / quote.unit_increment)
            units = quote.min_units + steps * quote.unit_increment
            ptu_cost = int(units * quote.unit_monthly_cost * NANOS)
            note = f"quote: {units} units sized for the busiest hour ({peak_tpm:,} tokens/min)"
        else:
            note = "no PTU reservation or quote configured"
        if rate is None:
            note += "; no pay-as-you-go price"
        be_tokens = cheaper = None
        if paygo is not None and ptu_cost is not None:
            if projected > 0 and paygo > 0:
                be_tokens = ptu_cost * projected // paygo
            cheaper = "ptu" if ptu_cost < paygo else "paygo"
        out.append(
            BreakEven(
                dep.name,
                dep.backend,
                entry is not None,
                row.prompt_tokens,
                row.completion_tokens,
                projected,
                peak_tpm,
                paygo,
                ptu_cost,
                units,
                be_tokens,
                cheaper,
                note,
            )
        )
    return out


def _peak_hours(engine: Engine, start: int, end: int) -> dict[str, tuple[int, int]]:
    """The busiest hour's (prompt, completion) tokens per deployment."""
    h = usage_hourly.c
    inner = (
        select(
            h.deployment,
            h.bucket,
            func.sum(h.prompt_tokens).label("p"),
            func.sum(h.completion_tokens).label("c"),
        )
        .where(h.bucket >= start, h.bucket < end)
        .group_by(h.deployment, h.bucket)
        .subquery()
    )
    best: dict[str, tuple[int, int]] = {}
    with engine.connect() as conn:
        for dep, _bucket, p, c in conn.execute(select(inner)):
            if dep is None:
                continue
            p, c = int(p or 0), int(c or 0)
            if p + c > sum(best.get(dep, (0, 0))):
                best[dep] = (p, c)
    return best
