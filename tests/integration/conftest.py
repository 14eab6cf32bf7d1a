"""Fixtures for integration tests: a real simulator and a real gateway on loopback."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sluicegate.accounting.records import UsageRecord
from sluicegate.admin.service import AdminService, IssuedKeys
from sluicegate.clock import FakeClock
from sluicegate.simulator.config import SimConfig, SimDeployment
from sluicegate.simulator.server import SimulatorThread
from sluicegate.storage.reports import fetch_records
from tests.support.gateway import BACKEND_KEY, GatewayThread, gateway_config


class OffsetClock(FakeClock):
    """Real time plus an offset the test moves: what the gateway reads as now can be put
    ahead (a new period) while the SDK and background jobs still wait in real time."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


def sim_config(**overrides: Any) -> SimConfig:
    deployments = [
        SimDeployment(
            name="gpt-4o-mini",
            model="gpt-4o-mini-2024-07-18",
            kind="chat",
            tpm=10_000_000,
            rpm=100_000,
        ),
        SimDeployment(
            name="gpt-4o", model="gpt-4o-2024-08-06", kind="chat", tpm=10_000_000, rpm=100_000
        ),
        SimDeployment(
            name="text-embedding-3-small",
            model="text-embedding-3-small",
            kind="embeddings",
            tpm=10_000_000,
            rpm=100_000,
        ),
    ]
    data: dict[str, Any] = {"deployments": deployments, "api_keys": [BACKEND_KEY]}
    data.update(overrides)
    return SimConfig(**data)


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    sim = SimulatorThread(sim_config())
    sim.start()
    yield sim
    sim.stop()


class Harness:
    """A gateway in front of a simulator, with helpers to make keys and read the ledger."""

    def __init__(self, gw: GatewayThread, sim: SimulatorThread) -> None:
        self.gw = gw
        self.sim = sim
        g = gw.gateway
        self.admin = AdminService(g.config, g.repository, g.hasher)

    @property
    def url(self) -> str:
        return self.gw.url

    def new_key(
        self, product: str = "starter", owner: str = "team-a", name: str = "k"
    ) -> IssuedKeys:
        issued = self.admin.create_subscription(product=product, owner=owner, name=name)
        self.gw.gateway.refresher.refresh_now()  # no waiting for the next poll in tests
        return issued

    def records(self, expect: int | None = None) -> list[UsageRecord]:
        """The ledger's rows; with ``expect``, wait (up to 5 s) until there are that many,
        since a record is written just after the client has read the last byte."""
        deadline = time.monotonic() + 5
        while True:
            assert self.gw.gateway.ledger.flush(10.0)
            rows = fetch_records(self.gw.gateway.engine, limit=1_000_000)
            if expect is None or len(rows) >= expect or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)

    def sdk(self, key: str) -> openai.AzureOpenAI:
        """An openai SDK client of this gateway with ``key``, without the SDK's retries."""
        return openai.AzureOpenAI(
            azure_endpoint=self.url, api_key=key, api_version="2024-10-21", max_retries=0
        )

    def sim_log(self) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.sim.url}/_sim/log")
        resp.raise_for_status()
        data = resp.json()
        entries: list[dict[str, Any]] = data["entries"] if isinstance(data, dict) else data
        return entries


@pytest.fixture
def harness(tmp_path: Path, simulator: SimulatorThread) -> Iterator[Harness]:
    gw = GatewayThread(gateway_config(tmp_path, {"sim": simulator.url}))
    gw.start()
    yield Harness(gw, simulator)
    gw.stop()


@pytest.fixture
def stop_later() -> Iterator[list[Harness]]:
    """Harnesses a test started itself, stopped at its end."""
    started: list[Harness] = []
    yield started
    for h in started:
        h.gw.stop()


@contextlib.contextmanager
def gateway_over(tmp_path: Path, backend_url: str) -> Iterator[Harness]:
    """A gateway of the default configuration whose backend ``b`` is at ``backend_url`` (no
    simulator: ``Harness.sim`` is None), stopped when the block ends."""
    gw = GatewayThread(gateway_config(tmp_path, {"b": backend_url})).start()
    try:
        yield Harness(gw, None)  # type: ignore[arg-type]  # no simulator here
    finally:
        gw.stop()


@contextlib.contextmanager
def posted_aside(url: str, body: dict[str, Any], key: str) -> Iterator[dict[str, Any]]:
    """POST ``body`` to ``url`` with ``key`` from another thread while the block runs. The dict
    yielded gets the answer's ``status`` once the request ends; the block's end waits for that
    (up to 120 s)."""
    answer: dict[str, Any] = {}

    def send() -> None:
        response = httpx.post(url, json=body, headers={"api-key": key}, timeout=120)
        answer["status"] = response.status_code

    sender = threading.Thread(target=send)
    sender.start()
    try:
        yield answer
    finally:
        sender.join(timeout=120)


@contextlib.contextmanager
def generating_at(tmp_path: Path, ttft_ms: int, tokens_per_second: float) -> Iterator[Harness]:
    """A gateway in front of a simulator whose gpt-4o-mini sends its first token after
    ``ttft_ms`` and then ``tokens_per_second``."""
    slow = SimDeployment(
        name="gpt-4o-mini",
        model="gpt-4o-mini",
        kind="chat",
        ttft_ms=ttft_ms,
        tokens_per_second=tokens_per_second,
    )
    sim = SimulatorThread(sim_config(deployments=[slow], api_keys=[BACKEND_KEY]))
    sim.start()
    gw = GatewayThread(
        gateway_config(
            tmp_path,
            {"sim": sim.url},
            deployments=[{"name": "gpt-4o-mini", "backend": "sim", "model": "gpt-4o-mini"}],
        )
    )
    gw.start()
    try:
        yield Harness(gw, sim)
    finally:
        gw.stop()
        sim.stop()


@pytest.fixture
def slow_harness(tmp_path: Path) -> Iterator[Harness]:
    """A gateway in front of a simulator that generates slowly (first token after 50 ms,
    then 20 tokens a second): streams that last long enough to be interrupted."""
    with generating_at(tmp_path, ttft_ms=50, tokens_per_second=20) as harness:
        yield harness
