"""Cluster mode with its PostgreSQL down: the gateway stays ready and serves (records spill and
reach the ledger later), starts while the database is unreachable (503 until it answers), and,
with ``storage.max_stale_seconds``, stops trusting a subscription view that old.

Each test has a PostgreSQL server of its own (``PostgresServer``) that it stops and starts; the
shared one on 5432 is never touched. Redis is the shared one, under a prefix per test."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from sluicegate.simulator.server import SimulatorThread
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.reports import fetch_records
from tests.integration.test_lifecycle import BODY, CHAT
from tests.support.gateway import GatewayProcess, gateway_config
from tests.support.pg import PostgresServer

REQUEST_ID = "x-sluicegate-request-id"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def pg() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


def cluster_gateway(
    tmp_path: Path, sim: SimulatorThread, db_url: str, **storage: Any
) -> GatewayProcess:
    cfg = gateway_config(
        tmp_path,
        {"sim": sim.url},
        storage_url=db_url,
        mode="cluster",
        redis={"url": "redis://127.0.0.1:6379/0", "prefix": f"sgt-{secrets.token_hex(4)}"},
    )
    cfg["storage"].update(storage)
    return GatewayProcess(tmp_path, cfg)


@contextlib.contextmanager
def serving(
    tmp_path: Path, sim: SimulatorThread, pg: PostgresServer, **storage: Any
) -> Iterator[tuple[GatewayProcess, str, str]]:
    """A ``cluster_gateway`` on a new database ``gw`` of ``pg`` (with these ``storage``
    settings), started, and a key it already sees: (gateway, key, database url). The gateway
    is killed at the end (a test that checks its exit calls ``terminate()`` first)."""
    db_url = pg.create_database("gw")
    gw = cluster_gateway(tmp_path, sim, db_url, **storage)
    key = gw.create_key()["primary_key"]
    try:
        gw.start()
        gw.wait_visible(key)
        yield gw, key, db_url
    finally:
        gw.kill()


def readyz(gw: GatewayProcess) -> tuple[int, dict[str, Any]]:
    r = httpx.get(f"{gw.url}/readyz", timeout=10)
    body: dict[str, Any] = r.json()
    return r.status_code, body


def chat(gw: GatewayProcess, key: str) -> httpx.Response:
    return httpx.post(gw.url + CHAT, json=BODY, headers={"api-key": key}, timeout=30)


def eventually(check: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until ``check()`` held; fails the test after ``within``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def test_postgres_down_gateway_stays_ready_serves_and_writes_records_later(
    tmp_path: Path, simulator: SimulatorThread, pg: PostgresServer
) -> None:
    with serving(tmp_path, simulator, pg) as (gw, key, db_url):
        assert readyz(gw)[0] == 200
        pg.stop()
        served = [chat(gw, key) for _ in range(20)]
        assert [r.status_code for r in served] == [200] * 20
        time.sleep(1)  # the refresher polls every 0.2 s: it has seen the outage
        status, body = readyz(gw)
        # The old /readyz pinged the database: 503 here, for every instance at once.
        assert status == 200, body
        assert body["subscriptions"] == "loaded"
        assert body["database"] == "unreachable"
        assert body["ledger"] == "spilling"
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert "sluicegate_ready 1.0" in metrics
        assert "sluicegate_database_reachable 0.0" in metrics
        pg.start()
        eventually(lambda: readyz(gw)[1]["database"] == "ok", 15, "database seen back")
        assert gw.terminate() == 0  # flushes the ledger
    engine = create_engine_for(db_url)
    try:
        stored = {r.request_id for r in fetch_records(engine, limit=100_000)}
    finally:
        engine.dispose()
    assert {r.headers[REQUEST_ID] for r in served} <= stored


def test_gateway_started_while_postgres_is_down_answers_503_then_serves(
    tmp_path: Path, simulator: SimulatorThread, pg: PostgresServer
) -> None:
    db_url = pg.create_database("gw")
    gw = cluster_gateway(tmp_path, simulator, db_url)
    key = gw.create_key()["primary_key"]  # migrates the database too
    pg.stop()
    try:
        gw.start()  # the old start failed here: "could not start: … Connection refused"
        status, body = readyz(gw)
        assert status == 503
        assert body["subscriptions"] == "loading"
        assert body["database"] == "unreachable"
        r = chat(gw, key)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "SubscriptionsLoading"
        assert set(r.json()["error"]) == {"code", "message"}
        assert int(r.headers["retry-after"]) >= 1
        sdk = openai.AzureOpenAI(
            azure_endpoint=gw.url, api_key=key, api_version="2024-10-21", max_retries=0
        )
        with pytest.raises(openai.InternalServerError) as refused:
            sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=4)
        assert refused.value.status_code == 503
        pg.start()
        waited = eventually(lambda: chat(gw, key).status_code == 200, 10, "served after start")
        assert waited < 10
        made = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=4)
        assert made.choices
        status, body = readyz(gw)
        assert (status, body["subscriptions"], body["database"]) == (200, "loaded", "ok")
        assert gw.terminate() == 0
    finally:
        gw.kill()
    log = gw.log_path.read_text()
    assert "unreachable at start" in log
    assert "Traceback" not in log


def test_start_with_postgres_down_migrates_when_it_answers(
    tmp_path: Path, simulator: SimulatorThread, pg: PostgresServer
) -> None:
    # A database never migrated: the instance waits for it, then runs the migrations a start
    # would have run, and serves the keys made afterwards.
    db_url = pg.create_database("fresh")
    gw = cluster_gateway(tmp_path, simulator, db_url)
    pg.stop()
    try:
        gw.start()
        assert readyz(gw)[0] == 503
        pg.start()
        eventually(lambda: readyz(gw)[0] == 200, 10, "ready after migrating")
        key = gw.create_key()["primary_key"]
        gw.wait_visible(key)
        assert chat(gw, key).status_code == 200
        assert gw.terminate() == 0
    finally:
        gw.kill()


def test_subscription_view_older_than_max_stale_seconds_refuses_requests(
    tmp_path: Path, simulator: SimulatorThread, pg: PostgresServer
) -> None:
    with serving(tmp_path, simulator, pg, max_stale_seconds=2) as (gw, key, _):
        time.sleep(3)  # longer than the bound, with the database up: no refusal
        assert chat(gw, key).status_code == 200
        pg.stop()
        down = time.monotonic()
        eventually(lambda: chat(gw, key).status_code == 503, 10, "refused when stale")
        assert time.monotonic() - down >= 1.0  # the last view served meanwhile
        r = chat(gw, key)
        assert r.json()["error"]["code"] == "SubscriptionViewStale"
        assert "retry-after" in r.headers
        status, body = readyz(gw)
        assert (status, body["subscriptions"]) == (503, "stale")
        pg.start()
        eventually(lambda: chat(gw, key).status_code == 200, 10, "served again")
        assert readyz(gw)[0] == 200
        assert gw.terminate() == 0


def test_postgres_down_and_spill_file_unwritable_makes_the_gateway_unready(
    tmp_path: Path, simulator: SimulatorThread, pg: PostgresServer
) -> None:
    # Records could be neither written nor spilled: they would be lost, so out of rotation.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the spill directory's parent should be")
    spill_dir = str(blocker / "spill")
    with serving(tmp_path, simulator, pg, spill_dir=spill_dir) as (gw, key, _):
        assert readyz(gw)[0] == 200  # the database takes the records: no spill file needed
        pg.stop()
        assert chat(gw, key).status_code == 200
        time.sleep(1)
        status, body = readyz(gw)
        assert status == 503, body
        assert body["ledger"] == "failing"
        assert "not a directory" in body["ledger_problem"]
        pg.start()
        eventually(lambda: readyz(gw)[0] == 200, 15, "ready once records are written")
