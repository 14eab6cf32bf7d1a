"""Required claims (APIM's ``<required-claims>``): a token without them is refused with 401 in
Azure's error shape, without its content echoed; ``match: any`` and ``match: all``; the
global list and an issuer's own list. Real gateway, real ``openai`` SDK, tokens of the test
identity provider (tests/support/idp.py)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from sluicegate.config.loader import ConfigError, parse_config
from sluicegate.simulator.server import SimulatorThread
from tests.auth.harness import EntraHarness, entra_gateway, oidc_section
from tests.auth.test_token_refusals import _metric
from tests.support.gateway import gateway_config
from tests.support.idp import AUDIENCE, TestIdentityProvider

APP = str(uuid.uuid4())
GROUP_1, GROUP_2 = str(uuid.uuid4()), str(uuid.uuid4())

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]


def _rules(ids: dict[str, str]) -> list[dict[str, Any]]:
    return [{"app_ids": [APP], "subscription": ids["team-a"]}]


def _refusal(h: EntraHarness, token: str) -> tuple[int, str | None]:
    """(status, error code) of one chat completion by ``token`` with the SDK; (200, None)
    when it passes. A refusal must have Azure's shape and say nothing of the token."""
    try:
        h.azure(token).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=2)
    except openai.APIStatusError as exc:
        refused = exc.response
    else:
        return 200, None
    body = refused.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    assert token not in refused.text
    assert token.split(".")[1] not in refused.text  # nor its claims
    if refused.status_code == 401:
        assert refused.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    return refused.status_code, body["error"]["code"]


@pytest.mark.parametrize("where", ["oidc", "issuer"])
def test_required_claims_any_and_all(
    tmp_path: Path, simulator: SimulatorThread, idp: TestIdentityProvider, where: str
) -> None:
    """``roles`` must hold any of two roles, ``groups`` all of two groups, and ``scp`` (space
    separated) its one scope; given for every token (``oidc.required_claims``) or for the
    issuer's tokens (``issuers[].required_claims``), with the same effect."""
    required = [
        {"name": "roles", "values": ["Gateway.User", "Gateway.Admin"], "match": "any"},
        {"name": "groups", "values": [GROUP_1, GROUP_2]},  # match: all by default, as APIM
        {"name": "scp", "values": ["user_impersonation"]},
    ]
    if where == "oidc":
        oidc = oidc_section(idp, required_claims=required)
    else:
        oidc = {
            "issuers": [
                {
                    "discovery_url": idp.discovery_url,
                    "audiences": [AUDIENCE],
                    "required_claims": required,
                }
            ]
        }
    with entra_gateway(
        tmp_path, simulator, idp, subscriptions={"team-a": "starter"}, rules=_rules, oidc=oidc
    ) as h:

        def token(**claims: Any) -> str:
            base: dict[str, Any] = {
                "azp": APP,
                "roles": ["Gateway.User"],
                "groups": [GROUP_1, GROUP_2, "other"],
                "scp": "openid user_impersonation",
            }
            return idp.issue(**{**base, **claims})

        assert _refusal(h, token()) == (200, None)
        assert _refusal(h, token(roles=["Other", "Gateway.Admin"])) == (200, None)
        # any: none of the values.
        assert _refusal(h, token(roles=["Other"])) == (401, "TokenClaimInvalid")
        # The claim absent, or present without a value.
        assert _refusal(h, token(roles=None)) == (401, "TokenClaimMissing")
        assert _refusal(h, token(roles=[])) == (401, "TokenClaimMissing")
        # all: one of the two groups is not enough.
        assert _refusal(h, token(groups=[GROUP_1])) == (401, "TokenClaimInvalid")
        # scp is split at spaces: a scope that merely contains the value does not count.
        assert _refusal(h, token(scp="user_impersonation_x")) == (401, "TokenClaimInvalid")
        assert [r.status for r in h.records(expect=2)] == [200, 200]
        metrics = h.metrics()
    # Counted like every token refusal (a bounded label: the code).
    assert _metric(metrics, "TokenClaimInvalid") == 3
    assert _metric(metrics, "TokenClaimMissing") == 2


