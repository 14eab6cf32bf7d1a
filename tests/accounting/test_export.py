"""Usage exports against the fake Event Hub (``simulator.event_hub``) on loopback, on SQLite
and PostgreSQL: the SAS and the batch shape as the service checks them, the events' fields,
the cursor across restarts and failures, splitting under the size limit, and lost records.

Each test drives one export's cycles itself (``Exporter.run_once``) on the test's loop, the
hub on the same loop; the gateway's own worker thread is exercised in
tests/integration/test_export_gateway.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from sluicegate.accounting.eventhub import EventHubSender, sas_token, sender_for
from sluicegate.accounting.export import EVENT_COLUMNS, CursorStore, Exporter
from sluicegate.accounting.pricing import PriceTable
from sluicegate.accounting.rollups import Rollups
from sluicegate.clock import FakeClock, SystemClock
from sluicegate.config.loader import ConfigError, environment_problems, parse_config
from sluicegate.config.model import ExportConfig, ExportIdentityConfig
from sluicegate.metrics.registry import GatewayMetrics
from sluicegate.simulator.event_hub import FakeEventHub
from sluicegate.storage.schema import usage_records
from tests.accounting.conftest import chat_record, write_ledger
from tests.accounting.test_rollups_cli import CONFIG, T0, records
from tests.support.identity_endpoint import IdentityEndpoint

KEY_ENV = "SG_TEST_EVENTHUB_KEY"


@pytest.fixture
async def hub() -> AsyncIterator[FakeEventHub]:
    h = await FakeEventHub(key_name="send").start()
    yield h
    await h.close()


def export_config(hub: FakeEventHub, **overrides: Any) -> ExportConfig:
    data: dict[str, Any] = {
        "name": "usage-hub",
        "type": "event_hub",
        "url": hub.url,
        "sas_key_name": "send",
        "sas_key_env": KEY_ENV,
        "start": "earliest",
    }
    data.update(overrides)
    return ExportConfig(**data)


@contextlib.asynccontextmanager
async def exporter(
    engine: Engine,
    hub: FakeEventHub,
    *,
    key: str | None = None,
    metrics: GatewayMetrics | None = None,
    **overrides: Any,
) -> AsyncIterator[Exporter]:
    """An export of ``engine``'s ledger to ``hub`` (its sender closed afterwards)."""
    config = export_config(hub, **overrides)
    sender = sender_for(config, SystemClock(), {KEY_ENV: hub.key if key is None else key})
    try:
        yield Exporter(config, engine, sender, observer=metrics, backoff_first=0.01)
    finally:
        await sender.aclose()


def ledger_ids(engine: Engine) -> dict[str, int]:
    """request_id → record id."""
    with engine.connect() as conn:
        rows = conn.execute(select(usage_records.c.request_id, usage_records.c.id))
        return {r.request_id: int(r.id) for r in rows}


def received(hub: FakeEventHub) -> list[dict[str, Any]]:
    return [e.json() for e in hub.events()]


async def drain(ex: Exporter) -> int:
    """Cycles until nothing more waits; the events sent."""
    sent = 0
    for _ in range(100):
        cycle = await ex.run_once()
        assert cycle.failure is None, cycle.failure
        sent += cycle.sent
        if not cycle.more:
            return sent
    raise AssertionError("the export never caught up")


# -- the wire --------------------------------------------------------------------------------


