"""The ledger when the database is up but a statement does not return: ``usage_records`` is
locked by another session (a maintenance ``LOCK TABLE``, a long ``CREATE INDEX``, ...).

``close(timeout)`` must return within its timeout all the same, with every record either
written or in the spill file (none lost), and each stored once when the spill file is
replayed. Each ``close()`` runs in a daemon thread joined with a timeout, so that a hang
fails the test instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from sluicegate.storage.engine import create_engine_for, normalize_url
from sluicegate.storage.ledger import LedgerWriter
from sluicegate.storage.migrations import migrate
from sluicegate.storage.schema import usage_records
from sluicegate.storage.spill import SpillFile
from tests.storage.conftest import build_record
from tests.storage.test_ledger import wait_until
from tests.storage.test_ledger_outage import stored_ids

#: How long past its timeout ``close()`` may take: spilling a few records (fsync) and a
#: loaded machine's scheduling. SQLite's busy timeout (5 s) is well beyond it, so a close
#: that waits for the locked statement to give up is caught on SQLite too.
MARGIN = 2.5
CLOSE_TIMEOUT = 1.0


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextlib.contextmanager
def table_locked(url: str) -> Iterator[None]:
    """Another session holds the strongest lock on ``usage_records`` until the block ends:
    every statement of the writer's (even the staging table's ``CREATE … AS SELECT``) waits."""
    if url.startswith("sqlite"):
        path = normalize_url(url).database
        assert path is not None
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            yield
        finally:
            locker.rollback()
            locker.close()
        return
    with psycopg.connect(_libpq(url)) as conn:
        conn.execute(f"LOCK TABLE {usage_records.name} IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.rollback()


def waiting_on_a_lock(url: str) -> bool:
    """Whether a session of the database at ``url`` is waiting for a lock (PostgreSQL), or,
    on SQLite, which cannot tell, after giving the writer time to get there."""
    if url.startswith("sqlite"):
        time.sleep(0.3)
        return True
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return row is not None and row[0] > 0


def close_in_time(writer: LedgerWriter, timeout: float) -> tuple[threading.Thread, float]:
    """Call ``writer.close(timeout)`` in a daemon thread; (that thread, seconds it took, or
    inf if it is still blocked ``MARGIN`` seconds past the timeout)."""
    closer = threading.Thread(target=writer.close, args=(timeout,), name="closer", daemon=True)
    started = time.monotonic()
    closer.start()
    closer.join(timeout + MARGIN)
    return closer, float("inf") if closer.is_alive() else time.monotonic() - started


def finish(writer: LedgerWriter, closer: threading.Thread) -> None:
    """After the lock is released: let the closer and a writer thread ``close()`` left
    running end (a statement that was stuck returns), so that the files and the table are
    still while they are counted."""
    closer.join(30)
    assert not closer.is_alive()
    thread = writer._thread
    if thread is not None:
        thread.join(30)
        assert not thread.is_alive()


def spilled_ids(spill_path: Path) -> set[str]:
    return {r.request_id for r in SpillFile(spill_path).read_all()}


def replay_with_a_successor(engine: Engine, spill_path: Path) -> None:
    successor = LedgerWriter(engine, spill_path=spill_path)
    successor.start()
    successor.close(30)
    assert successor.stats().pending == 0
    assert not spill_path.exists()


@pytest.fixture
def migrated(db_url: str) -> Iterator[tuple[str, Engine]]:
    migrate(db_url)
    engine = create_engine_for(db_url)
    yield db_url, engine
    engine.dispose()


def assert_none_lost_nor_stored_twice(
    url: str, engine: Engine, spill_path: Path, everything: set[str]
) -> None:
    """Each record is in the table or (still) in the spill file, and once the spill file is
    replayed (by a successor writer), each is stored exactly once."""
    rows, stored = stored_ids(url)
    assert rows == len(stored)
    assert stored | spilled_ids(spill_path) == everything
    replay_with_a_successor(engine, spill_path)
    assert stored_ids(url) == (len(everything), everything)


def test_close_returns_in_time_while_a_replay_waits_on_a_locked_table(
    migrated: tuple[str, Engine], tmp_path: Path
) -> None:
    """The writer replays a spill file left by an earlier run into a locked table; records
    arrive meanwhile. ``close()`` must not wait for the stuck replay to spill them."""
    url, engine = migrated
    spill_path = tmp_path / "spill.jsonl"
    left_before = [build_record(i) for i in range(30)]
    SpillFile(spill_path).append(left_before)
    arriving = [build_record(i) for i in range(30, 55)]
    everything = {r.request_id for r in [*left_before, *arriving]}

    writer = LedgerWriter(engine, spill_path=spill_path, batch_size=10, flush_interval=0.05)
    with table_locked(url):
        writer.start()
        assert wait_until(lambda: waiting_on_a_lock(url))  # the replay is stuck
        for record in arriving:
            writer.submit(record)
        closer, took = close_in_time(writer, CLOSE_TIMEOUT)
    finish(writer, closer)
    assert took <= CLOSE_TIMEOUT + MARGIN, f"close({CLOSE_TIMEOUT}) took {took:.1f} s"

    assert_none_lost_nor_stored_twice(url, engine, spill_path, everything)


def test_close_returns_in_time_while_a_batch_waits_on_a_locked_table(
    migrated: tuple[str, Engine], tmp_path: Path
) -> None:
    """The same for the ordinary batch write: the batch in flight is spilled with the queue;
    if the stuck statement then commits it, the replay does not store it twice."""
    url, engine = migrated
    spill_path = tmp_path / "spill.jsonl"
    records = [build_record(i) for i in range(40)]
    everything = {r.request_id for r in records}

    writer = LedgerWriter(engine, spill_path=spill_path, batch_size=10, flush_interval=0.05)
    writer.start()
    with table_locked(url):
        for record in records[:10]:
            writer.submit(record)
        assert wait_until(lambda: waiting_on_a_lock(url))  # the first batch is stuck
        for record in records[10:]:
            writer.submit(record)
        closer, took = close_in_time(writer, CLOSE_TIMEOUT)
        stats = writer.stats()
    finish(writer, closer)
    assert took <= CLOSE_TIMEOUT + MARGIN, f"close({CLOSE_TIMEOUT}) took {took:.1f} s"
    assert stats.pending == 0
    # The in-flight batch is in the spill file even if its statement commits later.
    assert spilled_ids(spill_path) >= {r.request_id for r in records[:10]}

    assert_none_lost_nor_stored_twice(url, engine, spill_path, everything)


def test_a_statement_timeout_turns_a_locked_table_into_a_failure_the_writer_rides_out(
    pg_database_url: str, tmp_path: Path
) -> None:
    """While the table stays locked the writer's statements give up after its
    ``statement_timeout``: it counts failures, backs off and spills the overflow (memory
    stays bounded) instead of waiting forever; once the lock goes, everything lands once.
    The timeout is the writer's own: it does not stay on the connections it returns to a
    shared engine's pool."""
    url = pg_database_url
    migrate(url)
    # One connection: the one the writer used is the one checked for a leaked setting.
    engine = create_engine(normalize_url(url), pool_size=1, max_overflow=0)
    spill_path = tmp_path / "spill.jsonl"
    records = [build_record(i) for i in range(200)]
    everything = {r.request_id for r in records}
    writer = LedgerWriter(
        engine, spill_path=spill_path, batch_size=10, flush_interval=0.05, max_pending=20,
        retry_initial=0.05, retry_max=0.1, statement_timeout=0.3,
    )  # fmt: skip
    writer.start()
    try:
        with table_locked(url):
            for record in records:
                writer.submit(record)
            assert wait_until(lambda: writer.stats().failures >= 2)
            assert wait_until(lambda: writer.stats().pending <= 20)  # the rest went to disk
            during = writer.stats()
        assert not during.healthy and during.spilled >= 180
        assert writer.flush(30)
        after = writer.stats()
        assert after.healthy and after.pending == 0
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar_one() == "0"
    finally:
        writer.close(30)
        engine.dispose()
    assert not spill_path.exists()
    assert stored_ids(url) == (len(everything), everything)


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_a_statement_timeout_must_be_positive_or_none(timeout: float, tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with pytest.raises(ValueError, match="statement_timeout"):
        LedgerWriter(engine, spill_path=tmp_path / "spill.jsonl", statement_timeout=timeout)
    LedgerWriter(engine, spill_path=tmp_path / "spill.jsonl", statement_timeout=None)
    engine.dispose()
