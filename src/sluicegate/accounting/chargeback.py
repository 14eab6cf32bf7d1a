"""Charge-back reports and time series, read from the rollups (never the raw ledger).

A range ``[start, end)`` is widened to whole hours (``periods.whole_hours``); whole UTC days
inside it are read from ``usage_daily`` and the hours at either edge from ``usage_hourly``, so
a month over ten million records reads a few thousand rollup rows. Where an edge falls in a
day whose hourly rollups are gone (``retention.hourly_rollups_days``), that edge is widened to
the whole day, read from ``usage_daily``: a report never counts purged hours as zero, and
its ``start``/``end`` (and ``note``) say what it covers (``covered_range``). A time series by
hour reads hours only, and refuses a range with such days (``ValueError``).

Cost of a group = its pay-as-you-go cost (priced per record when rolled up) + its share of
each PTU reservation's cost over the range: a reservation's cost for a piece of a month is
split between groups in proportion to the total tokens each sent to the reserved
backend/deployment in that piece (largest-remainder rounding, so the shares add up to the
reservation's cost to the nano). A piece in which nobody used the reservation is reported as
unallocated. A report for one subscription grouped by anything else first takes that
subscription's share, as in the report by subscription (against everybody's tokens), then
splits it between its groups by their tokens: its rows add up to its line in the report by
subscription, to the nano.

Counting: ``requests`` counts first attempts (so a request retried on another backend counts
once, for the group of its first attempt); ``attempts`` counts every upstream attempt.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    and_,
    case,
    func,
    literal,
    or_,
    select,
    union_all,
)
from sqlalchemy.engine import Engine

from sluicegate.accounting.periods import (
    DAY,
    Granularity,
    buckets,
    ceil_day,
    floor_day,
    floor_hour,
    iso,
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

_K = TypeVar("_K", bound=Hashable)


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
    """``start``/``end``: the range actually covered (whole hours; an edge in a day whose
    hourly rollups are purged, the whole day). ``note``: why it is wider than whole hours of
    the range asked for, or empty."""

    start: int
    end: int
    by: str
    currency: str
    rows: list[ChargeRow]
    total: ChargeRow
    ptu: list[PtuInterval] = field(default_factory=list)
    note: str = ""


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


def _purged_days(conn: Any, days: Iterable[int]) -> set[int]:
    """The days (UTC midnights) among ``days`` whose hourly rollups no longer hold the whole
    day: its daily rollup counts more attempts than its hours.

    Why compare, rather than look for any hourly row: ``Rollups.purge`` deletes the hourly
    rollups of whole days (``retention.hourly_rollups_days``) and records no horizon for
    them, and a record replayed late for such a day adds an hourly row (and the same to the
    day), so a purged day may hold a few hourly rows. Where a day's hours are kept, every
    change to them changes the day in the same transaction, so the two agree; every record
    counts one attempt, so a missing hour shows. One statement: one snapshot of both tables.
    """
    spans: list[list[int]] = []  # runs of consecutive days, [first, end)
    for day in sorted(set(days)):
        if spans and spans[-1][1] == day:
            spans[-1][1] = day + DAY
        else:
            spans.append([day, day + DAY])
    if not spans:
        return set()
    h, d = usage_hourly.c, usage_daily.c
    hours = select(((h.bucket // DAY) * DAY).label("day"), (-h.attempts).label("n")).where(
        or_(*(and_(h.bucket >= lo, h.bucket < hi) for lo, hi in spans))
    )
    daily = select(d.bucket.label("day"), d.attempts.label("n")).where(
        or_(*(and_(d.bucket >= lo, d.bucket < hi) for lo, hi in spans))
    )
    both = union_all(hours, daily).subquery()
    query = select(both.c.day).group_by(both.c.day).having(func.sum(both.c.n) != 0)
    return {int(day) for (day,) in conn.execute(query)}


def covered_range(conn: Any, start: int, end: int) -> tuple[int, int]:
    """The range a report over ``[start, end)`` (whole hours) can cover: an edge in a day
    whose hourly rollups are purged moves out to that day's midnight, so the day is read
    whole from ``usage_daily`` instead of as zero (``_purged_days``)."""
    days = {
        day
        for table, lo, hi in _parts(start, end)
        if table is usage_hourly
        for day in (floor_day(lo), floor_day(hi - 1))
    }
    purged = _purged_days(conn, days)
    if floor_day(start) in purged:
        start = floor_day(start)
    if floor_day(end - 1) in purged:
        end = ceil_day(end)
    return start, end


def _widened_note(asked: tuple[int, int], covered: tuple[int, int]) -> str:
    """Why ``covered`` (from ``covered_range``) is wider than ``asked``; empty if it is not."""
    days = []
    if covered[0] < asked[0]:
        days.append(iso(covered[0])[:10])
    if covered[1] > asked[1]:
        days.append(iso(covered[1] - DAY)[:10])
    if not days:
        return ""
    return (
        f"the hourly rollups of {' and '.join(dict.fromkeys(days))} are no longer kept "
        "(retention.hourly_rollups_days), so whole days are counted: the range covered is "
        f"{iso(covered[0])} to {iso(covered[1])}"
    )


def _missing_note(asked: tuple[int, int], covered: tuple[int, int]) -> str:
    """Why a range read as asked (``widen=False``) misses hours; empty if it does not."""
    if covered == asked:
        return ""
    return (
        f"{_widened_note(asked, covered).split(', so ')[0]}: only the hours still kept "
        f"within {iso(asked[0])} to {iso(asked[1])} are counted"
    )


def _union(
    start: int,
    end: int,
    columns: list[str],
    where: dict[str, str | None] | None = None,
    bucket_of: Any = None,
    *,
    hourly: bool = False,
) -> Any:
    """A subquery: the union of the rollup rows covering ``[start, end)`` (``hourly``: from
    ``usage_hourly`` only)."""
    selects: list[Select[Any]] = []
    for table, lo, hi in [(usage_hourly, start, end)] if hourly else _parts(start, end):
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
    ptu: bool = True,
    ptu_until: float | None = None,
    widen: bool = True,
) -> ChargeReport:
    """Totals and cost per value of ``by`` over ``[start, end)`` (widened to whole hours, and
    an edge in a day whose hourly rollups are purged to the whole day: the report's
    ``start``/``end`` are the range covered, its ``note`` says why when it is wider).

    Rows are sorted by cost, then tokens, descending. With ``subscription_id`` only that
    subscription's rows are returned; its PTU share is its share against everybody's tokens
    (as in the report by subscription), split between its rows by their tokens on the
    reservation. Raises ``ValueError`` for an unknown ``by`` or an empty range.

    For the budgets (the reports leave these at their defaults): ``ptu=False`` leaves PTU
    shares out; ``ptu_until`` charges no reservation cost after it; ``widen=False`` never
    widens an edge: only the hours still kept within the range are read, and the ``note``
    says so when hours are missing.
    """
    column = _check_by(by)
    asked = whole_hours(start, end)
    where: dict[str, str | None] | None = (
        {"subscription_id": subscription_id} if subscription_id is not None else None
    )
    rows: dict[str | None, ChargeRow] = {}
    with engine.connect() as conn:
        covered = covered_range(conn, *asked)
        a, b = covered if widen else asked
        sub = _union(a, b, [column, *_SUMMED], where)
        query = select(sub.c[column], *(func.sum(sub.c[n]) for n in _SUMMED)).group_by(
            sub.c[column]
        )
        for r in conn.execute(query):
            key, *vals = tuple(r)
            row = ChargeRow(key)
            for name, value in zip(_SUMMED, vals, strict=True):
                setattr(row, "paygo_nanos" if name == "cost_nanos" else name, int(value or 0))
            rows[key] = row
        intervals = (
            prices.ptu_intervals(a, b if ptu_until is None else min(b, ptu_until)) if ptu else []
        )
        for interval in intervals:
            for key, nanos in _ptu_shares(conn, interval, column, subscription_id).items():
                rows.setdefault(key, ChargeRow(key)).ptu_nanos += nanos
    ordered = sorted(
        rows.values(),
        key=lambda r: (-r.cost_nanos, -r.total_tokens, r.key is None, r.key or ""),
    )
    total = ChargeRow(None)
    for row in ordered:
        total.add(row)
    note = _widened_note(asked, (a, b)) if widen else _missing_note(asked, covered)
    return ChargeReport(a, b, by, prices.currency, ordered, total, intervals, note)


def _ptu_shares(
    conn: Any, interval: PtuInterval, column: str, subscription_id: str | None
) -> dict[str | None, int]:
    """The reservation's cost over ``interval`` per value of ``column`` (with
    ``subscription_id``: of that subscription's rows only, no ``UNALLOCATED``).

    For one subscription grouped by another column, allocating over that column's values
    across everybody would give the subscription the whole share of every group it is in
    (everybody's model ``gpt-4o``); so its own share is allocated first, against every
    subscription, exactly as in the report by subscription, and then split between its
    groups by their tokens (both largest remainder: exact to the nano, and its rows add up
    to its line in the report by subscription)."""
    if subscription_id is None or column == "subscription_id":
        tokens = ptu_tokens(conn, interval, [column])
        shares = allocate(interval.cost_nanos, {key[0]: n for key, n in tokens.items()})
        if subscription_id is None:
            return shares
        return {k: v for k, v in shares.items() if k == subscription_id}
    pairs = ptu_tokens(conn, interval, ["subscription_id", column])
    per_subscription: dict[str | None, int] = {}
    for (sub, _), n in pairs.items():
        per_subscription[sub] = per_subscription.get(sub, 0) + n
    own = allocate(interval.cost_nanos, per_subscription).get(subscription_id, 0)
    mine = {key: n for (sub, key), n in pairs.items() if sub == subscription_id}
    # ``own`` is positive only if this subscription has tokens here: never unallocated.
    return allocate(own, mine)


def ptu_tokens(
    conn: Any, interval: PtuInterval, columns: list[str]
) -> dict[tuple[str | None, ...], int]:
    """Total tokens per group of ``columns`` on the reservation's backend/deployment within
    the interval (whole hours; an edge in a day whose hourly rollups are purged: the day's
    tokens, from its daily rollup)."""
    lo, hi = floor_hour(interval.start), floor_hour(interval.end - 1) + 3600
    lo, hi = covered_range(conn, lo, hi)
    where: dict[str, str | None] = {}
    if interval.entry.backend is not None:
        where["backend"] = interval.entry.backend
    if interval.entry.deployment is not None:
        where["deployment"] = interval.entry.deployment
    sub = _union(lo, hi, [*columns, "total_tokens"], where)
    groups = [sub.c[c] for c in columns]
    query = select(*groups, func.sum(sub.c.total_tokens)).group_by(*groups)
    return {tuple(r[:-1]): int(r[-1] or 0) for r in conn.execute(query)}


def allocate(total: int, weights: Mapping[_K, int]) -> dict[_K | str, int]:
    """Split ``total`` nanos in proportion to ``weights`` so that the parts add up exactly
    (largest remainder; ties by key). No positive weight: everything is ``UNALLOCATED``."""
    positive = {k: w for k, w in weights.items() if w > 0}
    weight_sum = sum(positive.values())
    if total == 0:
        return {}
    if weight_sum == 0:
        return {UNALLOCATED: total}
    shares: dict[_K | str, int] = {k: total * w // weight_sum for k, w in positive.items()}
    rest = total - sum(shares.values())
    by_remainder = sorted(
        positive, key=lambda k: (-(total * positive[k] % weight_sum), _tie_order(k))
    )
    for k in by_remainder[:rest]:
        shares[k] += 1
    return shares


def _tie_order(key: object) -> tuple[tuple[bool, Any], ...]:
    """Ties are broken by key, ``None`` last (each part of a tuple key in turn)."""
    parts = key if isinstance(key, tuple) else (key,)
    return tuple((p is None, p or "") for p in parts)


@dataclass(slots=True)
class Series:
    """Values per bucket for the top keys (and ``(other)``). ``start``/``end``/``note``: the
    range covered, as in ``ChargeReport``."""

    start: int
    end: int
    granularity: str
    by: str
    buckets: list[int]
    keys: list[str]
    #: key → metric → one value per bucket
    values: dict[str, dict[str, list[int]]]
    currency: str
    note: str = ""


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
    range; every other key is summed as ``(other)``, a missing value is ``(none)``.

    By hour, every bucket is read from ``usage_hourly`` (a day's rollup cannot be split into
    hours), and a range touching days whose hourly rollups are purged raises ``ValueError``
    naming them; by day or month, such an edge is widened to the whole day as in
    ``charge_report`` (``start``/``end``/``note`` say so)."""
    column = _check_by(by)
    asked = a, b = whole_hours(start, end)
    if granularity not in ("hour", "day", "month"):
        raise ValueError("granularity must be hour, day or month")
    starts = buckets(a, b, granularity)
    if len(starts) > MAX_BUCKETS:
        raise ValueError(f"{len(starts)} {granularity}s: choose a coarser granularity")
    where: dict[str, str | None] | None = (
        {"subscription_id": subscription_id} if subscription_id is not None else None
    )
    hourly = granularity == "hour"
    with engine.connect() as conn:
        if hourly:
            purged = sorted(_purged_days(conn, range(floor_day(a), b, DAY)))
            if purged:
                days = iso(purged[0])[:10]
                if len(purged) > 1:
                    days += f" to {iso(purged[-1])[:10]}"
                raise ValueError(
                    f"the hourly rollups of {days} are no longer kept "
                    "(retention.hourly_rollups_days): choose granularity day, or a later range"
                )
        else:
            a, b = covered_range(conn, a, b)
            starts = buckets(a, b, granularity)
        totals = _union(a, b, [column, "total_tokens"], where, hourly=hourly)
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
        sub = _union(
            a, b, [column, *_SERIES_METRICS], where, _bucket_fn(granularity, a, b), hourly=hourly
        )
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
    note = _widened_note(asked, (a, b))
    return Series(a, b, granularity, by, starts, keys, values, prices.currency, note)


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