async def test_the_hub_checks_the_signature_and_the_batch_shape(hub: FakeEventHub) -> None:
    """The documented SAS format is what the hub accepts; a wrong key, an expired signature,
    another hub and a body that is not a batch are answered as Event Hubs does."""
    now = int(SystemClock().now())
    good = sas_token(hub.url, "send", hub.key, now + 60)
    sr = good.split("sr=", 1)[1].split("&", 1)[0]
    assert unquote(sr) == hub.url and "/" not in sr  # the URI, url-encoded
    batch = json.dumps([{"Body": '{"a":1}', "UserProperties": {"x": "y"}}])
    headers = {"Content-Type": "application/vnd.microsoft.servicebus.json"}
    target = f"{hub.url}/messages?timeout=60&api-version=2014-01"
    async with aiohttp.ClientSession() as http:

        async def post(auth: str, body: str = batch, url: str = target) -> tuple[int, str]:
            async with http.post(url, data=body, headers={**headers, "Authorization": auth}) as r:
                return r.status, await r.text()

        assert await post(good) == (201, "")
        status, text = await post(sas_token(hub.url, "send", "not-the-key", now + 60))
        assert status == 401 and text.startswith("<Error><Code>401</Code><Detail>InvalidSignature")
        status, text = await post(sas_token(hub.url, "send", hub.key, now - 1))
        assert status == 401 and "ExpiredToken" in text
        status, _ = await post(sas_token(hub.url, "listen", hub.key, now + 60))
        assert status == 401
        other = hub.url.rsplit("/", 1)[0] + "/other"
        status, text = await post(
            sas_token(other, "send", hub.key, now + 60), url=f"{other}/messages"
        )
        assert status == 404 and "could not be found" in text
        status, _ = await post(
            sas_token(hub.url, "send", hub.key, now + 60), url=f"{other}/messages"
        )
        assert status == 401  # a signature for one hub does not open another
        status, _ = await post(good, body='{"Body": "not in an array"}')
        assert status == 400
    assert [e.json() for e in hub.events()] == [{"a": 1}]


# -- delivery --------------------------------------------------------------------------------


async def test_records_reach_the_hub_with_their_fields(
    engine: Engine, tmp_path: Path, hub: FakeEventHub
) -> None:
    recs = [chat_record(f"req-{i}", T0 + i, f"sub-{i % 2}", 100 + i, 7) for i in range(5)]
    recs[1].streamed, recs[1].ttfb_ms, recs[1].caller = True, 12.5, "oid-1"
    recs[2].attempt, recs[2].error_code = 2, "BackendBusy"
    write_ledger(engine, tmp_path, recs)
    async with exporter(engine, hub) as ex:
        assert await drain(ex) == 5
    events = received(hub)
    ids = ledger_ids(engine)
    assert [e["record_id"] for e in events] == sorted(ids.values())
    by_request = {e["request_id"]: e for e in events}
    assert len(by_request) == len(recs)
    for rec in recs:
        event = by_request[rec.request_id]
        assert set(event) == {"record_id", *EVENT_COLUMNS}
        assert event["record_id"] == ids[rec.request_id]
        for name in EVENT_COLUMNS:
            if name == "ts":
                assert event["ts"].endswith("Z")
                assert abs(_epoch(event["ts"]) - rec.ts) < 1e-5
            elif name == "outcome":
                assert event[name] == str(rec.outcome)
            else:
                assert event[name] == getattr(rec, name), name
    props = [e.user_properties for e in hub.events()]
    assert props == [{"export": "usage-hub", "record_id": e["record_id"]} for e in events]
    auth = {a for _, a, _ in hub.requests}
    assert all(a.startswith("SharedAccessSignature sr=") for a in auth)
    assert {q for _, _, q in hub.requests} == {"timeout=60&api-version=2014-01"}
    # No secret in what was sent: neither the SAS key nor a signature.
    wire = json.dumps([[e.body, e.user_properties] for e in hub.events()])
    assert hub.key not in wire and "SharedAccessSignature" not in wire and "sig=" not in wire


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def test_the_cursor_survives_a_restart(
    engine: Engine, tmp_path: Path, hub: FakeEventHub
) -> None:
    """A new process (a new exporter, same name) goes on from the stored cursor: nothing
    sent twice, nothing missed."""
    write_ledger(engine, tmp_path, records(4))
    async with exporter(engine, hub) as first:
        assert await drain(first) == 4
    write_ledger(engine, tmp_path, records(3, T0 + 3600))
    async with exporter(engine, hub) as second:
        assert await drain(second) == 3
        assert (await second.run_once()).sent == 0
    ids = [e["record_id"] for e in received(hub)]
    assert ids == sorted(ledger_ids(engine).values())  # each once, in order
    state = CursorStore(engine, "usage-hub").state()
    assert state is not None and state[1] == 7


async def test_a_new_export_starts_at_the_latest_record_by_default(
    engine: Engine, tmp_path: Path, hub: FakeEventHub
) -> None:
    write_ledger(engine, tmp_path, records(3))
    async with exporter(engine, hub, start="latest") as ex:
        assert await drain(ex) == 0
        write_ledger(engine, tmp_path, records(2, T0 + 3600))
        assert await drain(ex) == 2
    assert {e["request_id"] for e in received(hub)} == {r.request_id for r in records(2, T0 + 3600)}


