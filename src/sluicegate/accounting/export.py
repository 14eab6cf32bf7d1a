"""Usage exports: ledger records shipped as JSON events to Event Hubs or a webhook, at least once.

APIM users stream one event per request with ``log-to-eventhub``; here the events come from
the ledger (``usage_records``), off the request path: the request path does nothing for an
export, configured or not.

How an export stays exact (no record skipped; duplicates only after a failure or a crash):

- Its cursor is a row of ``export_cursors`` (by the export's name): ``last_record_id`` (every
  id up to it was read) and ``gaps``, the ids up to it no record had when read. A cycle reads
  the records of the gaps and above the cursor in id order (``batch_size`` at most), sends
  them, and only after the receiver accepted them moves the cursor past them (:func:`advance`,
  pure). A failed send leaves the cursor where it was; the same records go again after a
  backoff (1 s doubling to 5 min; a ``Retry-After`` is honoured). So delivery is *at least
  once*: a crash (or a stop cut short) between the receiver's acceptance and the cursor's
  move sends that batch again, and each event carries ``record_id`` for consumers to drop
  duplicates.
- PostgreSQL hands ids out before commit: a record with a lower id can become visible after a
  higher one was read. The ids missing below the highest one read are kept as gaps (in the
  row, so every instance sees them) and read again by every cycle until a record fills them
  or they fall ``POSTGRES_OVERLAP`` ids behind (the rollups' bound on ids in flight; see
  ``accounting.rollups``). On SQLite ids become visible in commit order: no gaps are kept.
- Only one instance exports an export at a time: on PostgreSQL a cycle holds the cursor's row
  lock (``SELECT ... FOR UPDATE SKIP LOCKED``) from reading to moving it, so another
  instance's cycle finds the row locked and skips (dropping its lag gauges: it saw no lag,
  and its last figure may be long delivered); if the holder dies, its connection ends
  and the lock with it; if it stops talking (frozen, cut off), the server ends its
  transaction once idle longer than a send can take (``idle_in_transaction_session_timeout``:
  twice ``timeout_seconds`` plus 30 s). SQLite has one process. The move is also conditional
  on the row's ``version`` (a lost race moves nothing: it is logged, and the batch counts as
  sent twice).
- Records purged by retention before they were exported are lost to the export: on SQLite
  an id missing below the highest one read is such a record (counted and logged at once);
  on PostgreSQL a gap that falls out of the window is counted the same way (it may also have
  been an id no record ever got: a rolled-back batch, an insert skipped as a duplicate).

The worker is a daemon thread with its own event loop (``ExportWorker``): database calls go
to that loop's executor threads, sends are aiohttp requests on it. ``Gateway`` starts it after
the ledger and stops it first; a stop lets a cycle in flight finish for a few seconds, so a
clean stop sends nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from sqlalchemy import (
    ARRAY,
    BigInteger,
    Row,
    column,
    func,
    literal,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Select

from sluicegate.accounting.eventhub import Sender, SendResult, body_size, sender_for
from sluicegate.accounting.rollups import POSTGRES_OVERLAP
from sluicegate.clock import Clock, SystemClock
from sluicegate.config.model import ExportConfig
from sluicegate.storage.rows import RECORD_COLUMNS
from sluicegate.storage.schema import export_cursors, usage_records
from sluicegate.threads import ROLLUP_NICENESS, lower_priority

log = logging.getLogger("sluicegate.export")

#: The highest id a record can have (the top of the range above the cursor).
MAX_ID = 2**63 - 1
#: PostgreSQL: at most this many gap ranges are kept (the oldest beyond it count as lost).
MAX_GAP_RANGES = 10_000
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0
#: Seconds a stop waits for a cycle in flight before cancelling it (then its batch goes
#: again at the next start).
STOP_GRACE_SECONDS = 5.0
#: PostgreSQL: a claim's transaction may sit idle (sending) this much longer than its send can
#: take (an Entra ID token's wait and the send's timeout) before the server ends it.
HOLD_MARGIN_SECONDS = 30.0

#: The ``usage_records`` columns an event carries (besides ``record_id``, the row's id): all
#: a record fills but ``extra`` (routing details, not charge-back). Never a key: the ledger
#: holds none.
EVENT_COLUMNS = tuple(name for name in RECORD_COLUMNS if name != "extra")

Ranges = tuple[tuple[int, int], ...]


def iso_utc(ts: float) -> str:
    """``ts`` (epoch seconds) as ISO 8601 UTC with microseconds and a ``Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def event_of(row: Mapping[Any, Any]) -> dict[str, Any]:
    """The event for one ``usage_records`` row (``id`` and :data:`EVENT_COLUMNS`)."""
    event: dict[str, Any] = {"record_id": int(row["id"])}
    for name in EVENT_COLUMNS:
        event[name] = row[name]
    event["ts"] = iso_utc(float(row["ts"]))
    return event


