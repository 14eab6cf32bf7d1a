"""``TokenValidator`` against the test IdP on loopback, with a fake clock: the time checks and
their leeway, the refresh rate limit, rotation, concurrency and the algorithms."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from jwt.api_jws import PyJWS

from sluicegate.auth.oidc import FetchError
from sluicegate.auth.tokens import TokenError, TokenFailure, TokenValidator
from sluicegate.clock import FakeClock
from sluicegate.config.oidc import OidcConfig, OidcIssuerConfig
from tests.support.idp import AUDIENCE, TestIdentityProvider

NOW = 1_800_000_000


def _config(idp: TestIdentityProvider, **overrides: Any) -> OidcConfig:
    issuer: dict[str, Any] = {"discovery_url": idp.discovery_url, "audiences": [AUDIENCE]}
    issuer.update(overrides.pop("issuer", {}))
    return OidcConfig(issuers=[OidcIssuerConfig(**issuer)], **overrides)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=NOW)


@pytest.fixture
async def validator(idp: TestIdentityProvider, clock: FakeClock) -> AsyncIterator[TokenValidator]:
    v = TokenValidator(_config(idp, jwks_min_refresh_seconds=60), clock)
    await v.start(background=False)
    yield v
    await v.aclose()


def _claims(idp: TestIdentityProvider, **overrides: Any) -> dict[str, Any]:
    return idp.claims(**{"iat": NOW, "nbf": NOW, "exp": NOW + 3600, **overrides})


async def _refused(v: TokenValidator, token: str) -> TokenError:
    with pytest.raises(TokenError) as info:
        await v.validate(token)
    return info.value


async def test_valid_token_and_caller(validator: TokenValidator, idp: TestIdentityProvider) -> None:
    token = await validator.validate(idp.issue(_claims(idp, oid="the-oid", azp="the-app")))
    assert token.issuer == idp.issuer
    assert token.caller == "the-oid"
    assert token.key_id == idp.current.kid
    app_only = await validator.validate(idp.issue(_claims(idp, oid=None, azp="the-app")))
    assert app_only.caller == "the-app"
    v1 = await validator.validate(idp.issue(_claims(idp, oid=None, azp=None, appid="app-v1")))
    assert v1.caller == "app-v1"


async def test_expiry_and_not_before_with_leeway(
    validator: TokenValidator, idp: TestIdentityProvider, clock: FakeClock
) -> None:
    token = idp.issue(_claims(idp, nbf=NOW + 30, exp=NOW + 100))
    await validator.validate(token)  # nbf 30 s ahead: within the 60 s leeway
    clock.advance(159)
    await validator.validate(token)  # expired 59 s ago: still within the leeway
    clock.advance(1)
    err = await _refused(validator, token)
    assert (err.status, err.reason) == (401, TokenFailure.EXPIRED)
    assert "60 s ago" in err.message and "clock skew allowed: 60 s" in err.message

    early = idp.issue(_claims(idp, nbf=clock.now() + 61, exp=clock.now() + 3600))
    err = await _refused(validator, early)
    assert err.reason is TokenFailure.NOT_YET_VALID
    assert "61 s from now" in err.message


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": "tomorrow"}, TokenFailure.MALFORMED),
        ({"exp": 10**400}, TokenFailure.MALFORMED),
        ({"exp": True}, TokenFailure.MALFORMED),
        ({"nbf": [1]}, TokenFailure.MALFORMED),
        ({"aud": {"a": 1}}, TokenFailure.AUDIENCE),
        ({"aud": [AUDIENCE, "other"]}, None),  # any one accepted audience is enough
        ({"iss": 42}, TokenFailure.ISSUER),
        ({"iss": None}, TokenFailure.CLAIM_MISSING),
        ({"aud": None}, TokenFailure.CLAIM_MISSING),
        ({"sub": 7}, TokenFailure.MALFORMED),
    ],
)
async def test_claims_of_the_wrong_type(
    validator: TokenValidator,
    idp: TestIdentityProvider,
    claims: dict[str, Any],
    reason: TokenFailure | None,
) -> None:
    token = idp.issue(_claims(idp) | claims)
    if reason is None:
        await validator.validate(token)
        return
    err = await _refused(validator, token)
    assert (err.status, err.reason) == (401, reason), err.message


async def test_unknown_kid_refreshes_at_most_once_per_interval(
    validator: TokenValidator, idp: TestIdentityProvider, clock: FakeClock
) -> None:
    assert idp.jwks_hits == 1
    first = idp.rotate()
    assert (await validator.validate(idp.issue(_claims(idp)))).key_id == first.kid
    assert idp.jwks_hits == 2  # the new kid asked for one refresh

    second = idp.rotate()
    clock.advance(59)
    err = await _refused(validator, idp.issue(_claims(idp)))
    assert err.reason is TokenFailure.UNKNOWN_KEY
    assert second.kid in err.message and "refreshed 59 s ago" in err.message
    assert idp.jwks_hits == 2  # rate-limited: no fetch

    clock.advance(1)
    assert (await validator.validate(idp.issue(_claims(idp)))).key_id == second.kid
    assert idp.jwks_hits == 3


async def test_concurrent_unknown_kids_share_one_fetch(
    validator: TokenValidator, idp: TestIdentityProvider
) -> None:
    idp.rotate()
    tokens = [idp.issue(_claims(idp)) for _ in range(20)]
    results = await asyncio.gather(*(validator.validate(t) for t in tokens))
    assert len(results) == 20
    assert idp.jwks_hits == 2


async def test_background_refresh_drops_withdrawn_keys(
    idp: TestIdentityProvider, clock: FakeClock
) -> None:
    v = TokenValidator(_config(idp, jwks_max_age_seconds=600), clock)
    await v.start(background=False)
    try:
        old_token = idp.issue(_claims(idp))
        await v.validate(old_token)
        idp.rotate(drop_old=True)
        await v.refresh_due()
        assert idp.jwks_hits == 1  # not due yet
        clock.advance(600)
        await v.refresh_due()
        assert (idp.jwks_hits, idp.discovery_hits) == (2, 2)
        assert (await _refused(v, old_token)).reason is TokenFailure.UNKNOWN_KEY
    finally:
        await v.aclose()


async def test_algorithms(idp: TestIdentityProvider, clock: FakeClock) -> None:
    v = TokenValidator(
        _config(idp, issuer={"allowed_algorithms": ["RS256", "PS256", "ES256"]}), clock
    )
    await v.start(background=False)
    try:
        rsa_key = idp.current
        await v.validate(idp.issue(_claims(idp), alg="PS256"))  # RSA key, PSS padding
        err = await _refused(v, idp.issue(_claims(idp), alg="RS384"))
        assert err.reason is TokenFailure.ALGORITHM and "RS384" in err.message
        ec_key = idp.rotate("ES256")
        assert (await v.validate(idp.issue(_claims(idp)))).key_id == ec_key.kid
        for token in (idp.forge_none(_claims(idp)), idp.forge_hmac(_claims(idp))):
            err = await _refused(v, token)
            assert err.reason is TokenFailure.ALGORITHM
        # The key's type must fit the token's algorithm: an RSA signature under the EC key's
        # kid, and an ES256 one under the RSA key's kid.
        for token in (
            idp.issue(_claims(idp), key=rsa_key, kid=ec_key.kid),
            idp.issue(_claims(idp), key=ec_key, kid=rsa_key.kid),
        ):
            err = await _refused(v, token)
            assert err.reason is TokenFailure.ALGORITHM and "cannot verify" in err.message
    finally:
        await v.aclose()


async def test_malformed_and_oversized(
    validator: TokenValidator, idp: TestIdentityProvider
) -> None:
    for token in ("eyJ.x.y", "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.sig", "a.b"):
        assert (await _refused(validator, token)).reason is TokenFailure.MALFORMED
    huge = idp.issue(_claims(idp, pad="x" * 20_000))
    err = await _refused(validator, huge)
    assert err.reason is TokenFailure.MALFORMED and "longer than" in err.message


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class _Documents:
    """An in-memory fetcher (the ``JsonFetcher`` seam): URL → document or error."""

    def __init__(self, docs: dict[str, dict[str, Any]]) -> None:
        self.docs = docs
        self.calls: list[str] = []

    async def __call__(self, url: str) -> dict[str, Any]:
        self.calls.append(url)
        if url not in self.docs:
            raise FetchError(f"{url} answered 404")
        return self.docs[url]


async def test_symmetric_and_encryption_keys_in_the_jwks_are_ignored(
    idp: TestIdentityProvider, clock: FakeClock
) -> None:
    """A JWKS that (wrongly) publishes an ``oct`` key must not make HS256 verifiable, and an
    encryption key must not verify signatures."""
    good = idp.current.jwk()
    leaky = idp.unpublished_key()
    enc = dict(idp.rotate().jwk(), use="enc")
    secret = b"a shared secret of thirty-two bytes"
    oct_key = {"kty": "oct", "kid": "shared", "k": _b64(secret), "alg": "HS256"}
    docs = _Documents(
        {
            "https://idp.test/.well-known/openid-configuration": {
                "issuer": idp.issuer,
                "jwks_uri": "https://idp.test/keys",
            },
            "https://idp.test/keys": {
                "keys": [
                    good,
                    enc,
                    oct_key,
                    "junk",
                    {"kty": "XYZ"},
                    {"kty": ["RSA"]},
                    {"kty": "EC", "crv": ["P-256"], "kid": "odd"},
                    {"kty": "RSA", "kid": 5},
                    {"kty": "RSA", "kid": "broken", "n": "AQAB", "e": 7},
                    dict(leaky.jwk(), d="AQAB"),  # a private member that must be dropped
                ]
            },
        }
    )
    config = OidcConfig(
        issuers=[
            OidcIssuerConfig(
                discovery_url="https://idp.test/.well-known/openid-configuration",
                audiences=[AUDIENCE],
                allowed_algorithms=["RS256"],
            )
        ],
        jwks_min_refresh_seconds=0,
    )
    v = TokenValidator(config, clock, fetch=docs)
    await v.start(background=False)
    try:
        assert v.key_sets[0].kids == sorted([good["kid"], "broken", leaky.kid])
        err = await _refused(v, idp.issue(_claims(idp)))  # signed with the encryption key
        assert err.reason is TokenFailure.UNKNOWN_KEY
        hs = PyJWS().encode(
            json.dumps(_claims(idp)).encode(), secret, "HS256", headers={"kid": "shared"}
        )
        assert (await _refused(v, hs)).reason is TokenFailure.ALGORITHM
        # A broken entry is refused for what it is, not with a server error; private members
        # are dropped (the key is used as a public key).
        broken = idp.issue(_claims(idp), key=idp.unpublished_key(), kid="broken")
        err = await _refused(v, broken)
        assert err.reason is TokenFailure.ALGORITHM and "unusable" in err.message
        token = await v.validate(idp.issue(_claims(idp), key=leaky))
        assert token.key_id == leaky.kid
    finally:
        await v.aclose()


async def test_issuer_down_then_back(idp: TestIdentityProvider, clock: FakeClock) -> None:
    docs = _Documents({})
    config = OidcConfig(
        issuers=[OidcIssuerConfig(discovery_url="https://idp.test/oidc", audiences=[AUDIENCE])],
        jwks_min_refresh_seconds=30,
    )
    v = TokenValidator(config, clock, fetch=docs)
    await v.start(background=False)  # does not raise: key traffic must not wait for an IdP
    token = idp.issue(_claims(idp))
    err = await _refused(v, token)
    assert (err.status, err.reason, err.retry_after) == (503, TokenFailure.UNAVAILABLE, 10.0)
    calls = len(docs.calls)
    err = await _refused(v, token)  # within the interval: no new attempt
    assert err.status == 503 and len(docs.calls) == calls
    docs.docs["https://idp.test/oidc"] = {"issuer": idp.issuer, "jwks_uri": "https://idp.test/k"}
    docs.docs["https://idp.test/k"] = {"keys": [idp.current.jwk()]}
    clock.advance(30)
    assert (await v.validate(token)).issuer == idp.issuer
    await v.aclose()


async def test_two_issuers_are_told_apart_by_iss(clock: FakeClock) -> None:
    with TestIdentityProvider(tenant="tenant-a") as a, TestIdentityProvider(tenant="tenant-b") as b:
        config = OidcConfig(
            issuers=[
                OidcIssuerConfig(discovery_url=a.discovery_url, audiences=[AUDIENCE]),
                OidcIssuerConfig(discovery_url=b.discovery_url, audiences=["api://b"]),
            ]
        )
        v = TokenValidator(config, clock)
        await v.start(background=False)
        try:
            assert (await v.validate(a.issue(_claims(a)))).issuer == a.issuer
            assert (await v.validate(b.issue(_claims(b, aud="api://b")))).issuer == b.issuer
            # b's audience is not a's: each issuer keeps its own audiences.
            err = await _refused(v, a.issue(_claims(a, aud="api://b")))
            assert err.reason is TokenFailure.AUDIENCE
            # a token claiming b's issuer but signed by a's key
            err = await _refused(v, a.issue(_claims(a, iss=b.issuer, aud="api://b")))
            assert err.reason is TokenFailure.UNKNOWN_KEY
            err = await _refused(v, a.issue(_claims(a, iss="https://elsewhere")))
            assert err.reason is TokenFailure.ISSUER and "https://elsewhere" in err.message
        finally:
            await v.aclose()


async def test_one_of_two_issuers_down(idp: TestIdentityProvider, clock: FakeClock) -> None:
    """Tokens of the issuer that answers work; the silent one is asked again at most once per
    interval, and its tokens are refused with a message that says it is not reachable."""
    docs = _Documents({})
    config = OidcConfig(
        issuers=[
            OidcIssuerConfig(discovery_url=idp.discovery_url, audiences=[AUDIENCE]),
            OidcIssuerConfig(discovery_url="https://down.test/oidc", audiences=[AUDIENCE]),
        ],
        jwks_min_refresh_seconds=30,
    )

    async def fetch(url: str) -> dict[str, Any]:
        if url.startswith("https://down.test"):
            return await docs(url)
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            result: dict[str, Any] = await resp.json()
            return result

    v = TokenValidator(config, clock, fetch=fetch)
    await v.start(background=False)
    assert docs.calls == ["https://down.test/oidc"]
    assert (await v.validate(idp.issue(_claims(idp)))).issuer == idp.issuer
    for _ in range(3):
        err = await _refused(v, idp.issue(_claims(idp, iss="https://down.test/v2.0")))
        assert err.reason is TokenFailure.ISSUER and "not reachable" in err.message
    assert docs.calls == ["https://down.test/oidc"] * 2  # one retry in the interval
    clock.advance(30)
    await _refused(v, idp.issue(_claims(idp, iss="https://down.test/v2.0")))
    assert len(docs.calls) == 3
    await v.aclose()