async def test_a_busy_hub_is_retried_and_everything_arrives_once(
    engine: Engine, tmp_path: Path, hub: FakeEventHub
) -> None:
    """503 ServerBusy (with Retry-After), then 429: the cursor stays, the wait honours the
    hub, and once it accepts every record arrives exactly once."""
    metrics = GatewayMetrics()
    write_ledger(engine, tmp_path, records(6))
    hub.fail_next(1, 503, retry_after=7)
    hub.fail_next(1, 429)
    async with exporter(engine, hub, metrics=metrics, batch_size=4) as ex:
        busy = await ex.run_once()
        assert busy.failure is not None and busy.failure.reason == "busy"
        assert busy.failure.retry_after == 7 and ex.next_wait(busy, 0.5) == 7
        lag = metrics.render().decode()
        assert 'sluicegate_export_lag_records{export="usage-hub"} 6.0' in lag
        assert 'sluicegate_export_lag_seconds{export="usage-hub"} 0.0' not in lag
        throttled = await ex.run_once()
        assert throttled.failure is not None and throttled.failure.reason == "throttled"
        assert ex.next_wait(throttled, 0.5) == 0.5  # no Retry-After: the backoff
        state = CursorStore(engine, "usage-hub").state()
        assert state is not None and state[0].upto == 0  # not moved
        assert received(hub) == []
        assert await drain(ex) == 6
    assert hub.statuses() == [503, 429, 201, 201]
    assert [e["record_id"] for e in received(hub)] == sorted(ledger_ids(engine).values())
    text = metrics.render().decode()
    assert 'sluicegate_export_failures_total{export="usage-hub",reason="busy"} 1.0' in text
    assert 'sluicegate_export_events_total{export="usage-hub"} 6.0' in text
    assert 'sluicegate_export_lag_seconds{export="usage-hub"} 0.0' in text


async def test_a_wrong_key_fails_as_auth_and_moves_nothing(
    engine: Engine, tmp_path: Path, hub: FakeEventHub
) -> None:
    write_ledger(engine, tmp_path, records(2))
    async with exporter(engine, hub, key="d3JvbmcK") as ex:
        cycle = await ex.run_once()
    assert cycle.failure is not None and (cycle.failure.reason, cycle.failure.status) == (
        "auth",
        401,
    )
    assert "InvalidSignature" in cycle.failure.detail and "d3JvbmcK" not in cycle.failure.detail
    async with exporter(engine, hub) as ex:
        assert await drain(ex) == 2


async def test_the_hub_answers_throttling_and_quota_as_event_hubs_does(
    hub: FakeEventHub,
) -> None:
    """``fail_next`` answers as the service: the status, an XML ``<Error>`` body whose detail
    names the condition (ServerBusy's error code 50002, QuotaExceeded's SubCode=40300, a
    network rule refusing the sender), and the ``Retry-After`` asked for."""
    now = int(SystemClock().now())
    headers = {
        "Content-Type": "application/vnd.microsoft.servicebus.json",
        "Authorization": sas_token(hub.url, "send", hub.key, now + 60),
    }
    hub.fail_next(1, "server_busy", retry_after=4)
    hub.fail_next(1, "throttled")
    hub.fail_next(1, "quota_exceeded")
    hub.fail_next(1, "forbidden")
    hub.fail_next(1, 500)
    got = []
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            async with http.post(
                f"{hub.url}/messages", data='[{"Body": "x"}]', headers=headers
            ) as r:
                got.append((r.status, r.content_type, r.headers.get("Retry-After"), await r.text()))
    assert [(s, t, w) for s, t, w, _ in got] == [
        (503, "application/xml", "4"),
        (429, "application/xml", None),
        (403, "application/xml", None),
        (403, "application/xml", None),
        (500, "application/xml", None),
    ]
    bodies = [b for _, _, _, b in got]
    assert all(b.startswith(f"<Error><Code>{s}</Code><Detail>") for s, _, _, b in got)
    assert "Error code : 50002" in bodies[0] and "SubCode=40300" in bodies[2]
    assert "Ip has been prevented" in bodies[3]
    with pytest.raises(ValueError, match="no fault"):
        hub.fail_next(1, "nonsense")
    assert hub.events() == []