# -- the cursor (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cursor:
    """Every id up to ``upto`` was read, except ``gaps`` (inclusive ranges, lowest first)."""

    upto: int
    gaps: Ranges = ()
    version: int = 0

    def ranges(self) -> Ranges:
        """What the next read covers: the gaps, then everything above ``upto``."""
        return (*self.gaps, (self.upto + 1, MAX_ID))


@dataclass(frozen=True, slots=True)
class Move:
    """Where :func:`advance` moves a cursor, and how many ids it gave up on (``lost``)."""

    upto: int
    gaps: Ranges
    lost: int


def _size(ranges: Sequence[tuple[int, int]]) -> int:
    return sum(hi - lo + 1 for lo, hi in ranges)


def _minus(ranges: Sequence[tuple[int, int]], ids: Sequence[int]) -> list[tuple[int, int]]:
    """``ranges`` (sorted, disjoint) without ``ids`` (sorted), as ranges."""
    out: list[tuple[int, int]] = []
    i = 0
    for lo, hi in ranges:
        while i < len(ids) and ids[i] < lo:
            i += 1
        start = lo
        while i < len(ids) and ids[i] <= hi:
            if ids[i] > start:
                out.append((start, ids[i] - 1))
            start = ids[i] + 1
            i += 1
        if start <= hi:
            out.append((start, hi))
    return out


def advance(cursor: Cursor, sent: Sequence[int], complete: bool, *, keep_gaps: bool) -> Move:
    """The cursor after the records ``sent`` (ids, sorted; a prefix of what a read of
    ``cursor.ranges()`` returned) were delivered. ``complete``: that read returned every
    record of the ranges visible to it, and all were sent; else it covered the ranges only
    up to the last id sent.

    Ids of the covered ranges that no record had become gaps (``keep_gaps``, PostgreSQL:
    they may be in flight), or are counted ``lost`` at once (SQLite: they were purged).
    PostgreSQL gaps that fall ``POSTGRES_OVERLAP`` ids below the new ``upto`` are dropped and
    counted lost too, as are the oldest beyond :data:`MAX_GAP_RANGES`.
    """
    if not sent and not complete:
        raise ValueError("an incomplete read covers the ranges up to the last id sent")
    upto = max(cursor.upto, sent[-1]) if sent else cursor.upto
    end = MAX_ID if complete else sent[-1]
    top = min(end, upto)
    covered = [(lo, min(hi, top)) for lo, hi in cursor.ranges() if lo <= top]
    missing = _minus(covered, sent)
    rest = [(max(lo, end + 1), hi) for lo, hi in cursor.gaps if hi > end]
    gaps = sorted(missing + rest)
    if not keep_gaps:
        return Move(upto, (), _size(gaps))
    floor = upto - POSTGRES_OVERLAP
    kept = [(max(lo, floor + 1), hi) for lo, hi in gaps if hi > floor]
    lost = _size(gaps) - _size(kept)
    if len(kept) > MAX_GAP_RANGES:
        lost += _size(kept[: len(kept) - MAX_GAP_RANGES])
        kept = kept[len(kept) - MAX_GAP_RANGES :]
    return Move(upto, tuple(kept), lost)


def _decode_gaps(text: str) -> Ranges:
    return tuple((int(lo), int(hi)) for lo, hi in orjson.loads(text))


# -- the cursor (database) -----------------------------------------------------------------


