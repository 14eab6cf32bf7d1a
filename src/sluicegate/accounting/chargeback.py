"""Charge-back reports and time series, read from the rollups (never the raw ledger).

A range ``[start, end)`` is widened to whole hours (``periods.whole_hours``); whole UTC days
inside it are read from ``usage_daily`` and the hours at either edge from ``usage_hourly``, so
a month over ten million records reads a few thousand rollup rows.

Cost of a group = its pay-as-you-go cost (priced per record when rolled up) + its share of
each PTU reservation's cost over the range: a reservation's cost for a piece of a month is
split between groups in proportion to the total tokens each sent to the reserved
backend/deployment in that piece (largest-remainder rounding, so the shares add up to the
reservation's cost to the nano). A piece in which nobody used the reservation is reported as
unallocated.

Counting: ``requests`` counts first attempts (so a request retried on another backend counts
once, for the group of its first attempt); ``attempts`` counts every upstream attempt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from sqlalchemy import BigInteger, ColumnElement, Select, case, func, literal, select, union_all
from sqlalchemy.engine import Engine

from sluicegate.accounting.periods import (
    DAY,
    Granularity,
    buckets,
    ceil_day,
    floor_day,
    floor_hour,
    next_month,
    whole_hours,
)
from sluicegate.accounting.pricing import PriceTable, PtuInterval
from sluicegate.storage.schema import usage_daily, usage_hourly

Dimension = Literal["subscription", "owner", "product", "deployment", "backend", "model"]
DIMENSIONS: tuple[str, ...] = get_args(Dimension)
_COLUMN = {
    "subscription": "subscription_id",
    "owner": "owner",
    "product": "product",
    "deployment": "deployment",
    "backend": "backend",
    "model": "model",
}
_SUMMED = (
    "requests",
    "attempts",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "total_tokens",
    "errors",
    "aborted",
    "estimated",
    "cost_nanos",
    "unpriced_records",
    "unpriced_tokens",
)
OTHER = "(other)"
UNALLOCATED = "(unallocated PTU)"
#: The most buckets one series may have (a chart wider than this is unreadable anyway).
MAX_BUCKETS = 2_000


@dataclass(slots=True)
class ChargeRow:
    """Totals of one group over the range. Money in nanos (1e-9 of ``currency``)."""

    key: str | None
    requests: int = 0
    attempts: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    errors: int = 0
    aborted: int = 0
    estimated: int = 0
    paygo_nanos: int = 0
    ptu_nanos: int = 0
    unpriced_records: int = 0
    unpriced_tokens: int = 0

    @property
    def cost_nanos(self) -> int:
        return self.paygo_nanos + self.ptu_nanos

    def add(self, other: ChargeRow) -> None:
        for name in (
            "requests",
            "attempts",
            "prompt_tokens",
            "cached_tokens",
            "completion_tokens",
            "total_tokens",
            "errors",
            "aborted",
            "estimated",
            "paygo_nanos",
            "ptu_nanos",
            "unpriced_records",
            "unpriced_tokens",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(slots=True)
class ChargeReport:
    start: int
    end: int
    by: str
    currency: str
    rows: list[ChargeRow]
    total: ChargeRow
    ptu: list[PtuInterval] = field(default_factory=list)


def _parts(start: int, end: int) -> list[tuple[Any, int, int]]:
    """(table, lo, hi): whole days from the daily table, the edges from the hourly one."""
    d0, d1 = ceil_day(start), floor_day(end)
    if d0 >= d1:
        return [(usage_hourly, start, end)]
    parts: list[tuple[Any, int, int]] = [(usage_daily, d0, d1)]
    if start < d0:
        parts.append((usage_hourly, start, d0))
    if d1 < end:
        parts.append((usage_hourly, d1, end))
    return parts


def _union(
    start: int,
    end: int,
    columns: list[str],
    where: dict[str, str | None] | None = None,
    bucket_of: Any = None,
) -> Any:
    """A subquery: the union of the rollup rows covering ``[start, end)``."""
    selects: list[Select[Any]] = []
    for table, lo, hi in _parts(start, end):
        cols: list[ColumnElement[Any]] = [table.c[name] for name in columns]
        if bucket_of is not None:
            cols.append(bucket_of(table).label("b"))
        q = select(*cols).where(table.c.bucket >= lo, table.c.bucket < hi)
        for name, value in (where or {}).items():
            q = q.where(table.c[name].is_(None) if value is None else table.c[name] == value)
        selects.append(q)
    return union_all(*selects).subquery() if len(selects) > 1 else selects[0].subquery()


def _check_by(by: str) -> str:
    if by not in _COLUMN:
        raise ValueError(f"cannot group by {by!r}; choose one of {', '.join(DIMENSIONS)}")
    return _COLUMN[by]


def charge_report(
    engine: Engine,
    prices: PriceTable,
    *,
    start: float,
    end: float,
    by: str = "subscription",
    subscription_id: str | None = None,
) -> ChargeReport:
    """Totals and cost per value of ``by`` over ``[start, end)`` (widened to whole hours).

    Rows are sorted by cost, then tokens, descending. With ``subscription_id`` only that
    subscription's rows are returned (its PTU share is still computed against everybody's
    tokens). Raises ``ValueError`` for an unknown ``by`` or an empty range.
    """
    column = _check_by(by)
    a, b = whole_hours(start, end)
    where: dict[str, str | None] | None = (
        {"subscription_id": subscription_id} if subscription_id is not None else None
    )
    sub = _union(a, b, [column, *_SUMMED], where)
    query = select(sub.c[column], *(func.sum(sub.c[n]) for n in _SUMMED)).group_by(sub.c[column])
    rows: dict[str | None, ChargeRow] = {}
    with engine.connect() as conn:
        for r in conn.execute(query):
            key, *vals = tuple(r)
            row = ChargeRow(key)
            for name, value in zip(_SUMMED, vals, strict=True):
                setattr(row, "paygo_nanos" if name == "cost_nanos" else name, int(value or 0))
            rows[key] = row
        intervals = prices.ptu_intervals(a, b)
        for interval in intervals:
            shares = _ptu_tokens(conn, interval, column)
            for key, nanos in allocate(interval.cost_nanos, shares).items():
                if subscription_id is not None and key == UNALLOCATED:
                    continue
                if subscription_id is not None and key not in rows:
                    continue
                rows.setdefault(key, ChargeRow(key)).ptu_nanos += nanos
    ordered = sorted(
        rows.values(),
        key=lambda r: (-r.cost_nanos, -r.total_tokens, r.key is None, r.key or ""),
    )
    total = ChargeRow(None)
    for row in ordered:
        total.add(row)
    return ChargeReport(a, b, by, prices.currency, ordered, total, intervals)


def _ptu_tokens(conn: Any, interval: PtuInterval, column: str) -> dict[str | None, int]:
    """Total tokens per group on the reservation's backend/deployment within the interval."""
    lo, hi = floor_hour(interval.start), floor_hour(interval.end - 1) + 3600
    where: dict[str, str | None] = {}
    if interval.entry.backend is not None:
        where["backend"] = interval.entry.backend
    if interval.entry.deployment is not None:
        where["deployment"] = interval.entry.deployment
    sub = _union(lo, hi, [column, "total_tokens"], where)
    query = select(sub.c[column], func.sum(sub.c.total_tokens)).group_by(sub.c[column])
    return {key: int(tokens or 0) for key, tokens in conn.execute(query)}


