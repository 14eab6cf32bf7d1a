"""Usage exports on PostgreSQL as a cluster runs them: a record that commits below ids already
exported (ids are handed out before commit) is still exported, once; two instances exporting
the same export never both send a batch; and the cursor's arithmetic (``advance``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from sluicegate.accounting.export import Cursor, CursorStore, Exporter, advance
from sluicegate.accounting.pricing import PriceTable
from sluicegate.accounting.rollups import POSTGRES_OVERLAP, Rollups
from sluicegate.clock import FakeClock
from sluicegate.config.loader import parse_config
from sluicegate.metrics.registry import GatewayMetrics
from sluicegate.simulator.event_hub import FakeEventHub
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import migrate
from sluicegate.storage.schema import usage_records
from tests.accounting.conftest import write_ledger
from tests.accounting.test_export import drain, exporter, hub, ledger_ids, received
from tests.accounting.test_rollups_cli import CONFIG, T0, records
from tests.accounting.test_rollups_races import insert_uncommitted
from tests.support.pg import pg_database_url  # noqa: F401  (the fixture)

__all__ = ["hub"]  # the fixture, shared


@pytest.fixture
def pg_engine(pg_database_url: str) -> Iterator[Engine]:  # noqa: F811  (the fixture)
    migrate(pg_database_url)
    eng = create_engine_for(pg_database_url)
    yield eng
    eng.dispose()


async def test_a_record_committing_below_exported_ids_is_exported_once(
    pg_engine: Engine, tmp_path: Path, hub: FakeEventHub
) -> None:
    """Two ledger transactions: the first takes an id, the second a higher one and commits
    first; the export sends the second, then the first once it commits, and neither again."""
    engine = pg_engine
    write_ledger(engine, tmp_path, records(2))
    late, newer = records(2, T0 + 600)
    late.request_id, newer.request_id = "late", "newer"
    async with exporter(engine, hub) as ex:
        assert await drain(ex) == 2
        ledger = insert_uncommitted(engine, late)
        try:
            write_ledger(engine, tmp_path, [newer])
            assert await drain(ex) == 1  # newer only: late is not visible yet
            late_id = ledger.execute(
                select(usage_records.c.id).where(usage_records.c.request_id == "late")
            ).scalar_one()
            state = CursorStore(engine, "usage-hub").state()
            assert state is not None
            assert state[0].upto > late_id and state[0].gaps == ((late_id, late_id),)
            ledger.commit()
        finally:
            ledger.close()
        assert await drain(ex) == 1  # no newer record needed
        assert await drain(ex) == 0
    # Another instance (nothing in memory) sends nothing again.
    async with exporter(engine, hub) as other:
        assert await drain(other) == 0
    got = [e["request_id"] for e in received(hub)]
    assert sorted(got) == sorted(ledger_ids(engine)) and len(got) == len(set(got)) == 4
    assert got[-2:] == ["newer", "late"]
    state = CursorStore(engine, "usage-hub").state()
    assert state is not None and state[0].gaps == () and state[2] == 0


async def test_two_instances_never_send_the_same_batch(
    pg_engine: Engine,
    pg_database_url: str,  # noqa: F811  (the fixture)
    tmp_path: Path,
    hub: FakeEventHub,
) -> None:
    """Two gateways (two engines) run the same export on one database: while one holds the
    cursor the other skips; run together, every record arrives exactly once."""
    second_engine = create_engine_for(pg_database_url)
    try:
        write_ledger(pg_engine, tmp_path, records(30))
        async with (
            exporter(pg_engine, hub, batch_size=5) as a,
            exporter(second_engine, hub, batch_size=5) as b,
        ):
            await a.run_once()  # creates the cursor, sends 5
            claim = await asyncio.to_thread(a.store.claim)
            assert claim is not None
            try:
                skipped = await b.run_once()
                assert skipped.skipped and skipped.sent == 0
            finally:
                await asyncio.to_thread(claim.release)

            async def run(ex: Exporter) -> None:
                for _ in range(40):
                    await ex.run_once()

            await asyncio.gather(run(a), run(b))
        assert a.sent + b.sent == 30  # however they shared the cycles
        ids = [e["record_id"] for e in received(hub)]
        assert sorted(ids) == sorted(ledger_ids(pg_engine).values())
        assert len(ids) == len(set(ids)) == 30
    finally:
        second_engine.dispose()


def lag_lines(metrics: GatewayMetrics) -> list[str]:
    """The export lag series ``metrics`` exposes (no HELP/TYPE lines)."""
    text = metrics.render().decode()
    return [line for line in text.splitlines() if line.startswith("sluicegate_export_lag_")]


async def test_an_instance_that_finds_the_cursor_held_reports_no_lag(
    pg_engine: Engine,
    pg_database_url: str,  # noqa: F811  (the fixture)
    tmp_path: Path,
    hub: FakeEventHub,
) -> None:
    """Each instance reports the lag it saw in its last cycle; one whose cycle found the
    cursor held by another saw nothing: it drops its series rather than repeat an old figure
    (which summed, or maxed, with the holder's would report a backlog already delivered), and
    reports again once it holds the cursor."""
    second_engine = create_engine_for(pg_database_url)
    ma, mb = GatewayMetrics(), GatewayMetrics()
    try:
        write_ledger(pg_engine, tmp_path, records(12))
        async with (
            exporter(pg_engine, hub, metrics=ma, batch_size=5) as a,
            exporter(second_engine, hub, metrics=mb, batch_size=5) as b,
        ):
            assert (await b.run_once()).sent == 5
            assert 'sluicegate_export_lag_records{export="usage-hub"} 7.0' in lag_lines(mb)
            claim = await asyncio.to_thread(a.store.claim)  # a's cycle, sending
            assert claim is not None
            try:
                assert (await b.run_once()).skipped
            finally:
                await asyncio.to_thread(claim.release)
            assert lag_lines(mb) == []
            assert await drain(a) == 7
            assert 'sluicegate_export_lag_records{export="usage-hub"} 0.0' in lag_lines(ma)
            assert lag_lines(mb) == []  # still nothing seen: not the old 7
            assert (await b.run_once()).sent == 0  # holds it again: reports again
            assert lag_lines(mb) == [
                'sluicegate_export_lag_records{export="usage-hub"} 0.0',
                'sluicegate_export_lag_seconds{export="usage-hub"} 0.0',
            ]
    finally:
        second_engine.dispose()


# -- the cursor's arithmetic -----------------------------------------------------------------


def test_advance_keeps_the_missing_ids_as_gaps_on_postgresql() -> None:
    cursor = Cursor(10, ((4, 4), (7, 8)))
    # Read 7, 12, 15 (complete): 4 and 8 still missing, 11, 13-14 new gaps.
    move = advance(cursor, [7, 12, 15], complete=True, keep_gaps=True)
    assert move.upto == 15 and move.lost == 0
    assert move.gaps == ((4, 4), (8, 8), (11, 11), (13, 14))
    # Truncated after id 7: the gaps above it and everything above 10 stay to be read.
    move = advance(cursor, [7], complete=False, keep_gaps=True)
    assert move.upto == 10 and move.gaps == ((4, 4), (8, 8))
    # SQLite: a missing id is a purged record, lost at once.
    move = advance(Cursor(10), [11, 14], complete=True, keep_gaps=False)
    assert move == type(move)(14, (), 2)


def test_advance_gives_up_gaps_that_fall_out_of_the_window() -> None:
    cursor = Cursor(100, ((50, 59),))
    top = 100 + POSTGRES_OVERLAP + 60
    move = advance(cursor, [top], complete=True, keep_gaps=True)
    # 50-59 and 101-160 are more than POSTGRES_OVERLAP ids below the new top: given up.
    assert move.upto == top and move.gaps == ((161, top - 1),) and move.lost == 10 + 60


def test_an_incomplete_read_must_have_sent_something() -> None:
    with pytest.raises(ValueError, match="incomplete"):
        advance(Cursor(3), [], complete=False, keep_gaps=True)


async def test_a_holder_that_stops_talking_loses_the_cursor_after_the_hold_bound(
    pg_engine: Engine, tmp_path: Path, hub: FakeEventHub
) -> None:
    """The row lock is held across the send. A holder that goes silent with its connection
    open (a frozen process or VM, a partition) would keep every other instance's export
    skipping until the server noticed; the server ends its transaction once it has been
    idle ``hold_seconds``, another instance takes the cursor, and the silent one's late move
    fails (moves nothing)."""
    write_ledger(pg_engine, tmp_path, records(3))
    async with exporter(pg_engine, hub) as ex:
        await asyncio.to_thread(ex.store.ensure, "earliest")
    frozen = CursorStore(pg_engine, "usage-hub", hold_seconds=0.3)
    claim = await asyncio.to_thread(frozen.claim)
    assert claim is not None
    try:
        await asyncio.sleep(0.8)  # sending, silently, past the bound
        async with exporter(pg_engine, hub) as other:
            assert await drain(other) == 3  # not skipped
        with pytest.raises(DBAPIError, match="idle-in-transaction"):
            await asyncio.to_thread(claim.move, advance(claim.cursor, [1], True, keep_gaps=True), 1)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(claim.release)
    state = CursorStore(pg_engine, "usage-hub").state()
    assert state is not None and state[1] == 3  # the silent holder's move counted nothing


async def test_start_latest_exports_a_record_in_flight_when_the_export_is_created(
    pg_engine: Engine, tmp_path: Path, hub: FakeEventHub
) -> None:
    """``start: latest`` exports what commits after the export is created. On PostgreSQL a
    record whose id was handed out before (in flight) can commit after, below the newest id:
    the ids missing below it when the cursor is created are its first gaps, so that record
    is exported when it commits (the committed ones are not)."""
    write_ledger(pg_engine, tmp_path, records(2))
    late, newer = records(2, T0 + 600)
    late.request_id, newer.request_id = "late", "newer"
    ledger = insert_uncommitted(pg_engine, late)
    try:
        write_ledger(pg_engine, tmp_path, [newer])
        async with exporter(pg_engine, hub, start="latest") as ex:
            assert await drain(ex) == 0  # the cursor starts above "newer"
            ledger.commit()
            assert await drain(ex) == 1
            assert await drain(ex) == 0
    finally:
        ledger.close()
    assert [e["request_id"] for e in received(hub)] == ["late"]
    state = CursorStore(pg_engine, "usage-hub").state()
    assert state is not None and state[0].gaps == () and state[2] == 0


async def test_the_lag_is_never_negative_once_retention_emptied_the_ledger(
    pg_engine: Engine, tmp_path: Path, hub: FakeEventHub
) -> None:
    """PostgreSQL's purge takes every raw record of a quiet ledger (no newest row is kept, as
    on SQLite): the highest id is then none, not below the cursor's."""
    metrics = GatewayMetrics()
    write_ledger(pg_engine, tmp_path, records(3))
    clock = FakeClock(T0)
    rollups = Rollups(pg_engine, PriceTable(parse_config(CONFIG)), clock)
    async with exporter(pg_engine, hub, metrics=metrics) as ex:
        assert await drain(ex) == 3
        rollups.catch_up()
        clock.set(T0 + 3 * 86400)
        assert rollups.purge(raw_days=1, hourly_days=None).raw_deleted == 3
        assert await drain(ex) == 0
    assert 'sluicegate_export_lag_records{export="usage-hub"} 0.0' in metrics.render().decode()