async def test_throttling_and_quota_back_off_and_are_not_auth_failures(
    engine: Engine, tmp_path: Path, hub: FakeEventHub
) -> None:
    """What the hub cannot take now (503 ServerBusy, 429, 403 QuotaExceeded) leaves the cursor
    and waits (its ``Retry-After``, else the backoff) under its own reason, never ``auth``:
    that stays for 401 and for a 403 refusing the sender itself (here a network rule)."""
    metrics = GatewayMetrics()
    write_ledger(engine, tmp_path, records(3))
    hub.fail_next(1, "quota_exceeded", retry_after=9)
    hub.fail_next(1, "quota_exceeded")
    hub.fail_next(1, "server_busy")
    hub.fail_next(1, "throttled", retry_after=3)
    hub.fail_next(1, "forbidden")
    async with exporter(engine, hub, metrics=metrics) as ex:
        cycles = [await ex.run_once() for _ in range(5)]
        failures = [c.failure for c in cycles if c.failure is not None]
        assert [(f.reason, f.status) for f in failures] == [
            ("quota", 403),
            ("quota", 403),
            ("busy", 503),
            ("throttled", 429),
            ("auth", 403),
        ]
        assert [ex.next_wait(c, 0.5) for c in cycles] == [9, 0.5, 0.5, 3, 0.5]
        assert "SubCode=40300" in failures[0].detail and "50002" in failures[2].detail
        state = CursorStore(engine, "usage-hub").state()
        assert state is not None and state[0].upto == 0  # not moved
        assert received(hub) == []
        assert await drain(ex) == 3
    text = metrics.render().decode()
    assert 'sluicegate_export_failures_total{export="usage-hub",reason="quota"} 2.0' in text
    assert 'sluicegate_export_failures_total{export="usage-hub",reason="auth"} 1.0' in text
    assert [e["record_id"] for e in received(hub)] == sorted(ledger_ids(engine).values())


async def test_batches_stay_under_the_size_limit(
    engine: Engine, tmp_path: Path, hub: FakeEventHub
) -> None:
    """Batches are split by bytes (Event Hubs: 1 MB) as well as by count; a 413 halves the
    batch."""
    write_ledger(engine, tmp_path, records(40))
    async with exporter(engine, hub, batch_size=500) as ex:
        assert isinstance(ex.sender, EventHubSender)
        ex.sender.max_batch_bytes = 4_000  # ~10 of these events
        hub.max_bytes = 4_000
        assert await drain(ex) == 40
    assert len(hub.batches) >= 4 and sum(hub.batches) == 40
    assert 413 not in hub.statuses()
    hub.max_bytes = 1_500  # two or three events
    write_ledger(engine, tmp_path, records(8, T0 + 7200))
    async with exporter(engine, hub, batch_size=8) as ex:
        first = await ex.run_once()
        assert first.failure is not None and first.failure.reason == "too_large"
        assert ex.limit == 4
        for _ in range(20):
            cycle = await ex.run_once()
            assert cycle.failure is None or cycle.failure.reason == "too_large"
            if cycle.failure is None and not cycle.more:
                break
        assert ex.limit < 4
    assert [e["record_id"] for e in received(hub)] == sorted(ledger_ids(engine).values())


async def test_only_the_products_asked_for_are_exported(
    engine: Engine, tmp_path: Path, hub: FakeEventHub
) -> None:
    recs = records(6)
    for r in recs[::2]:
        r.product = "other"
    write_ledger(engine, tmp_path, recs)
    async with exporter(engine, hub, products=["p"]) as ex:
        assert await drain(ex) == 3
        assert (await ex.run_once()).sent == 0
    assert [e["product"] for e in received(hub)] == ["p"] * 3


