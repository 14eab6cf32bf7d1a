"""LedgerWriter conformance, on SQLite and PostgreSQL: exactly once, in batches, never blocking."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from sluicegate.accounting.records import Outcome
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.ledger import LedgerWriter
from sluicegate.storage.migrations import migrate
from sluicegate.storage.reports import count_records, fetch_records
from sluicegate.storage.rows import RECORD_COLUMNS, encode_json, record_params
from sluicegate.storage.schema import usage_records
from sluicegate.storage.spill import SpillFile
from tests.storage.conftest import RecordFactory
from tests.support.pg import throwaway_database


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_records_are_stored_field_for_field(
    engine: Engine, make_record: RecordFactory, tmp_path: Path
) -> None:
    records = [
        make_record(0),
        make_record(1, outcome=Outcome.ABORTED, usage_estimated=True, ttfb_ms=None),
        make_record(2, subscription_id=None, owner=None, product=None, model=None, extra={}),
        make_record(3, status=429, outcome=Outcome.BACKEND_ERROR, error_code="429", attempt=2),
        make_record(4, caller="oid:1234", prompt_tokens=2**40, total_tokens=2**40 + 5),
    ]
    writer = LedgerWriter(engine, spill_path=tmp_path / "spill.jsonl")
    writer.start()
    for r in records:
        writer.submit(r)
    assert writer.flush(10)
    assert fetch_records(engine) == records
    stats = writer.stats()
    assert (stats.pending, stats.written, stats.failures, stats.spilled) == (0, 5, 0, 0)
    assert stats.healthy and stats.last_write_at is not None
    assert stats.last_write_seconds is not None and stats.last_write_seconds >= 0
    writer.close(10)
    assert not (tmp_path / "spill.jsonl").exists()


def test_a_record_submitted_twice_is_stored_once(
    engine: Engine, make_record: RecordFactory, tmp_path: Path
) -> None:
    writer = LedgerWriter(engine, spill_path=tmp_path / "spill.jsonl", batch_size=2)
    writer.start()
    first = make_record(1)
    for _ in range(3):
        writer.submit(first)
    writer.submit(make_record(1, attempt=2))  # a retry is a record of its own
    writer.close(10)
    rows = fetch_records(engine)
    assert [(r.request_id, r.attempt) for r in rows] == [("req-000001", 1), ("req-000001", 2)]
    assert rows[0] == first


def test_concurrent_submitters_lose_and_duplicate_nothing(
    engine: Engine, make_record: RecordFactory, tmp_path: Path
) -> None:
    threads_n, per_thread = 8, 1500
    writer = LedgerWriter(
        engine, spill_path=tmp_path / "spill.jsonl", batch_size=200, max_pending=5_000
    )
    writer.start()
    barrier = threading.Barrier(threads_n)

    def produce(k: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            writer.submit(make_record(k * per_thread + i))

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    writer.close(60)
    expected = threads_n * per_thread
    with engine.connect() as conn:
        rows, distinct = conn.execute(
            select(func.count(), func.count(func.distinct(usage_records.c.request_id)))
        ).one()
    assert (rows, distinct) == (expected, expected)
    stats = writer.stats()
    assert (stats.pending, stats.failures) == (0, 0)
    # 12,000 at once is more than ``max_pending``: whatever overflowed while the writer was
    # behind went through the spill file (the bound holds while the database is up), and
    # came back from it.
    assert stats.spilled == stats.replayed
    assert stats.written + stats.replayed == expected


def test_a_spill_file_replayed_in_parts_beside_new_records_loses_and_duplicates_nothing(
    engine: Engine, make_record: RecordFactory, tmp_path: Path
) -> None:
    """A spill file left by an earlier run, six parts long, replayed while records keep
    coming (some of them also in the file, as after a batch both committed and spilled)."""
    spill_path = tmp_path / "spill.jsonl"
    left = [make_record(i) for i in range(2_600)]
    SpillFile(spill_path).append(left)
    writer = LedgerWriter(engine, spill_path=spill_path, batch_size=100, flush_interval=0.01)
    writer.start()
    for i in range(2_500, 3_100):  # 2,500-2,599 are in the file too
        writer.submit(make_record(i))
        if i % 50 == 0:
            time.sleep(0.002)
    writer.close(60)
    stats = writer.stats()
    assert (stats.replayed, stats.written, stats.pending, stats.failures) == (2_600, 600, 0, 0)
    assert not spill_path.exists()
    with engine.connect() as conn:
        rows, distinct = conn.execute(
            select(func.count(), func.count(func.distinct(usage_records.c.request_id)))
        ).one()
    assert (rows, distinct) == (3_100, 3_100)


def test_a_full_batch_is_written_without_waiting_for_the_interval(
    engine: Engine, make_record: RecordFactory, tmp_path: Path
) -> None:
    writer = LedgerWriter(
        engine, spill_path=tmp_path / "spill.jsonl", batch_size=10, flush_interval=60
    )
    writer.start()
    for i in range(10):
        writer.submit(make_record(i))
    assert wait_until(lambda: writer.stats().written == 10)
    writer.submit(make_record(10))  # a partial batch waits for the interval ...
    time.sleep(0.2)
    assert writer.stats().written == 10
    started = time.monotonic()
    assert writer.flush(10)  # ... unless someone flushes
    assert time.monotonic() - started < 5
    assert count_records(engine) == 11
    writer.close(10)


def test_submit_before_start_and_after_close_loses_nothing(
    engine: Engine, make_record: RecordFactory, tmp_path: Path
) -> None:
    spill_path = tmp_path / "spill.jsonl"
    writer = LedgerWriter(engine, spill_path=spill_path)
    writer.submit(make_record(1))  # queued until start
    assert writer.flush(0.05) is False
    writer.start()
    assert writer.flush(10)
    writer.close(10)
    writer.submit(make_record(2))  # no thread any more: straight to the spill file
    assert writer.stats().spilled == 1
    assert [r.request_id for r in SpillFile(spill_path).read_all()] == ["req-000002"]

    successor = LedgerWriter(engine, spill_path=spill_path)
    successor.start()
    assert wait_until(lambda: successor.stats().replayed == 1)
    successor.close(10)
    assert [r.request_id for r in fetch_records(engine)] == ["req-000001", "req-000002"]
    assert not spill_path.exists()


def test_close_without_start_writes_what_was_queued(
    engine: Engine, make_record: RecordFactory, tmp_path: Path
) -> None:
    writer = LedgerWriter(engine, spill_path=tmp_path / "spill.jsonl")
    writer.submit(make_record(1))
    writer.close(10)
    assert count_records(engine) == 1
    writer.close(10)  # idempotent


def test_a_record_the_database_refuses_is_set_aside_not_retried_forever(
    engine: Engine, make_record: RecordFactory, tmp_path: Path
) -> None:
    spill_path = tmp_path / "spill.jsonl"
    writer = LedgerWriter(engine, spill_path=spill_path, batch_size=50)
    writer.start()
    poison = make_record(2, operation=None)  # NOT NULL in every database
    for r in [make_record(1), poison, make_record(3)]:
        writer.submit(r)
    assert writer.flush(10)
    writer.submit(make_record(4))  # the ledger keeps going
    writer.close(10)
    assert [r.request_id for r in fetch_records(engine)] == [
        "req-000001",
        "req-000003",
        "req-000004",
    ]
    stats = writer.stats()
    assert (stats.written, stats.rejected, stats.failures) == (3, 1, 0)
    assert [r.request_id for r in SpillFile(Path(f"{spill_path}.rejected")).read_all()] == [
        "req-000002"
    ]


def test_a_record_refused_late_in_a_large_batch_loses_and_duplicates_nothing(
    engine: Engine, make_record: RecordFactory, tmp_path: Path
) -> None:
    """A batch goes to the database in several statements (50 rows each) within one
    transaction: a record refused in the third leaves no row of the first two behind
    twice, and every other record is stored once."""
    spill_path = tmp_path / "spill.jsonl"
    writer = LedgerWriter(engine, spill_path=spill_path, batch_size=130, flush_interval=60)
    records = [make_record(i) for i in range(130)]
    records[117] = make_record(117, operation=None)  # NOT NULL in every database
    for r in records:
        writer.submit(r)
    writer.start()
    assert writer.flush(30)
    writer.close(10)
    expected = [r.request_id for i, r in enumerate(records) if i != 117]
    assert sorted(r.request_id for r in fetch_records(engine)) == expected
    stats = writer.stats()
    assert (stats.written, stats.rejected, stats.failures) == (129, 1, 0)


def test_an_engine_factory_is_called_in_the_writer_and_disposed(
    db_url: str, engine: Engine, make_record: RecordFactory, tmp_path: Path
) -> None:
    made: list[Engine] = []
    pools: list[object] = []

    def factory() -> Engine:
        made.append(create_engine_for(db_url))
        pools.append(made[-1].pool)
        return made[-1]

    writer = LedgerWriter(factory, spill_path=tmp_path / "spill.jsonl")
    writer.start()
    writer.submit(make_record(1))
    writer.close(10)
    assert len(made) == 1
    assert made[0].pool is not pools[0]  # dispose() replaces the pool, closing its connections
    assert count_records(engine) == 1


def test_repr_shows_the_state(engine: Engine, tmp_path: Path) -> None:
    writer = LedgerWriter(engine, spill_path=tmp_path / "spill.jsonl")
    assert repr(writer).startswith("<LedgerWriter new pending=0 written=0")
    writer.start()
    writer.close(5)
    assert "closed" in repr(writer)


def test_submit_never_raises_and_garbage_does_not_block_the_ledger(
    engine: Engine, make_record: RecordFactory, tmp_path: Path
) -> None:
    writer = LedgerWriter(engine, spill_path=tmp_path / "spill.jsonl")
    writer.start()
    writer.submit(None)  # type: ignore[arg-type]
    writer.submit(make_record(1))
    assert writer.flush(10)
    writer.close(10)
    assert [r.request_id for r in fetch_records(engine)] == ["req-000001"]
    stats = writer.stats()
    assert (stats.written, stats.rejected, stats.failures, stats.healthy) == (1, 1, 0, True)


def test_the_record_columns_are_the_tables() -> None:
    """The writer's parameter order is the table's columns (all but the surrogate id)."""
    assert tuple(c.name for c in usage_records.columns if c.name != "id") == RECORD_COLUMNS


def test_a_records_extra_is_stored_as_canonical_json(make_record: RecordFactory) -> None:
    """The writer's fast encoding of ``extra`` is the text ``encode_json`` gives (sorted keys,
    no spaces, UTF-8 and escapes as the stdlib writes them), and a key orjson refuses still
    encodes as the stdlib would."""
    extra = {"route": 'spill "é"\n\u2028\\', "backend_kind": "ptu", "backend_deployment": "d"}
    params = record_params(make_record(0, extra=extra))
    assert params[RECORD_COLUMNS.index("extra")] == encode_json(extra)
    odd: dict[Any, str] = {2: "two", 1: "one"}
    params = record_params(make_record(1, extra=odd))
    assert params[RECORD_COLUMNS.index("extra")] == '{"1":"one","2":"two"}'


def test_text_the_copy_format_escapes_is_stored_as_it_was(
    engine: Engine, make_record: RecordFactory, tmp_path: Path
) -> None:
    """PostgreSQL's rows go through ``COPY``'s text format, where tabs, newlines, backslashes
    and ``\\N`` mean something: values holding them come back unchanged (and on SQLite)."""
    records = [
        make_record(0, owner="tab\there", caller="back\\slash\nnew\rline", model="\\N"),
        make_record(1, error_code="\\.", deployment="ünïcødé ✓", extra={"k": "\\N\t\\."}),
        make_record(2, request_id="req-with-\\-and-|", owner="", caller=" "),
    ]
    writer = LedgerWriter(engine, spill_path=tmp_path / "spill.jsonl")
    writer.start()
    for r in records:
        writer.submit(r)
    writer.close(10)
    assert fetch_records(engine) == records
    assert writer.stats().rejected == 0


def test_postgresql_refusals_at_either_step_are_set_aside_and_the_writer_recovers(
    make_record: RecordFactory, tmp_path: Path
) -> None:
    """A value too long for its column fails the ``COPY`` into the staging table; a NULL in
    a NOT NULL column passes it and fails the move into ``usage_records``. Both in the very
    first batch of a connection, so the transaction that created the staging table is rolled
    back with it: the writer must create it again to write the rest, record by record, and
    afterwards in batches."""
    spill_path = tmp_path / "spill.jsonl"
    with throwaway_database() as url:
        migrate(url)
        engine = create_engine_for(url)
        try:
            writer = LedgerWriter(engine, spill_path=spill_path, batch_size=50, flush_interval=60)
            first = [make_record(i) for i in range(6)]
            first[1] = make_record(1, owner="x" * 201)  # owner is VARCHAR(200)
            first[4] = make_record(4, operation=None)  # NOT NULL
            for r in first:
                writer.submit(r)
            writer.start()
            assert writer.flush(30)
            for i in range(6, 60):
                writer.submit(make_record(i))
            writer.close(30)
            stored = [r.request_id for r in fetch_records(engine)]
            stats = writer.stats()
        finally:
            engine.dispose()
    assert stored == [f"req-{i:06d}" for i in range(60) if i not in (1, 4)]
    assert (stats.written, stats.rejected, stats.failures) == (58, 2, 0)
    rejected = SpillFile(Path(f"{spill_path}.rejected")).read_all()
    assert [r.request_id for r in rejected] == ["req-000001", "req-000004"]
