"""Month-end forecasts per subscription, and PTU against pay-as-you-go per deployment.

Method (documented in docs/chargeback.md, tested in tests/accounting):

- *Month to date* (MTD) is everything from the first of the month (UTC) to ``now`` (the
  injected clock), read from the rollups like any report.
- With at least ``TREND_MIN_DAYS`` complete days, a least-squares line is fitted to the daily
  totals of the complete days (x = the day's midpoint). Each remaining day (and the rest of
  today) is projected from that line, clamped at zero, so a growing or shrinking subscription
  is projected along its trend. With fewer complete days, the run rate is used:
  ``MTD * month_length / elapsed``.
- Projected pay-as-you-go cost = projected tokens x the MTD pay-as-you-go cost per token.
- PTU reservations are a fixed cost: each one's cost for the whole month (``ptu_intervals``
  over the month, so a reservation starting mid-month counts from its start) is in the
  projected total whatever the traffic. It is split the way the month's charge-back will
  split it if the projections hold: in proportion to each subscription's *projected* tokens
  on the reserved backend/deployment (its MTD tokens there x its projected/MTD ratio), to the
  nano. What no subscription is projected to use (a reservation nobody used so far) is the
  ``(unallocated PTU)`` row (method ``unallocated``): not a subscription, so not counted in
  the number of subscriptions, and listed after them, on the last page.
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
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from sluicegate.accounting.chargeback import (
    UNALLOCATED,
    ChargeReport,
    ChargeRow,
    allocate,
    charge_report,
    ptu_tokens,
)
from sluicegate.accounting.periods import DAY, HOUR, floor_day, floor_hour, month_bounds
from sluicegate.accounting.pricing import NANOS, PriceTable, PtuInterval
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
    engine: Engine, column: str, keys: list[str | None] | None, start: int, end: int
) -> dict[str | None, list[int]]:
    """Total tokens per complete day of ``[start, end)`` for each of ``keys`` (``None``: for
    every key with usage, in one grouped query)."""
    days = (end - start) // DAY
    out: dict[str | None, list[int]] = {k: [0] * days for k in keys or []}
    if days <= 0 or keys == []:
        return out
    d = usage_daily.c
    query = (
        select(d[column], d.bucket, func.sum(d.total_tokens))
        .where(d.bucket >= start, d.bucket < end)
        .group_by(d[column], d.bucket)
    )
    if keys is not None:
        named = [k for k in keys if k is not None]
        if None in keys and named:
            query = query.where(d[column].in_(named) | d[column].is_(None))
        elif named:
            query = query.where(d[column].in_(named))
        else:
            query = query.where(d[column].is_(None))
    with engine.connect() as conn:
        for key, bucket, tokens in conn.execute(query):
            i = (int(bucket) - start) // DAY
            if keys is None:
                out.setdefault(key, [0] * days)
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
    and how many keys have usage this month (see the module docstring for the method).

    Without ``subscription_id``, the last page ends with the ``(unallocated PTU)`` row when
    some reservation cost is not projected onto any key; it is not counted in the number of
    keys, and the total includes it (every reservation's whole month). With
    ``subscription_id`` (only by subscription: ``ValueError`` otherwise), the page and the
    total are that subscription's projection, its PTU share against everybody's."""
    if subscription_id is not None and by != "subscription":
        raise ValueError("a forecast for one subscription is by subscription")
    m0, m1 = month_bounds(now)
    today = floor_day(now)
    column = {"subscription": "subscription_id"}.get(by, by)
    intervals = prices.ptu_intervals(m0, m1)
    report = (
        charge_report(engine, prices, start=m0, end=now, by=by, subscription_id=subscription_id)
        if now > m0
        else ChargeReport(m0, m0, by, prices.currency, [], ChargeRow(None))
    )
    rows = {r.key: r for r in report.rows if r.key != UNALLOCATED}
    with engine.connect() as conn:
        used = {i: _ptu_tokens_so_far(conn, i, column, now) for i in intervals}
    # A projected PTU share depends on the projection of everybody on the reservation.
    ptu_keys = {k for tokens in used.values() for k in tokens}
    wanted = list(rows)
    page = wanted[offset : offset + limit]
    shown = set(wanted if subscription_id is not None else page)
    days = [0] * max((today - m0) // DAY, 0)
    daily = _daily_by_key(engine, column, None if ptu_keys else list(shown), m0, today)
    for k in ptu_keys | shown:
        daily.setdefault(k, list(days))  # no complete day with usage yet
    so_far = {k: r.total_tokens for k, r in rows.items()}
    if ptu_keys - so_far.keys():
        # One subscription's report holds only its row: the others' tokens so far are
        # their complete days and today's hours (what the report would have read).
        hours = _tokens_by_key(engine, column, today, floor_hour(now - 1) + HOUR)
        for k in ptu_keys - so_far.keys():
            so_far[k] = sum(daily[k]) + hours.get(k, 0)
    projected = {k: project_month(daily[k], so_far[k], m0, m1, now) for k in ptu_keys | shown}
    ptu_share: dict[str | None, int] = {}
    for interval in intervals:
        weights = {k: _scale(n, so_far[k], projected[k][0]) for k, n in used[interval].items()}
        for k, nanos in allocate(interval.cost_nanos, weights).items():
            ptu_share[k] = ptu_share.get(k, 0) + nanos
    out = [_projection(rows[k], daily[k], projected[k], ptu_share.get(k, 0)) for k in page]
    if subscription_id is not None:
        if subscription_id not in rows:
            return out, Projection(None, 0, 0, 0, 0, "none", tuple(days)), 0
        own = _projection(
            rows[subscription_id],
            daily[subscription_id],
            projected[subscription_id],
            ptu_share.get(subscription_id, 0),
        )
        return out, own, 1
    # The reservations' cost nobody is projected to use: on the page holding the last key
    # (the first page if there is none), so that it needs no page of its own.
    unallocated = ptu_share.get(UNALLOCATED, 0)
    unallocated_mtd = sum(r.cost_nanos for r in report.rows if r.key == UNALLOCATED)
    last_page = offset < len(wanted) <= offset + limit or (not wanted and offset == 0)
    if (unallocated or unallocated_mtd) and last_page:
        out.append(
            Projection(UNALLOCATED, 0, unallocated_mtd, 0, unallocated, "unallocated", tuple(days))
        )
    totals = _daily_totals(engine, m0, today)
    tokens, method = project_month(totals, report.total.total_tokens, m0, m1, now)
    paygo = _scale(report.total.paygo_nanos, report.total.total_tokens, tokens)
    total = Projection(
        None,
        report.total.total_tokens,
        report.total.cost_nanos,
        tokens,
        paygo + sum(i.cost_nanos for i in intervals),
        method,
        tuple(totals),
    )
    return out, total, len(wanted)


def _tokens_by_key(engine: Engine, column: str, start: int, end: int) -> dict[str | None, int]:
    """Total tokens per key in the hours of ``[start, end)`` (hourly rollups)."""
    h = usage_hourly.c
    query = (
        select(h[column], func.sum(h.total_tokens))
        .where(h.bucket >= start, h.bucket < end)
        .group_by(h[column])
    )
    with engine.connect() as conn:
        return {key: int(tokens or 0) for key, tokens in conn.execute(query)}


def _ptu_tokens_so_far(
    conn: Any, interval: PtuInterval, column: str, now: float
) -> dict[str | None, int]:
    """Tokens per key on the reservation from the interval's start until ``now``."""
    if interval.start >= now:
        return {}
    elapsed = PtuInterval(interval.entry, interval.start, min(interval.end, now), 0)
    return {key[0]: n for key, n in ptu_tokens(conn, elapsed, [column]).items() if n > 0}


def _projection(
    row: ChargeRow, daily: list[int], projected: tuple[int, str], ptu_nanos: int
) -> Projection:
    """A key's projection: pay-as-you-go cost scaled with its tokens, plus its projected
    share of the reservations' month cost."""
    tokens, method = projected
    paygo = _scale(row.paygo_nanos, row.total_tokens, tokens)
    return Projection(
        row.key,
        row.total_tokens,
        row.cost_nanos,
        tokens,
        paygo + ptu_nanos,
        method,
        tuple(daily),
    )


def _daily_totals(engine: Engine, start: int, end: int) -> list[int]:
    days = (end - start) // DAY
    values = [0] * max(days, 0)
    d = usage_daily.c
    query = select(d.bucket, func.sum(d.total_tokens)).where(d.bucket >= start, d.bucket < end)
    with engine.connect() as conn:
        for bucket, tokens in conn.execute(query.group_by(d.bucket)):
            i = (int(bucket) - start) // DAY
            if 0 <= i < days:
                values[i] += int(tokens or 0)
    return values


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