async def test_records_purged_before_export_are_counted_lost(
    engine: Engine, tmp_path: Path, hub: FakeEventHub
) -> None:
    """Retention purges records the export has not read (it was failing for days): they are
    lost to it, counted and logged; the rest arrive."""
    metrics = GatewayMetrics()
    clock = FakeClock(T0)
    old = records(10)
    write_ledger(engine, tmp_path, old[:2])
    async with exporter(engine, hub, metrics=metrics) as ex:
        assert await drain(ex) == 2
    write_ledger(engine, tmp_path, old[2:])
    rollups = Rollups(engine, PriceTable(parse_config(CONFIG)), clock)
    rollups.catch_up()
    clock.set(T0 + 3 * 86400)
    recent = records(2, clock.now())
    write_ledger(engine, tmp_path, recent)
    rollups.catch_up()
    purged = rollups.purge(raw_days=1, hourly_days=None).raw_deleted
    assert purged == 10  # the 2 exported and the 8 not yet
    async with exporter(engine, hub, metrics=metrics) as ex:
        assert await drain(ex) == 2
        state = CursorStore(engine, "usage-hub").state()
        assert state is not None
        cursor, _, lost = state
        if engine.dialect.name == "postgresql":
            # Missing ids are waited for (they may be in flight) until they fall out of the
            # window; a later export gives them up. Here: still gaps.
            assert lost == 0 and cursor.gaps
        else:
            assert lost == 8 and cursor.gaps == ()
            assert 'sluicegate_export_lost_records_total{export="usage-hub"} 8.0' in (
                metrics.render().decode()
            )
    assert [e["request_id"] for e in received(hub)] == [r.request_id for r in [*old[:2], *recent]]


def test_the_event_hub_config_is_checked() -> None:
    base = {
        "backends": [{"name": "b", "url": "http://127.0.0.1:1"}],
        "deployments": [{"name": "d", "backend": "b"}],
        "products": [{"name": "p"}],
    }
    ok = {"name": "x", "type": "event_hub", "url": "https://ns.servicebus.windows.net/hub"}
    parsed = parse_config({**base, "exports": [{**ok, "sas_key_name": "s", "sas_key_env": "E"}]})
    assert parsed.exports[0].batch_size == 500 and parsed.exports[0].start == "latest"
    entra = parse_config({**base, "exports": [{**ok, "identity": {"type": "managed-identity"}}]})
    assert entra.exports[0].identity is not None
    assert entra.exports[0].identity.scope == "https://eventhubs.azure.net/.default"
    bad = [
        {**ok},  # no auth
        {**ok, "sas_key_name": "s", "sas_key_env": "E", "identity": {}},
        {**ok, "url": "https://ns.servicebus.windows.net", "sas_key_name": "s", "sas_key_env": "E"},
        {**ok, "sas_key_name": "s", "sas_key_env": "E", "products": ["nope"]},
        {**ok, "sas_key_name": "s", "sas_key_env": "E", "unknown": 1},
        {"name": "w", "type": "webhook", "url": "https://x", "header": "X-Key"},
    ]
    for export in bad:
        with pytest.raises(Exception):  # noqa: B017,PT011  (ConfigError, any message)
            parse_config({**base, "exports": [export]})
    twice = {**ok, "sas_key_name": "s", "sas_key_env": "E"}
    with pytest.raises(Exception, match="duplicate name"):
        parse_config({**base, "exports": [twice, twice]})


def test_config_check_names_an_unset_key_variable() -> None:
    config = parse_config(
        {
            "backends": [{"name": "b", "url": "http://127.0.0.1:1"}],
            "deployments": [{"name": "d", "backend": "b"}],
            "products": [{"name": "p"}],
            "exports": [
                {
                    "name": "x",
                    "type": "event_hub",
                    "url": "https://ns.servicebus.windows.net/hub",
                    "sas_key_name": "s",
                    "sas_key_env": "SG_TEST_UNSET_KEY",
                }
            ],
        }
    )
    assert environment_problems(config, {}) == [
        "exports[0].sas_key_env: environment variable SG_TEST_UNSET_KEY is not set"
    ]
    assert environment_problems(config, {"SG_TEST_UNSET_KEY": "k"}) == []


def test_a_missing_key_is_refused_when_the_export_is_built() -> None:
    config = ExportConfig(
        name="x",
        type="event_hub",
        url="https://ns.servicebus.windows.net/hub",
        sas_key_name="s",
        sas_key_env="SG_TEST_UNSET_KEY",
    )
    with pytest.raises(RuntimeError, match="SG_TEST_UNSET_KEY"):
        sender_for(config, SystemClock(), {})


_AZURE_VARS = (
    "MSI_ENDPOINT", "MSI_SECRET", "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT",
    "AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
)  # fmt: skip


