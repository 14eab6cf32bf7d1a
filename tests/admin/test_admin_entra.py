"""The admin API with Entra ID tokens (``admin.entra``): an administrator's token opens it, a
valid token of anyone else gets 403, invalid tokens and client credentials get 401; the
admin token keeps working; and the two configurations stay apart: an admin token (JWT) is no
client credential unless the client side's own audiences and rules accept it. Every refusal is
counted and logged without the credential."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from sluicegate.config.admin import AdminEntraConfig
from sluicegate.simulator.server import SimulatorThread
from tests.admin.entra import ADMIN_APP, ADMIN_GROUP, ADMIN_ROLE, admin_section, metric
from tests.admin.harness import ADMIN_TOKEN, ADMIN_TOKEN_ENV, admin_gateway
from tests.auth.harness import EntraHarness, entra_gateway, oidc_section
from tests.support.idp import AUDIENCE, TestIdentityProvider

CLIENT_APP = str(uuid.uuid4())  # a client application, mapped by the client token rules


@pytest.fixture
def idp() -> Iterator[TestIdentityProvider]:
    with TestIdentityProvider() as provider:
        yield provider


@pytest.fixture
def gw(
    tmp_path: Path,
    simulator: SimulatorThread,
    idp: TestIdentityProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[EntraHarness]:
    """Client tokens (audience AUDIENCE, app CLIENT_APP → team-a) and admin tokens (audience
    ADMIN_APP, group ADMIN_GROUP or role ADMIN_ROLE) from the same tenant."""
    monkeypatch.setenv(ADMIN_TOKEN_ENV, ADMIN_TOKEN)
    with entra_gateway(
        tmp_path,
        simulator,
        idp,
        subscriptions={"team-a": "starter"},
        rules=lambda ids: [{"app_ids": [CLIENT_APP], "subscription": ids["team-a"]}],
        admin=admin_section(idp),
    ) as harness:
        yield harness


def admin_get(h: EntraHarness, token: str | None, path: str = "/products") -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.get(f"{h.url}/admin/api{path}", headers=headers, timeout=30)


def test_an_administrators_token_opens_the_admin_api(
    gw: EntraHarness, idp: TestIdentityProvider
) -> None:
    by_group = idp.issue(aud=ADMIN_APP, groups=[str(uuid.uuid4()), ADMIN_GROUP])
    by_role = idp.issue(aud=ADMIN_APP, roles=[ADMIN_ROLE])
    for token in (by_group, by_role, ADMIN_TOKEN):
        r = admin_get(gw, token)
        assert r.status_code == 200, r.text
        assert [p["name"] for p in r.json()["items"]] == ["starter", "embeddings-only"]
    # Writes too: an administrator is an administrator.
    made = httpx.post(
        f"{gw.url}/admin/api/subscriptions",
        headers={"Authorization": f"Bearer {by_group}"},
        json={"product": "starter", "owner": "team-b", "name": "b"},
        timeout=30,
    )
    assert made.status_code == 201, made.text
    # An unknown path is "not found" for an administrator, "unauthorized" for others.
    assert admin_get(gw, by_role, "/nothing-here").status_code == 404
    assert admin_get(gw, None, "/nothing-here").status_code == 401


def test_other_tokens_and_client_credentials_are_refused(
    gw: EntraHarness, idp: TestIdentityProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sluicegate.admin")
    now = int(time.time())
    cases: list[tuple[str, str | None, int, str, str, tuple[str, ...]]] = [
        # name, credential, status, error code, metrics reason, words in the message
        ("valid but not an admin",
         idp.issue(aud=ADMIN_APP, groups=[str(uuid.uuid4())], roles=["Reader"],
                   preferred_username="someone@example.test"),
         403, "NotAnAdmin", "AdminNotAnAdmin", ("someone@example.test", "not an administrator")),
        ("group overage",
         idp.issue(aud=ADMIN_APP, _claim_names={"groups": "src1"}),
         403, "NotAnAdmin", "AdminNotAnAdmin", ("group overage", "app roles")),
        ("expired", idp.issue(aud=ADMIN_APP, groups=[ADMIN_GROUP], exp=now - 600),
         401, "TokenExpired", "AdminTokenExpired", ("expired at", "admin.entra")),
        ("wrong audience", idp.issue(aud="api://someone-else", groups=[ADMIN_GROUP]),
         401, "TokenAudienceInvalid", "AdminTokenAudienceInvalid", ("api://someone-else",)),
        # A client token, even of someone in the admin group: the admin audience is not its.
        ("client token", idp.issue(aud=AUDIENCE, azp=CLIENT_APP, groups=[ADMIN_GROUP]),
         401, "TokenAudienceInvalid", "AdminTokenAudienceInvalid", (AUDIENCE, ADMIN_APP)),
        ("bad signature",
         idp.issue(aud=ADMIN_APP, groups=[ADMIN_GROUP], key=idp.unpublished_key(),
                   kid=idp.current.kid),
         401, "TokenSignatureInvalid", "AdminTokenSignatureInvalid", ("signature",)),
        ("alg none", idp.forge_none(idp.claims(aud=ADMIN_APP, groups=[ADMIN_GROUP])),
         401, "TokenAlgorithmNotAllowed", "AdminTokenAlgorithmNotAllowed", ("none",)),
        ("subscription key", gw.keys["team-a"],
         401, "Unauthorized", "AdminTokenInvalid", ("not the admin token",)),
        ("nothing", None, 401, "Unauthorized", "AdminCredentialsMissing", ("Bearer",)),
    ]  # fmt: skip
    for name, credential, status, code, _, words in cases:
        r = admin_get(gw, credential)
        assert r.status_code == status, (name, r.text)
        error = r.json()["error"]
        assert error["code"] == code, (name, error)
        for word in words:
            assert word in error["message"], (name, word, error["message"])
        if credential is not None:
            assert credential not in r.text, name
        assert "Traceback" not in r.text
        if code.startswith("Token"):
            assert 'error="invalid_token"' in r.headers["www-authenticate"], name
        if status == 403:
            assert 'error="insufficient_scope"' in r.headers["www-authenticate"], name
    # The subscription key still works where it belongs, so it was refused for being one.
    assert gw.chat({"api-key": gw.keys["team-a"]}).status_code == 200

    metrics = gw.metrics()
    expected: dict[str, int] = {}
    for _, _, _, _, reason, _ in cases:
        expected[reason] = expected.get(reason, 0) + 1
    for reason, count in expected.items():
        assert metric(metrics, reason) == count, reason
    logged = [getattr(r, "reason", None) for r in caplog.records if r.name == "sluicegate.admin"]
    assert sorted(x for x in logged if x) == sorted(r for _, _, _, _, r, _ in cases)
    secrets = [c for _, c, _, _, _, _ in cases if c]
    for record in caplog.records:
        text = record.getMessage() + repr(vars(record))
        assert not any(secret in text for secret in secrets)
    # Who was refused is logged for a valid token (its oid), never the token.
    refused = [r for r in caplog.records if getattr(r, "reason", "") == "AdminNotAnAdmin"]
    assert all(getattr(r, "caller", None) for r in refused)


def test_an_admin_token_is_no_client_credential(
    gw: EntraHarness, idp: TestIdentityProvider
) -> None:
    admin = idp.issue(aud=ADMIN_APP, groups=[ADMIN_GROUP], roles=[ADMIN_ROLE])
    assert admin_get(gw, admin).status_code == 200
    # The client side does not accept the admin audience…
    r = gw.bearer(admin)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "TokenAudienceInvalid"
    # … and the admin token (the shared secret) is not a subscription key either.
    assert gw.chat({"api-key": ADMIN_TOKEN}).status_code == 401
    assert gw.bearer(ADMIN_TOKEN).status_code == 401
    # A client token works on the client side only.
    client = idp.issue(aud=AUDIENCE, azp=CLIENT_APP)
    assert gw.bearer(client).status_code == 200
    assert admin_get(gw, client).status_code == 401


def test_client_rules_decide_alone_even_for_the_admin_audience(
    tmp_path: Path,
    simulator: SimulatorThread,
    idp: TestIdentityProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An operator who lists the admin app as a client audience too: an admin token is then a
    client credential only if a client token rule maps it, by its own conditions; being an
    administrator grants nothing there."""
    monkeypatch.setenv(ADMIN_TOKEN_ENV, ADMIN_TOKEN)
    oidc = oidc_section(idp)
    oidc["issuers"][0]["audiences"] = [AUDIENCE, ADMIN_APP]
    with entra_gateway(
        tmp_path,
        simulator,
        idp,
        subscriptions={"team-a": "starter", "admins": "starter"},
        rules=lambda ids: [{"app_ids": [CLIENT_APP], "subscription": ids["team-a"]}],
        oidc=oidc,
        admin=admin_section(idp),
    ) as h:
        admin = idp.issue(aud=ADMIN_APP, groups=[ADMIN_GROUP])
        r = h.bearer(admin)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "NoMatchingTokenRule"
        assert admin_get(h, admin).status_code == 200
    with entra_gateway(
        tmp_path / "mapped",
        simulator,
        idp,
        subscriptions={"admins": "starter"},
        rules=lambda ids: [{"groups": [ADMIN_GROUP], "subscription": ids["admins"]}],
        oidc=oidc,
        admin=admin_section(idp),
    ) as h:
        # A client rule that maps the group: now it is a client credential, by that rule.
        assert h.bearer(idp.issue(aud=ADMIN_APP, groups=[ADMIN_GROUP])).status_code == 200


