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
    expiry_margin,
    refresh_delay,
    usable,
)

SCOPE = "https://cognitiveservices.azure.com/.default"


class Credential:
    """Hands out token-1, token-2, … valid for ``lifetime`` s of the fake clock. ``calls``
    counts the tokens handed out, ``attempts`` every call."""

    def __init__(self, clock: FakeClock, lifetime: float) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.attempts = 0
        self.fail = False

    def get_token_info(self, *scopes: str, options: object = None) -> AccessTokenInfo:
        assert scopes == (SCOPE,)
        self.attempts += 1
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
        # Right after a failed fetch, requests fail at once (no new fetch) …
        with pytest.raises(BackendAuthError, match=r"endpoint down; next try in 2\.0 s"):
            await source.token()
        clock.advance(2)  # … until its backoff is over
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


def test_expiry_margin() -> None:
    hour = HeldToken("t", expires_on=4600.0, fetched_at=1000.0)
    assert expiry_margin(hour, 300.0) == 60.0
    assert expiry_margin(hour, 50.0) == 25.0  # half the refresh lead: refreshed before
    short = HeldToken("t", expires_on=1008.0, fetched_at=1000.0)
    assert expiry_margin(short, 300.0) == 2.0  # a quarter of a short lifetime
    assert usable(short, 1005.9, 300.0) and not usable(short, 1006.0, 300.0)
    assert usable(hour, 4539.9, 300.0) and not usable(hour, 4540.0, 300.0)
    # The background refresh always comes before the margin.
    for token in (hour, short):
        for before in (1.0, 50.0, 300.0, 10_000.0):
            refresh_at = 1000.0 + refresh_delay(token, 1000.0, before)
            assert refresh_at < token.expires_on - expiry_margin(token, before)


async def test_a_token_is_not_sent_within_its_margin_of_expiry() -> None:
    """When refreshes keep failing, the held token is used until 60 s before it expires, not
    to the last second: then a request fetches (and fails over if that fails)."""
    clock = FakeClock(start=1_000_000.0)
    credential = Credential(clock, lifetime=3600)
    sleeps = Sleeps(clock)  # never released: the background refresh stays asleep
    source = TokenSource(credential, SCOPE, clock, refresh_before=300, sleep=sleeps)
    await source.start()
    try:
        assert await sleeps.next() == 3300.0
        held = source.held
        assert held is not None and held.expires_on == 1_003_600.0
        credential.fail = True
        clock.advance(3600 - 61)
        assert await source.token() == "token-1" and credential.attempts == 1
        clock.advance(2)  # 59 s before expiry: no longer sent
        assert source.valid() is None
        with pytest.raises(BackendAuthError, match="endpoint down"):
            await source.token()
        assert credential.attempts == 2 and source.waited == 1
        credential.fail = False
        clock.advance(1)  # the backoff after that failure
        assert await source.token() == "token-2"
    finally:
        await source.aclose()


async def test_a_short_lived_token_is_not_sent_in_its_last_quarter() -> None:
    clock = FakeClock(start=1_000_000.0)
    credential = Credential(clock, lifetime=8)
    sleeps = Sleeps(clock)
    source = TokenSource(credential, SCOPE, clock, refresh_before=300, sleep=sleeps)
    await source.start()
    try:
        assert await sleeps.next() == 4.0  # refreshed half-way, before the margin (2 s)
        clock.advance(5.9)
        assert source.valid() == "token-1"
        clock.advance(0.2)
        assert source.valid() is None
        assert await source.token() == "token-2"
    finally:
        await source.aclose()


class CachingCredential(Credential):
    """Like azure-identity when its refresh failed: the cached token again, however close to
    its expiry."""

    def get_token_info(self, *scopes: str, options: object = None) -> AccessTokenInfo:
        self.attempts += 1
        return AccessTokenInfo("token-1", 1_000_000 + int(self.lifetime))