def allocate(total: int, weights: dict[str | None, int]) -> dict[str | None, int]:
    """Split ``total`` nanos in proportion to ``weights`` so that the parts add up exactly
    (largest remainder; ties by key). No positive weight: everything is unallocated."""
    positive = {k: w for k, w in weights.items() if w > 0}
    weight_sum = sum(positive.values())
    if total == 0:
        return {}
    if weight_sum == 0:
        return {UNALLOCATED: total}
    shares = {k: total * w // weight_sum for k, w in positive.items()}
    rest = total - sum(shares.values())
    by_remainder = sorted(
        positive, key=lambda k: (-(total * positive[k] % weight_sum), k is None, k or "")
    )
    for k in by_remainder[:rest]:
        shares[k] += 1
    return shares


@dataclass(slots=True)
class Series:
    """Values per bucket for the top keys (and ``(other)``)."""

    start: int
    end: int
    granularity: str
    by: str
    buckets: list[int]
    keys: list[str]
    #: key → metric → one value per bucket
    values: dict[str, dict[str, list[int]]]
    currency: str


_SERIES_METRICS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_nanos")


def usage_series(
    engine: Engine,
    prices: PriceTable,
    *,
    start: float,
    end: float,
    granularity: Granularity = "day",
    by: str = "subscription",
    top: int = 8,
    subscription_id: str | None = None,
) -> Series:
    """Tokens and pay-as-you-go cost per bucket for the ``top`` keys by total tokens over the
    range; every other key is summed as ``(other)``, a missing value is ``(none)``."""
    column = _check_by(by)
    a, b = whole_hours(start, end)
    if granularity not in ("hour", "day", "month"):
        raise ValueError("granularity must be hour, day or month")
    starts = buckets(a, b, granularity)
    if len(starts) > MAX_BUCKETS:
        raise ValueError(f"{len(starts)} {granularity}s: choose a coarser granularity")
    where: dict[str, str | None] | None = (
        {"subscription_id": subscription_id} if subscription_id is not None else None
    )
    with engine.connect() as conn:
        totals = _union(a, b, [column, "total_tokens"], where)
        top_keys = [
            k
            for (k,) in conn.execute(
                select(totals.c[column])
                .group_by(totals.c[column])
                .order_by(func.sum(totals.c.total_tokens).desc(), totals.c[column])
                .limit(max(top, 0))
            )
        ]
        named = [k for k in top_keys if k is not None]
        sub = _union(a, b, [column, *_SERIES_METRICS], where, _bucket_fn(granularity, a, b))
        col = sub.c[column]
        key_expr = case(
            (col.is_(None), literal("(none)")),
            *([(col.in_(named), col)] if named else []),
            else_=literal(OTHER),
        )
        query = select(
            sub.c.b, key_expr.label("k"), *(func.sum(sub.c[m]) for m in _SERIES_METRICS)
        ).group_by(sub.c.b, key_expr)
        index = {t: i for i, t in enumerate(starts)}
        values: dict[str, dict[str, list[int]]] = {}
        for r in conn.execute(query):
            bucket, key, *vals = tuple(r)
            i = index.get(int(bucket))
            if i is None:
                continue
            per = values.setdefault(key, {m: [0] * len(starts) for m in _SERIES_METRICS})
            for m, v in zip(_SERIES_METRICS, vals, strict=True):
                per[m][i] += int(v or 0)
    keys = [("(none)" if k is None else k) for k in top_keys]
    keys = [k for k in keys if k in values] + ([OTHER] if OTHER in values else [])
    return Series(a, b, granularity, by, starts, keys, values, prices.currency)


def _bucket_fn(granularity: str, start: int, end: int) -> Any:
    def fn(table: Any) -> ColumnElement[Any]:
        bucket = table.c.bucket
        if granularity == "hour" or (granularity == "day" and table is usage_daily):
            return bucket  # type: ignore[no-any-return]
        if granularity == "day":
            return (bucket // DAY) * DAY  # type: ignore[no-any-return]
        months = buckets(start, end, "month")
        whens = [(bucket < next_month(m), literal(m, BigInteger)) for m in months]
        return case(*whens, else_=literal(months[-1], BigInteger))

    return fn
