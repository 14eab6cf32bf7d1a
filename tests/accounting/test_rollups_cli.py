"""Rollups against the raw ledger on SQLite and PostgreSQL, and the CLI over them."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import Engine

from sluicegate.accounting.chargeback import charge_report, usage_series
from sluicegate.accounting.pricing import PriceTable
from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.accounting.rollups import Rollups
from sluicegate.cli.main import main
from sluicegate.clock import FakeClock
from sluicegate.config.loader import parse_config
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.ledger import LedgerWriter
from sluicegate.storage.migrations import migrate
from sluicegate.storage.reports import ledger_totals, usage_report
from tests.accounting.conftest import write_ledger

T0 = datetime(2026, 3, 3, 22, 0, tzinfo=UTC).timestamp()
CONFIG: dict[str, Any] = {  # a config document, as parse_config reads it
    "storage": {"url": "sqlite:///x.db"},
    "backends": [{"name": "east", "url": "http://e"}],
    "deployments": [
        {"name": "mini", "backend": "east", "model": "gpt-4o-mini"},
        {"name": "odd", "backend": "east"},
    ],
    "products": [{"name": "p"}],
    "prices": [{"deployment": "mini", "input": 1, "output": 2}],
}


def records(n: int, start: float = T0) -> list[UsageRecord]:
    return [
        UsageRecord(
            request_id=f"r{start}-{i}",
            ts=start + i * 97.0,
            subscription_id=f"sub-{i % 4}",
            owner=f"team-{i % 2}",
            product="p",
            deployment="odd" if i % 10 == 0 else "mini",
            backend="east",
            operation="chat/completions",
            status=200,
            outcome=Outcome.OK,
            model="gpt-4o-mini",
            prompt_tokens=100 + i,
            completion_tokens=10,
            total_tokens=110 + i,
        )
        for i in range(n)
    ]


def test_rollups_match_the_raw_ledger_incrementally(engine: Engine, tmp_path: Path) -> None:
    prices = PriceTable(parse_config(CONFIG))
    rollups = Rollups(engine, prices, FakeClock(T0))
    write_ledger(engine, tmp_path, records(150))  # crosses midnight
    assert rollups.catch_up().hours >= 4
    # More records, in hours already rolled up.
    write_ledger(engine, tmp_path, records(40, T0 + 3600))
    rollups.catch_up()
    rollups.catch_up()  # idempotent
    start, end = T0 - 86400, T0 + 3 * 86400
    for by in ("subscription", "owner", "deployment"):
        raw = {r.key: r for r in usage_report(engine, start=start, end=end, by=by)}
        rep = charge_report(engine, prices, start=start, end=end, by=by)
        tokens = {k: r.total_tokens for k, r in raw.items()}
        assert {r.key: r.total_tokens for r in rep.rows} == tokens
        assert {r.key: r.requests for r in rep.rows} == {k: r.requests for k, r in raw.items()}
    total = ledger_totals(engine)
    rep = charge_report(engine, prices, start=start, end=end, by="owner")
    assert rep.total.total_tokens == total.total_tokens
    mini = [r for r in records(150) + records(40, T0 + 3600) if r.deployment == "mini"]
    expected = sum(r.prompt_tokens * 1000 + r.completion_tokens * 2000 for r in mini)
    assert rep.total.paygo_nanos == expected
    assert rep.total.unpriced_records == 15 + 4
    series = usage_series(engine, prices, start=start, end=end, granularity="day", by="owner")
    assert sum(sum(v["total_tokens"]) for v in series.values.values()) == total.total_tokens


def test_cli_usage_report_forecast_and_config_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = dict(
        CONFIG,
        storage={"url": f"sqlite:///{tmp_path / 'l.db'}", "spill_dir": str(tmp_path / "spill")},
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    migrate(cfg["storage"]["url"])
    engine = create_engine_for(cfg["storage"]["url"])
    write_ledger(engine, tmp_path, records(30))
    engine.dispose()
    assert (
        main(
            [
                "usage",
                "report",
                "-c",
                str(path),
                "--from",
                "2026-03-01",
                "--to",
                "2026-04-01",
                "--by",
                "owner",
                "--format",
                "json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    by_key = {r["key"]: r for r in out["rows"]}
    assert by_key["(total)"]["total_tokens"] == sum(r.total_tokens for r in records(30))
    assert by_key["(total)"]["unpriced_records"] == 3
    assert (
        main(
            [
                "usage",
                "report",
                "-c",
                str(path),
                "--from",
                "2026-03-01",
                "--to",
                "2026-04-01",
                "--format",
                "csv",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines()[0].startswith("key,requests,attempts")
    assert main(["forecast", "-c", str(path), "--json"]) == 0
    assert "deployments" in json.loads(capsys.readouterr().out)
    assert main(["config", "check", str(path)]) == 0
    err = capsys.readouterr().err
    assert "deployment 'odd'" in err and "no price" in err


def test_rollups_stay_exact_while_the_ledger_keeps_writing(engine: Engine, tmp_path: Path) -> None:
    """Catch-ups race a live ledger writer and each other (the job and `sluicegate rollups`):
    every record is counted once, never twice (SQLite aggregates outside the write lock)."""
    prices = PriceTable(parse_config(CONFIG))
    rollups = Rollups(engine, prices, FakeClock(T0))
    other = Rollups(engine, prices, FakeClock(T0))
    writer = LedgerWriter(
        engine, spill_path=tmp_path / "spill.jsonl", flush_interval=0.001, batch_size=3
    )
    writer.start()
    stop = threading.Event()

    def race() -> None:
        while not stop.is_set():
            other.catch_up()

    racer = threading.Thread(target=race)
    racer.start()
    submitted: list[UsageRecord] = []
    runs = 0
    try:
        for wave in range(40):
            batch = records(150, T0 + wave * 7.0)  # the same few hours again and again
            for r in batch:
                r.request_id = f"w{wave}-{r.request_id}"
                writer.submit(r)
            submitted += batch
            before = ledger_totals(engine).total_tokens
            rollups.catch_up()  # while the writer commits this wave
            rolled = charge_report(engine, prices, start=T0 - 86400, end=T0 + 3 * 86400, by="owner")
            # Complete up to some moment during the catch-up, and nothing counted twice.
            assert before <= rolled.total.total_tokens <= ledger_totals(engine).total_tokens
            runs += 1
    finally:
        stop.set()
        racer.join(30)
    assert writer.flush(10)
    writer.close(10)
    rollups.catch_up()
    start, end = T0 - 86400, T0 + 3 * 86400
    rep = charge_report(engine, prices, start=start, end=end, by="owner")
    assert rep.total.requests == len(submitted) == ledger_totals(engine).requests
    assert rep.total.total_tokens == sum(r.total_tokens for r in submitted)
    mini = [r for r in submitted if r.deployment == "mini"]
    assert rep.total.paygo_nanos == sum(
        r.prompt_tokens * 1000 + r.completion_tokens * 2000 for r in mini
    )
    assert runs == 40


def test_rebuild_between_catch_ups_counts_every_record_once(engine: Engine, tmp_path: Path) -> None:
    """A price rebuild recomputes hours while newer records still wait for the next catch-up:
    that catch-up must not add them a second time."""
    prices = PriceTable(parse_config(CONFIG))
    rollups = Rollups(engine, prices, FakeClock(T0))
    first, later = records(60), records(50, T0 + 1800)  # the same hours
    write_ledger(engine, tmp_path, first)
    rollups.catch_up()
    write_ledger(engine, tmp_path, later)
    rollups.rebuild(T0 - 86400, T0 + 3 * 86400)
    rollups.catch_up()
    rep = charge_report(engine, prices, start=T0 - 86400, end=T0 + 3 * 86400, by="owner")
    assert rep.total.total_tokens == sum(r.total_tokens for r in first + later)
    assert rep.total.requests == len(first) + len(later)


def test_records_written_after_a_purge_emptied_the_ledger_are_rolled_up(
    engine: Engine, tmp_path: Path
) -> None:
    """One day of retention after quiet days: the purge deletes every record it may. SQLite
    must not hand the ids out again (catch-up reads only ids above its watermark), so there
    it keeps the newest record until a newer one exists; the new records reach charge-back."""
    prices = PriceTable(parse_config(CONFIG))
    clock = FakeClock(T0)
    rollups = Rollups(engine, prices, clock)
    kept = 1 if engine.dialect.name == "sqlite" else 0
    old = records(30)
    write_ledger(engine, tmp_path, old)
    rollups.catch_up()
    clock.set(T0 + 3 * 86400)  # two quiet days later
    purged = rollups.purge(raw_days=1, hourly_days=None)
    left = ledger_totals(engine).requests
    new = records(5, clock.now())
    write_ledger(engine, tmp_path, new)
    rollups.catch_up()
    start, end = T0 - 86400, clock.now() + 86400
    rep = charge_report(engine, prices, start=start, end=end, by="owner")
    assert rep.total.requests == len(old) + len(new)
    assert rep.total.total_tokens == sum(r.total_tokens for r in old + new)
    assert (purged.raw_deleted, left) == (len(old) - kept, kept)
    # Once newer records exist the kept one goes too; the rollups keep every record.
    clock.advance(3 * 86400)
    # SQLite: the old record it kept and every new one but the newest.
    assert rollups.purge(raw_days=1, hourly_days=None).raw_deleted == len(new)
    assert ledger_totals(engine).requests == kept
    rollups.catch_up()
    rep = charge_report(engine, prices, start=start, end=end, by="owner")
    assert rep.total.requests == len(old) + len(new)


def test_late_records_for_purged_hours_are_added_once_by_concurrent_runs(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """PostgreSQL: a record replayed from a spill file for an hour whose raw records were
    purged is added to the rollups (it cannot be recomputed), by whichever of several
    processes' runs gets there first, once: each run adds it only in the transaction that
    moves the watermark past it, from the watermark as it then is."""
    url = request.getfixturevalue("pg_database_url")
    migrate(url)
    engine = create_engine_for(url)
    try:
        prices = PriceTable(parse_config(CONFIG))
        clock = FakeClock(T0)
        old = records(20)
        write_ledger(engine, tmp_path, old)
        Rollups(engine, prices, clock).catch_up()
        clock.set(T0 + 3 * 86400)
        assert Rollups(engine, prices, clock).purge(raw_days=1, hourly_days=None).raw_deleted
        late = records(3, T0 + 60)  # old timestamps, new ids
        write_ledger(engine, tmp_path, late)

        def run(start: threading.Barrier) -> None:
            start.wait()
            Rollups(engine, prices, clock).catch_up()

        for _ in range(3):  # a race: three tries at making the runs overlap
            start = threading.Barrier(2)
            runs = [threading.Thread(target=run, args=(start,)) for _ in range(2)]
            for t in runs:
                t.start()
            for t in runs:
                t.join()
        rep = charge_report(engine, prices, start=T0 - 86400, end=T0 + 2 * 86400, by="owner")
        assert rep.total.requests == len(old) + len(late)
        assert rep.total.total_tokens == sum(r.total_tokens for r in old + late)
    finally:
        engine.dispose()