def _read_query(cursor: Cursor, limit: int) -> Select[Any]:
    """The records above the cursor and in its gaps, in id order, at most ``limit``. Two
    index range scans (a join with the gaps as a table on PostgreSQL), each limited: far
    behind, the scan above the cursor still stops after ``limit`` rows."""
    c = usage_records.c
    cols = [c.id, *(c[name] for name in EVENT_COLUMNS)]
    top = select(*cols).where(c.id > cursor.upto).order_by(c.id).limit(limit)
    if not cursor.gaps:
        return top
    ranges = (
        func.unnest(
            literal([lo for lo, _ in cursor.gaps], ARRAY(BigInteger)),
            literal([hi for _, hi in cursor.gaps], ARRAY(BigInteger)),
        )
        .table_valued(column("lo", BigInteger), column("hi", BigInteger))
        .render_derived(name="ranges")
    )
    late = (
        select(*cols)
        .join_from(ranges, usage_records, c.id.between(ranges.c.lo, ranges.c.hi))
        .order_by(c.id)
        .limit(limit)
    )
    both = union_all(select(top.subquery()), select(late.subquery())).subquery()
    return select(both).order_by(both.c.id).limit(limit)


class Claim:
    """One cycle's hold on an export's cursor. On PostgreSQL the row stays locked (in
    ``conn``'s transaction) until :meth:`release`; on SQLite nothing is held between calls.
    Blocking: call from a worker thread, one call at a time."""

    def __init__(self, store: CursorStore, cursor: Cursor, conn: Connection | None) -> None:
        self.store = store
        self.cursor = cursor
        self._conn = conn

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Connection]:
        if self._conn is not None:
            yield self._conn
        else:
            with self.store.engine.connect() as conn:
                yield conn

    def read(self, limit: int) -> tuple[list[Row[Any]], int]:
        """Up to ``limit`` records of the cursor's ranges, in id order, and the highest id
        in the ledger (for the lag)."""
        with self._connection() as conn:
            rows = list(conn.execute(_read_query(self.cursor, limit)))
            top = conn.execute(select(func.max(usage_records.c.id))).scalar()
        return rows, int(top or 0)

    def move(self, move: Move, exported: int) -> bool:
        """Store ``move`` (and count ``exported`` events); False if the cursor had moved
        meanwhile (nothing is changed then)."""
        t = export_cursors.c
        statement = (
            update(export_cursors)
            .where(t.name == self.store.name, t.version == self.cursor.version)
            .values(
                last_record_id=move.upto,
                gaps=orjson.dumps([list(g) for g in move.gaps]).decode(),
                version=t.version + 1,
                exported=t.exported + exported,
                lost=t.lost + move.lost,
                updated_at=self.store.clock.now(),
            )
        )
        if self._conn is not None:
            done = self._conn.execute(statement).rowcount == 1
            self._conn.commit()
            self._conn.close()
            self._conn = None
            return done
        with self.store.engine.begin() as conn:
            return conn.execute(statement).rowcount == 1

    def release(self) -> None:
        """End the hold (rolled back: nothing moved). Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.rollback()
            finally:
                conn.close()


class CursorStore:
    """An export's cursor in ``export_cursors``. Blocking: call from a worker thread."""

    def __init__(
        self,
        engine: Engine,
        name: str,
        clock: Clock | None = None,
        *,
        hold_seconds: float = HOLD_MARGIN_SECONDS,
    ) -> None:
        self.engine = engine
        self.name = name
        self.clock = clock or SystemClock()
        #: PostgreSQL: the longest a claim's transaction may wait between its statements (the
        #: send) before the server ends its session, and the row lock with it.
        self.hold_seconds = hold_seconds

    @property
    def keeps_gaps(self) -> bool:
        return self.engine.dialect.name != "sqlite"

    def ensure(self, start: str) -> None:
        """Create the cursor if it does not exist: ``latest`` above the highest record id now
        (on PostgreSQL with the ids missing below it as gaps: records in flight then are
        exported when they commit), ``earliest`` below the lowest. An existing cursor is left
        alone (whatever ``start``)."""
        t, c = export_cursors.c, usage_records.c
        with self.engine.begin() as conn:
            if conn.execute(select(t.name).where(t.name == self.name)).first() is not None:
                return
            gaps: Ranges = ()
            if start == "latest":
                upto = int(conn.execute(select(func.max(c.id))).scalar() or 0)
                if conn.dialect.name == "postgresql":
                    gaps = _missing_ids(conn, upto)
            else:
                upto = int(conn.execute(select(func.min(c.id))).scalar() or 1) - 1
            now = self.clock.now()
            values = {
                "name": self.name,
                "last_record_id": upto,
                "gaps": orjson.dumps([list(g) for g in gaps]).decode(),
                "version": 0,
                "exported": 0,
                "lost": 0,
                "created_at": now,
                "updated_at": now,
            }
            if conn.dialect.name == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                conn.execute(pg_insert(export_cursors).values(values).on_conflict_do_nothing())
            else:
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                conn.execute(sqlite_insert(export_cursors).values(values).on_conflict_do_nothing())

    def state(self) -> tuple[Cursor, int, int] | None:
        """The cursor, the events exported and the ids lost so far (None: no cursor)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(export_cursors).where(export_cursors.c.name == self.name)
            ).first()
        if row is None:
            return None
        return _cursor_of(row), int(row.exported), int(row.lost)

    def claim(self) -> Claim | None:
        """Hold the cursor for a cycle; None when another instance holds it (PostgreSQL) or
        it does not exist."""
        query = select(export_cursors).where(export_cursors.c.name == self.name)
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as conn:
                row = conn.execute(query).first()
            return None if row is None else Claim(self, _cursor_of(row), None)
        conn = self.engine.connect()
        try:
            # The lock is held across the send: bound it on the server, so that a holder
            # that stops talking without closing its connection (a frozen process or VM, a
            # network partition: the server's keepalives notice after hours, if ever) does
            # not stop every instance's export until then. Its move then fails; the next
            # holder sends the batch again (at least once).
            idle_ms = max(1, round(self.hold_seconds * 1000))
            conn.execute(
                select(func.set_config("idle_in_transaction_session_timeout", str(idle_ms), True))
            )
            row = conn.execute(query.with_for_update(skip_locked=True)).first()
        except BaseException:
            conn.close()
            raise
        if row is None:
            conn.rollback()
            conn.close()
            return None
        return Claim(self, _cursor_of(row), conn)


def _missing_ids(conn: Connection, upto: int) -> Ranges:
    """PostgreSQL: the ids no record has, up to ``upto`` and at most ``POSTGRES_OVERLAP`` below
    it (not below the oldest record: those were purged), as ranges. A ``latest`` cursor starts
    with them as gaps: a record in flight when it is created commits below ``upto``."""
    lowest = conn.execute(select(func.min(usage_records.c.id))).scalar()
    if lowest is None:
        return ()
    lo = max(int(lowest), upto - POSTGRES_OVERLAP + 1)
    rows = conn.execute(
        text(
            "SELECT min(s), max(s) FROM (SELECT s, s - row_number() OVER (ORDER BY s) AS g "
            "FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS s "
            "WHERE NOT EXISTS (SELECT 1 FROM usage_records AS r WHERE r.id = s)) AS m "
            "GROUP BY g ORDER BY 1"
        ),
        {"lo": lo, "hi": upto},
    )
    ranges = [(int(a), int(b)) for a, b in rows]
    return tuple(ranges[-MAX_GAP_RANGES:])


def _overlap(a: Ranges, b: Sequence[tuple[int, int]]) -> Ranges:
    """The ids in both ``a`` and ``b`` (sorted, disjoint ranges), as ranges. Linear: each
    may hold ``MAX_GAP_RANGES`` ranges."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def _cursor_of(row: Any) -> Cursor:
    return Cursor(int(row.last_record_id), _decode_gaps(row.gaps), int(row.version))


