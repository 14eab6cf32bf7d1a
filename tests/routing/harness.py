"""Several simulators (one per backend) behind one real gateway, for the routing tests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from sluicegate.accounting.records import UsageRecord
from sluicegate.admin.service import AdminService
from sluicegate.clock import Clock
from sluicegate.simulator.config import SimConfig, SimDeployment
from sluicegate.simulator.server import SimulatorThread
from sluicegate.storage.reports import fetch_records
from tests.routing.scripted import ScriptedBackend
from tests.support.gateway import BACKEND_KEY, GatewayThread, gateway_config
from tests.support.pg import throwaway_database

API = "api-version=2024-10-21"
#: The test Redis (cluster mode), on loopback.
REDIS_URL = "redis://127.0.0.1:6379/0"


class ShiftedClock:
    """Real time plus an offset the test can move forward: a simulator on this clock sees
    its rate-limit window move on when the test says so (a 60-s window can expire at once)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def shift(self, seconds: float) -> None:
        self.offset += seconds


def chat_deployment(name: str = "gpt-4o", **kw: Any) -> SimDeployment:
    values: dict[str, Any] = {"tpm": 10_000_000, "rpm": 1_000_000, **kw}
    return SimDeployment(name=name, model="gpt-4o-2024-08-06", kind="chat", **values)


def start_sim(
    *deployments: SimDeployment,
    port: int = 0,
    clock: Clock | None = None,
    bearer_tokens: list[str] | None = None,
    api_keys: list[str] | None = None,
) -> SimulatorThread:
    config = SimConfig(
        deployments=list(deployments) or [chat_deployment()],
        api_keys=[BACKEND_KEY] if api_keys is None else api_keys,
        bearer_tokens=bearer_tokens or [],
    )
    return SimulatorThread(config, port=port, clock=clock).start()


def pool_config(
    tmp: Path,
    sims: dict[str, SimulatorThread],
    pool: list[dict[str, Any]],
    *,
    kinds: dict[str, str] | None = None,
    routing: dict[str, Any] | None = None,
    timeouts: dict[str, dict[str, float]] | None = None,
    name: str = "gpt-4o",
    **extra: Any,
) -> dict[str, Any]:
    """A gateway.yaml dict with one deployment ``name`` over ``pool`` (members name sims)."""
    extra.setdefault("deployments", [{"name": name, "pool": pool, "model": "gpt-4o"}])
    data = gateway_config(tmp, {n: s.url for n, s in sims.items()}, **extra)
    for backend in data["backends"]:
        backend["kind"] = (kinds or {}).get(backend["name"], "paygo")
        if timeouts and backend["name"] in timeouts:
            backend["timeouts"] = timeouts[backend["name"]]
    if routing is not None:
        data["routing"] = routing
    return data


class Routed:
    """A started gateway over named simulators, with keys, ledger and truth-log helpers."""

    def __init__(self, config: dict[str, Any], sims: dict[str, SimulatorThread]) -> None:
        self.sims = sims
        self.gw = GatewayThread(config).start()
        g = self.gw.gateway
        self.admin = AdminService(g.config, g.repository, g.hasher)
        issued = self.admin.create_subscription(product="starter", owner="team", name="k")
        g.refresher.refresh_now()
        assert issued.primary_key is not None
        self.key = issued.primary_key

    @property
    def url(self) -> str:
        return self.gw.url

    def chat_url(self, deployment: str = "gpt-4o") -> str:
        return f"{self.url}/openai/deployments/{deployment}/chat/completions?{API}"

    def records(self, expect: int | None = None) -> list[UsageRecord]:
        deadline = time.monotonic() + 5
        while True:
            assert self.gw.gateway.ledger.flush(10.0)
            rows = fetch_records(self.gw.gateway.engine, limit=1_000_000)
            if expect is None or len(rows) >= expect or time.monotonic() > deadline:
                return sorted(rows, key=lambda r: (r.ts, r.attempt))
            time.sleep(0.02)

    def sim_log(self, name: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.sims[name].url}/_sim/log", timeout=10)
        resp.raise_for_status()
        data = resp.json()
        return data["entries"] if isinstance(data, dict) else list(data)

    def states(self) -> dict[str, dict[str, Any]]:
        return {s["backend"]: s for s in self.gw.gateway.backend_states()}

    def stop(self) -> None:
        self.gw.stop()


@contextlib.contextmanager
def cluster_pair(
    tmp: Path,
    sims: dict[str, SimulatorThread],
    pool: list[dict[str, Any]],
    redis_prefix: str,
    **settings: Any,
) -> Iterator[tuple[Routed, GatewayThread, dict[str, Any]]]:
    """Two gateway instances in cluster mode over ``sims``, sharing the test Redis (under
    ``redis_prefix``) and a throwaway PostgreSQL ledger: (a ``Routed`` one with a key, a
    second that has loaded that key, their ``pool_config`` with these ``settings``). Both
    gateways stop before the database is dropped, then every one of ``sims`` stops."""
    gateways: list[Routed | GatewayThread] = []
    try:
        with throwaway_database() as pg_url:
            redis = {"url": REDIS_URL, "prefix": redis_prefix}
            config = pool_config(
                tmp, sims, pool, mode="cluster", storage_url=pg_url, redis=redis, **settings
            )
            try:
                one = Routed(config, sims)
                gateways.append(one)
                two = GatewayThread(config).start()
                gateways.append(two)
                two.gateway.refresher.refresh_now()  # the key made on `one` is known here too
                yield one, two, config
            finally:
                for gateway in gateways:
                    gateway.stop()
    finally:
        for sim in sims.values():
            sim.stop()


def body(max_tokens: int = 100, stream: bool = False, text: str = "hello there") -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def one_member_gateway(
    tmp: Path, backend_url: str, routing: dict[str, Any], started: list[Any], **settings: Any
) -> Routed:
    """A started gateway whose deployment gpt-4o is a one-member pool over the backend at
    ``backend_url`` (backend ``only``) with these ``routing`` and other ``gateway_config``
    ``settings``; put first in ``started`` to be stopped at the test's end."""
    data = gateway_config(
        tmp,
        {"only": backend_url},
        deployments=[{"name": "gpt-4o", "pool": [{"backend": "only"}], "model": "gpt-4o"}],
        routing=routing,
        **settings,
    )
    routed = Routed(data, {})
    started.insert(0, routed)
    return routed


def one_member_pool(
    tmp: Path, backend: ScriptedBackend, routing: dict[str, Any], started: list[Any]
) -> Routed:
    """Start ``backend`` and a ``one_member_gateway`` over it; both are put first in
    ``started`` (the gateway before the backend) to be stopped at the test's end."""
    backend.start()
    routed = one_member_gateway(tmp, backend.url, routing, started)
    started.insert(1, backend)
    return routed


def post_chat(routed: Routed, **kw: Any) -> httpx.Response:
    """A chat request to gpt-4o (``body(5, **kw)``) with the harness's key."""
    return httpx.post(
        routed.chat_url(), json=body(5, **kw), headers={"api-key": routed.key}, timeout=30
    )
