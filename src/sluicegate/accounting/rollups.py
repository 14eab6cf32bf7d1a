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
  visible after a higher one, below the watermark. Each ``Rollups`` remembers how far its runs
  read the ids and which of those were missing (the gaps: in flight then, or rolled back for
  good); a run recomputes the hours of the records above what it read and of those that
  appeared in its gaps since (``_catch_up_postgresql``). So a record that commits below the
  watermark is counted by the next run of any process, with no newer record needed, as long
  as its id is less than ``POSTGRES_OVERLAP`` below the watermark when it commits (more ids
  than the ledger writers can have in flight). A run with nothing remembered (a new process)
  reads the ``POSTGRES_OVERLAP`` ids below the watermark instead.
- Runs serialise on a lock (an advisory transaction lock on PostgreSQL, which inserts do not
  wait for; the write lock on SQLite, held only to merge a chunk and move the watermark).
- Pricing happens here (see ``pricing``): each hour is split where a price starts, so every
  record is charged the price in force at its timestamp. Rollups keep their cost after the raw
  records are purged; ``rebuild()`` re-prices a range while its raw records exist.
- Hours before ``raw_purged_before`` (the horizon) cannot be recomputed (their raw records are
  gone). Every recompute reads the horizon under the lock, in its own transaction, before it
  reads a raw record; the horizon only moves under that lock, and raw records only go once
  it has moved past them, so an hour is never replaced by what is left of it mid-purge.
- On PostgreSQL a record can commit for an hour before the horizon at any time (a spill file
  replayed late; a record whose id the watermark passed while it was in flight). So there
  the purge *takes* raw records: in one locked transaction per hour it deletes the hour's raw
  records, replaces the hour's rollup with exactly what it deleted (one statement) and moves
  the horizon past the hour. A raw record before the horizon is therefore never counted;
  each catch-up takes any that committed since (``_take_late``) and *adds* them as extra rows
  (reports sum rows, so rows of one group need not be unique). Nothing depends on ids there.
  On SQLite every record is added by id anyway, and the purge deletes in short chunks.
- A day's row is recomputed from its hours only where they are all kept: hourly rollups are
  deleted only before the horizon's day (kept as long as the raw records, whatever
  ``hourly_days`` says), and a SQLite catch-up adds a chunk to its days as to its hours.

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
    ARRAY,
    BigInteger,
    ColumnElement,
    Table,
    case,
    cast,
    column,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.selectable import TableValuedAlias

from sluicegate.accounting.periods import DAY, HOUR, floor_day, floor_hour
from sluicegate.accounting.pricing import PriceTable
from sluicegate.accounting.records import Outcome
from sluicegate.clock import Clock, SystemClock
from sluicegate.storage.schema import rollup_state, usage_daily, usage_hourly, usage_records
from sluicegate.threads import not_idle

log = logging.getLogger("sluicegate.rollups")