# -- one export ----------------------------------------------------------------------------


class ExportObserver(Protocol):
    """What an export reports (implemented by ``metrics.GatewayMetrics``)."""

    def export_sent(self, export: str, events: int) -> None: ...

    def export_failed(self, export: str, reason: str) -> None: ...

    def export_lost(self, export: str, records: int) -> None: ...

    def export_lag(self, export: str, records: int, seconds: float) -> None: ...

    def export_lag_unknown(self, export: str) -> None:
        """This instance saw no lag: its last cycle found the cursor held by another."""
        ...


@dataclass(frozen=True, slots=True)
class Cycle:
    """What one :meth:`Exporter.run_once` did: events sent, whether more records wait
    (``more``: run again at once), the failure if the send failed, ``skipped`` when another
    instance held the cursor."""

    sent: int = 0
    more: bool = False
    failure: SendResult | None = None
    skipped: bool = False


class Exporter:
    """One export: its cursor, its sender, its cycles. Use from one event loop."""

    def __init__(
        self,
        config: ExportConfig,
        engine: Engine,
        sender: Sender,
        *,
        clock: Clock | None = None,
        observer: ExportObserver | None = None,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.config = config
        self.sender = sender
        self.clock = clock or SystemClock()
        self.store = CursorStore(
            engine,
            config.name,
            self.clock,
            hold_seconds=2 * config.timeout_seconds + HOLD_MARGIN_SECONDS,
        )
        self.observer = observer
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self._products = None if config.products is None else frozenset(config.products)
        #: Records read per cycle: ``batch_size``, halved after each 413.
        self.limit = config.batch_size
        self._ensured = False
        self.cycles = self.failures = self.sent = 0
        self.last_failure: str | None = None
        #: Whether the observer holds lag series of this export that this one set.
        self._lag_shown = False

    def __repr__(self) -> str:
        return (
            f"<Exporter {self.config.name} {self.config.type} sent={self.sent} "
            f"failures={self.failures} last_failure={self.last_failure!r}>"
        )

    async def run_once(self) -> Cycle:
        """One cycle: hold the cursor, read, send, move the cursor past what was accepted.
        Raises what the database raises (the cursor stays)."""
        self.cycles += 1
        if not self._ensured:
            await asyncio.to_thread(self.store.ensure, self.config.start)
            self._ensured = True
        claim = await asyncio.to_thread(self.store.claim)
        if claim is None:
            # Another instance's cycle holds the cursor: what this one last saw may be long
            # delivered (the holder runs back to back while records wait). Its lag series go,
            # rather than go on reporting that backlog beside the holder's figure. Only
            # series it set: prometheus_client before 0.22 raises removing one it lacks.
            if self.observer is not None and self._lag_shown:
                self._lag_shown = False
                self.observer.export_lag_unknown(self.config.name)
            return Cycle(skipped=True)
        try:
            return await self._cycle(claim)
        finally:
            await asyncio.to_thread(claim.release)

    async def _cycle(self, claim: Claim) -> Cycle:
        rows, top = await asyncio.to_thread(claim.read, self.limit)
        items, taken, oldest = self._batch(rows)
        sent_ids = [int(r.id) for r in rows[:taken]]
        complete = len(rows) < self.limit and taken == len(rows)
        name = self.config.name
        if items:
            result = await self.sender.send(items)
            if not result.ok:
                self._failed(result, top - claim.cursor.upto, oldest)
                return Cycle(failure=result)
        if not rows:
            # max: retention may have taken every record (no highest id on PostgreSQL).
            self._lag(max(top - claim.cursor.upto, 0), 0.0)
            return Cycle()
        move = advance(claim.cursor, sent_ids, complete, keep_gaps=claim.store.keeps_gaps)
        if not await asyncio.to_thread(claim.move, move, len(items)):
            log.warning("export %s: the cursor moved under this cycle; its batch went twice", name)
        self.sent += len(items)
        self.last_failure = None
        if self.observer is not None:
            if items:
                self.observer.export_sent(name, len(items))
            if move.lost:
                self.observer.export_lost(name, move.lost)
        if move.lost:
            log.warning(
                "export %s: %d record id(s) were never exported: %s",
                name,
                move.lost,
                "ids no record committed for within the window (records purged by retention "
                "before export, or ids a rolled-back batch took)"
                if claim.store.keeps_gaps
                else "records purged by retention before export",
            )
        self._lag(max(top - move.upto, 0), 0.0 if complete else self.clock.now() - oldest)
        return Cycle(sent=len(items), more=not complete)

    def _batch(self, rows: Sequence[Row[Any]]) -> tuple[list[bytes], int, float]:
        """The items to send from ``rows`` (those of the export's products), as many as fit
        the sender's byte limit (one at least), how many rows they cover (a prefix), and the
        oldest timestamp among the rows (for the lag)."""
        items: list[bytes] = []
        size = 0
        limit = self.sender.max_batch_bytes
        taken = 0
        oldest = self.clock.now()
        for row in rows:
            m = row._mapping
            oldest = min(oldest, float(m["ts"]))
            if self._products is None or m["product"] in self._products:
                item = self.sender.item(int(m["id"]), event_of(m))
                full = limit is not None and body_size(size + len(item), len(items) + 1) > limit
                if full and items:
                    break
                items.append(item)
                size += len(item)
            taken += 1
        return items, taken, oldest

    def _failed(self, result: SendResult, behind: int, oldest: float) -> None:
        self.failures += 1
        self.last_failure = result.reason
        if result.reason == "too_large" and self.limit > 1:
            self.limit = max(1, self.limit // 2)
            log.warning(
                "export %s: the receiver refused a batch as too large (413); batches of %d "
                "records from now on",
                self.config.name,
                self.limit,
            )
        log.warning(
            "export %s: send failed (%s%s): %s",
            self.config.name,
            result.reason,
            f", {result.status}" if result.status is not None else "",
            result.detail or "-",
        )
        if self.observer is not None:
            self.observer.export_failed(self.config.name, result.reason)
        self._lag(max(behind, 0), max(self.clock.now() - oldest, 0.0))

    def _lag(self, records: int, seconds: float) -> None:
        if self.observer is not None:
            self.observer.export_lag(self.config.name, records, seconds)
            self._lag_shown = True

    def next_wait(self, cycle: Cycle | None, backoff: float) -> float:
        """Seconds before the next cycle after ``cycle`` (None: it raised), ``backoff``
        being the current failure backoff: at once while records wait, the interval when
        caught up, the backoff (or the receiver's ``Retry-After``, capped) after a failure."""
        if cycle is None:
            return backoff
        if cycle.failure is not None:
            wait = cycle.failure.retry_after
            if wait is None:
                return backoff
            return min(max(wait, self.backoff_first), self.backoff_max)
        if cycle.more:
            return 0.0
        return self.config.interval_seconds

    async def run(self, stop: asyncio.Event) -> None:
        """Cycles until ``stop`` is set (checked between cycles)."""
        backoff = self.backoff_first
        while not stop.is_set():
            cycle: Cycle | None
            try:
                cycle = await self.run_once()
            except Exception as exc:  # the database: try again after the backoff
                cycle = None
                self.failures += 1
                self.last_failure = "database"
                first = str(exc).strip().splitlines()
                log.warning(
                    "export %s: cycle failed: %s: %s",
                    self.config.name,
                    type(exc).__name__,
                    first[0][:200] if first else "-",
                )
                if self.observer is not None:
                    self.observer.export_failed(self.config.name, "database")
            wait = self.next_wait(cycle, backoff)
            if cycle is None or cycle.failure is not None:
                backoff = min(backoff * 2, self.backoff_max)
            elif not cycle.skipped:
                backoff = self.backoff_first
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
            else:
                await asyncio.sleep(0)


# -- the worker ----------------------------------------------------------------------------


class ExportWorker:
    """Runs every export on a daemon thread with its own event loop. ``start()`` once,
    ``stop()`` once (from any thread)."""

    def __init__(self, exporters: Sequence[Exporter]) -> None:
        self.exporters = list(exporters)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()

    def __repr__(self) -> str:
        alive = self._thread is not None and self._thread.is_alive()
        return f"<ExportWorker {'running' if alive else 'stopped'} {self.exporters!r}>"

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the export worker was already started")
        self._thread = threading.Thread(target=self._main, name="export-worker", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def stop(self, timeout: float = STOP_GRACE_SECONDS + 5.0) -> None:
        """Stop after the cycles in flight (cancelled after ``STOP_GRACE_SECONDS``)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        lower_priority(ROLLUP_NICENESS)
        try:
            asyncio.run(self._run())
        except Exception:
            log.exception("export worker failed")

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = stop = asyncio.Event()
        self._ready.set()
        tasks = [
            asyncio.create_task(e.run(stop), name=f"export-{e.config.name}") for e in self.exporters
        ]
        try:
            await stop.wait()
            _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for e in self.exporters:
                with contextlib.suppress(Exception):
                    await e.sender.aclose()


def export_worker(
    configs: Sequence[ExportConfig],
    engine: Engine,
    clock: Clock,
    environ: Mapping[str, str],
    observer: ExportObserver | None = None,
) -> ExportWorker | None:
    """The worker for ``configs`` (None without exports). Raises ``RuntimeError`` when an
    export's secret is not in ``environ``."""
    if not configs:
        return None
    return ExportWorker(
        [
            Exporter(c, engine, sender_for(c, clock, environ), clock=clock, observer=observer)
            for c in configs
        ]
    )


# -- operators: reading and rewinding cursors (admin API, CLI) -----------------------------

#: PostgreSQL: how long a rewind waits for a cycle in flight (it holds the cursor's row lock
#: while it sends) before it gives up (``ExportBusy``: the admin API's 409).
REWIND_LOCK_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class CursorView:
    """An export's cursor as stored: ``last_record_id`` (every id up to it was delivered but
    the ``gap_ids``), the events ``exported`` and the ids ``lost`` since it was created, and
    when it was created and last moved (epoch seconds)."""

    name: str
    last_record_id: int
    gap_ids: int
    gap_ranges: int
    exported: int
    lost: int
    created_at: float
    updated_at: float


def cursor_views(engine: Engine) -> dict[str, CursorView]:
    """Every export's cursor in the database, by name (configured or not). Blocking."""
    with engine.connect() as conn:
        rows = list(conn.execute(select(export_cursors).order_by(export_cursors.c.name)))
    views = {}
    for row in rows:
        gaps = _decode_gaps(row.gaps)
        views[row.name] = CursorView(
            name=row.name,
            last_record_id=int(row.last_record_id),
            gap_ids=_size(gaps),
            gap_ranges=len(gaps),
            exported=int(row.exported),
            lost=int(row.lost),
            created_at=float(row.created_at),
            updated_at=float(row.updated_at),
        )
    return views


def newest_record_id(engine: Engine) -> int | None:
    """The highest id in the ledger (None: no record). Blocking."""
    with engine.connect() as conn:
        top = conn.execute(select(func.max(usage_records.c.id))).scalar()
    return None if top is None else int(top)


class ExportNotFound(Exception):
    """No cursor by that name (the export is unknown, or has not run its first cycle)."""


class ExportBusy(Exception):
    """The cursor could not be taken: a cycle kept it past the wait (or kept moving it)."""


class RewindRefused(Exception):
    """A forward move past records not delivered yet, without ``skip``; ``skipped`` is how
    many records it would have passed."""

    def __init__(self, message: str, skipped: int) -> None:
        super().__init__(message)
        self.skipped = skipped


@dataclass(frozen=True, slots=True)
class Rewound:
    """What :func:`rewind` did: the cursor before and after, and the records a forward move
    passed over without sending them (``skipped``)."""

    name: str
    previous_record_id: int
    last_record_id: int
    skipped: int


def rewind(
    engine: Engine,
    name: str,
    *,
    after_record_id: int | None = None,
    since: float | None = None,
    skip: bool = False,
    clock: Clock | None = None,
    lock_seconds: float = REWIND_LOCK_SECONDS,
) -> Rewound:
    """Move export ``name``'s cursor so that its next cycle sends every record above
    ``after_record_id``, or from the first record at or after ``since`` (epoch seconds; with
    no record that late, above the newest record). Exactly one of the two. Blocking.

    Backward (re-send): the ids above the new point are read again; the cursor's gaps below
    it are kept (records still awaited there are sent when they commit). Forward: every id up
    to the new point counts as delivered; if records not delivered yet lie on the way,
    :class:`RewindRefused` unless ``skip`` (then they are never sent, and counted in the
    answer and in a warning). On PostgreSQL the ids on the way with no record (in flight,
    perhaps) stay gaps. A point above the newest record: :class:`RewindRefused`, ``skip``
    or not (records written later would be passed over uncounted). A point below the
    oldest record is taken as just below it (the ids under it were purged).

    Safe with a running worker and other instances: on PostgreSQL the move takes the cursor's
    row lock (which a cycle holds while it sends), waiting at most ``lock_seconds`` for it
    (:class:`ExportBusy` after that); on SQLite the move is conditional on the row's
    ``version``, which a cycle's own move checks too (a cycle that read the old cursor moves
    nothing: its batch goes again from the new point). Either way a cycle's later move never
    undoes a rewind. :class:`ExportNotFound` without a cursor by that name.
    """
    if (after_record_id is None) == (since is None):
        raise ValueError("give after_record_id or since, exactly one")
    clock = clock or SystemClock()
    t, c = export_cursors.c, usage_records.c
    postgres = engine.dialect.name == "postgresql"
    for _ in range(5):
        with engine.begin() as conn:
            query = select(export_cursors).where(t.name == name)
            if postgres:
                # SET LOCAL: bounds this transaction's wait for the row lock only.
                conn.execute(
                    select(
                        func.set_config(
                            "lock_timeout", str(max(1, round(lock_seconds * 1000))), True
                        )
                    )
                )
                try:
                    row = conn.execute(query.with_for_update()).first()
                except DBAPIError as exc:
                    # 55P03 lock_not_available: lock_timeout ran out (a cycle is sending).
                    if getattr(exc.orig, "sqlstate", None) == "55P03":
                        raise ExportBusy(
                            f"export {name!r} is sending a batch; try again in a moment"
                        ) from None
                    raise
            else:
                row = conn.execute(query).first()
            if row is None:
                raise ExportNotFound(f"no export {name!r} in the database")
            cursor = _cursor_of(row)
            if since is not None:
                first = conn.execute(select(func.min(c.id)).where(c.ts >= since)).scalar()
                if first is not None:
                    target = int(first) - 1
                else:
                    top = conn.execute(select(func.max(c.id))).scalar()
                    target = max(cursor.upto, int(top or 0))
            else:
                assert after_record_id is not None
                target = after_record_id
                if target < cursor.upto:
                    # Below the oldest record nothing is left to send: the ids there would
                    # only be read as missing and counted lost (they were delivered, then
                    # purged), with a warning.
                    oldest = conn.execute(select(func.min(c.id))).scalar()
                    floor = cursor.upto if oldest is None else min(cursor.upto, int(oldest) - 1)
                    target = max(target, floor)
            skipped = 0
            if target > cursor.upto:
                top = int(conn.execute(select(func.max(c.id))).scalar() or 0)
                if target > top:
                    # Records written later with ids up to it would never be sent, and no
                    # count could say how many: never, skip or not.
                    raise RewindRefused(
                        f"record {target} is above the newest record ({top}): moving export "
                        f"{name!r} there would skip records not written yet",
                        0,
                    )
                pending = [(lo, min(hi, target)) for lo, hi in cursor.ranges() if lo <= target]
                skipped = int(
                    conn.execute(
                        select(func.count()).where(
                            or_(*(c.id.between(lo, hi) for lo, hi in pending))
                        )
                    ).scalar()
                    or 0
                )
                if skipped and not skip:
                    raise RewindRefused(
                        f"moving export {name!r} from record {cursor.upto} forward to {target} "
                        f"would skip {skipped} record(s) not delivered yet; give skip: true "
                        "(the CLI's --skip) to skip them",
                        skipped,
                    )
                # PostgreSQL: an id on the way with no record may be in flight (it commits
                # later): it stays a gap, as for a cursor started at ``latest``.
                gaps: Ranges = _overlap(_missing_ids(conn, target), pending) if postgres else ()
            else:
                gaps = tuple((lo, min(hi, target)) for lo, hi in cursor.gaps if lo <= target)
            if target == cursor.upto and gaps == cursor.gaps:
                return Rewound(name, cursor.upto, target, 0)
            done = conn.execute(
                update(export_cursors)
                .where(t.name == name, t.version == cursor.version)
                .values(
                    last_record_id=target,
                    gaps=orjson.dumps([list(g) for g in gaps]).decode(),
                    version=t.version + 1,
                    updated_at=clock.now(),
                )
            ).rowcount
        if done == 1:
            if skipped:
                log.warning(
                    "export %s: moved forward from record %d to %d: %d record(s) skipped, "
                    "never sent",
                    name,
                    cursor.upto,
                    target,
                    skipped,
                )
            else:
                log.info("export %s: cursor moved from record %d to %d", name, cursor.upto, target)
            return Rewound(name, cursor.upto, target, skipped)
    raise ExportBusy(f"export {name!r} kept moving; try again in a moment")
