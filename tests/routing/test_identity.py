"""Managed identity to the backend, with azure-identity itself against a loopback App Service
token endpoint (IDENTITY_ENDPOINT + IDENTITY_HEADER, so the metadata address is never tried).

Refresh is shown with real short-lived tokens (a few seconds: azure-identity treats anything
within five minutes of expiry as due, so every fetch reaches the endpoint and the count is
exactly the gateway's own refreshes); the fake-clock version is in test_identity_unit.py."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from sluicegate.clock import FakeClock
from sluicegate.config.model import BackendAuthConfig
from sluicegate.upstream.identity import BackendAuthError, TokenSource, credential_for
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


def test_a_backend_without_a_token_is_failed_over_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_all: list[Routed]
) -> None:
    """The identity endpoint refuses the gateway (a wrong ``IDENTITY_HEADER``): the managed
    identity backend gets no token, so its attempt fails before anything is sent to it, and
    the request goes on to the next member of the pool. The client sees only the answer; the
    failed attempt has its own record, and no secret shows anywhere."""
    with IdentityEndpoint(lifetime=3600) as endpoint:
        for name in _AZURE_VARS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint.url)
        monkeypatch.setenv("IDENTITY_HEADER", "not-" + endpoint.secret)
        sims = {
            "mi": start_sim(bearer_tokens=endpoint.tokens, api_keys=["not-the-gateway-key"]),
            "keyed": start_sim(),
        }
        config = pool_config(
            tmp_path, sims, [{"backend": "mi"}, {"backend": "keyed", "priority": 2}]
        )
        (mi,) = [b for b in config["backends"] if b["name"] == "mi"]
        mi["auth"] = {"type": "managed-identity", "client_id": CLIENT_ID}
        routed = Routed(config, sims)
        stop_all.append(routed)
        assert routed.gw.gateway.runtime.passthrough.name == "mi"
        with httpx.Client(timeout=30) as client:
            r = client.post(routed.chat_url(), json=body(5), headers={"api-key": routed.key})
            # A path the gateway passes through goes to one backend, with nowhere to fail
            # over to: the client is told, in Azure's error shape.
            passed = client.get(
                f"{routed.url}/openai/files?api-version=2024-10-21",
                headers={"api-key": routed.key},
            )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        assert passed.status_code == 502, passed.text
        assert passed.json()["error"]["code"] == "BackendAuthUnavailable"
        assert passed.headers["retry-after"] == "1"
        assert endpoint.hits and not any(h.authorized for h in endpoint.hits)
        assert routed.sim_log("mi") == [], "nothing is sent to a backend without a token"
        assert len(routed.sim_log("keyed")) == 1
        failed, served, _ = routed.records(expect=3)
        assert (failed.attempt, failed.backend, failed.outcome) == (1, "mi", "backend_error")
        assert failed.status == 502 and failed.error_code == "BackendAuthUnavailable"
        assert failed.total_tokens == 0
        assert (served.attempt, served.backend, served.outcome) == (2, "keyed", "ok")
        assert served.total_tokens > 0
        for text in (r.text, passed.text, repr(failed), repr(served)):
            assert endpoint.secret not in text and routed.key not in text
        # Stopped while the endpoint still answers: a refresh under way against a closed
        # port would hold the stop for azure-identity's own retries.
        routed.stop()


def test_a_hung_identity_endpoint_holds_neither_requests_nor_the_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_all: list[Routed]
) -> None:
    """An identity endpoint that takes connections and never answers (azure-identity would
    wait 300 s a try): the gateway starts after waiting ``timeouts.connect`` for the first
    token, a request waits as long before it fails over, and the gateway stops at once while
    the fetch is still hung."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # connections complete in the kernel; nothing ever reads them
    try:
        for name in _AZURE_VARS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("IDENTITY_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}/t")
        monkeypatch.setenv("IDENTITY_HEADER", "header")
        sims = {"mi": start_sim(api_keys=["not-the-gateway-key"]), "keyed": start_sim()}
        config = pool_config(
            tmp_path,
            sims,
            [{"backend": "mi"}, {"backend": "keyed", "priority": 2}],
            timeouts={"mi": {"connect": 1.0}},
        )
        (mi,) = [b for b in config["backends"] if b["name"] == "mi"]
        mi["auth"] = {"type": "managed-identity", "client_id": CLIENT_ID}
        began = time.monotonic()
        routed = Routed(config, sims)
        stop_all.append(routed)
        assert time.monotonic() - began < 10
        with httpx.Client(timeout=30) as client:
            began = time.monotonic()
            r = client.post(routed.chat_url(), json=body(5), headers={"api-key": routed.key})
            waited = time.monotonic() - began
        assert r.status_code == 200, r.text
        assert 0.9 <= waited < 5, waited
        failed, served = routed.records(expect=2)
        assert (failed.backend, failed.error_code) == ("mi", "BackendAuthUnavailable")
        assert served.backend == "keyed"
        assert routed.sim_log("mi") == []
        hung = [t for t in threading.enumerate() if t.name == "sluicegate-token-fetch-mi"]
        assert hung and all(t.daemon and t.is_alive() for t in hung)
        began = time.monotonic()
        routed.stop()
        assert time.monotonic() - began < 3, "the stop waited for the hung fetch"
        assert any(t.is_alive() for t in hung), "the fetch was still hung when the stop ended"
    finally:
        listener.close()


async def test_bursts_against_a_refusing_identity_endpoint_cost_one_call_per_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """azure-identity itself against the loopback endpoint, which refuses the gateway (a wrong
    ``IDENTITY_HEADER``) at once: a hundred bursts of requests within a second cost no call
    beyond the start's; the next call comes once the backoff is over (time is a fake clock,
    the background refresh never wakes)."""
    with IdentityEndpoint() as endpoint:
        for name in _AZURE_VARS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint.url)
        monkeypatch.setenv("IDENTITY_HEADER", "not-" + endpoint.secret)
        auth = BackendAuthConfig(type="managed-identity", client_id=CLIENT_ID)
        clock = FakeClock()
        never = asyncio.Event()

        async def sleep(seconds: float) -> None:
            await never.wait()

        source = TokenSource(
            credential_for(auth, os.environ), auth.scope, clock, name="mi", sleep=sleep
        )
        await source.start()

        async def request() -> str:
            try:
                return await source.token()
            except BackendAuthError as exc:
                return str(exc)

        try:
            per_fetch = len(endpoint.hits)
            assert per_fetch >= 1 and source.failures == 1
            answers: list[str] = []
            for _ in range(100):
                answers += await asyncio.gather(*(request() for _ in range(10)))
                clock.advance(0.009)
            assert len(endpoint.hits) == per_fetch, "a burst within the backoff called it"
            assert source.refused == 1000 and source.waited == 0
            assert all("next try in" in a for a in answers)
            assert endpoint.secret not in " ".join(answers)
            clock.advance(0.1)  # the backoff (1 s) is over: one call for the next burst
            answers = await asyncio.gather(*(request() for _ in range(10)))
            assert len(endpoint.hits) == 2 * per_fetch and source.waited == 10
            assert len(set(answers)) == 1 and "next try in" not in answers[0], answers[0]
            assert not any(h.authorized for h in endpoint.hits)
        finally:
            await source.aclose()