def test_required_claim_without_values_and_with_a_separator(
    tmp_path: Path, simulator: SimulatorThread, idp: TestIdentityProvider
) -> None:
    """A claim without ``values`` must merely be present; a ``separator`` splits a string
    claim (``tier: "gold,silver"``); a boolean claim compares as JSON writes it."""
    oidc = oidc_section(
        idp,
        required_claims=[
            {"name": "tid"},
            {"name": "tier", "values": ["gold"], "separator": ","},
            {"name": "email_verified", "values": ["true"]},
        ],
    )
    with entra_gateway(
        tmp_path, simulator, idp, subscriptions={"team-a": "starter"}, rules=_rules, oidc=oidc
    ) as h:
        good: dict[str, Any] = {"azp": APP, "tier": "silver, gold", "email_verified": True}
        assert _refusal(h, idp.issue(**good)) == (200, None)
        assert _refusal(h, idp.issue(**{**good, "tid": None})) == (401, "TokenClaimMissing")
        assert _refusal(h, idp.issue(**{**good, "tier": "silver"})) == (401, "TokenClaimInvalid")
        assert _refusal(h, idp.issue(**{**good, "email_verified": False})) == (
            401,
            "TokenClaimInvalid",
        )


def test_product_that_requires_a_token_refuses_subscription_keys(
    tmp_path: Path, simulator: SimulatorThread, idp: TestIdentityProvider
) -> None:
    """``require_token``: the product's subscription keys alone get 401 ``TokenRequired``
    (APIM: an API behind ``validate-jwt`` answers 401 without a token); its tokens, and a key
    with a token of the same subscription, pass; another product's keys still work. Without
    an ``oidc`` section the setting is a configuration error."""
    products: list[dict[str, Any]] = [
        {"name": "starter", "deployments": ["*"]},
        {"name": "tokens-only", "deployments": ["*"], "require_token": True},
    ]
    subs = {"team-a": "tokens-only", "team-b": "starter"}
    with entra_gateway(
        tmp_path, simulator, idp, subscriptions=subs, rules=_rules, products=products
    ) as h:
        token = idp.issue(azp=APP)
        keyed = h.chat({"api-key": h.keys["team-a"]})
        assert keyed.status_code == 401, keyed.text
        assert keyed.json()["error"]["code"] == "TokenRequired"
        assert h.keys["team-a"] not in keyed.text
        assert keyed.headers["www-authenticate"] == "Bearer"
        assert _refusal(h, token) == (200, None)
        both = h.chat({"api-key": h.keys["team-a"], "authorization": f"Bearer {token}"})
        assert both.status_code == 200, both.text
        assert h.chat({"api-key": h.keys["team-b"]}).status_code == 200
        metrics = h.metrics()
    assert _metric(metrics, "TokenRequired") == 1
    data = gateway_config(tmp_path / "plain", {"sim": simulator.url}, products=products)
    with pytest.raises(ConfigError, match=r"products\[1\]\.require_token"):
        parse_config(data)


def test_required_claim_with_numbers_and_objects(
    tmp_path: Path, simulator: SimulatorThread, idp: TestIdentityProvider
) -> None:
    """A claim of numbers (``groups: [1, 2]``) compares as JSON writes them; a present claim
    whose values do not match (objects, other numbers) is ``TokenClaimInvalid``, not missing."""
    oidc = oidc_section(idp, required_claims=[{"name": "groups", "values": ["2"]}])
    with entra_gateway(
        tmp_path, simulator, idp, subscriptions={"team-a": "starter"}, rules=_rules, oidc=oidc
    ) as h:
        assert _refusal(h, idp.issue(azp=APP, groups=[1, 2])) == (200, None)
        assert _refusal(h, idp.issue(azp=APP, groups=2)) == (200, None)
        assert _refusal(h, idp.issue(azp=APP, groups=[3])) == (401, "TokenClaimInvalid")
        assert _refusal(h, idp.issue(azp=APP, groups=[{"id": 2}])) == (401, "TokenClaimInvalid")
        assert _refusal(h, idp.issue(azp=APP)) == (401, "TokenClaimMissing")


@pytest.mark.parametrize(
    ("claim", "problem"),
    [
        ({"name": "tier", "values": ["gold,silver"], "separator": ","}, "contains the separator"),
        ({"name": "roles", "values": [""]}, "cannot be empty"),
        ({"name": "roles", "values": [" Gateway.User"]}, "surrounding whitespace"),
        ({"name": "scp", "values": ["a b"]}, "cannot contain whitespace"),
    ],
)
def test_required_claim_values_no_token_could_match_are_refused(
    tmp_path: Path, simulator: SimulatorThread, claim: dict[str, Any], problem: str
) -> None:
    oidc = {
        "issuers": [{"discovery_url": "https://login.example.com/.well-known/openid-configuration",
                     "audiences": [AUDIENCE]}],
        "required_claims": [claim],
    }  # fmt: skip
    data = gateway_config(tmp_path, {"sim": simulator.url}, oidc=oidc)
    with pytest.raises(ConfigError, match=problem):
        parse_config(data)
