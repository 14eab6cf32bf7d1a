"""Rollups racing purges, and records that commit late, on SQLite and PostgreSQL.

The races are interleaved deterministically, never by sleeping:

- ``before_the_first_lock`` runs a step (the real ``purge()``) at the moment another run is
  about to take the rollups' lock, i.e. after everything it read before the lock. It listens
  to the SQL the engine sends (a SQLAlchemy event), so the code under test is not changed or
  wrapped.
- A ledger transaction that has inserted a record but not committed yet is a second
  connection held open while the rollups run, then committed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select, text
from sqlalchemy.engine import Engine

from sluicegate.accounting.chargeback import charge_report
from sluicegate.accounting.periods import DAY, HOUR, floor_day
from sluicegate.accounting.pricing import PriceTable
from sluicegate.accounting.records import UsageRecord
from sluicegate.accounting.rollups import POSTGRES_OVERLAP, Rollups
from sluicegate.clock import FakeClock
from sluicegate.config.loader import parse_config
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import migrate
from sluicegate.storage.reports import ledger_totals
from sluicegate.storage.rows import record_to_row
from sluicegate.storage.schema import rollup_state, usage_daily, usage_hourly, usage_records
from tests.accounting.conftest import write_ledger
from tests.accounting.test_rollups_cli import CONFIG, T0, records
from tests.support.pg import pg_database_url  # noqa: F401  (the fixture)

PRICES = PriceTable(parse_config(CONFIG))
START, END = floor_day(T0) - DAY, floor_day(T0) + 60 * DAY  # whole days: read from usage_daily


def totals(engine: Engine) -> tuple[int, int, int]:
    """``(requests, total_tokens, cost)`` of every day charge-back reports."""
    t = charge_report(engine, PRICES, start=START, end=END, by="owner").total
    return t.requests, t.total_tokens, t.paygo_nanos


def expected(recs: list[UsageRecord]) -> tuple[int, int, int]:
    mini = [r for r in recs if r.deployment == "mini"]
    cost = sum(r.prompt_tokens * 1000 + r.completion_tokens * 2000 for r in mini)
    return len(recs), sum(r.total_tokens for r in recs), cost


def hourly_matches_daily(engine: Engine) -> bool:
    with engine.connect() as conn:
        hours = conn.execute(select(func.sum(usage_hourly.c.total_tokens))).scalar()
        days = conn.execute(select(func.sum(usage_daily.c.total_tokens))).scalar()
    return bool(hours == days)


def horizon(engine: Engine) -> float | None:
    with engine.connect() as conn:
        value = conn.execute(select(rollup_state.c.raw_purged_before)).scalar()
    return None if value is None else float(value)


@contextmanager
def before_the_first_lock(engine: Engine, step: Callable[[], Any]) -> Iterator[list[Any]]:
    """Run ``step`` once, just before the next statement that takes the rollups' lock
    (``pg_advisory_xact_lock`` / ``BEGIN IMMEDIATE``) is sent; yields a list that holds the
    step's result once it ran."""
    ran: list[Any] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if ran or not ("pg_advisory_xact_lock" in statement or statement == "BEGIN IMMEDIATE"):
            return
        ran.append(None)  # first: the step takes the lock too
        ran[0] = step()

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield ran
    finally:
        event.remove(engine, "before_cursor_execute", before)


def test_a_purge_between_reading_the_horizon_and_rebuilding_keeps_the_rollups(
    engine: Engine, tmp_path: Path
) -> None:
    """An admin rebuilds a range while the daily purge deletes its raw records: the rebuild
    read the purge horizon before the purge moved it, and must not replace the hours it can
    no longer recompute with nothing."""
    clock = FakeClock(T0)
    rollups = Rollups(engine, PRICES, clock)
    old = records(60)  # 22:00 to 23:35 on 3 March
    write_ledger(engine, tmp_path, old)
    rollups.catch_up()
    assert totals(engine) == expected(old)
    clock.set(T0 + 3 * DAY)
    with before_the_first_lock(
        engine, lambda: rollups.purge(raw_days=1, hourly_days=None)
    ) as purged:
        rollups.rebuild(START, END)
    kept = 1 if engine.dialect.name == "sqlite" else 0  # SQLite keeps its newest record
    assert purged[0].raw_deleted == len(old) - kept
    assert totals(engine) == expected(old)
    assert hourly_matches_daily(engine)


