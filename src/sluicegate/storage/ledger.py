"""The batching ledger writer: usage records off the request path and into SQL, none lost.

The request path only calls :meth:`LedgerWriter.submit`, which appends to an in-memory queue
and returns. One background thread drains the queue in batches of ``batch_size`` (or whatever
arrived within ``flush_interval``) with ``INSERT … ON CONFLICT (request_id, attempt) DO
NOTHING`` (on PostgreSQL, ``COPY`` into a staging table first), so a batch that is retried
after an ambiguous failure, or replayed from the spill file, is stored exactly once.

While the database is unreachable the thread retries the same batch with capped exponential
backoff (``retry_initial`` doubling up to ``retry_max``). Records keep arriving; about
``max_pending`` of them are kept in memory and the newer overflow is appended to the spill
file (JSON lines, fsynced per batch). When the database answers again the spill file is
replayed in parts of ``_REPLAY_PART_BATCHES`` batches, a batch of the queue written between
two parts, and removed once read to its end. The same bound holds while the database is up
but the writer is behind (the records arrive faster than it writes them, or during a
replay): memory holds about ``max_pending`` records, whatever the outage's length and the
load. A spill file left by an earlier run (or a crash) is replayed on ``start()``.

A record the database refuses for its content (a value too long for its column, for example)
would otherwise block the queue forever: such a batch is retried record by record and each
refused record is appended to ``<spill_path>.rejected`` (same format) and counted as
``rejected``, so an operator can see and repair it.

A database that is up but does not answer a statement (``usage_records`` locked by another
session: a maintenance ``LOCK TABLE``, a ``CREATE INDEX``; or a stuck server) is bounded
twice. On PostgreSQL every transaction of the writer's runs under ``SET LOCAL
statement_timeout`` (``statement_timeout``, 10 s by default: a normal batch takes
milliseconds), so a statement waiting on a lock fails and is handled as an outage (retried
with backoff, overflow spilled); ``LOCAL``, so the setting does not stay on connections the
writer returns to a shared engine's pool. SQLite's busy timeout (``engine.py``) does the same
there. And ``close()`` never waits for a statement past its own timeout (a stuck server may
never time it out): see there.

Crash loss window: after ``kill -9`` (or a power cut) the records lost are those submitted but
neither committed nor spilled: the in-memory queue plus the batch in flight, at most about
``max_pending + batch_size`` records, in the normal case only the last ``flush_interval``'s
worth. ``close()`` leaves no such window: what it cannot write within its timeout it spills,
including the batch in flight in a statement that has not returned (if that statement commits
later, the replay's insert skips the copies). The spill file is never locked while a
statement runs (``spill.py``), so a replay stuck on the database does not hold that up. The
thread is a daemon thread, so a process that exits without calling ``close()`` loses the queue
as a crash would. (With SQLite's ``synchronous=NORMAL`` a power cut may also roll back the
last committed transactions.)
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError

from sluicegate.accounting.records import UsageRecord
from sluicegate.clock import Clock, SystemClock
from sluicegate.storage.rows import RECORD_COLUMNS, record_params
from sluicegate.storage.schema import usage_records
from sluicegate.storage.spill import SpillFile
from sluicegate.threads import LEDGER_NICENESS, IdleWhileCaughtUp, lower_priority

log = logging.getLogger(__name__)

_Item = tuple[int, UsageRecord]  # (submission sequence number, record)
_State = Literal["new", "running", "closing", "closed"]


@dataclass(frozen=True, slots=True)
class LedgerStats:
    """A snapshot of a writer's counters (all counts since the writer was created).

    ``pending``: records submitted but not yet durable (queued, in flight or being spilled).
    ``written``: submitted records committed to the database (a duplicate counts as written;
    a batch ``close()`` spilled while its statement hung counts as spilled only, even if the
    statement commits later).
    ``failures``: failed write attempts (each retry of a batch counts once).
    ``spilled``: records appended to the spill file. ``replayed``: spill-file records written.
    ``rejected``: records the database refused for their content (see ``.rejected`` file).
    ``last_write_seconds``: how long the last successful batch insert took.
    ``last_write_at``: when it finished (``clock.now()``); None before the first.
    ``healthy``: the last database attempt succeeded (True until one fails).
    """

    pending: int
    written: int
    failures: int
    spilled: int
    replayed: int
    rejected: int
    last_write_seconds: float | None
    last_write_at: float | None
    healthy: bool


class LedgerWriter:
    """Writes usage records to ``usage_records`` from a background thread.

    ``engine`` is an :class:`Engine` (shared with the caller, not disposed here) or a factory
    called once in the writer's thread (the engine is then owned and disposed on ``close()``).

    Thread-safety: ``submit()`` may be called from any thread, including the asyncio event
    loop: it only takes a lock that is never held during I/O, does no I/O (except after
    ``close()``, see there), and never raises. ``flush()``, ``close()`` and ``stats()`` are
    thread-safe too; ``flush()`` and ``close()`` block, so call them off the event loop
    (``asyncio.to_thread``). ``start()`` and ``close()`` are meant to be called once each.

    The ``clock`` times the statistics; waiting and backoff use real time, as threads must.

    ``statement_timeout`` (seconds; None: the server's setting) bounds each statement of the
    writer's on PostgreSQL (see the module docstring); it must exceed the slowest normal
    batch, or every batch fails and goes through the spill file.
    """

    def __init__(
        self,
        engine: Engine | Callable[[], Engine],
        *,
        spill_path: Path,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        max_pending: int = 20_000,
        clock: Clock | None = None,
        retry_initial: float = 0.2,
        retry_max: float = 2.0,
        statement_timeout: float | None = 10.0,
    ) -> None:
        if batch_size < 1 or max_pending < 0 or flush_interval <= 0:
            raise ValueError("batch_size >= 1, max_pending >= 0 and flush_interval > 0 needed")
        if statement_timeout is not None and statement_timeout <= 0:
            raise ValueError("statement_timeout > 0 (or None) needed")
        if isinstance(engine, Engine):
            _check_dialect(engine)
            self._engine: Engine | None = engine
            self._engine_factory: Callable[[], Engine] | None = None
        else:
            self._engine = None
            self._engine_factory = engine
        self._spill = SpillFile(spill_path)
        self._rejects = SpillFile(Path(str(spill_path) + ".rejected"))
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_pending = max_pending
        self._clock = clock or SystemClock()
        self._retry_initial = retry_initial
        self._retry_max = max(retry_max, retry_initial)
        # In whole milliseconds, as PostgreSQL takes it (0 would mean no timeout at all).
        self._statement_timeout_ms = (
            None if statement_timeout is None else max(1, round(statement_timeout * 1000))
        )

        self._cond = threading.Condition(threading.Lock())
        # Everything below is guarded by self._cond.
        self._state: _State = "new"
        self._queue: deque[_Item] = deque()
        self._inflight: list[_Item] = []  # the batch the thread is writing, oldest first
        self._shedding: list[list[_Item]] = []  # groups being appended to the spill file
        self._next_seq = 0
        self._flush_waiters = 0
        self._spill_pending = False
        self._replaying = 0  # records fed so far by the replay in parts under way
        self._thread: threading.Thread | None = None
        # The thread has ended (set by it, last). Whichever of close() and the thread comes
        # second lets go of the spill file and the owned engine (``_release``).
        self._thread_done = False
        self._written = self._failures = self._spilled = self._replayed = self._rejected = 0
        self._last_write_seconds: float | None = None
        self._last_write_at: float | None = None
        self._healthy = True
        self._scheduling = IdleWhileCaughtUp()  # the writer thread's (sluicegate.threads)

    @property
    def spill_path(self) -> Path:
        return self._spill.path

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<LedgerWriter {self._state} pending={s.pending} written={s.written} "
            f"failures={s.failures} spilled={s.spilled} healthy={s.healthy}>"
        )

    # -- the public interface ------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread; a spill file left by an earlier run is replayed first."""
        with self._cond:
            if self._state != "new":
                raise RuntimeError(f"cannot start a writer that is {self._state}")
            self._state = "running"
            self._spill_pending = self._spill.exists()
            self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
            self._thread.start()

    def submit(self, record: UsageRecord) -> None:
        """Queue ``record`` for writing. Non-blocking, thread-safe, never raises.

        Before ``start()`` records wait in the queue. After ``close()`` there is no thread to
        write them, so the record is appended to the spill file at once (blocking file I/O,
        but nothing is lost; the next writer replays it).
        """
        try:
            with self._cond:
                if self._state != "closed":
                    self._queue.append((self._next_seq, record))
                    self._next_seq += 1
                    n = len(self._queue)
                    if n == 1 or n == self._batch_size:
                        self._cond.notify_all()
                    if self._scheduling.idle and (
                        n >= _BACKLOG_BATCHES * self._batch_size
                        or record.ts - self._queue[0][1].ts > _BACKLOG_AGE_SECONDS
                    ):
                        # A backlog built while the writer idles, perhaps in the middle of a
                        # batch it gets no CPU to finish: give it its share back now.
                        self._scheduling.promote()
                    return
            self._spill.append([record])
            with self._cond:
                self._spilled += 1
        except Exception:
            log.exception("ledger: could not queue usage record %s", _ident(record))

    def flush(self, timeout: float) -> bool:
        """Wait until every record submitted before this call is durable (written or spilled).

        Returns False if that did not happen within ``timeout`` seconds (the database is
        down and the records are still waiting in memory, or the writer was never started).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._next_seq
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                while self._oldest_pending() < target:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return True
            finally:
                self._flush_waiters -= 1

    def close(self, timeout: float) -> None:
        """Write everything and stop; what cannot be written is spilled, so none is lost.

        Waits up to ``timeout`` seconds for the thread to write the backlog (and replay a
        spill file). If the database fails meanwhile, or the time runs out, the records left
        are appended to the spill file before this returns: then it returns within about
        ``timeout`` plus the time to append them, whatever the database does. A statement
        that has not returned by then (a lock held by another session, a stuck server) is not
        waited for: the batch it writes is spilled with the queue (should it commit later,
        the replay's insert skips the copies), and the thread is left to end by itself once
        the statement returns, without starting anything else. Idempotent.
        """
        with self._cond:
            if self._state == "closed":
                return
            never_started = self._state == "new"
            if never_started and not self._queue and not self._spill.exists():
                self._state = "closed"
                return
        if never_started:
            self.start()  # so that what was queued before start() is written, not just spilled
        with self._cond:
            self._state = "closing"
            self._cond.notify_all()
            thread = self._thread
        assert thread is not None
        thread.join(timeout)
        with self._cond:
            self._state = "closed"
            left_running = not self._thread_done
            # Anything the thread did not get to (records submitted after it drained, or all
            # of them if it is stuck on the database) goes to the spill file from here. The
            # in-flight batch may yet be committed as well: duplicates are ignored on replay.
            # It is taken from the thread (which sees the state and counts it as spilled,
            # not written) so that it is not counted as pending any more. Nothing here waits
            # for the thread: the spill file is not locked while a statement runs.
            leftovers = [*self._queue]
            if left_running:
                leftovers[:0] = self._inflight
                self._inflight = []
            self._queue.clear()
            if leftovers:
                self._shedding.append(leftovers)
        if leftovers:
            log.warning("ledger: spilling %d record(s) left at close", len(leftovers))
            self._spill_group(leftovers)
            with self._cond:
                lost = len(self._queue)
            if lost:
                log.error("ledger: %d record(s) could be neither written nor spilled", lost)
        if left_running:
            # It ends by itself once its statement returns, and then calls _release().
            log.error("ledger: writer thread still busy after %.1f s; left running", timeout)
            return
        self._release()

    def _release(self) -> None:
        """Let go of the spill file and the owned engine, once the thread has ended."""
        self._spill.close()  # a replay cut short holds its file open
        if self._engine_factory is not None and self._engine is not None:
            self._engine.dispose()

    def stats(self) -> LedgerStats:
        """A consistent snapshot of the counters. Thread-safe, cheap."""
        with self._cond:
            return LedgerStats(
                pending=self._pending_count(),
                written=self._written,
                failures=self._failures,
                spilled=self._spilled,
                replayed=self._replayed,
                rejected=self._rejected,
                last_write_seconds=self._last_write_seconds,
                last_write_at=self._last_write_at,
                healthy=self._healthy,
            )

    # -- bookkeeping (call with self._cond held) ------------------------------------------

    def _pending_count(self) -> int:
        return len(self._queue) + len(self._inflight) + sum(len(g) for g in self._shedding)

    def _oldest_pending(self) -> int:
        """Sequence number of the oldest record not yet durable (``_next_seq`` if none).

        Batches are taken from the head and overflow from the tail of the queue, and each
        list is in submission order, so the first element of each is its oldest.
        """
        heads = [g[0][0] for g in (self._inflight, self._queue, *self._shedding) if g]
        return min(heads, default=self._next_seq)

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        lower_priority(LEDGER_NICENESS)  # the event loop comes first (see sluicegate.threads)
        try:
            self._loop()
        except BaseException:
            # A bug, not a database problem. Keep the records: spill them, and let close()
            # spill whatever arrives after this (the thread is done).
            log.exception("ledger: writer thread failed; spilling what it holds")
            with self._cond:
                self._healthy = False
            self._spill_remaining()
        finally:
            with self._cond:
                self._thread_done = True
                abandoned = self._state == "closed"  # close() returned without waiting for us
            if abandoned:
                self._release()

    def _loop(self) -> None:
        backoff = 0.0  # 0 while the database is healthy
        scheduling = self._scheduling
        while True:
            if backoff > 0:
                self._wait_backoff(backoff)
            with self._cond:
                if backoff == 0:
                    self._wait_for_work()
                if self._state == "closed":
                    return  # close() gave up on us and spilled what we held
                closing = self._state == "closing"
                if closing and not (self._queue or self._inflight or self._spill_pending):
                    return
                if not self._inflight:
                    n = min(self._batch_size, len(self._queue))
                    self._inflight = [self._queue.popleft() for _ in range(n)]
                batch = [record for _, record in self._inflight]
                # Yield the core to requests at once while caught up (sluicegate.threads);
                # compete for it normally once a few batches wait, records have waited a
                # while (other processes keep the core busy), someone waits for a flush, or
                # when closing.
                backlog = (
                    closing
                    or self._flush_waiters > 0
                    or len(self._queue) >= _BACKLOG_BATCHES * self._batch_size
                    or (
                        bool(self._queue)
                        and self._clock.now() - self._queue[0][1].ts > _BACKLOG_AGE_SECONDS
                    )
                )
            scheduling.update(backlog)
            if closing and backoff > 0:
                # The database was failing when close() came: do not keep the caller waiting.
                self._spill_remaining()
                return
            if self._attempt(batch):
                backoff = 0.0
                # Up, but perhaps behind (a replay, or more records than it can write): the
                # memory bound holds all the same.
                self._shed_overflow()
            else:
                backoff = min(max(backoff * 2, self._retry_initial), self._retry_max)
                self._shed_overflow()

    def _wait_for_work(self) -> None:
        """Block until there is a batch worth writing (held lock: self._cond)."""
        while not (self._queue or self._inflight or self._spill_pending) and self._state not in (
            "closing",
            "closed",
        ):
            self._cond.wait()
        deadline = time.monotonic() + self._flush_interval
        while (
            len(self._queue) < self._batch_size
            and self._state == "running"
            and not self._flush_waiters
            and not self._inflight
            and not self._spill_pending  # a replay goes on at the writer's pace
        ):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)

    def _wait_backoff(self, backoff: float) -> None:
        """Sleep ``backoff`` seconds before a retry, spilling overflow as it accumulates."""
        deadline = time.monotonic() + backoff
        while True:
            self._shed_overflow()
            with self._cond:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._state != "running":
                    return
                self._cond.wait(min(remaining, self._flush_interval))

    def _attempt(self, batch: list[UsageRecord]) -> bool:
        """Write the in-flight batch, then replay the spill file if one waits. True if done."""
        started = self._clock.monotonic()
        try:
            rejected = self._write(batch) if batch else 0
            with self._cond:
                if self._state == "closed":
                    # close() gave up waiting for this statement, took the batch and spilled
                    # it: counted as spilled, its replay a no-op now that it is stored.
                    if batch:
                        log.info("ledger: a batch spilled at close was committed after all")
                else:
                    self._written += len(batch) - rejected
                self._inflight = []
                if batch:
                    self._last_write_seconds = self._clock.monotonic() - started
                    self._last_write_at = self._clock.now()
                if not self._healthy:
                    log.info("ledger: database reachable again")
                self._healthy = True
                self._cond.notify_all()
                # Closed: close() has returned; the next writer replays the file.
                replay = self._spill_pending and self._state != "closed"
            if replay:
                # In parts: the queue is written (and its overflow shed) between two, so that
                # records arriving during a long replay are not all held in memory.
                fed, finished = self._spill.replay_part(
                    self._write,
                    batch_size=self._batch_size,
                    limit=_REPLAY_PART_BATCHES * self._batch_size,
                )
                with self._cond:
                    self._replayed += fed
                    self._replaying += fed
                    if finished:
                        self._spill_pending = False
                        replayed, self._replaying = self._replaying, 0
                if finished:
                    log.info("ledger: replayed %d record(s) from %s", replayed, self._spill.path)
            return True
        except Exception as exc:
            with self._cond:
                self._failures += 1
                if self._healthy:
                    log.warning("ledger: write failed, will retry: %s", exc)
                else:
                    log.debug("ledger: write failed again: %s", exc)
                self._healthy = False
            return False

    def _write(self, records: Sequence[UsageRecord]) -> int:
        """Insert ``records`` idempotently; raise if the database could not take them.

        Returns how many records were rejected: a record that cannot be encoded, or that the
        database refuses for its content, would fail every retry and block the ledger, so it
        is set aside in the ``.rejected`` file instead (a refused batch is retried record by
        record to find it).
        """
        engine = self._get_engine()  # outside the try: a bad engine is not bad content
        rejected = 0
        rows: list[tuple[UsageRecord, tuple[Any, ...]]] = []
        for record in records:
            try:
                rows.append((record, record_params(record)))
            except Exception as exc:
                log.error("ledger: record %s cannot be encoded: %r", _ident(record), exc)
                self._reject(record)
                rejected += 1
        if not rows:
            return rejected
        try:
            self._insert(engine, [row for _, row in rows])
            return rejected
        except Exception as exc:
            if not _is_content_error(exc):
                raise
        for record, row in rows:
            try:
                self._insert(engine, [row])
            except Exception as exc:
                if not _is_content_error(exc):
                    raise
                log.error("ledger: record %s rejected by the database: %s", _ident(record), exc)
                self._reject(record)
                rejected += 1
        return rejected

    def _reject(self, record: UsageRecord) -> None:
        try:
            self._rejects.append([record])
        except OSError:
            raise  # retried with the batch: the record must not be lost to a full disk
        except Exception:
            log.exception("ledger: record %s cannot even be encoded; dropped", _ident(record))
        with self._cond:
            self._rejected += 1

    def _insert(self, engine: Engine, params: list[tuple[Any, ...]]) -> None:
        # The rows are passed as plain tuples (``record_params``) straight to the driver: at
        # thousands of records per second, SQLAlchemy's per-row parameter processing was the
        # writer thread's main cost (and it shares the GIL with requests).
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                _copy_into_postgresql(conn, params, self._statement_timeout_ms)
                return
            # SQLite: rows go in groups of ``_SQLITE_ROWS_PER_STATEMENT`` per statement.
            # sqlite3's executemany steps (and releases and retakes the GIL) once per row;
            # one statement per group does it once per group. (The stalls the writer caused
            # came from its CPU use on a shared core: see sluicegate.threads.)
            k = _SQLITE_ROWS_PER_STATEMENT
            whole = len(params) - len(params) % k
            flatten = itertools.chain.from_iterable
            if whole:
                grouped = [tuple(flatten(params[i : i + k])) for i in range(0, whole, k)]
                conn.exec_driver_sql(_insert_sql(k), grouped)
            rest = params[whole:]
            if rest:
                flat = tuple(flatten(rest))
                conn.exec_driver_sql(_insert_sql(len(rest)), flat)

    def _get_engine(self) -> Engine:
        if self._engine is None:
            assert self._engine_factory is not None
            engine = self._engine_factory()
            _check_dialect(engine)
            self._engine = engine
        return self._engine

    # -- spilling -------------------------------------------------------------------------

    def _shed_overflow(self) -> None:
        """Move the newest records beyond ``max_pending`` from memory to the spill file."""
        with self._cond:
            excess = min(self._pending_count() - self._max_pending, len(self._queue))
            if excess <= 0:
                return
            group = [self._queue.pop() for _ in range(excess)]
            group.reverse()
            self._shedding.append(group)
        self._spill_group(group)

    def _spill_remaining(self) -> None:
        """Spill everything held in memory (closing with the database down, or a crash)."""
        with self._cond:
            group = [*self._inflight, *self._queue]
            self._inflight = []
            self._queue.clear()
            if not group:
                return
            self._shedding.append(group)
        log.warning("ledger: spilling %d record(s) to %s", len(group), self._spill.path)
        self._spill_group(group)

    def _spill_group(self, group: list[_Item]) -> None:
        """Append a group (already listed in ``_shedding``) to the spill file."""
        ok = False
        try:
            self._spill.append([record for _, record in group])
            ok = True
        except Exception:
            log.exception("ledger: could not write the spill file %s", self._spill.path)
        with self._cond:
            self._shedding = [g for g in self._shedding if g is not group]
            if ok:
                self._spilled += len(group)
                self._spill_pending = True
            else:
                # Keep them in memory (in submission order) and try again later.
                self._failures += 1
                merged = sorted([*self._queue, *group], key=lambda item: item[0])
                self._queue = deque(merged)
            self._cond.notify_all()


def _check_dialect(engine: Engine) -> None:
    name, driver = engine.dialect.name, engine.dialect.driver
    if name == "postgresql" and driver != "psycopg":
        # The PostgreSQL path uses psycopg 3's COPY (``_copy_into_postgresql``).
        raise ValueError(f"the ledger writes to PostgreSQL through psycopg 3, not {driver}")
    if name not in ("sqlite", "postgresql"):
        raise ValueError(f"the ledger supports SQLite and PostgreSQL, not {name}")


def _copy_into_postgresql(
    conn: Connection, params: list[tuple[Any, ...]], timeout_ms: int | None
) -> None:
    """Insert the rows ``params`` into ``usage_records`` in ``conn``'s transaction, each
    ``(request_id, attempt)`` at most once: ``COPY`` into the session's staging table, then
    one statement that moves them (``DELETE … RETURNING`` into ``INSERT … SELECT … ON
    CONFLICT DO NOTHING``), ``_PG_ROWS_PER_MOVE`` rows at a time. ``timeout_ms``: the
    transaction's ``statement_timeout`` (set first, so that it bounds every statement,
    the staging table's creation included: it reads ``usage_records``, and a lock held on it
    makes that wait too). ``SET LOCAL`` costs a round trip per batch, but a session-wide
    ``SET`` would stay on the pooled connection for the engine's other users (reports, whose
    queries may rightly take longer).

    Why in parts: the server's work for a row (~10 µs: the heap, three indexes) comes in one
    burst per statement, and a server on the gateway's machine may run it on the worker's
    core (the kernel wakes it beside its client). A 500-row move was a ~4 ms burst that a
    lightly loaded worker's requests waited behind (bench/ledger_cost.py --rate: the
    99.9th percentile of a 0.2 ms sleep 1.1-1.9 ms, against 0.8 with ``executemany``);
    100-row parts keep each burst near 1 ms, for ~1 µs more of the writer's CPU a record.

    Why not ``executemany`` of ``INSERT … ON CONFLICT``: that costs the database one
    statement per row and the writer thread one round of parameter binding and result
    handling per row. Under sustained saturation the writer fell behind the requests
    (bench/analysis.md: records waiting grew by ~2,100 a second at ~6,000 requests a
    second). ``COPY`` has no ``ON CONFLICT``, hence the staging table.

    The staging table is temporary (each session has its own, and it leaves nothing behind)
    and emptied at every commit or rollback. It is created once per connection; the mark
    kept in the pooled connection's ``info`` is dropped on any error, because a rolled-back
    transaction takes the table it created with it. Errors from the driver are raised as
    SQLAlchemy's (``DataError``, ``IntegrityError``, …), as ``exec_driver_sql`` raises them,
    so that the caller can tell bad content from an unavailable database.
    """
    pooled = conn.connection
    info = pooled.info
    raw = pooled.driver_connection
    assert raw is not None  # an open connection in a transaction has its driver's
    statement = ""  # the one running, for the error raised
    try:
        with raw.cursor() as cursor:
            if timeout_ms is not None:
                statement = f"SET LOCAL statement_timeout = {int(timeout_ms)}"
                cursor.execute(statement)
            statement = _PG_CREATE_STAGING
            if not info.get(_PG_STAGING_READY):
                cursor.execute(statement)
                info[_PG_STAGING_READY] = True
            k = _PG_ROWS_PER_MOVE
            for i in range(0, len(params), k):
                statement = _PG_COPY_TO_STAGING
                with cursor.copy(statement) as copy:
                    for row in params[i : i + k]:
                        copy.write_row(row)
                statement = _PG_MOVE_FROM_STAGING
                cursor.execute(statement)
    except BaseException as exc:
        info.pop(_PG_STAGING_READY, None)
        dbapi = conn.dialect.loaded_dbapi
        if isinstance(exc, dbapi.Error):
            raise DBAPIError.instance(
                statement, None, exc, dbapi.Error, dialect=conn.dialect
            ) from exc
        raise


def _is_content_error(exc: BaseException) -> bool:
    """Whether the database refused the data itself, as opposed to being unavailable.

    Content errors (a value too long or out of range, a NOT NULL violated, a parameter the
    driver cannot convert) fail again on every retry; anything else (connection refused or
    lost, locked, schema missing) may pass later and is retried.
    """
    if isinstance(exc, DataError | IntegrityError):
        return True
    if isinstance(exc, DBAPIError | SQLAlchemyError | OSError):
        return isinstance(exc, StatementError) and not isinstance(exc, DBAPIError)
    return isinstance(exc, TypeError | ValueError | OverflowError)


def _ident(record: UsageRecord) -> str:
    # Defensive: used in the error path of submit(), which must not raise on a bad argument.
    return f"{getattr(record, 'request_id', '?')}#{getattr(record, 'attempt', '?')}"


#: Batches waiting (beyond the one in flight) from which the writer stops yielding the core.
_BACKLOG_BATCHES = 4
#: ... or from which the oldest waiting record is this old (seconds since its request came).
_BACKLOG_AGE_SECONDS = 1.0
#: Batches of the spill file replayed between two batches of the queue.
_REPLAY_PART_BATCHES = 4

# Statements on our own table and column names only, no input.
_COLUMNS = ", ".join(RECORD_COLUMNS)

_INSERT_SQL: dict[int, str] = {}
#: Rows per INSERT statement on SQLite (24 columns: well under its 32,766 parameters).
_SQLITE_ROWS_PER_STATEMENT = 50


def _insert_sql(rows: int) -> str:
    """SQLite's ``INSERT … VALUES (?, …)[, (…)…] ON CONFLICT (request_id, attempt) DO
    NOTHING`` for ``rows`` rows per statement."""
    cached = _INSERT_SQL.get(rows)
    if cached is not None:
        return cached
    one = f"({', '.join('?' for _ in RECORD_COLUMNS)})"
    sql = (
        f"INSERT INTO {usage_records.name} ({_COLUMNS}) "  # noqa: S608
        f"VALUES {', '.join(one for _ in range(rows))} "
        "ON CONFLICT (request_id, attempt) DO NOTHING"
    )
    _INSERT_SQL[rows] = sql
    return sql


# PostgreSQL (``_copy_into_postgresql``).
_PG_STAGING = "sluicegate_incoming_records"
_PG_STAGING_READY = "sluicegate.ledger.staging_ready"  # key in the pooled connection's info
_PG_CREATE_STAGING = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {_PG_STAGING} ON COMMIT DELETE ROWS "  # noqa: S608
    f"AS SELECT {_COLUMNS} FROM {usage_records.name} WITH NO DATA"
)
_PG_COPY_TO_STAGING = f"COPY {_PG_STAGING} ({_COLUMNS}) FROM STDIN"
_PG_MOVE_FROM_STAGING = (
    f"WITH moved AS (DELETE FROM {_PG_STAGING} RETURNING {_COLUMNS}) "  # noqa: S608
    f"INSERT INTO {usage_records.name} ({_COLUMNS}) SELECT {_COLUMNS} FROM moved "
    "ON CONFLICT (request_id, attempt) DO NOTHING"
)
#: Rows per ``COPY`` and move, within the batch's one transaction.
_PG_ROWS_PER_MOVE = 100
