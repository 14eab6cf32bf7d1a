"""A real simulator and a real gateway (with the admin API and dashboard) on loopback, for the
admin, accounting and dashboard tests."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from sluicegate.accounting.records import UsageRecord
from sluicegate.clock import Clock
from sluicegate.simulator.server import SimulatorThread
from sluicegate.storage.reports import count_records, fetch_records
from tests.integration.conftest import sim_config
from tests.support.gateway import GatewayThread, gateway_config

ADMIN_TOKEN_ENV = "SG_TEST_ADMIN_TOKEN"
ADMIN_TOKEN = "admin-token-for-tests-0123456789abcdef"
API_VERSION = "2024-10-21"


class AdminHarness:
    def __init__(self, gw: GatewayThread, sim: SimulatorThread) -> None:
        self.gw = gw
        self.sim = sim
        self.api = httpx.Client(
            base_url=f"{gw.url}/admin/api",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )

    @property
    def url(self) -> str:
        return self.gw.url

    def create(self, owner: str, name: str, product: str = "starter") -> tuple[str, str]:
        """A subscription made through the admin API: (id, primary key)."""
        r = self.api.post("/subscriptions", json={"product": product, "owner": owner, "name": name})
        assert r.status_code == 201, r.text
        self.gw.gateway.refresher.refresh_now()
        body = r.json()
        return body["subscription"]["id"], body["primary_key"]

    def chat(self, key: str, deployment: str, text: str, *, stream: bool = False) -> int:
        url = f"{self.url}/openai/deployments/{deployment}/chat/completions"
        body: dict[str, Any] = {"messages": [{"role": "user", "content": text}]}
        if stream:
            body["stream"] = True
        with httpx.stream(
            "POST",
            url,
            params={"api-version": API_VERSION},
            headers={"api-key": key},
            json=body,
            timeout=30,
        ) as r:
            r.read()
            return r.status_code

    def embed(self, key: str, deployment: str, text: str) -> int:
        r = httpx.post(
            f"{self.url}/openai/deployments/{deployment}/embeddings",
            params={"api-version": API_VERSION},
            headers={"api-key": key},
            json={"input": text},
            timeout=30,
        )
        return r.status_code

    def records(self, expect: int) -> list[UsageRecord]:
        """The ledger, once it holds ``expect`` records (a record is written just after the
        client has read the last byte)."""
        engine = self.gw.gateway.engine
        deadline = time.monotonic() + 10
        while True:
            assert self.gw.gateway.ledger.flush(10.0)
            if count_records(engine) >= expect or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        rows = fetch_records(engine, limit=1_000_000)
        assert len(rows) == expect, f"ledger has {len(rows)} records, expected {expect}"
        return rows


@contextmanager
def admin_gateway(
    tmp: Path,
    clock: Clock | None = None,
    breakers: dict[str, dict[str, Any]] | None = None,
    **config: Any,
) -> Iterator[AdminHarness]:
    """Simulator + gateway with the admin token set; extra keys go into gateway.yaml.
    ``breakers``: backends' own ``circuit_breaker`` rules, by backend name."""
    sim = SimulatorThread(sim_config())
    sim.start()
    previous = os.environ.get(ADMIN_TOKEN_ENV)
    os.environ[ADMIN_TOKEN_ENV] = ADMIN_TOKEN
    gw: GatewayThread | None = None
    try:
        backends = config.pop("backends", None) or {"sim": sim.url}
        backends = {name: (sim.url if url == "SIM" else url) for name, url in backends.items()}
        config.setdefault("admin", {"token_env": ADMIN_TOKEN_ENV})
        data = gateway_config(tmp, backends, **config)
        for backend in data["backends"]:
            if breakers and backend["name"] in breakers:
                backend["circuit_breaker"] = breakers[backend["name"]]
        gw = GatewayThread(data, clock=clock)
        gw.start()
        harness = AdminHarness(gw, sim)
        try:
            yield harness
        finally:
            harness.api.close()
    finally:
        if gw is not None:
            gw.stop()
        sim.stop()
        if previous is None:
            os.environ.pop(ADMIN_TOKEN_ENV, None)
        else:
            os.environ[ADMIN_TOKEN_ENV] = previous
