"""The ledger tools: ``ledger_cost.py`` writes every record it times (on a real SQLite file
and a real PostgreSQL database), and ``backlog.py`` reads the gauge and fits the slope."""

from __future__ import annotations

import tempfile
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

import backlog
import ledger_cost
from backlog import Trace
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import migrate
from targets import PG_SERVER


def _count(url: str) -> int:
    engine = create_engine_for(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM usage_records")).scalar_one())
    finally:
        engine.dispose()


def test_ledger_cost_writes_each_record_it_times_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate(url)
    result = ledger_cost.measure(url, records=2_000, repeats=2, spill_dir=tmp_path)
    # the warm-up's 1,000 and each repeat's records, none twice
    assert _count(url) == 1_000 + 2 * 2_000
    assert len(result["runs"]) == 2
    assert result["records_per_s"] > 0 and result["writer_cpu_us"] > 0
    assert result["database_cpu_us"] is None  # no server process to read


def test_ledger_cost_holds_more_records_than_the_gateways_backlog_bound(tmp_path: Path) -> None:
    """Its default 50,000 records once went past the writer's ``max_pending`` (20,000): the
    rest was shed to the spill file and the tool stopped ("did not write cleanly")."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate(url)
    result = ledger_cost.measure(url, records=25_000, repeats=1, spill_dir=tmp_path)
    assert _count(url) == 1_000 + 25_000
    assert result["writer_cpu_us"] > 0


def test_ledger_cost_reads_the_postgresql_backends_cpu() -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        ledger_cost.postgres_database("postgresql://postgres@127.0.0.1:5432/postgres") as url,
    ):
        result = ledger_cost.measure(url, records=2_000, repeats=1, spill_dir=Path(tmp))
        assert _count(url) == 3_000
    assert result["database_cpu_us"] is not None and result["database_cpu_us"] >= 0


def test_paced_submission_writes_every_record_and_reports_the_waits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate(url)
    result = ledger_cost.paced(url, rate=2_000, seconds=1.0, spill_dir=tmp_path, busy=0.0002)
    assert _count(url) == 1_000 + result["records"]
    assert 1_000 <= result["records"] <= 2_001
    assert 0 <= result["late_p99_ms"] <= result["late_p999_ms"] <= result["late_max_ms"]


def test_the_pending_gauge_is_read_from_prometheus_text() -> None:
    body = (
        b"# HELP sluicegate_ledger_pending_records Usage records not yet written\n"
        b"# TYPE sluicegate_ledger_pending_records gauge\n"
        b"sluicegate_ledger_pending_records_other 7.0\n"
        b"sluicegate_ledger_pending_records 1234.0\n"
    )
    assert backlog.parse_pending(body) == 1234
    assert backlog.parse_pending(b"sluicegate_ledger_pending_records 2.5e+04\n") == 25_000
    assert backlog.parse_pending(b"nothing here\n") is None


def test_growth_is_the_slope_over_the_second_half() -> None:
    seconds = [float(s) for s in range(1, 11)]
    waiting = [9_000, 9_000, 9_000, 9_000, 9_000, 100, 300, 500, 700, 900]
    trace = Trace("t", seconds, waiting, [90.0] * 10, 1000, 10.0, 0.1, 90.0, 90.0)
    assert trace.growth_per_s() == pytest.approx(200.0)
    assert Trace("t", [1.0], [5], [90.0], 10, 1.0, None, 90.0, 90.0).growth_per_s() == 0.0
    line = backlog.summary([trace])[1]
    assert line.split()[:6] == ["t", "100", "900", "200", "9000", "0.1"]


def test_an_outage_refuses_the_targets_database_and_cuts_its_connections() -> None:
    with ledger_cost.postgres_database("postgresql://postgres@127.0.0.1:5432/postgres") as url:
        database = url.rsplit("/", 1)[1]
        held = psycopg.connect(PG_SERVER + database, autocommit=True)
        try:
            assert backlog.stored_records(database) == 0
            backlog.set_connections(database, allowed=False)
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(PG_SERVER + database, connect_timeout=5)
            with pytest.raises(psycopg.OperationalError):
                held.execute("SELECT 1")  # an open connection is cut too
            backlog.set_connections(database, allowed=True)
            assert backlog.stored_records(database) == 0  # up again
        finally:
            held.close()


def test_the_outage_summary_says_whether_the_ledger_was_complete() -> None:
    common = ([1.0, 2.0], [10, 20_000], [90.0, 110.0], 1000, 2.0, 3.0, 90.0, 95.0)
    whole = Trace("a", *common, spill_mib=[0.0, 4.5], complete=True)
    short = Trace("b", *common, spill_mib=[0.0, 1.0], complete=False)
    lines = backlog.summary([whole, short])
    assert lines[1].split()[-3:] == ["110.0", "4.5", "complete"]
    assert lines[2].split()[-1] == "MISSING"
    assert "spill MiB" not in backlog.summary([Trace("c", *common)])[0]