def test_a_purge_while_a_catch_up_recomputes_keeps_the_rollups(
    engine: Engine, tmp_path: Path
) -> None:
    """A PostgreSQL catch-up with nothing remembered (a new process) recomputes the hours of
    the ids it rescans below the watermark: a purge that deletes their raw records after the
    catch-up found them must not leave those hours empty."""
    clock = FakeClock(T0)
    rollups = Rollups(engine, PRICES, clock)
    old = records(60)
    write_ledger(engine, tmp_path, old)
    rollups.catch_up()
    clock.set(T0 + 3 * DAY)
    new = records(2, clock.now())
    write_ledger(engine, tmp_path, new)  # the next catch-up rescans the old ids too
    with before_the_first_lock(
        engine, lambda: rollups.purge(raw_days=1, hourly_days=None)
    ) as purged:
        Rollups(engine, PRICES, clock).catch_up()
    assert purged[0].raw_deleted == len(old)
    assert totals(engine) == expected(old + new)
    assert hourly_matches_daily(engine)


def test_a_stale_purge_does_not_move_the_horizon_back(engine: Engine, tmp_path: Path) -> None:
    """Two processes purge at once, one with a clock a day behind: the horizon never goes back
    to a time whose raw records the other one deleted (a rebuild would then recompute those
    hours from nothing)."""
    behind, ahead = FakeClock(T0 + 3 * DAY), FakeClock(T0 + 4 * DAY)
    rollups = Rollups(engine, PRICES, FakeClock(T0))
    old = records(60) + records(30, T0 + DAY)
    write_ledger(engine, tmp_path, old)
    rollups.catch_up()
    with before_the_first_lock(
        engine, lambda: Rollups(engine, PRICES, ahead).purge(raw_days=1, hourly_days=None)
    ):
        Rollups(engine, PRICES, behind).purge(raw_days=1, hourly_days=None)
    assert horizon(engine) == floor_day(ahead.now() - DAY)
    rollups.rebuild(START, END)
    assert totals(engine) == expected(old)


def past_the_overlap(engine: Engine) -> None:
    """PostgreSQL: make the next ids too far above the ones written so far for a catch-up to
    rescan those (it rescans ``POSTGRES_OVERLAP`` ids below its watermark)."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(
                text("SELECT setval(pg_get_serial_sequence('usage_records', 'id'), :n)"),
                {"n": 2 * POSTGRES_OVERLAP},
            )


@pytest.mark.parametrize("raw_days", [None, 1.0])
def test_a_rebuild_of_part_of_a_day_keeps_the_day(
    engine: Engine, tmp_path: Path, raw_days: float | None
) -> None:
    """A rebuild (a price corrected) of some hours of a day recomputes the day from its hours:
    the day's row must keep what it held, also after a purge of hourly rollups."""
    clock = FakeClock(T0)
    rollups = Rollups(engine, PRICES, clock)
    old = records(60) + records(30, T0 + DAY)  # 22:00 to 23:35 on 3 and 4 March
    write_ledger(engine, tmp_path, old)
    rollups.catch_up()
    clock.set(T0 + 40 * DAY)
    purged = rollups.purge(raw_days=raw_days, hourly_days=1)
    rollups.rebuild(T0, T0 + HOUR)  # 22:00 to 23:00 on 3 March: part of the day
    assert totals(engine) == expected(old)
    if raw_days is None:
        # The raw records are kept, so any hour may still be recomputed, and its day with it
        # from its hours: hourly rollups are kept as long as their raw records are.
        assert purged.hourly_deleted == 0
    else:
        assert purged.hourly_deleted > 0