#: PostgreSQL: how far below the highest id read a missing id is still waited for, and how
#: far below the watermark a run with nothing remembered reads (see the module docstring).
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
#: The ``usage_records`` columns ``_raw_aggregates`` reads, besides ``GROUP_COLUMNS``.
_AGGREGATED_COLUMNS = (
    "ts",
    "attempt",
    "outcome",
    "usage_estimated",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "total_tokens",
    "reasoning_tokens",
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


@dataclass(frozen=True, slots=True)
class _Read:
    """PostgreSQL: how far a ``Rollups``' runs have read ``usage_records``. Every record with an
    id up to ``upto`` that was visible to a run had its hour recomputed (or taken) after
    that, except in ``gaps`` (inclusive ranges, the lowest first): ids no record had then."""

    upto: int
    gaps: tuple[tuple[int, int], ...]


def _gaps_above(gaps: Iterable[tuple[int, int]], floor: int) -> list[tuple[int, int]]:
    """The parts of ``gaps`` (inclusive ranges) above ``floor``."""
    return [(max(lo, floor + 1), hi) for lo, hi in gaps if hi > floor]


def _id_ranges(ranges: list[tuple[int, int]]) -> TableValuedAlias:
    """PostgreSQL: ``ranges`` (inclusive) as a table ``(lo, hi)``: two array parameters, so
    the statement stays the same size however many ranges there are."""
    return (
        func.unnest(
            literal([lo for lo, _ in ranges], ARRAY(BigInteger)),
            literal([hi for _, hi in ranges], ARRAY(BigInteger)),
        )
        .table_valued(column("lo", BigInteger), column("hi", BigInteger))
        .render_derived(name="ranges")
    )


def _hour_of(conn: Connection) -> ColumnElement[Any]:
    ts = usage_records.c.ts
    if conn.dialect.name == "postgresql":
        return cast(func.floor(ts / HOUR), BigInteger) * HOUR
    # SQLite truncates toward zero when casting REAL to INTEGER: floor for positive times.
    return cast(ts / HOUR, BigInteger) * HOUR


def _raw_aggregates(c: Any = usage_records.c) -> list[ColumnElement[Any]]:
    """Aggregates of raw records; ``c``: the columns of ``usage_records`` or of a query
    returning its rows."""

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
        #: PostgreSQL: what this object's runs read of ``usage_records`` (see
        #: ``_catch_up_postgresql``); None until its first run.
        self._read: _Read | None = None

    def __repr__(self) -> str:
        return f"<Rollups {self.engine.url.render_as_string(hide_password=True)}>"

    # -- public ----------------------------------------------------------------------------

    def state(self) -> tuple[int, float | None]:
        """``(last_record_id, raw_purged_before)``."""
        with self.engine.connect() as conn:
            row = conn.execute(select(rollup_state).where(rollup_state.c.id == 1)).one()
        return int(row.last_record_id), row.raw_purged_before

    def catch_up(self) -> RollupRun:
        """Bring the rollups up to date with every record committed so far (on PostgreSQL,
        one that committed with its id ``POSTGRES_OVERLAP`` or more below the watermark
        excepted: see the module docstring)."""
        if self.engine.dialect.name == "sqlite":
            return self._catch_up_sqlite()
        return self._catch_up_postgresql()

    def _catch_up_postgresql(self) -> RollupRun:
        """PostgreSQL: recompute the hours of the records this object has not read yet: those
        above the ids it read, and those that committed since in the gaps it left below (ids
        handed out but not visible then). A record committing below the watermark is thus
        counted by this object's next run, whether or not a newer record follows it.

        Why remember the gaps, rather than rescan ``POSTGRES_OVERLAP`` ids below the
        watermark on every run (as this did while there were new ids, and not at all when
        there were none, so a late record waited for the next new id): probing the gaps costs
        an index look-up per range of missing ids, a few in practice (records in flight, a
        rolled-back batch, ids an ``ON CONFLICT`` skipped), while a rescan read 50,000 records
        every run and recomputed every hour they fell into: days of hours for a quiet
        ledger, every ten seconds. A run now reads only new ids and gaps, and recomputes only
        the hours that got records.

        Why in memory, not in ``rollup_state``: what a run may skip depends only on what the
        same object read before, and nothing else needs it. A run with nothing remembered (a
        new process, or another process moved the watermark ``POSTGRES_OVERLAP`` past what
        this one read) reads the ids ``POSTGRES_OVERLAP`` below the watermark, as a run of
        any process did before. Concurrent runs of one object may each store what they read;
        either is true of what it read, so whichever is stored last is sound.

        Exact, whatever the order: hours are recomputed from the raw records (idempotent); the
        gaps are read in a statement before the one that finds the hours, so a record is
        either recomputed after it was visible or still in a gap; hours before the horizon
        are taken by ``_take_late`` instead, as before.
        """
        started = time.monotonic()
        c = usage_records.c
        read = self._read
        with self.engine.connect() as conn:
            watermark, purged = self._read_state(conn)
            top = int(conn.execute(select(func.max(c.id))).scalar() or 0)
            floor = max(watermark - POSTGRES_OVERLAP, 0)
            if read is not None and read.upto > watermark:
                read = None  # the watermark went back (restored database): start afresh
            start = floor if read is None else max(read.upto, floor)
            upto = max(start, top)
            ranges = [] if read is None else _gaps_above(read.gaps, floor)
            if upto > start:
                ranges.append((start + 1, upto))
            gaps: list[tuple[int, int]] = []
            hours: list[int] = []
            if ranges:
                # Gaps first: a record that commits between the two statements is then in
                # the hours (recomputed after it was visible) or still in a gap, never lost.
                gaps = self._missing(conn, ranges)
                hours = self._hours_in(conn, ranges)
            # No new record, nothing late in a gap; but a record may have committed below the
            # watermark for an hour before the horizon (an index probe, normally empty).
            work = (
                bool(hours)
                or top > watermark
                or (
                    purged is not None
                    and conn.execute(select(c.id).where(c.ts < purged).limit(1)).first() is not None
                )
            )
            conn.rollback()
        done = days = 0
        if work:
            # Hours before the horizon are taken below instead (records of ids at or under
            # the watermark included); ``_recompute`` checks the horizon again under the lock.
            done, days = self._recompute(h for h in hours if purged is None or h >= purged)
            with self.engine.connect() as conn:
                self._lock(conn)
                current, _ = self._read_state(conn)
                self._take_late(conn)
                watermark = max(current, top)
                conn.execute(
                    update(rollup_state)
                    .where(rollup_state.c.id == 1)
                    .values(last_record_id=watermark, updated_at=self.clock.now())
                )
                conn.commit()
        self._read = _Read(upto, tuple(_gaps_above(gaps, upto - POSTGRES_OVERLAP)))
        return RollupRun(done, days, watermark, time.monotonic() - started)

    def _missing(self, conn: Connection, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """PostgreSQL: the ids of ``ranges`` (inclusive) no record has, as inclusive ranges:
        an index-only pass over the ids, the lowest first."""
        c = usage_records.c
        r = _id_ranges(ranges)
        present = select(r.c.lo, c.id).join_from(r, usage_records, c.id.between(r.c.lo, r.c.hi))
        # One id past each range's end closes its last gap.
        ids = union_all(present, select(r.c.lo, r.c.hi + 1)).subquery()
        before = func.lag(ids.c.id, 1, ids.c.lo - 1).over(partition_by=ids.c.lo, order_by=ids.c.id)
        steps = select(ids.c.id, before.label("before")).subquery()
        query = (
            select(steps.c.before + 1, steps.c.id - 1)
            .where(steps.c.id > steps.c.before + 1)
            .order_by(steps.c.before)
        )
        return [(int(a), int(b)) for a, b in conn.execute(query)]

    def _hours_in(self, conn: Connection, ranges: list[tuple[int, int]]) -> list[int]:
        """PostgreSQL: the hours of the records whose ids are in ``ranges`` (inclusive)."""
        c = usage_records.c
        r = _id_ranges(ranges)
        hour = _hour_of(conn)
        query = select(hour).join_from(r, usage_records, c.id.between(r.c.lo, r.c.hi)).distinct()
        return sorted(int(h) for (h,) in conn.execute(query))

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
        from the new watermark, so nothing is added twice. The chunk is added to its days
        too (not recomputed from their hours): a record replayed late for a day whose hourly
        rollups are purged must not replace the day with itself.
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
            days: dict[int, list[dict[str, Any]]] = defaultdict(list)
            for h in hours:
                days[floor_day(h)].extend(priced[h])
            with not_idle(), self.engine.connect() as conn:
                self._lock(conn)
                current, _ = self._read_state(conn)
                if current != watermark:  # another run added this chunk first
                    conn.rollback()
                    continue
                for h in hours:
                    self._merge(conn, usage_hourly, h, priced[h])
                for day in sorted(days):
                    self._merge(conn, usage_daily, day, days[day])
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

    def _merge(
        self, conn: Connection, table: Table, bucket: int, rows: list[dict[str, Any]]
    ) -> None:
        """Add ``rows`` (priced aggregates of new records) to the rows ``table`` holds for
        ``bucket``: one row per group afterwards, whatever the bucket held before."""
        if not rows:
            return
        merged: dict[tuple[Any, ...], dict[str, Any]] = {}
        held = conn.execute(select(table).where(table.c.bucket == bucket)).mappings().all()
        every: list[Mapping[Any, Any]] = list(held)
        every.extend(rows)
        for row in every:
            into = _group_row(merged, bucket, row)
            for name in COUNT_COLUMNS:
                into[name] += int(row[name])
        conn.execute(delete(table).where(table.c.bucket == bucket))
        conn.execute(insert(table), list(merged.values()))

    def rebuild(self, start: float, end: float) -> RollupRun:
        """Recompute (and re-price) every hour of ``[start, end)`` whose raw records are still
        kept. Used after correcting a price; hours before the purge horizon (as it is when
        each day of them is recomputed) are left alone."""
        started = time.monotonic()
        _, purged = self.state()
        first = floor_hour(max(start, purged or start))
        done, days = self._recompute(range(first, int(end), HOUR))
        return RollupRun(done, days, self.state()[0], time.monotonic() - started)

    def purge(
        self, *, raw_days: float | None, hourly_days: float | None, chunk: int = 10_000
    ) -> PurgeRun:
        """Delete raw records older than ``raw_days`` (whole UTC days) and hourly rollups older
        than ``hourly_days`` (but never of a day whose raw records are kept: a late record or a
        rebuild recomputes such a day from its hours).

        PostgreSQL: one locked transaction per hour that has raw records; it takes them into
        the hour's rollup and moves the horizon past the hour (see the module docstring).
        SQLite: the horizon is moved first, then records already rolled up are deleted in
        chunks of ``chunk`` rows, one transaction each; the record with the highest id is
        never deleted: it outlives retention until a newer record exists (see the comment in
        the loop)."""
        now = self.clock.now()
        raw_deleted = hourly_deleted = 0
        watermark, purged = self.state()
        if raw_days is not None:
            cutoff = float(floor_day(now - raw_days * DAY))
            if self.engine.dialect.name != "sqlite":
                if purged is None or cutoff > purged:
                    raw_deleted = self._take_hours(cutoff)
                purged = self.state()[1]
            else:
                if purged is None or cutoff > purged:
                    # Mark first: from now on these hours are not recomputed. Under the lock,
                    # never back: a purge with a later cutoff may have deleted records already.
                    with self.engine.connect() as conn:
                        self._lock(conn)
                        _, current = self._read_state(conn)
                        if current is None or cutoff > current:
                            conn.execute(
                                update(rollup_state)
                                .where(rollup_state.c.id == 1)
                                .values(raw_purged_before=cutoff)
                            )
                        conn.commit()
                    purged = cutoff if current is None else max(cutoff, current)
                raw_deleted = self._delete_sqlite(purged, watermark, chunk)
        if hourly_days is not None and purged is not None:
            # Only before the horizon's day: later days may still be recomputed from their
            # hours (the horizon only grows, so one read before the statement is enough).
            cutoff_h = min(floor_day(now - hourly_days * DAY), floor_day(purged))
            with self.engine.begin() as conn:
                hourly_deleted = conn.execute(
                    delete(usage_hourly).where(usage_hourly.c.bucket < cutoff_h)
                ).rowcount
        return PurgeRun(raw_deleted, hourly_deleted, purged)

    def _delete_sqlite(self, purged: float, watermark: int, chunk: int) -> int:
        c = usage_records.c
        old_enough = [c.ts < purged, c.id <= watermark]
        # SQLite gives a new row max(id) + 1 (``id`` is a rowid without AUTOINCREMENT): with
        # the newest row deleted, new records would take ids at or below the watermark, which
        # catch-up never reads, and the next purge would delete them unrolled. Keeping that
        # one row keeps max(id) from going down. Decided in the statement itself (under the
        # write lock), so a concurrent purge cannot race it.
        newest = select(func.max(c.id)).correlate(None).scalar_subquery()
        old_enough.append(c.id < newest)
        deleted = 0
        while True:
            ids = select(c.id).where(*old_enough).limit(chunk)
            with self.engine.begin() as conn:
                n = conn.execute(delete(usage_records).where(c.id.in_(ids))).rowcount
            deleted += n
            if n < chunk:
                return deleted

    def _take_hours(self, cutoff: float) -> int:
        """PostgreSQL: move the horizon to ``cutoff`` an hour at a time, taking each hour's raw
        records into its rollup in the transaction that moves the horizon past it. Returns the
        number of records deleted.

        Why not mark the horizon, then delete in chunks, as on SQLite: ids are handed out
        before commit there, so a record for such an hour may commit after the catch-up that
        would have seen it (below the watermark, or during the purge); with the raw records
        counted and deleted at once, one rule holds whatever the ids: a raw record before the
        horizon is not in the rollups (``_take_late`` adds it). The lock is held for an hour's
        records, as by the catch-up that recomputes the current hour; inserts do not wait.
        """
        c = usage_records.c
        deleted = 0
        while True:
            with self.engine.connect() as conn:
                self._lock(conn)
                _, purged = self._read_state(conn)
                if purged is not None and purged >= cutoff:
                    conn.rollback()
                    return deleted
                after = [] if purged is None else [c.ts >= purged]
                first = conn.execute(select(func.min(c.ts)).where(c.ts < cutoff, *after)).scalar()
                horizon = cutoff
                if first is not None:
                    hour = floor_hour(first)
                    horizon = hour + HOUR
                    rows = self._take(conn, hour, horizon).get(hour, [])
                    # The hour's rollup holds recomputed rows only (it was after the horizon):
                    # replaced by exactly the records deleted.
                    conn.execute(delete(usage_hourly).where(usage_hourly.c.bucket == hour))
                    if rows:
                        conn.execute(insert(usage_hourly), rows)
                    self._recompute_day(conn, floor_day(hour))
                    deleted += sum(int(r["attempts"]) for r in rows)
                conn.execute(
                    update(rollup_state)
                    .where(rollup_state.c.id == 1)
                    .values(raw_purged_before=float(horizon))
                )
                conn.commit()

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

    def _recompute(self, hours: Iterable[int]) -> tuple[int, int]:
        """Recompute ``hours`` (those after the horizon) and their days, a transaction per
        day. Returns how many hours and days were recomputed."""
        by_day: dict[int, list[int]] = defaultdict(list)
        for h in hours:
            by_day[floor_day(h)].append(h)
        sqlite = self.engine.dialect.name == "sqlite"
        done_hours = done_days = 0
        for day, day_hours in sorted(by_day.items()):
            with self.engine.connect() as conn:
                self._lock(conn)
                # The horizon as it is now, read under the lock in this transaction, before
                # any raw record: it moves only under this lock, and raw records after it stay
                # until this transaction ends. (PostgreSQL reads at READ COMMITTED: each
                # statement sees what committed before it started, so after the lock was
                # granted, and a purge deletes only in the transaction that moves it.) A
                # horizon read earlier could let an hour being purged be replaced by nothing.
                watermark, purged = self._read_state(conn)
                live = [h for h in day_hours if purged is None or h >= purged]
                if not live:
                    conn.rollback()
                    continue
                # SQLite adds records above the watermark later (_catch_up_sqlite): an hour
                # recomputed here must not hold them already.
                upto = (0, watermark) if sqlite else None
                for h in live:
                    rows = self._price(conn, h, h + HOUR, h, upto)
                    conn.execute(delete(usage_hourly).where(usage_hourly.c.bucket == h))
                    if rows:
                        conn.execute(insert(usage_hourly), rows)
                # Every hour of the day is kept: hourly rollups go only before the horizon's
                # day (``purge``).
                self._recompute_day(conn, day)
                conn.commit()
            done_hours += len(live)
            done_days += 1
        return done_hours, done_days

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
                self._add_priced(out, bucket, seg_start, r._mapping)
        return list(out.values())

    def _add_priced(
        self,
        rows: dict[tuple[Any, ...], dict[str, Any]],
        bucket: int,
        seg_start: float,
        m: Mapping[Any, Any],
    ) -> None:
        """Add one group's aggregates (``_raw_aggregates``) of a piece of time starting at
        ``seg_start`` (within which prices are constant) to its row in ``rows``, priced."""
        row = _group_row(rows, bucket, m)
        for name in COUNT_COLUMNS[:10]:
            row[name] += int(m[name])
        rate = self.prices.resolve(m["deployment"], m["model"], m["backend"], seg_start)
        billable = int(m["billable"])
        if rate is None:
            if billable:
                row["unpriced_records"] += billable
                row["unpriced_tokens"] += int(m["prompt_tokens"]) + int(m["completion_tokens"])
        else:
            row["cost_nanos"] += rate.cost_nanos(
                int(m["prompt_tokens"]),
                int(m["cached_tokens"]),
                int(m["completion_tokens"]),
            )

    def _take(self, conn: Connection, start: int, end: float) -> dict[int, list[dict[str, Any]]]:
        """PostgreSQL: delete the raw records of ``[start, end)`` and return them aggregated and
        priced into rollup rows, by hour. One statement: exactly the records deleted are
        counted (one that commits meanwhile is neither, and stays for ``_take_late``)."""
        c = usage_records.c
        gone = (
            delete(usage_records)
            .where(c.ts >= start, c.ts < end)
            .returning(*(c[name] for name in (*GROUP_COLUMNS, *_AGGREGATED_COLUMNS)))
            .cte("gone")
        )
        segments = self.prices.segments(start, end)
        g = gone.c
        piece: ColumnElement[Any] = literal(0)
        if len(segments) > 1:
            piece = case(
                *((g.ts < seg_end, i) for i, (_, seg_end) in enumerate(segments[:-1])),
                else_=len(segments) - 1,
            )
        hour_of = cast(func.floor(g.ts / HOUR), BigInteger) * HOUR
        taken = select(hour_of.label("hour_"), piece.label("piece_"), *g).subquery()
        t = taken.c
        groups = [t[name] for name in GROUP_COLUMNS]
        query = select(t.hour_, t.piece_, *groups, *_raw_aggregates(t)).group_by(
            t.hour_, t.piece_, *groups
        )
        out: dict[int, dict[tuple[Any, ...], dict[str, Any]]] = defaultdict(dict)
        for r in conn.execute(query):
            m = r._mapping
            hour = int(m["hour_"])
            self._add_priced(out[hour], hour, segments[int(m["piece_"])][0], m)
        return {hour: list(rows.values()) for hour, rows in out.items()}

    def _take_late(self, conn: Connection) -> None:
        """PostgreSQL: raw records before the horizon committed since it moved past them
        (replayed late, or in flight while the purge or a catch-up ran): take them and add them
        as extra rows to their hours and days (those cannot be recomputed). In the caller's
        locked transaction. Records before the horizon are never in the rollups (``purge``
        takes them when it moves it), so whatever is there is added, once: deleted with it."""
        purged = self._read_state(conn)[1]
        if purged is None:
            return
        c = usage_records.c
        first = conn.execute(select(func.min(c.ts)).where(c.ts < purged)).scalar()
        if first is None:
            return
        taken = self._take(conn, floor_hour(first), purged)
        log.warning("rollups: %d hour(s) before the purge horizon got late records", len(taken))
        for hour, rows in sorted(taken.items()):
            conn.execute(insert(usage_hourly), rows)
            conn.execute(insert(usage_daily), [dict(r, bucket=floor_day(hour)) for r in rows])


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
