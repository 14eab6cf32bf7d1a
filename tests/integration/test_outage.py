"""PostgreSQL stopped for 20 seconds under load, through a real gateway: every usage record
arrives exactly once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from sluicegate.simulator.server import SimulatorThread
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.reports import fetch_records
from tests.integration.conftest import sim_config
from tests.integration.test_lifecycle import BODY, CHAT, wait_status
from tests.support.gateway import GatewayProcess, gateway_config
from tests.support.pg import PostgresServer


def test_postgres_down_for_20_seconds_under_load(tmp_path: Path) -> None:
    sim = SimulatorThread(sim_config())
    sim.start()
    pg = PostgresServer()
    pg.start()
    url = pg.create_database("ledger")
    cfg = gateway_config(tmp_path, {"sim": sim.url}, storage_url=url, mode="embedded")
    gw = GatewayProcess(tmp_path, cfg)
    answered: list[int] = []
    try:
        gw.start()
        made = gw.create_key("starter", "o", "n")
        key = made["primary_key"]
        wait_status(gw.url, key, 200, within=2)
        stop = threading.Event()

        def client(stream: bool) -> None:
            with httpx.Client(base_url=gw.url, timeout=30) as c:
                while not stop.is_set():
                    r = c.post(CHAT, json={**BODY, "stream": stream}, headers={"api-key": key})
                    answered.append(r.status_code)
                    time.sleep(0.02)

        threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(3)
        pg.stop()
        down_at = len(answered)
        time.sleep(20)
        served_while_down = len(answered) - down_at
        ready = httpx.get(f"{gw.url}/readyz").status_code
        pg.start()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert gw.terminate() == 0
    finally:
        gw.kill()
        log = httpx.get(f"{sim.url}/_sim/log").json()
        sim.stop()
    assert ready == 200  # records spill: a database outage leaves the gateway ready...
    assert served_while_down > 100  # ...and serving
    assert set(answered) == {200}
    entries = log["entries"] if isinstance(log, dict) else log
    forwarded = {e["headers"]["x-ms-client-request-id"] for e in entries}
    engine = create_engine_for(url)
    records = fetch_records(engine, limit=1_000_000)
    engine.dispose()
    pg.cleanup()
    ids = [r.request_id for r in records]
    assert len(ids) == len(set(ids)), "a record was written twice"
    assert set(ids) == forwarded, "a record is missing"
    assert len(records) == len(answered) + 1  # + the one wait_status made