@pytest.mark.parametrize("raw_days", [None, 1.0])
def test_a_late_record_for_a_day_without_hourly_rollups_keeps_the_day(
    engine: Engine, tmp_path: Path, raw_days: float | None
) -> None:
    """A spill file replayed weeks later (old timestamps, new ids) adds to its hour and day:
    the day's row must keep what it held, also after a purge of hourly rollups."""
    clock = FakeClock(T0)
    rollups = Rollups(engine, PRICES, clock)
    old = records(60) + records(30, T0 + DAY)
    write_ledger(engine, tmp_path, old)
    rollups.catch_up()
    past_the_overlap(engine)
    clock.set(T0 + 40 * DAY)
    recent = records(2, clock.now())
    write_ledger(engine, tmp_path, recent)
    rollups.catch_up()
    rollups.purge(raw_days=raw_days, hourly_days=1)
    late = records(3, T0 + 600)
    for r in late:
        r.request_id = f"late-{r.request_id}"
    write_ledger(engine, tmp_path, late)
    rollups.catch_up()
    assert totals(engine) == expected(old + recent + late)


def insert_uncommitted(engine: Engine, record: UsageRecord) -> Any:
    """A ledger transaction that inserted ``record`` (its id handed out) and has not committed:
    the open connection, to commit later."""
    conn = engine.connect()
    conn.execute(insert(usage_records), [record_to_row(record)])
    return conn


@pytest.fixture
def pg_engine(pg_database_url: str) -> Iterator[Engine]:  # noqa: F811  (the fixture)
    """PostgreSQL only: SQLite hands ids out in commit order, no record commits below another."""
    migrate(pg_database_url)
    eng = create_engine_for(pg_database_url)
    yield eng
    eng.dispose()


def test_a_record_for_a_purged_hour_committing_below_the_watermark_is_counted(
    pg_engine: Engine, tmp_path: Path
) -> None:
    """PostgreSQL: a spill replay inserts a record for an hour whose raw records are purged;
    before it commits, another gateway commits a newer record and a catch-up moves the
    watermark past the replayed record's id. The record still reaches charge-back, once."""
    engine = pg_engine
    clock = FakeClock(T0)
    rollups = Rollups(engine, PRICES, clock)
    old = records(20)
    write_ledger(engine, tmp_path, old)
    rollups.catch_up()
    clock.set(T0 + 3 * DAY)
    assert rollups.purge(raw_days=1, hourly_days=None).raw_deleted == len(old)
    late = records(1, T0 + 60)[0]
    late.request_id = "replayed"
    replay = insert_uncommitted(engine, late)
    try:
        newer = records(1, clock.now())
        write_ledger(engine, tmp_path, newer)
        rollups.catch_up()
        replayed_id = replay.execute(
            select(usage_records.c.id).where(usage_records.c.request_id == "replayed")
        ).scalar_one()
        assert rollups.state()[0] > replayed_id  # the watermark passed it
        replay.commit()
    finally:
        replay.close()
    rollups.catch_up()  # no id above the watermark
    assert totals(engine) == expected([*old, late, *newer])
    newest = records(1, clock.now() + 60)
    newest[0].request_id = "newest"
    write_ledger(engine, tmp_path, newest)
    rollups.catch_up()  # rescans the replayed record's id: not added twice
    rollups.catch_up()
    assert totals(engine) == expected([*old, late, *newer, *newest])
    assert hourly_matches_daily(engine)


def test_a_record_committing_below_the_watermark_just_before_its_hour_is_purged_is_counted(
    pg_engine: Engine, tmp_path: Path
) -> None:
    """PostgreSQL: a record commits after the watermark passed its id, and the purge reaches
    its hour before a catch-up rescans it: the purge must not delete it uncounted."""
    engine = pg_engine
    clock = FakeClock(T0)
    rollups = Rollups(engine, PRICES, clock)
    old = records(20)
    write_ledger(engine, tmp_path, old)
    rollups.catch_up()
    slow = records(1, T0 + 90)[0]
    slow.request_id = "slow"
    ledger = insert_uncommitted(engine, slow)
    try:
        newer = records(1, T0 + 120)
        newer[0].request_id = "newer"
        write_ledger(engine, tmp_path, newer)
        rollups.catch_up()
        ledger.commit()
    finally:
        ledger.close()
    clock.set(T0 + 3 * DAY)
    rollups.purge(raw_days=1, hourly_days=None)
    rollups.catch_up()
    assert totals(engine) == expected([*old, slow, *newer])
    assert ledger_totals(engine).requests == 0
    assert hourly_matches_daily(engine)


