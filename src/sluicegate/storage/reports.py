"""Usage reports over the ledger: token totals grouped by one dimension, over a time range.

Counting rules (the same for every report):

- A row of ``usage_records`` is one upstream attempt; a request retried on another backend has
  several. ``requests`` counts distinct request ids; tokens are summed over all attempts
  (a failed attempt normally carries none).
- ``aborted``: attempts whose client went away; ``estimated``: attempts whose token counts
  are the gateway's estimate; ``errors``: attempts that ended in a client error, a backend
  error or a gateway rejection (so a request retried after a 429 counts one error).
- Time ranges are half-open: ``start <= ts < end`` (epoch seconds, UTC).

All functions block on database I/O and are thread-safe (each uses its own connection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from sqlalchemy import ColumnElement, Select, case, func, select
from sqlalchemy.engine import Engine

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.storage.rows import record_from_row
from sluicegate.storage.schema import usage_records

GroupBy = Literal["subscription", "owner", "product", "deployment", "backend", "model"]

_GROUP_COLUMNS: dict[str, ColumnElement[Any]] = {
    "subscription": usage_records.c.subscription_id,
    "owner": usage_records.c.owner,
    "product": usage_records.c.product,
    "deployment": usage_records.c.deployment,
    "backend": usage_records.c.backend,
    "model": usage_records.c.model,
}
assert set(_GROUP_COLUMNS) == set(get_args(GroupBy))

_ERROR_OUTCOMES = (str(Outcome.CLIENT_ERROR), str(Outcome.BACKEND_ERROR), str(Outcome.REJECTED))


@dataclass(frozen=True, slots=True)
class ReportRow:
    """Totals for one group. ``key`` is the group's value (None where the records had none;
    also None for the grand total of ``ledger_totals``)."""

    key: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    aborted: int
    estimated: int
    errors: int


def _aggregates() -> list[ColumnElement[Any]]:
    c = usage_records.c
    return [
        func.count(func.distinct(c.request_id)).label("requests"),
        func.coalesce(func.sum(c.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(c.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(c.total_tokens), 0).label("total_tokens"),
        func.coalesce(func.sum(c.cached_tokens), 0).label("cached_tokens"),
        func.coalesce(func.sum(c.reasoning_tokens), 0).label("reasoning_tokens"),
        func.coalesce(func.sum(case((c.outcome == str(Outcome.ABORTED), 1), else_=0)), 0).label(
            "aborted"
        ),
        func.coalesce(func.sum(case((c.usage_estimated.is_(True), 1), else_=0)), 0).label(
            "estimated"
        ),
        func.coalesce(func.sum(case((c.outcome.in_(_ERROR_OUTCOMES), 1), else_=0)), 0).label(
            "errors"
        ),
    ]


def _in_range(
    query: Select[Any], start: float | None, end: float | None, subscription_id: str | None
) -> Select[Any]:
    c = usage_records.c
    if start is not None:
        query = query.where(c.ts >= start)
    if end is not None:
        query = query.where(c.ts < end)
    if subscription_id is not None:
        query = query.where(c.subscription_id == subscription_id)
    return query


def _row(key: str | None, m: Any) -> ReportRow:
    return ReportRow(
        key=key,
        requests=int(m["requests"]),
        prompt_tokens=int(m["prompt_tokens"]),
        completion_tokens=int(m["completion_tokens"]),
        total_tokens=int(m["total_tokens"]),
        cached_tokens=int(m["cached_tokens"]),
        reasoning_tokens=int(m["reasoning_tokens"]),
        aborted=int(m["aborted"]),
        estimated=int(m["estimated"]),
        errors=int(m["errors"]),
    )


def usage_report(
    engine: Engine,
    *,
    start: float,
    end: float,
    by: GroupBy,
    subscription_id: str | None = None,
) -> list[ReportRow]:
    """Totals per value of ``by`` for records with ``start <= ts < end``.

    Optionally only one subscription's records. Sorted by ``total_tokens`` descending, ties by
    key (None last). Groups with no records in the range do not appear.
    """
    try:
        column = _GROUP_COLUMNS[by]
    except KeyError:
        choices = ", ".join(sorted(_GROUP_COLUMNS))
        raise ValueError(f"cannot group by {by!r}; choose one of {choices}") from None
    query = select(column.label("key"), *_aggregates()).group_by(column)
    query = _in_range(query, start, end, subscription_id)
    with engine.connect() as conn:
        rows = [_row(r._mapping["key"], r._mapping) for r in conn.execute(query)]
    rows.sort(key=lambda r: (-r.total_tokens, r.key is None, r.key or ""))
    return rows


def ledger_totals(
    engine: Engine,
    *,
    start: float | None = None,
    end: float | None = None,
    subscription_id: str | None = None,
) -> ReportRow:
    """Grand totals over the ledger (or a range of it), as one ``ReportRow`` with key None."""
    query = _in_range(select(*_aggregates()), start, end, subscription_id)
    with engine.connect() as conn:
        row = conn.execute(query).one()
    return _row(None, row._mapping)


def fetch_records(
    engine: Engine,
    *,
    start: float | None = None,
    end: float | None = None,
    subscription_id: str | None = None,
    limit: int = 10_000,
    offset: int = 0,
) -> list[UsageRecord]:
    """Stored records, oldest first (by ts, request id, attempt), at most ``limit`` of them."""
    c = usage_records.c
    query = _in_range(select(usage_records), start, end, subscription_id)
    query = query.order_by(c.ts, c.request_id, c.attempt).offset(offset).limit(limit)
    with engine.connect() as conn:
        return [record_from_row(r._mapping) for r in conn.execute(query)]


def count_records(engine: Engine) -> int:
    """How many rows ``usage_records`` holds (attempts, not requests)."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(usage_records)).scalar_one())
