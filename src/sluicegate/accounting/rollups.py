"""Hourly and daily rollups of the ledger, priced, kept up to date incrementally.

How it stays correct without touching the ledger writer:

- ``rollup_state.last_record_id`` is a watermark over ``usage_records.id``. On PostgreSQL
  ``catch_up()`` finds the hours that records above it fall into, and *recomputes* each such
  hour from the raw records (delete the hour's rows, insert the fresh aggregate), then the day
  that contains it from its hours. Recomputing is idempotent, so a crash, a concurrent run or a
  batch replayed from the ledger's spill file (old timestamps, new ids) never double-counts.
- On SQLite ids grow in commit order (and never restart below the watermark: ``purge()``
  keeps the newest record), so ``catch_up()`` *adds* the records above the watermark to
  their hours instead, a chunk at a time, aggregated outside the write lock and merged,
  with the watermark moved, in one short transaction (``_catch_up_sqlite``): the ledger
  writer needs that lock several times a second.
- On PostgreSQL, ids are handed out before commit, so a record with a lower id can become
  visible after a higher one. Each run therefore rescans ``POSTGRES_OVERLAP`` ids below the
  watermark (more than the ledger writers can have in flight) and recomputes those hours too.
- Runs serialise on a lock (an advisory transaction lock on PostgreSQL, which inserts do not
  wait for; the write lock on SQLite, held only to merge a chunk and move the watermark).
- Pricing happens here (see ``pricing``): each hour is split where a price starts, so every
  record is charged the price in force at its timestamp. Rollups keep their cost after the raw
  records are purged; ``rebuild()`` re-prices a range while its raw records exist.
- Hours before ``raw_purged_before`` cannot be recomputed (their raw records are gone): on
  PostgreSQL a late record for such an hour is *added* as an extra row (reports sum rows, so
  rows of one group need not be unique); on SQLite every record is added anyway.

All methods block on database I/O; call them from a worker thread.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Table,
    and_,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine

from sluicegate.accounting.periods import DAY, HOUR, floor_day, floor_hour
from sluicegate.accounting.pricing import PriceTable
from sluicegate.accounting.records import Outcome
from sluicegate.clock import Clock, SystemClock
from sluicegate.storage.schema import rollup_state, usage_daily, usage_hourly, usage_records
from sluicegate.threads import not_idle

log = logging.getLogger("sluicegate.rollups")

#: Ids rescanned below the watermark on PostgreSQL (see the module docstring).
POSTGRES_OVERLAP = 50_000
#: Records aggregated per step of a SQLite catch-up (outside the write lock; see
#: ``Rollups._catch_up_sqlite``).
SQLITE_CHUNK = 20_000
_PG_LOCK_KEY = 0x51_0C_E6_A7_E0_00_00_02

GROUP_COLUMNS = ("subscription_id", "owner", "product", "deployment", "backend", "model")
COUNT_COLUMNS = (
    "requests",
    "attempts",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "total_tokens",
    "reasoning_tokens",
    "errors",
    "aborted",
    "estimated",
    "cost_nanos",
    "unpriced_records",
    "unpriced_tokens",
)
_ERRORS = (str(Outcome.CLIENT_ERROR), str(Outcome.BACKEND_ERROR), str(Outcome.REJECTED))


@dataclass(frozen=True, slots=True)
class RollupRun:
    """What one ``catch_up``/``rebuild`` did."""

    hours: int
    days: int
    last_record_id: int
    seconds: float


@dataclass(frozen=True, slots=True)
class PurgeRun:
    raw_deleted: int
    hourly_deleted: int
    raw_purged_before: float | None


def _hour_of(conn: Connection) -> ColumnElement[Any]:
    ts = usage_records.c.ts
    if conn.dialect.name == "postgresql":
        return cast(func.floor(ts / HOUR), BigInteger) * HOUR
    # SQLite truncates toward zero when casting REAL to INTEGER: floor for positive times.
    return cast(ts / HOUR, BigInteger) * HOUR


def _raw_aggregates() -> list[ColumnElement[Any]]:
    c = usage_records.c

    def n(cond: ColumnElement[bool]) -> ColumnElement[Any]:
        return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)

    return [
        n(c.attempt == 1).label("requests"),
        func.count().label("attempts"),
        func.coalesce(func.sum(c.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(c.cached_tokens), 0).label("cached_tokens"),
        func.coalesce(func.sum(c.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(c.total_tokens), 0).label("total_tokens"),
        func.coalesce(func.sum(c.reasoning_tokens), 0).label("reasoning_tokens"),
        n(c.outcome.in_(_ERRORS)).label("errors"),
        n(c.outcome == str(Outcome.ABORTED)).label("aborted"),
        n(c.usage_estimated.is_(True)).label("estimated"),
        n((c.prompt_tokens + c.completion_tokens) > 0).label("billable"),
    ]


class Rollups:
    """Maintains ``usage_hourly``/``usage_daily`` for one database. Thread-safe."""

    def __init__(self, engine: Engine, prices: PriceTable, clock: Clock | None = None) -> None:
        self.engine = engine
        self.prices = prices
        self.clock = clock or SystemClock()

    def __repr__(self) -> str:
        return f"<Rollups {self.engine.url.render_as_string(hide_password=True)}>"

    # -- public ----------------------------------------------------------------------------

    def state(self) -> tuple[int, float | None]:
        """``(last_record_id, raw_purged_before)``."""
        with self.engine.connect() as conn:
            row = conn.execute(select(rollup_state).where(rollup_state.c.id == 1)).one()
        return int(row.last_record_id), row.raw_purged_before

    def catch_up(self) -> RollupRun:
        """Bring the rollups up to date with every record committed so far."""
        if self.engine.dialect.name == "sqlite":
            return self._catch_up_sqlite()
        started = time.monotonic()
        with self.engine.connect() as conn:
            watermark, purged = self._read_state(conn)
            top = conn.execute(select(func.max(usage_records.c.id))).scalar()
            if top is None or int(top) <= watermark:
                return RollupRun(0, 0, watermark, time.monotonic() - started)
            top = int(top)
            overlap = POSTGRES_OVERLAP if conn.dialect.name == "postgresql" else 0
            c = usage_records.c
            new_ids = and_(c.id > max(watermark - overlap, 0), c.id <= top)
            hours = sorted(
                int(h) for (h,) in conn.execute(select(_hour_of(conn)).where(new_ids).distinct())
            )
        late = [h for h in hours if purged is not None and h < purged]
        hours = [h for h in hours if purged is None or h >= purged]
        days = self._recompute(hours)
        with self.engine.connect() as conn:
            self._lock(conn)
            current, _ = self._read_state(conn)
            if late and current < top:
                # Added (they cannot be recomputed) in the transaction that moves the
                # watermark past them, from the watermark as it is now: a run that added
                # them first moved it already, and a run that fails adds nothing.
                self._add_late(conn, late, max(watermark, current), top)
            conn.execute(
                update(rollup_state)
                .where(rollup_state.c.id == 1)
                .values(last_record_id=max(current, top), updated_at=self.clock.now())
            )
            conn.commit()
        return RollupRun(len(hours), days, top, time.monotonic() - started)

    def _catch_up_sqlite(self) -> RollupRun:
        """SQLite: add the records above the watermark to their hours, a chunk at a time.

        On SQLite ids grow in commit order (one writer at a time) and records are never
        changed, so the records of ``(watermark, hi]`` can be aggregated once, without any
        lock, and added to what the hours hold: exact, and the cost follows the new records
        instead of the size of the hours. Recomputing whole hours under the write lock, as
        on PostgreSQL, took seconds per run under load at this thread's low priority while
        the ledger writer, which needs the same lock, waited and records queued in memory.
        Here the lock is held only to merge the chunk's rows into its hours and days and to
        move the watermark; a concurrent run that moved it first makes this one start over
        from the new watermark, so nothing is added twice.
        """
        started = time.monotonic()
        hours_done: set[int] = set()
        days_done: set[int] = set()
        while True:
            with self.engine.connect() as conn:
                watermark, _ = self._read_state(conn)
                top = conn.execute(select(func.max(usage_records.c.id))).scalar()
                if top is None or int(top) <= watermark:
                    conn.rollback()
                    break
                hi = min(int(top), watermark + SQLITE_CHUNK)
                c = usage_records.c
                hours = sorted(
                    int(h)
                    for (h,) in conn.execute(
                        select(_hour_of(conn)).where(c.id > watermark, c.id <= hi).distinct()
                    )
                )
                priced = {h: self._price(conn, h, h + HOUR, h, (watermark, hi)) for h in hours}
                conn.rollback()
            with not_idle(), self.engine.connect() as conn:
                self._lock(conn)
                current, _ = self._read_state(conn)
                if current != watermark:  # another run added this chunk first
                    conn.rollback()
                    continue
                days = {floor_day(h) for h in hours}
                for h in hours:
                    self._merge_hour(conn, h, priced[h])
                for day in sorted(days):
                    self._recompute_day(conn, day)
                conn.execute(
                    update(rollup_state)
                    .where(rollup_state.c.id == 1)
                    .values(last_record_id=hi, updated_at=self.clock.now())
                )
                conn.commit()
            hours_done.update(hours)
            days_done.update(days)
        with self.engine.connect() as conn:
            watermark, _ = self._read_state(conn)
        return RollupRun(len(hours_done), len(days_done), watermark, time.monotonic() - started)

    def _merge_hour(self, conn: Connection, hour: int, rows: list[dict[str, Any]]) -> None:
        """Add ``rows`` (priced aggregates of new records) to the rows the hour holds: one row
        per group afterwards, whatever the hour held before."""
        if not rows:
            return
        h = usage_hourly.c
        merged: dict[tuple[Any, ...], dict[str, Any]] = {}
        held = conn.execute(select(usage_hourly).where(h.bucket == hour)).mappings().all()
        every: list[Mapping[Any, Any]] = list(held)
        every.extend(rows)
        for row in every:
            into = _group_row(merged, hour, row)
            for name in COUNT_COLUMNS:
                into[name] += int(row[name])
        conn.execute(delete(usage_hourly).where(h.bucket == hour))
        conn.execute(insert(usage_hourly), list(merged.values()))

    def rebuild(self, start: float, end: float) -> RollupRun:
        """Recompute (and re-price) every hour of ``[start, end)`` whose raw records are still
        kept. Used after correcting a price; hours before the purge horizon are left alone."""
        started = time.monotonic()
        _, purged = self.state()
        first = floor_hour(max(start, purged or start))
        hours = list(range(first, int(end), HOUR))
        days = self._recompute(hours)
        return RollupRun(len(hours), days, self.state()[0], time.monotonic() - started)

    def purge(
        self, *, raw_days: float | None, hourly_days: float | None, chunk: int = 10_000
    ) -> PurgeRun:
        """Delete raw records older than ``raw_days`` (whole UTC days, only records already
        rolled up) and hourly rollups older than ``hourly_days``. In chunks of ``chunk`` rows,
        one transaction each.

        On SQLite the record with the highest id is never deleted: it outlives retention until
        a newer record exists (see the comment in the loop)."""
        now = self.clock.now()
        raw_deleted = hourly_deleted = 0
        watermark, purged = self.state()
        if raw_days is not None:
            cutoff = float(floor_day(now - raw_days * DAY))
            if purged is None or cutoff > purged:
                # Mark first: from now on late records for these hours are added, not recomputed.
                with self.engine.connect() as conn:
                    self._lock(conn)
                    conn.execute(
                        update(rollup_state)
                        .where(rollup_state.c.id == 1)
                        .values(raw_purged_before=cutoff)
                    )
                    conn.commit()
                purged = cutoff
            c = usage_records.c
            old_enough = [c.ts < purged, c.id <= watermark]
            if self.engine.dialect.name == "sqlite":
                # SQLite gives a new row max(id) + 1 (``id`` is a rowid without AUTOINCREMENT):
                # with the newest row deleted, new records would take ids at or below the
                # watermark, which catch-up never reads, and the next purge would delete them
                # unrolled. Keeping that one row keeps max(id) from going down. Decided in the
                # statement itself (under the write lock), so a concurrent purge cannot race
                # it. PostgreSQL's sequence never hands an id out twice.
                newest = select(func.max(c.id)).correlate(None).scalar_subquery()
                old_enough.append(c.id < newest)
            while True:
                ids = select(c.id).where(*old_enough).limit(chunk)
                with self.engine.begin() as conn:
                    n = conn.execute(delete(usage_records).where(c.id.in_(ids))).rowcount
                raw_deleted += n
                if n < chunk:
                    break
        if hourly_days is not None:
            cutoff_h = floor_day(now - hourly_days * DAY)
            with self.engine.begin() as conn:
                hourly_deleted = conn.execute(
                    delete(usage_hourly).where(usage_hourly.c.bucket < cutoff_h)
                ).rowcount
        return PurgeRun(raw_deleted, hourly_deleted, purged)

    # -- internals -------------------------------------------------------------------------

    def _lock(self, conn: Connection) -> None:
        if conn.dialect.name == "postgresql":
            key = _PG_LOCK_KEY - (1 << 64) if _PG_LOCK_KEY >= 1 << 63 else _PG_LOCK_KEY
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    def _read_state(self, conn: Connection) -> tuple[int, float | None]:
        row = conn.execute(select(rollup_state).where(rollup_state.c.id == 1)).one()
        return int(row.last_record_id), row.raw_purged_before

    def _recompute(self, hours: Iterable[int]) -> int:
        by_day: dict[int, list[int]] = defaultdict(list)
        for h in hours:
            by_day[floor_day(h)].append(h)
        sqlite = self.engine.dialect.name == "sqlite"
        for day, day_hours in sorted(by_day.items()):
            with self.engine.connect() as conn:
                self._lock(conn)
                # SQLite adds records above the watermark later (_catch_up_sqlite): an hour
                # recomputed here must not hold them already.
                upto = (0, self._read_state(conn)[0]) if sqlite else None
                for h in day_hours:
                    rows = self._price(conn, h, h + HOUR, h, upto)
                    conn.execute(delete(usage_hourly).where(usage_hourly.c.bucket == h))
                    if rows:
                        conn.execute(insert(usage_hourly), rows)
                self._recompute_day(conn, day)
                conn.commit()
        return len(by_day)

    def _recompute_day(self, conn: Connection, day: int) -> None:
        h = usage_hourly.c
        conn.execute(delete(usage_daily).where(usage_daily.c.bucket == day))
        groups = [h[name] for name in GROUP_COLUMNS]
        sums = [func.sum(h[name]) for name in COUNT_COLUMNS]
        query = (
            select(literal(day, BigInteger), *groups, *sums)
            .where(h.bucket >= day, h.bucket < day + DAY)
            .group_by(*groups)
        )
        conn.execute(
            insert(usage_daily).from_select(["bucket", *GROUP_COLUMNS, *COUNT_COLUMNS], query)
        )

    def _price(
        self, conn: Connection, start: int, end: int, bucket: int, ids: tuple[int, int] | None
    ) -> list[dict[str, Any]]:
        """Aggregate and price the raw records of ``[start, end)`` (optionally only ids in
        ``(lo, hi]``) into rollup rows for ``bucket``, split where prices change."""
        c = usage_records.c
        groups = [c[name] for name in GROUP_COLUMNS]
        out: dict[tuple[Any, ...], dict[str, Any]] = {}
        for seg_start, seg_end in self.prices.segments(start, end):
            query = select(*groups, *_raw_aggregates()).where(c.ts >= seg_start, c.ts < seg_end)
            if ids is not None:
                # From id 0 no lower bound: the planner then keeps the ``ts`` index (one
                # hour's rows) instead of scanning every id below the upper one.
                lower = [c.id > ids[0]] if ids[0] > 0 else []
                query = query.where(*lower, c.id <= ids[1])
            for r in conn.execute(query.group_by(*groups)):
                m = r._mapping
                row = _group_row(out, bucket, m)
                for name in COUNT_COLUMNS[:10]:
                    row[name] += int(m[name])
                rate = self.prices.resolve(m["deployment"], m["model"], m["backend"], seg_start)
                billable = int(m["billable"])
                if rate is None:
                    if billable:
                        row["unpriced_records"] += billable
                        row["unpriced_tokens"] += int(m["prompt_tokens"]) + int(
                            m["completion_tokens"]
                        )
                else:
                    row["cost_nanos"] += rate.cost_nanos(
                        int(m["prompt_tokens"]),
                        int(m["cached_tokens"]),
                        int(m["completion_tokens"]),
                    )
        return list(out.values())

    def _add_late(self, conn: Connection, hours: list[int], lo: int, hi: int) -> None:
        """Records of ids ``(lo, hi]`` that arrived for hours whose raw records were purged:
        add them as extra rows to the hour and its day (they cannot be recomputed). In the
        caller's locked transaction, which also moves the watermark to ``hi``."""
        log.warning("rollups: %d hour(s) before the purge horizon got late records", len(hours))
        for h in hours:
            rows = self._price(conn, h, h + HOUR, h, (lo, hi))
            if rows:
                conn.execute(insert(usage_hourly), rows)
                day_rows = [dict(r, bucket=floor_day(h)) for r in rows]
                conn.execute(insert(usage_daily), day_rows)


def _group_row(
    rows: dict[tuple[Any, ...], dict[str, Any]], bucket: int, source: Mapping[Any, Any]
) -> dict[str, Any]:
    """The row in ``rows`` of ``source``'s group (its ``GROUP_COLUMNS``), added with zero
    counts if it is not there yet."""
    key = tuple(source[name] for name in GROUP_COLUMNS)
    row = rows.get(key)
    if row is None:
        row = {"bucket": bucket, **dict(zip(GROUP_COLUMNS, key, strict=True))}
        row.update({name: 0 for name in COUNT_COLUMNS})
        rows[key] = row
    return row


def rollup_table(granularity: str) -> Table:
    return usage_hourly if granularity == "hour" else usage_daily
