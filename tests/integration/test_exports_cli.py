"""``sluicegate exports list`` and ``sluicegate exports rewind``: the cursor and lag of an
export that shipped records to the fake Event Hub, as a table and as JSON; a rewind by record
id and by time, after which the export's next cycles send exactly the records after the
point again; a forward move refused without ``--skip`` and, with it, the records passed over
never sent; an unknown export and a missing point.

Commands run in-process through ``main()`` on SQLite (the admin API's tests cover
PostgreSQL); the export's cycles are the real ``Exporter``'s, driven by the test."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from sluicegate.accounting.eventhub import sender_for
from sluicegate.accounting.export import Exporter
from sluicegate.clock import SystemClock
from sluicegate.config.loader import load_config
from sluicegate.config.model import GatewayConfig
from sluicegate.simulator.event_hub import EventHubThread, FakeEventHub
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.schema import usage_records
from tests.integration.test_cli_output import record, run_cli, write_config, write_records

KEY_ENV = "SG_TEST_EVENTHUB_KEY"
T0 = 1_790_000_000.0


@pytest.fixture
def hub() -> Iterator[FakeEventHub]:
    with EventHubThread(FakeEventHub(key_name="send")) as h:
        yield h


def export_cycles(config: GatewayConfig, hub: FakeEventHub) -> int:
    """Run the export's cycles until it is caught up; the events sent."""

    async def drain() -> int:
        [export] = config.exports
        engine = create_engine_for(config.storage.url)
        sender = sender_for(export, SystemClock(), {KEY_ENV: hub.key})
        try:
            ex = Exporter(export, engine, sender)
            sent = 0
            while True:
                cycle = await ex.run_once()
                assert cycle.failure is None, cycle.failure
                sent += cycle.sent
                if not cycle.more:
                    return sent
        finally:
            await sender.aclose()
            engine.dispose()

    return asyncio.run(drain())


def record_ids(hub: FakeEventHub) -> list[int]:
    return [int(e.json()["record_id"]) for e in hub.events()]


def ledger_ids(config: GatewayConfig) -> list[int]:
    engine = create_engine_for(config.storage.url)
    try:
        with engine.connect() as conn:
            return [int(i) for i in conn.scalars(select(usage_records.c.id).order_by("id"))]
    finally:
        engine.dispose()


def exported_ledger(tmp_path: Path, hub: FakeEventHub) -> tuple[GatewayConfig, str, list[int]]:
    """A configuration with the export ``usage-hub`` to ``hub`` and a ledger of four records,
    all exported: (the configuration, its path, the records' ids)."""
    export: dict[str, Any] = {
        "name": "usage-hub",
        "type": "event_hub",
        "url": hub.url,
        "sas_key_name": "send",
        "sas_key_env": KEY_ENV,
        "start": "earliest",
    }
    path = write_config(tmp_path, f"sqlite:///{tmp_path / 'l.db'}", exports=[export])
    config = load_config(path)
    write_records(
        path, tmp_path, [record(i, T0 + 10 * i, "sub-1", refused=False) for i in range(4)]
    )
    ids = ledger_ids(config)
    assert export_cycles(config, hub) == 4
    return config, str(path), ids


def test_exports_list_and_rewind(
    tmp_path: Path,
    hub: FakeEventHub,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, c, ids = exported_ledger(tmp_path, hub)

    code, out, err = run_cli(capsys, "exports", "list", "-c", c, "--json")
    assert code == 0, err
    [item] = json.loads(out)["items"]
    assert item["name"] == "usage-hub" and item["url"] == hub.url
    assert (item["last_record_id"], item["lag_records"], item["exported"]) == (ids[-1], 0, 4)
    assert item["sent_since_start"] is None  # not a running gateway

    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run_cli(capsys, "exports", "list", "-c", c)
    assert code == 0, err
    assert "usage-hub" in out and str(ids[-1]) in out

    # Back by record id: the next cycles send exactly the records above it again.
    code, out, err = run_cli(
        capsys, "exports", "rewind", "usage-hub", "-c", c, "--after-record-id", str(ids[1])
    )
    assert code == 0, err
    assert f"from record {ids[3]} to {ids[1]}" in out
    assert export_cycles(config, hub) == 2
    assert record_ids(hub)[4:] == ids[2:]

    # Back by time: from the first record at or after it.
    since = datetime.fromtimestamp(T0 + 5, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    code, out, err = run_cli(
        capsys, "exports", "rewind", "usage-hub", "-c", c, "--since", since, "--json"
    )
    assert code == 0, err
    assert json.loads(out)["last_record_id"] == ids[0]
    assert export_cycles(config, hub) == 3
    assert record_ids(hub)[6:] == ids[1:]

    # Forward past records not sent yet: refused, then skipped with --skip.
    write_records(
        Path(c), tmp_path, [record(i, T0 + 100 + i, "sub-1", refused=False) for i in (4, 5)]
    )
    newest = ledger_ids(config)[-1]
    code, out, err = run_cli(
        capsys, "exports", "rewind", "usage-hub", "-c", c, "--after-record-id", str(newest)
    )
    assert code == 1 and "would skip 2 record(s)" in err and "skip" in err
    code, out, err = run_cli(
        capsys,
        "exports",
        "rewind",
        "usage-hub",
        "-c",
        c,
        "--after-record-id",
        str(newest),
        "--skip",
    )
    assert code == 0, err
    assert "skipped 2 record(s)" in err
    assert export_cycles(config, hub) == 0
    assert len(hub.events()) == 9

    code, out, err = run_cli(capsys, "exports", "rewind", "nope", "-c", c, "--after-record-id", "0")
    assert code == 1 and "no export 'nope'" in err
    code, out, err = run_cli(capsys, "exports", "rewind", "usage-hub", "-c", c)
    assert code == 2 and "--after-record-id or --since" in err


def test_a_rewind_below_the_oldest_record_counts_nothing_lost(
    tmp_path: Path, hub: FakeEventHub, capsys: pytest.CaptureFixture[str]
) -> None:
    """Retention purged the oldest records (delivered long ago): a rewind to 0 ("the whole
    ledger") re-sends what is left, and counts none of the purged ids as lost (they were
    delivered; the lost count and its warning are for records purged before export)."""
    config, c, ids = exported_ledger(tmp_path, hub)
    engine = create_engine_for(config.storage.url)
    try:
        with engine.begin() as conn:  # what retention does
            conn.execute(usage_records.delete().where(usage_records.c.id <= ids[1]))
    finally:
        engine.dispose()

    code, out, err = run_cli(
        capsys, "exports", "rewind", "usage-hub", "-c", c, "--after-record-id", "0", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["last_record_id"] == ids[1]  # below it: no record to send
    assert export_cycles(config, hub) == 2
    assert record_ids(hub)[4:] == ids[2:]
    code, out, err = run_cli(capsys, "exports", "list", "-c", c, "--json")
    assert code == 0, err
    [item] = json.loads(out)["items"]
    assert item["lost"] == 0 and item["exported"] == 6
