"""Usage exports, found in review: how a refusal is classified when the receiver's answer
names the entity, the lag gauges of an instance that never held the cursor, and a url the
parser itself refuses.

* Event Hubs' error details name the entity they refused (``SystemTracker:<namespace>:<hub>``,
  ``sb://<namespace>/<hub>``): a 403 refusing the sender of a hub whose name says "quota"
  (a chargeback gateway's hub may well be called ``llm-quota``) is still ``auth``.
* prometheus_client before 0.22 raises ``KeyError`` removing a series it does not hold; an
  instance whose first cycles find the cursor held never set one.
* A url ``urlsplit`` cannot read (an unclosed IPv6 literal) is refused naming the export,
  like every other unusable url.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.metrics import MetricWrapperBase
from sqlalchemy.engine import Engine

from sluicegate.accounting.eventhub import sender_for
from sluicegate.accounting.export import Exporter
from sluicegate.clock import SystemClock
from sluicegate.config.loader import ConfigError, parse_config
from sluicegate.config.model import ExportConfig
from sluicegate.metrics.registry import GatewayMetrics
from sluicegate.simulator.event_hub import FakeEventHub
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import migrate
from tests.accounting.conftest import write_ledger
from tests.accounting.test_export import drain, exporter, hub, received
from tests.accounting.test_export_cluster import lag_lines
from tests.accounting.test_rollups_cli import records
from tests.support.pg import pg_database_url  # noqa: F401  (the fixture)

__all__ = ["hub"]  # the fixture, shared


@pytest.fixture
def pg_engine(pg_database_url: str) -> Iterator[Engine]:  # noqa: F811  (the fixture)
    migrate(pg_database_url)
    eng = create_engine_for(pg_database_url)
    yield eng
    eng.dispose()


@contextlib.asynccontextmanager
async def named_hub(name: str) -> AsyncIterator[FakeEventHub]:
    h = await FakeEventHub(key_name="send", hub=name).start()
    try:
        yield h
    finally:
        await h.close()


async def test_the_hubs_errors_name_the_entity_as_the_service_does() -> None:
    """The fake's ``<Error>`` details end as the service's do: ``TrackingId:…,
    SystemTracker:<namespace>:<hub>, Timestamp:…`` (the namespace: the url's host)."""
    async with (
        named_hub("llm-quota") as h,
        aiohttp.ClientSession() as http,
        http.post(f"{h.url}/messages", data="[]") as r,
    ):
        text = await r.text()
    assert r.status == 401  # no signature
    assert ", SystemTracker:127.0.0.1:llm-quota, Timestamp:" in text
    assert "TrackingId:" in text


async def test_a_403_refusing_the_sender_of_a_hub_named_quota_is_auth(
    engine: Engine, tmp_path: Path
) -> None:
    """A network rule's 403 from the hub ``llm-quota`` names the hub in its detail; that is
    not the receiver naming a quota: ``auth``. The hub's own QuotaExceeded is still
    ``quota``."""
    write_ledger(engine, tmp_path, records(2))
    async with named_hub("llm-quota") as h:
        h.fail_next(1, "forbidden")
        h.fail_next(1, "quota_exceeded")
        metrics = GatewayMetrics()
        async with exporter(engine, h, metrics=metrics) as ex:
            refused, over = (await ex.run_once(), await ex.run_once())
            assert refused.failure is not None and over.failure is not None
            assert (refused.failure.reason, refused.failure.status) == ("auth", 403)
            assert (over.failure.reason, over.failure.status) == ("quota", 403)
            assert await drain(ex) == 2
        text = metrics.render().decode()
        assert 'sluicegate_export_failures_total{export="usage-hub",reason="auth"} 1.0' in text
        assert 'sluicegate_export_failures_total{export="usage-hub",reason="quota"} 1.0' in text
        assert len(received(h)) == 2


async def test_a_webhook_403_quoting_its_own_url_is_auth(engine: Engine, tmp_path: Path) -> None:
    """The same for a webhook: a refusal that quotes the url it was sent to (a receiver at
    ``/hooks/ratelimit-ingest``, say) names no quota; one that says it rate limits does."""
    texts = iter(
        [
            "Forbidden: 10.0.0.7 may not POST to {url}",
            "Forbidden: rate limit exceeded for {url}, try again later",
        ]
    )

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=403, text=next(texts).format(url=request.url))

    app = web.Application()
    app.router.add_post("/hooks/ratelimit-ingest", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    config = ExportConfig(
        name="hook",
        type="webhook",
        url=f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/ratelimit-ingest",
        start="earliest",
    )
    sender = sender_for(config, SystemClock(), {})
    write_ledger(engine, tmp_path, records(1))
    try:
        ex = Exporter(config, engine, sender)
        first, second = await ex.run_once(), await ex.run_once()
    finally:
        await sender.aclose()
        await runner.cleanup()
    assert first.failure is not None and second.failure is not None
    assert "ratelimit-ingest" in first.failure.detail
    assert (first.failure.reason, second.failure.reason) == ("auth", "quota")


def _remove_before_0_22(self: Any, *labelvalues: Any) -> None:
    """``MetricWrapperBase.remove`` as prometheus_client had it before 0.22
    (prometheus/client_python#1077): a label set it does not hold raises ``KeyError``.
    pyproject.toml admits those versions."""
    labelvalues = tuple(str(value) for value in labelvalues)
    with self._lock:
        del self._metrics[labelvalues]


async def test_an_instance_that_never_held_the_cursor_removes_no_series(
    pg_engine: Engine,
    pg_database_url: str,  # noqa: F811  (the fixture)
    tmp_path: Path,
    hub: FakeEventHub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance whose cycles find the cursor held before any cycle of its own set the lag
    gauges has no series to drop, and does not ask: with prometheus_client before 0.22 the
    removal raised ``KeyError`` and every such cycle failed as ``database``. Once it has
    set them, finding the cursor held drops them as before."""
    monkeypatch.setattr(MetricWrapperBase, "remove", _remove_before_0_22)
    second_engine = create_engine_for(pg_database_url)
    ma, mb = GatewayMetrics(), GatewayMetrics()
    try:
        write_ledger(pg_engine, tmp_path, records(3))
        async with (
            exporter(pg_engine, hub, metrics=ma) as a,
            exporter(second_engine, hub, metrics=mb) as b,
        ):
            await asyncio.to_thread(a.store.ensure, a.config.start)
            claim = await asyncio.to_thread(a.store.claim)  # a's cycle, sending
            assert claim is not None
            try:
                assert (await b.run_once()).skipped
                assert (await b.run_once()).skipped
            finally:
                await asyncio.to_thread(claim.release)
            assert b.failures == 0 and b.last_failure is None
            assert lag_lines(mb) == []
            assert await drain(b) == 3
            assert 'sluicegate_export_lag_records{export="usage-hub"} 0.0' in lag_lines(mb)
            claim = await asyncio.to_thread(a.store.claim)
            assert claim is not None
            try:
                assert (await b.run_once()).skipped
            finally:
                await asyncio.to_thread(claim.release)
            assert lag_lines(mb) == []
            assert b.failures == 0
    finally:
        second_engine.dispose()


def test_a_url_the_parser_cannot_read_is_refused_naming_the_export() -> None:
    base = {
        "backends": [{"name": "b", "url": "http://127.0.0.1:1"}],
        "deployments": [{"name": "d", "backend": "b"}],
        "products": [{"name": "p"}],
    }
    export = {"name": "billing-hook", "type": "webhook", "url": "https://[::1/ingest"}
    with pytest.raises(ConfigError) as refused:
        parse_config({**base, "exports": [export]})
    assert "export 'billing-hook'" in str(refused.value)
    assert "exports[0].url" in str(refused.value)
    # IPv6 literals with and without a port, and a namespace url without one, are fine.
    for url in ("https://[::1]:8443/ingest", "https://[::1]/ingest", "https://ns.example.net/x"):
        ok = parse_config({**base, "exports": [{**export, "url": url}]})
        assert ok.exports[0].url == url
