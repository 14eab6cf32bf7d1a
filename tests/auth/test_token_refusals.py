"""Every wrong token is refused with the right status, a clear Azure-shaped message, a
metrics count and a log line that does not contain the token."""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from sluicegate.simulator.server import SimulatorThread
from tests.auth.harness import EntraHarness, entra_gateway, oidc_section
from tests.support.gateway import free_port
from tests.support.idp import TestIdentityProvider

APP = str(uuid.uuid4())


def _rules(ids: dict[str, str]) -> list[dict[str, object]]:
    return [{"app_ids": [APP], "subscription": ids["team-a"]}]


def _assert_refused(resp: httpx.Response, status: int, code: str, *words: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code, body
    message: str = body["error"]["message"]
    for word in words:
        assert word in message, (word, message)
    assert "Traceback" not in resp.text
    if status == 401 and code.startswith("Token"):
        assert resp.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    return message


def _metric(text: str, reason: str) -> float:
    prefix = f'sluicegate_auth_failures_total{{reason="{reason}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


@pytest.fixture
def h(
    tmp_path: Path, simulator: SimulatorThread, idp: TestIdentityProvider
) -> Iterator[EntraHarness]:
    with entra_gateway(
        tmp_path, simulator, idp, subscriptions={"team-a": "starter"}, rules=_rules
    ) as harness:
        yield harness


CASES: list[tuple[str, Callable[[TestIdentityProvider], str], int, str, tuple[str, ...]]] = [
    ("expired", lambda p: p.issue(azp=APP, exp=int(time.time()) - 600), 401,
     "TokenExpired", ("expired at", "Get a new token")),
    ("not yet valid", lambda p: p.issue(azp=APP, nbf=int(time.time()) + 600), 401,
     "TokenNotYetValid", ("not valid before",)),
    ("wrong audience", lambda p: p.issue(azp=APP, aud="api://someone-else"), 401,
     "TokenAudienceInvalid", ("api://someone-else", "https://cognitiveservices.azure.com")),
    ("wrong issuer", lambda p: p.issue(azp=APP, iss="https://login.evil.example/t/v2.0"), 401,
     "TokenIssuerInvalid", ("https://login.evil.example/t/v2.0", "does not trust")),
    ("bad signature", lambda p: p.issue(azp=APP, key=p.unpublished_key(), kid=p.current.kid),
     401, "TokenSignatureInvalid", ("signature does not verify",)),
    ("alg none", lambda p: p.forge_none(p.claims(azp=APP)), 401,
     "TokenAlgorithmNotAllowed", ("algorithm none",)),
    ("HMAC with the public key", lambda p: p.forge_hmac(p.claims(azp=APP)), 401,
     "TokenAlgorithmNotAllowed", ("algorithm HS256",)),
    ("no exp", lambda p: p.issue(azp=APP, exp=None), 401, "TokenClaimMissing", ("'exp'",)),
    ("not a JWT", lambda p: "eyJhbGciOi.broken.token", 401, "TokenMalformed", ("not a",)),
    ("no rule", lambda p: p.issue(azp=str(uuid.uuid4())), 403,
     "NoMatchingTokenRule", ("no token rule", "subscription")),
]  # fmt: skip


def test_each_wrong_token_is_refused_with_a_clear_message(
    h: EntraHarness, idp: TestIdentityProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sluicegate.auth")
    tokens: list[str] = []
    for name, make, status, code, words in CASES:
        token = make(idp)
        tokens.append(token)
        resp = h.bearer(token)
        message = _assert_refused(resp, status, code, *words)
        assert token not in message, name
    assert idp.jwks_hits == 1  # only the start-up fetch: none of these asked for a refresh
    # A good token still works, so the refusals were about the tokens.
    assert h.bearer(idp.issue(azp=APP)).status_code == 200

    metrics = h.metrics()
    for code, count in Counter(code for _, _, _, code, _ in CASES).items():
        assert _metric(metrics, code) == count, code
    # Refused tokens never reach the ledger (a stranger cannot fill it) nor the backend.
    records = h.records(expect=1)
    assert [r.status for r in records] == [200]
    assert len(h.sim_log()) == 1
    # Each refusal was logged with its reason, and no log line holds a token.
    reasons = [getattr(r, "reason", None) for r in caplog.records if r.name == "sluicegate.auth"]
    assert sorted(r for r in reasons if r) == sorted(code for _, _, _, code, _ in CASES)
    for record in caplog.records:
        text = record.getMessage() + repr(vars(record))
        assert not any(token in text for token in tokens)


def test_unknown_key_is_refused_after_exactly_one_refresh(
    h: EntraHarness, idp: TestIdentityProvider
) -> None:
    assert idp.jwks_hits == 1  # fetched at start
    stranger = idp.unpublished_key()
    resp = h.bearer(idp.issue(azp=APP, key=stranger))
    _assert_refused(resp, 401, "TokenSigningKeyUnknown", stranger.kid, "fetched again")
    assert idp.jwks_hits == 2  # one refresh for the unknown kid
    for _ in range(5):  # more unknown kids within the interval: no more fetches
        resp = h.bearer(idp.issue(azp=APP, key=idp.unpublished_key()))
        _assert_refused(resp, 401, "TokenSigningKeyUnknown", "refreshed")
    assert idp.jwks_hits == 2


def test_key_rotation_is_picked_up_without_restart(
    h: EntraHarness, idp: TestIdentityProvider
) -> None:
    old = idp.current
    assert h.bearer(idp.issue(azp=APP)).status_code == 200
    new = idp.rotate(drop_old=True)
    assert new.kid != old.kid
    resp = h.bearer(idp.issue(azp=APP))  # signed with the new key: the gateway refreshes
    assert resp.status_code == 200, resp.text
    assert idp.jwks_hits == 2
    # The IdP withdrew the old key, and the refreshed key set no longer holds it.
    resp = h.bearer(idp.issue(azp=APP, key=old))
    _assert_refused(resp, 401, "TokenSigningKeyUnknown", old.kid)
    assert h.bearer(idp.issue(azp=APP)).status_code == 200
    assert idp.jwks_hits == 2
    assert [r.status for r in h.records(expect=3)] == [200, 200, 200]


def test_key_and_token_together_must_name_the_same_subscription(
    tmp_path: Path, simulator: SimulatorThread, idp: TestIdentityProvider
) -> None:
    with entra_gateway(
        tmp_path,
        simulator,
        idp,
        subscriptions={"team-a": "starter", "team-b": "starter"},
        rules=_rules,
    ) as h:
        token = idp.issue(azp=APP, oid="caller-oid")
        key_a, key_b = h.keys["team-a"], h.keys["team-b"]
        bearer = {"authorization": f"Bearer {token}"}
        # Same subscription: accepted, and the ledger has the caller.
        assert h.chat({"api-key": key_a, **bearer}).status_code == 200
        # Different subscriptions: refused, neither wins.
        _assert_refused(
            h.chat({"api-key": key_b, **bearer}),
            403,
            "CredentialsDisagree",
            h.subs["team-a"],
            h.subs["team-b"],
        )
        # One bad credential spoils the pair.
        _assert_refused(h.chat({"api-key": "sg-wrong", **bearer}), 401, "401")
        expired = idp.issue(azp=APP, exp=int(time.time()) - 600)
        _assert_refused(
            h.chat({"api-key": key_a, "authorization": f"Bearer {expired}"}), 401, "TokenExpired"
        )
        # Two different tokens are ambiguous, like two different keys.
        other = idp.issue(azp=APP)
        _assert_refused(
            h.chat({"api-key": token, "authorization": f"Bearer {other}"}),
            400,
            "AmbiguousCredentials",
        )
        records = h.records(expect=1)
        assert _metric(h.metrics(), "CredentialsDisagree") == 1
    assert [(r.subscription_id, r.caller, r.status) for r in records] == [
        (h.subs["team-a"], "caller-oid", 200)
    ]


def test_a_rule_naming_an_unknown_subscription_is_refused(
    tmp_path: Path, simulator: SimulatorThread, idp: TestIdentityProvider
) -> None:
    with entra_gateway(
        tmp_path,
        simulator,
        idp,
        rules=lambda ids: [{"app_ids": [APP], "subscription": "sub_does_not_exist"}],
    ) as h:
        resp = h.bearer(idp.issue(azp=APP))
        _assert_refused(resp, 403, "TokenSubscriptionNotFound", "sub_does_not_exist")


def test_tokens_are_refused_when_no_issuer_is_configured(
    tmp_path: Path, simulator: SimulatorThread, idp: TestIdentityProvider
) -> None:
    with entra_gateway(tmp_path, simulator, None, subscriptions={"team-a": "starter"}) as h:
        _assert_refused(h.bearer(idp.issue()), 401, "TokensNotAccepted", "api-key")
        # Keys work as before.
        assert h.chat({"api-key": h.keys["team-a"]}).status_code == 200


def test_identity_provider_down_at_start(tmp_path: Path, simulator: SimulatorThread) -> None:
    """The gateway starts without its IdP (key traffic must not wait for it); tokens get 503
    with Retry-After while the IdP does not answer, and work once it does."""
    late = TestIdentityProvider(port=free_port())  # not started yet: connections refused
    oidc = {**oidc_section(late), "jwks_min_refresh_seconds": 0}
    with entra_gateway(
        tmp_path, simulator, late, subscriptions={"team-a": "starter"}, rules=_rules, oidc=oidc
    ) as h:
        assert h.chat({"api-key": h.keys["team-a"]}).status_code == 200
        resp = h.bearer(late.issue(azp=APP))
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "IdentityProviderUnavailable"
        assert int(resp.headers["retry-after"]) > 0
        with late:
            assert h.bearer(late.issue(azp=APP)).status_code == 200
            assert late.jwks_hits == 1