def test_a_purge_keeps_the_cost_of_an_hour_where_the_price_changes(
    engine: Engine, tmp_path: Path
) -> None:
    """Each record is charged the price in force at its timestamp, whether its hour was
    recomputed, purged (PostgreSQL: taken into its rollup by the purge) or got a late record
    after the purge."""
    change = T0 + 1800  # 22:30 on 3 March
    prices = PriceTable(
        parse_config(
            dict(
                CONFIG,
                prices=[
                    {"deployment": "mini", "input": 1, "output": 2},
                    {"deployment": "mini", "input": 3, "output": 4, "effective_from": change},
                ],
            )
        )
    )

    def cost(recs: list[UsageRecord]) -> int:
        return sum(
            r.prompt_tokens * 1000 + r.completion_tokens * 2000
            if r.ts < change
            else r.prompt_tokens * 3000 + r.completion_tokens * 4000
            for r in recs
            if r.deployment == "mini"
        )

    def charged() -> tuple[int, int]:
        t = charge_report(engine, prices, start=START, end=END, by="owner").total
        return t.requests, t.paygo_nanos

    clock = FakeClock(T0)
    rollups = Rollups(engine, prices, clock)
    old = records(60)
    write_ledger(engine, tmp_path, old)
    rollups.catch_up()
    assert charged() == (len(old), cost(old))
    clock.set(T0 + 3 * DAY)
    rollups.purge(raw_days=1, hourly_days=None)
    assert charged() == (len(old), cost(old))
    late = records(40, T0 + 5)  # both sides of the change
    for r in late:
        r.request_id = f"late-{r.request_id}"
    write_ledger(engine, tmp_path, late)
    rollups.catch_up()
    assert charged() == (len(old) + len(late), cost(old + late))
    assert hourly_matches_daily(engine)


def matches_the_ledger(engine: Engine) -> bool:
    """The rollups charge-back reads hold exactly the raw records' requests and tokens."""
    raw = ledger_totals(engine)
    return totals(engine)[:2] == (raw.requests, raw.total_tokens)


def commit_below_the_watermark(
    engine: Engine, tmp_path: Path, rollups: Rollups, late: UsageRecord, newer: UsageRecord
) -> None:
    """``late`` is inserted, ``newer`` inserted and committed after it (a higher id), a
    catch-up with ``rollups`` moves the watermark past both, and only then does ``late``
    commit: ids out of commit order, as two ledger writers produce them on PostgreSQL."""
    ledger = insert_uncommitted(engine, late)
    try:
        write_ledger(engine, tmp_path, [newer])
        rollups.catch_up()
        late_id = ledger.execute(
            select(usage_records.c.id).where(usage_records.c.request_id == late.request_id)
        ).scalar_one()
        assert rollups.state()[0] > late_id  # the watermark passed it
        ledger.commit()
    finally:
        ledger.close()


def test_a_record_committing_below_the_watermark_is_counted_without_a_newer_record(
    pg_engine: Engine, tmp_path: Path
) -> None:
    """PostgreSQL: a record for a kept hour commits after a catch-up moved the watermark past
    its id, and no record follows it (a quiet tenant, the last hour of a day): the next
    catch-up counts it, once, also through later catch-ups and purges."""
    engine = pg_engine
    clock = FakeClock(T0)
    rollups = Rollups(engine, PRICES, clock)
    old = records(20)  # 22:00 to 22:31 on 3 March
    write_ledger(engine, tmp_path, old)
    rollups.catch_up()
    late, newer = records(2, T0 + 90)[1], records(1, T0 + 3 * HOUR)[0]
    late.request_id, newer.request_id = "late", "newer"
    commit_below_the_watermark(engine, tmp_path, rollups, late, newer)
    assert totals(engine) == expected([*old, newer])  # the late record is not counted yet
    rollups.catch_up()  # no new id
    assert totals(engine) == expected([*old, late, newer])
    assert matches_the_ledger(engine)
    assert hourly_matches_daily(engine)
    assert rollups.catch_up().hours == 0  # counted once, and not looked at again
    newest = records(1, T0 + 3 * HOUR + 60)[0]
    newest.request_id = "newest"
    write_ledger(engine, tmp_path, [newest])
    assert rollups.catch_up().hours == 1  # the new record's hour only, not those read before
    assert totals(engine) == expected([*old, late, newer, newest])
    # Another process's catch-up (it rescans below the watermark) and the purge: still once.
    Rollups(engine, PRICES, clock).catch_up()
    clock.set(T0 + 3 * DAY)
    rollups.purge(raw_days=1, hourly_days=None)
    rollups.catch_up()
    assert totals(engine) == expected([*old, late, newer, newest])
    assert ledger_totals(engine).requests == 0
    assert hourly_matches_daily(engine)