async def test_an_entra_identity_sends_event_hubs_tokens(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``identity: managed-identity``: the token is fetched for Event Hubs' resource (by the
    backends' identity code) and sent as a bearer token, which the hub accepts."""
    write_ledger(engine, tmp_path, records(3))
    with IdentityEndpoint() as endpoint:
        for name in _AZURE_VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in endpoint.environ().items():
            monkeypatch.setenv(name, value)
        hub = await FakeEventHub(bearer_tokens=endpoint.tokens).start()
        try:
            config = ExportConfig(
                name="entra",
                type="event_hub",
                url=hub.url,
                identity=ExportIdentityConfig(type="managed-identity"),
                start="earliest",
            )
            sender = sender_for(config, SystemClock(), dict(os.environ))
            try:
                assert await drain(Exporter(config, engine, sender)) == 3
            finally:
                await sender.aclose()
        finally:
            await hub.close()
        issued = endpoint.issued()
    assert len(received(hub)) == 3
    assert issued and issued[0].params["resource"] == "https://eventhubs.azure.net"
    assert {a for _, a, _ in hub.requests} == {f"Bearer {issued[0].token}"}


async def test_the_worker_loop_backs_off_and_delivers_after_failures(
    engine: Engine, tmp_path: Path, hub: FakeEventHub
) -> None:
    """``Exporter.run``: two 503s, then the hub accepts; the loop backs off (1 s doubling in
    production, 10 ms here), delivers everything once, and stops when told."""
    write_ledger(engine, tmp_path, records(5))
    hub.fail_next(2, 503)
    stop = asyncio.Event()
    async with exporter(engine, hub, interval_seconds=0.01) as ex:
        task = asyncio.create_task(ex.run(stop))
        for _ in range(500):
            if len(hub.events()) >= 5:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 5)
    assert hub.statuses()[:3] == [503, 503, 201]
    assert [e["record_id"] for e in received(hub)] == sorted(ledger_ids(engine).values())
    assert ex.failures == 2 and ex.last_failure is None


@contextlib.asynccontextmanager
async def webhook(
    routes: dict[str, Any], secret: str = "hook-secret-1"
) -> AsyncIterator[tuple[ExportConfig, Any]]:
    """A receiver on 127.0.0.1 (``routes``: path → handler; ``/ingest`` takes the POSTs) and
    a ``webhook`` export to it, sending ``secret`` in ``X-Hook-Key``: (config, sender)."""
    from aiohttp import web

    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    config = ExportConfig(
        name="hook",
        type="webhook",
        url=f"http://127.0.0.1:{runner.addresses[0][1]}/ingest",
        header="X-Hook-Key",
        secret_env="SG_TEST_HOOK_SECRET",
        start="earliest",
    )
    sender = sender_for(config, SystemClock(), {"SG_TEST_HOOK_SECRET": secret})
    try:
        yield config, sender
    finally:
        await sender.aclose()
        await runner.cleanup()


async def test_a_webhook_gets_the_events_as_a_json_array_with_its_secret(
    engine: Engine, tmp_path: Path
) -> None:
    """``type: webhook``: one POST of a JSON array of events per batch, the configured header
    carrying the secret from the environment; any 2xx is success, a 500 is retried."""
    from aiohttp import web

    got: list[tuple[str | None, str, Any]] = []
    answers = [500, 202]

    async def receive(request: web.Request) -> web.Response:
        got.append((request.headers.get("X-Hook-Key"), request.content_type, await request.json()))
        return web.Response(status=answers.pop(0) if answers else 200)

    write_ledger(engine, tmp_path, records(3))
    async with webhook({"/ingest": receive}) as (config, sender):
        ex = Exporter(config, engine, sender)
        failed = await ex.run_once()
        assert failed.failure is not None and failed.failure.reason == "server_error"
        assert await drain(ex) == 3
    assert [(h, t) for h, t, _ in got] == [("hook-secret-1", "application/json")] * 2
    assert got[0][2] == got[1][2]  # the same batch again
    assert [e["record_id"] for e in got[1][2]] == sorted(ledger_ids(engine).values())
    assert all("hook-secret-1" not in json.dumps(e) for e in got[1][2])


