"""A real gateway served the way ``sluicegate serve`` serves it (``server.uvicorn_config``:
header limits, TLS), in front of a real simulator, trusting a test identity provider.

Subscriptions are created in the ledger database *before* the gateway is built, so that the
``token_rules`` of its configuration can name their ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from sluicegate.accounting.records import UsageRecord
from sluicegate.admin.service import AdminService
from sluicegate.config.loader import parse_config
from sluicegate.gateway import Gateway, key_hasher_for
from sluicegate.simulator.server import SimulatorThread
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import migrate
from sluicegate.storage.reports import fetch_records
from sluicegate.storage.subscriptions import SubscriptionRepository
from tests.support.gateway import GatewayThread, gateway_config, gateway_environ
from tests.support.idp import AUDIENCE, TestIdentityProvider

API_VERSION = "2024-10-21"
CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me about the sluice gates of the Netherlands"}
]


#: The Entra harness serves its gateway like every other test (tests/support/gateway.py).
ServedGateway = GatewayThread


@dataclass
class EntraHarness:
    served: ServedGateway
    sim: SimulatorThread
    idp: TestIdentityProvider | None
    subs: dict[str, str]  # name → subscription id
    keys: dict[str, str]  # name → primary key

    @property
    def url(self) -> str:
        return self.served.url

    @property
    def gateway(self) -> Gateway:
        return self.served.gateway

    def azure(self, token: str, **kwargs: Any) -> openai.AzureOpenAI:
        """The SDK as an Entra ID client: ``azure_ad_token_provider`` returning ``token``."""
        return openai.AzureOpenAI(
            azure_endpoint=self.url,
            azure_ad_token_provider=lambda: token,
            api_version=API_VERSION,
            max_retries=0,
            **kwargs,
        )

    def chat(self, headers: dict[str, str], path: str = CHAT) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=30)

    def bearer(self, token: str) -> httpx.Response:
        return self.chat({"authorization": f"Bearer {token}"})

    def records(self, expect: int | None = None) -> list[UsageRecord]:
        """The ledger's rows; with ``expect``, wait (up to 5 s) until there are that many."""
        deadline = time.monotonic() + 5
        while True:
            assert self.gateway.ledger.flush(10.0)
            rows = fetch_records(self.gateway.engine, limit=1_000_000)
            if expect is None or len(rows) >= expect or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)

    def sim_log(self) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.sim.url}/_sim/log", timeout=10)
        resp.raise_for_status()
        data = resp.json()
        return data["entries"] if isinstance(data, dict) else data  # type: ignore[no-any-return]

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


def oidc_section(idp: TestIdentityProvider, **overrides: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "issuers": [{"discovery_url": idp.discovery_url, "audiences": [AUDIENCE]}],
    }
    section.update(overrides)
    return section


@contextmanager
def entra_gateway(
    tmp: Path,
    sim: SimulatorThread,
    idp: TestIdentityProvider | None,
    *,
    subscriptions: dict[str, str] | None = None,
    rules: Callable[[dict[str, str]], list[dict[str, Any]]] | None = None,
    oidc: dict[str, Any] | None = None,
    **extra: Any,
) -> Iterator[EntraHarness]:
    """``subscriptions``: name → product, created first; ``rules(ids)`` builds the
    ``token_rules`` from their ids; ``extra`` goes into the configuration (``security``,
    ``listen``, ``products``, …). Without ``idp`` the gateway has no ``oidc`` section."""
    tmp.mkdir(parents=True, exist_ok=True)
    base = gateway_config(tmp, {"sim": sim.url}, **extra)
    # With the oidc section when there is one: settings that need it (require_token) pass.
    plain = parse_config({**base, "oidc": oidc or oidc_section(idp)} if idp else base)
    migrate(plain.storage.url)
    engine = create_engine_for(plain.storage.url)
    try:
        admin = AdminService(
            plain, SubscriptionRepository(engine), key_hasher_for(plain, gateway_environ())
        )
        subs: dict[str, str] = {}
        keys: dict[str, str] = {}
        for name, product in (subscriptions or {}).items():
            issued = admin.create_subscription(product=product, owner=f"owner-{name}", name=name)
            subs[name] = issued.subscription.id
            assert issued.primary_key is not None
            keys[name] = issued.primary_key
    finally:
        engine.dispose()
    data = dict(base)
    if idp is not None:
        data["oidc"] = oidc or oidc_section(idp)
        data["token_rules"] = rules(subs) if rules is not None else []
    served = ServedGateway(parse_config(data)).start()
    try:
        yield EntraHarness(served, sim, idp, subs, keys)
    finally:
        served.stop()