async def test_a_token_fetched_inside_its_margin_counts_as_a_failure() -> None:
    clock = FakeClock(start=1_000_000.0)
    credential = CachingCredential(clock, lifetime=3600)
    sleeps = Sleeps(clock)
    source = TokenSource(credential, SCOPE, clock, refresh_before=300, sleep=sleeps)
    await source.start()
    try:
        assert await source.token() == "token-1"
        clock.advance(3600 - 30)
        with pytest.raises(BackendAuthError, match=r"^the token obtained expires in 30 s$"):
            await source.token()
        assert (credential.attempts, source.failures, source.waited) == (2, 1, 1)
        assert source.last_error == "the token obtained expires in 30 s"
        with pytest.raises(BackendAuthError, match=r"expires in 30 s; next try in 1\.0 s"):
            await source.token()
        assert (credential.attempts, source.refused) == (2, 1)
    finally:
        await source.aclose()


async def test_background_retries_without_a_token_wait_1_2_4_up_to_30_s() -> None:
    clock = FakeClock(start=1_000_000.0)
    credential = Credential(clock, lifetime=600)
    credential.fail = True
    sleeps = Sleeps(clock)
    source = TokenSource(credential, SCOPE, clock, refresh_before=300, sleep=sleeps)
    await source.start()
    try:
        waits = []
        for attempts in range(1, 9):
            waits.append(await sleeps.next())
            assert credential.attempts == attempts  # one fetch per wait (the start's first)
            sleeps.release()
        assert waits == [1, 2, 4, 8, 16, 30, 30, 30]
        assert await sleeps.next() == 30 and credential.attempts == 9
        credential.fail = False
        sleeps.release()
        assert await sleeps.next() == 300  # a token: refreshed half-way through its life
        assert source.valid() == "token-1"
        credential.fail = True
        sleeps.release()
        assert await sleeps.next() == 1  # the backoff starts over
    finally:
        await source.aclose()


async def test_after_a_failed_fetch_requests_fail_at_once_for_a_backoff() -> None:
    """Bursts of requests against a failing endpoint: each failed fetch is followed by a
    backoff (1, 2, 4 … 30 s) in which requests fail without a new call; a success resets it."""
    clock = FakeClock(start=1_000_000.0)
    credential = Credential(clock, lifetime=600)
    credential.fail = True
    sleeps = Sleeps(clock)  # never released: only the request path fetches
    source = TokenSource(credential, SCOPE, clock, refresh_before=300, sleep=sleeps)
    await source.start()

    async def burst(n: int = 10) -> list[str]:
        async def one() -> str:
            try:
                return await source.token()
            except BackendAuthError as exc:
                return str(exc)

        return list(await asyncio.gather(*(one() for _ in range(n))))

    refused = "RuntimeError: endpoint down; next try in"
    try:
        assert credential.attempts == 1  # the start's
        for _ in range(10):  # ten bursts within the first second: no new call
            assert all(r.startswith(refused) for r in await burst())
            clock.advance(0.0625)
        assert credential.attempts == 1 and source.refused == 100 and source.waited == 0
        clock.advance(0.375)  # 1 s after the failure
        for backoff in (2, 4, 8, 16, 30, 30):
            assert await burst() == ["RuntimeError: endpoint down"] * 10  # one shared fetch
            attempts = credential.attempts
            clock.advance(backoff - 0.5)
            assert await burst(3) == [f"{refused} 0.5 s"] * 3
            assert credential.attempts == attempts
            clock.advance(0.5)
        assert credential.attempts == 7
        credential.fail = False
        assert await burst() == ["token-1"] * 10
        clock.advance(600 - 60)  # token-1 no longer usable; the next failure backs off 1 s
        credential.fail = True
        assert await burst() == ["RuntimeError: endpoint down"] * 10
        assert await burst(1) == [f"{refused} 1.0 s"]
        assert credential.attempts == 9
    finally:
        await source.aclose()