async def test_a_webhook_redirect_is_a_failure_and_the_secret_stays_with_the_url(
    engine: Engine, tmp_path: Path
) -> None:
    """A 3xx is not followed: aiohttp would turn a redirected POST into a GET (the events
    dropped, its 200 taken for delivery) and carry the secret header to the redirect's host.
    The cursor stays, and the send counts as ``rejected``."""
    from aiohttp import web

    seen: list[tuple[str, str | None]] = []

    async def moved(request: web.Request) -> web.Response:
        seen.append((request.method, request.headers.get("X-Hook-Key")))
        raise web.HTTPFound(f"http://localhost:{request.url.port}/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append((request.method, request.headers.get("X-Hook-Key")))
        return web.Response(status=200)

    write_ledger(engine, tmp_path, records(2))
    async with webhook({"/ingest": moved, "/elsewhere": elsewhere}) as (config, sender):
        cycle = await Exporter(config, engine, sender).run_once()
    assert seen == [("POST", "hook-secret-1")]  # not followed to another host
    assert cycle.failure is not None and cycle.failure.reason == "rejected"
    assert cycle.failure.status == 302
    state = CursorStore(engine, "hook").state()
    assert state is not None and state[1] == 0  # nothing counted as exported


def test_an_event_hub_url_names_one_hub() -> None:
    """The REST path's ``/messages`` is the sender's to add: a ``url`` copied from the "send
    batch" page (``…/{hub}/messages``) or with another segment would post to
    ``…/messages/messages`` and sign for an entity that is not a hub; refused up front."""
    base = {
        "backends": [{"name": "b", "url": "http://127.0.0.1:1"}],
        "deployments": [{"name": "d", "backend": "b"}],
        "products": [{"name": "p"}],
    }
    sas = {"name": "x", "type": "event_hub", "sas_key_name": "s", "sas_key_env": "E"}
    for url in (
        "https://ns.servicebus.windows.net/hub/messages",
        "https://ns.servicebus.windows.net/hub/partitions/0",
    ):
        with pytest.raises(ConfigError, match="names the hub"):
            parse_config({**base, "exports": [{**sas, "url": url}]})
    ok = parse_config(
        {**base, "exports": [{**sas, "url": "https://ns.servicebus.windows.net/hub/"}]}
    )
    assert ok.exports[0].url == "https://ns.servicebus.windows.net/hub"


def test_an_export_url_with_an_unusable_port_is_refused_naming_the_export() -> None:
    """A port of 0, above 65535 or not a number (or no host at all) can never be sent to: the
    export would fail every cycle (or crash it) until someone read the log. Refused when the
    configuration is loaded, naming the export."""
    base = {
        "backends": [{"name": "b", "url": "http://127.0.0.1:1"}],
        "deployments": [{"name": "d", "backend": "b"}],
        "products": [{"name": "p"}],
    }
    sas = {"type": "event_hub", "sas_key_name": "s", "sas_key_env": "E"}
    kinds = (
        ("billing-hub", "https://ns.servicebus.windows.net{port}/hub", sas),
        ("billing-hook", "https://finance.example.com{port}/ingest", {"type": "webhook"}),
    )
    for name, url, settings in kinds:
        for port in (":0", ":99999", ":https", ":-1"):
            export = {"name": name, **settings, "url": url.format(port=port)}
            with pytest.raises(
                ConfigError, match="port must be a number from 1 to 65535"
            ) as refused:
                parse_config({**base, "exports": [export]})
            assert f"export {name!r}" in str(refused.value)
            assert "exports[0].url" in str(refused.value)
        nohost = {"name": name, **settings, "url": "https://:443/hub"}
        with pytest.raises(ConfigError, match="no host") as refused:
            parse_config({**base, "exports": [nohost]})
        assert f"export {name!r}" in str(refused.value)
        ok = parse_config(
            {**base, "exports": [{"name": name, **settings, "url": url.format(port=":8443")}]}
        )
        assert ok.exports[0].url == url.format(port=":8443")


async def test_a_receiver_echoing_the_secret_does_not_put_it_in_the_log(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A refusal's body goes to the log (its first 200 characters); receivers that quote the
    credential they refused ("invalid key 'hook-…'") must not carry it there."""
    from aiohttp import web

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=401, text=f"invalid key '{request.headers['X-Hook-Key']}'")

    write_ledger(engine, tmp_path, records(1))
    async with webhook({"/ingest": refuse}, "hook-secret-0123456789") as (config, sender):
        with caplog.at_level("WARNING", logger="sluicegate.export"):
            cycle = await Exporter(config, engine, sender).run_once()
    assert cycle.failure is not None and cycle.failure.reason == "auth"
    assert "invalid key" in cycle.failure.detail
    assert "hook-secret-0123456789" not in cycle.failure.detail
    assert "invalid key" in caplog.text and "hook-secret-0123456789" not in caplog.text