def test_a_record_committing_below_the_watermark_is_counted_by_another_process(
    pg_engine: Engine, tmp_path: Path
) -> None:
    """PostgreSQL: one gateway's catch-up moved the watermark past a record in flight; after
    it commits, with no newer record, another gateway's next catch-up counts it (one that
    read below its id before, then one that never ran), once."""
    engine = pg_engine
    clock = FakeClock(T0)
    old = records(20)
    write_ledger(engine, tmp_path, old)
    other = Rollups(engine, PRICES, clock)
    other.catch_up()
    late, newer = records(2, T0 + 90)[1], records(1, T0 + 120)[0]
    late.request_id, newer.request_id = "late", "newer"
    commit_below_the_watermark(engine, tmp_path, Rollups(engine, PRICES, clock), late, newer)
    other.catch_up()
    assert totals(engine) == expected([*old, late, newer])
    Rollups(engine, PRICES, clock).catch_up()
    other.catch_up()
    assert totals(engine) == expected([*old, late, newer])
    assert matches_the_ledger(engine)
    assert hourly_matches_daily(engine)


def test_a_record_committing_below_the_watermark_after_its_hour_was_purged_is_counted(
    pg_engine: Engine, tmp_path: Path
) -> None:
    """PostgreSQL: the watermark passed a record in flight, then the purge took its hour;
    the record commits then: the next catch-up finds it where its id was missing, and it is
    taken into its purged hour, once (not recomputed: its hour's other records are gone)."""
    engine = pg_engine
    clock = FakeClock(T0)
    rollups = Rollups(engine, PRICES, clock)
    old = records(20)
    write_ledger(engine, tmp_path, old)
    rollups.catch_up()
    late, newer = records(2, T0 + 90)[1], records(1, T0 + 3 * DAY)[0]
    late.request_id, newer.request_id = "late", "newer"
    ledger = insert_uncommitted(engine, late)
    try:
        write_ledger(engine, tmp_path, [newer])
        rollups.catch_up()
        clock.set(T0 + 3 * DAY)
        assert rollups.purge(raw_days=1, hourly_days=None).raw_deleted == len(old)
        ledger.commit()
    finally:
        ledger.close()
    rollups.catch_up()
    assert totals(engine) == expected([*old, late, newer])
    rollups.catch_up()
    assert totals(engine) == expected([*old, late, newer])
    assert ledger_totals(engine).requests == 1  # the late record was taken, as its hour
    assert hourly_matches_daily(engine)


def test_a_rolled_back_insert_below_the_watermark_leaves_the_rollups_exact(
    pg_engine: Engine, tmp_path: Path
) -> None:
    """PostgreSQL: a ledger batch that took an id and rolled back (an outage) leaves a gap
    below the watermark that never fills; later records are counted around it."""
    engine = pg_engine
    rollups = Rollups(engine, PRICES, FakeClock(T0))
    old = records(20)
    write_ledger(engine, tmp_path, old)
    rollups.catch_up()
    lost, newer = records(1, T0 + 90)[0], records(1, T0 + 120)[0]
    lost.request_id, newer.request_id = "lost", "newer"
    ledger = insert_uncommitted(engine, lost)
    try:
        write_ledger(engine, tmp_path, [newer])
        rollups.catch_up()
        ledger.rollback()
    finally:
        ledger.close()
    assert rollups.catch_up().hours == 0
    newest = records(3, T0 + 4000)
    write_ledger(engine, tmp_path, newest)
    rollups.catch_up()
    assert totals(engine) == expected([*old, newer, *newest])
    assert matches_the_ledger(engine)
