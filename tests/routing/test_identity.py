"""Managed identity to the backend, with azure-identity itself against a loopback App Service
token endpoint (IDENTITY_ENDPOINT + IDENTITY_HEADER, so the metadata address is never tried).

Refresh is shown with real short-lived tokens (a few seconds: azure-identity treats anything
within five minutes of expiry as due, so every fetch reaches the endpoint and the count is
exactly the gateway's own refreshes); the fake-clock version is in test_identity_unit.py."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.routing.harness import Routed, body, pool_config, start_sim
from tests.support.identity_endpoint import IdentityEndpoint

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
_AZURE_VARS = (
    "MSI_ENDPOINT", "MSI_SECRET", "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT",
    "AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
)  # fmt: skip


def _gateway(tmp: Path, endpoint: IdentityEndpoint, monkeypatch: pytest.MonkeyPatch) -> Routed:
    for name in _AZURE_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in endpoint.environ().items():
        monkeypatch.setenv(name, value)
    # The backend accepts only the tokens the identity endpoint hands out.
    sims = {"aoai": start_sim(bearer_tokens=endpoint.tokens, api_keys=["not-the-gateway-key"])}
    config = pool_config(tmp, sims, [{"backend": "aoai"}])
    config["backends"][0]["auth"] = {"type": "managed-identity", "client_id": CLIENT_ID}
    return Routed(config, sims)


@pytest.fixture
def stop_all() -> Iterator[list[Routed]]:
    started: list[Routed] = []
    yield started
    for routed in started:
        routed.stop()
        for sim in routed.sims.values():
            sim.stop()


def test_requests_carry_the_token_fetched_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_all: list[Routed]
) -> None:
    with IdentityEndpoint(lifetime=3600) as endpoint:
        routed = _gateway(tmp_path, endpoint, monkeypatch)
        stop_all.append(routed)
        with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(
                lambda _: client.post(
                    routed.chat_url(), json=body(5), headers={"api-key": routed.key}
                ).status_code,
                range(40),
            ))  # fmt: skip
        assert statuses == [200] * 40
        (hit,) = endpoint.hits
        assert hit.authorized
        assert hit.params["resource"] == "https://cognitiveservices.azure.com"
        assert hit.params["client_id"] == CLIENT_ID
        assert hit.params["api-version"] == "2019-08-01"
        log = routed.sim_log("aoai")
        assert len(log) == 40
        assert all(e["authorization_present"] and not e["api_key_present"] for e in log)
        backend = routed.gw.gateway.runtime.backends["aoai"]
        assert backend.token_source is not None and backend.token_source.waited == 0
        assert backend.secrets() == [endpoint.tokens[0]]


def test_short_lived_tokens_are_refreshed_before_expiry_off_the_request_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_all: list[Routed]
) -> None:
    with IdentityEndpoint(lifetime=4) as endpoint:
        routed = _gateway(tmp_path, endpoint, monkeypatch)
        stop_all.append(routed)
        statuses: list[int] = []
        deadline = time.monotonic() + 5.0
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < deadline:
                r = client.post(routed.chat_url(), json=body(5), headers={"api-key": routed.key})
                statuses.append(r.status_code)
                time.sleep(0.05)
        assert statuses and set(statuses) == {200}
        source = routed.gw.gateway.runtime.backends["aoai"].token_source
        assert source is not None
        routed.stop()  # no refresh between the counts below
        issued = endpoint.issued()
        # About one fetch per half lifetime (1.5-2 s), in the background: 1 at start + 2-4.
        assert 2 <= len(issued) <= 6, [(h.time, h.expires_on) for h in issued]
        for earlier, later in itertools.pairwise(issued):
            assert earlier.expires_on is not None
            assert later.time < earlier.expires_on, "refreshed before the held token expired"
        assert source.waited == 0, "no request waited for a token"
        assert source.fetches == len(issued)