def test_tokens_are_refused_without_admin_entra(tmp_path: Path, idp: TestIdentityProvider) -> None:
    with admin_gateway(tmp_path) as h:
        token = idp.issue(aud=ADMIN_APP, groups=[ADMIN_GROUP])
        r = httpx.get(
            f"{h.url}/admin/api/products",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "TokensNotAccepted"
        assert "admin.entra" in r.json()["error"]["message"]
        login = httpx.get(f"{h.url}/dashboard/login", timeout=30)
        assert "Sign in with Entra ID" not in login.text
        metrics = httpx.get(f"{h.url}/metrics", timeout=30).text
        assert metric(metrics, "AdminTokensNotAccepted") == 1


def test_configuration_of_admin_entra() -> None:
    base = {"discovery_url": "https://login.example/t/v2.0/.well-known/openid-configuration"}
    config = AdminEntraConfig.model_validate({**base, "client_id": ADMIN_APP, "roles": ["A"]})
    assert config.accepted_audiences == [ADMIN_APP]
    assert config.oidc().issuers[0].audiences == [ADMIN_APP]
    assert config.oidc().leeway_seconds == config.leeway_seconds
    bad: list[tuple[dict[str, Any], str]] = [
        ({**base, "client_id": ADMIN_APP}, "at least one of 'groups' or 'roles'"),
        (
            {**base, "client_id": ADMIN_APP, "groups": ["g"], "allowed_algorithms": ["HS256"]},
            "only asymmetric",
        ),
        (
            {
                "discovery_url": "http://login.example/.well-known/openid-configuration",
                "client_id": ADMIN_APP,
                "groups": ["g"],
            },
            "https://",
        ),
        (
            {**base, "client_id": ADMIN_APP, "groups": ["g"], "redirect_uri": "http://gw/cb"},
            "redirect_uri must be an https://",
        ),
        ({**base, "client_id": "", "groups": ["g"]}, "client_id"),
        ({**base, "client_id": ADMIN_APP, "groups": ["g"], "secret": "x"}, "secret"),
    ]
    for data, words in bad:
        with pytest.raises(ValidationError) as info:
            AdminEntraConfig.model_validate(data)
        assert words in str(info.value), (data, str(info.value))
