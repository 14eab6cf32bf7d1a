"""TokenSource: background refresh before expiry, driven by a fake clock (no sleeping).

The credential here stands in for azure-identity (an external library); the real one is
exercised against a loopback token endpoint in test_identity.py."""

from __future__ import annotations

import asyncio

import pytest
from azure.core.credentials import AccessTokenInfo

from sluicegate.clock import FakeClock
from sluicegate.config.model import BackendAuthConfig
from sluicegate.upstream.identity import (
    BackendAuthError,
    HeldToken,
    TokenSource,
    credential_for,
    refresh_delay,
)


class Credential:
    """Hands out token-1, token-2, … valid for ``lifetime`` s of the fake clock."""

    def __init__(self, clock: FakeClock, lifetime: float) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.fail = False

    def get_token_info(self, *scopes: str, options: object = None) -> AccessTokenInfo:
        assert scopes == ("https://cognitiveservices.azure.com/.default",)
        if self.fail:
            raise RuntimeError("endpoint down\nsecond line")
        self.calls += 1
        return AccessTokenInfo(f"token-{self.calls}", int(self.clock.now() + self.lifetime))


class Sleeps:
    """A sleep the test releases step by step; each release advances the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.asked: asyncio.Queue[float] = asyncio.Queue()
        self.go: asyncio.Queue[None] = asyncio.Queue()

    async def __call__(self, seconds: float) -> None:
        await self.asked.put(seconds)
        await self.go.get()
        self.clock.advance(seconds)

    async def next(self) -> float:
        return await asyncio.wait_for(self.asked.get(), 5)

    def release(self) -> None:
        self.go.put_nowait(None)


def test_refresh_delay() -> None:
    token = HeldToken("t", expires_on=4600.0, fetched_at=1000.0)
    assert refresh_delay(token, 1000.0, 300.0) == 3300.0
    assert refresh_delay(token, 4500.0, 300.0) == 0.0
    short = HeldToken("t", expires_on=1006.0, fetched_at=1000.0)
    assert refresh_delay(short, 1000.0, 300.0) == 3.0  # half-way through a short lifetime


async def test_token_is_fetched_once_and_refreshed_before_expiry() -> None:
    clock = FakeClock(start=1_000_000.0)
    credential = Credential(clock, lifetime=3600)
    sleeps = Sleeps(clock)
    source = TokenSource(
        credential, "https://cognitiveservices.azure.com/.default", clock, sleep=sleeps
    )
    await source.start()
    try:
        assert credential.calls == 1
        for _ in range(100):
            assert await source.token() == "token-1"
        assert credential.calls == 1 and source.waited == 0
        assert await sleeps.next() == 3300.0  # 300 s before expiry
        sleeps.release()
        assert await sleeps.next() == 3300.0  # the next cycle: a new token was fetched
        assert credential.calls == 2
        assert await source.token() == "token-2"
        assert source.waited == 0
        assert "fetches=2" in repr(source)
    finally:
        await source.aclose()


async def test_failed_refresh_keeps_the_held_token_then_waits_for_one() -> None:
    clock = FakeClock(start=1_000_000.0)
    credential = Credential(clock, lifetime=600)
    sleeps = Sleeps(clock)
    source = TokenSource(
        credential,
        "https://cognitiveservices.azure.com/.default",
        clock,
        refresh_before=300,
        sleep=sleeps,
    )
    await source.start()
    try:
        assert await sleeps.next() == 300.0
        credential.fail = True
        sleeps.release()
        assert await sleeps.next() == 1.0  # backoff after the failed refresh
        assert source.last_error == "endpoint down"
        assert await source.token() == "token-1"  # still valid: used, no waiting
        clock.advance(400)  # now past expiry
        with pytest.raises(BackendAuthError, match="endpoint down"):
            await source.token()
        assert source.waited == 1
        credential.fail = False
        assert await source.token() == "token-2"
    finally:
        await source.aclose()


async def test_first_fetch_failure_does_not_stop_the_start() -> None:
    clock = FakeClock()
    credential = Credential(clock, lifetime=600)
    credential.fail = True
    sleeps = Sleeps(clock)
    source = TokenSource(
        credential, "https://cognitiveservices.azure.com/.default", clock, sleep=sleeps
    )
    await source.start()
    try:
        assert source.held is None and source.valid() is None
        assert await sleeps.next() == 1.0
        credential.fail = False
        sleeps.release()
        await sleeps.next()
        assert source.valid() == "token-1"
    finally:
        await source.aclose()


def test_credentials_for_each_auth_type(monkeypatch: pytest.MonkeyPatch) -> None:
    from azure.identity import (
        ClientSecretCredential,
        ManagedIdentityCredential,
        WorkloadIdentityCredential,
    )

    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi/token")  # never called
    monkeypatch.setenv("IDENTITY_HEADER", "x")
    mi = credential_for(BackendAuthConfig(type="managed-identity", client_id="abc"), {})
    assert isinstance(mi, ManagedIdentityCredential)
    gov = "https://login.microsoftonline.us"
    sp_auth = BackendAuthConfig(
        type="service-principal",
        tenant_id="t",
        client_id="c",
        client_secret_env="SP_SECRET",
        authority_host=gov,
    )
    sp = credential_for(sp_auth, {"SP_SECRET": "s"})
    assert isinstance(sp, ClientSecretCredential)
    with pytest.raises(BackendAuthError, match="SP_SECRET"):
        credential_for(sp_auth, {})
    wi_auth = BackendAuthConfig(type="workload-identity", client_id="c", tenant_id="t")
    with pytest.raises(BackendAuthError, match="AZURE_FEDERATED_TOKEN_FILE"):
        credential_for(wi_auth, {})
    wi = credential_for(wi_auth, {"AZURE_FEDERATED_TOKEN_FILE": "/nonexistent"})
    assert isinstance(wi, WorkloadIdentityCredential)
    with pytest.raises(ValueError, match="service-principal needs"):
        BackendAuthConfig(type="service-principal", tenant_id="t")
    with pytest.raises(ValueError, match="https"):
        BackendAuthConfig(type="managed-identity", authority_host="http://x")
