"""Token rules: claim matching (and across conditions, or within one), first match wins."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sluicegate.auth.rules import ClaimMatcher, TokenRules, claim_values
from sluicegate.auth.tokens import VerifiedToken
from sluicegate.config.oidc import TokenRule

ISS = "https://login.microsoftonline.com/t/v2.0"


def _token(issuer: str = ISS, **claims: Any) -> VerifiedToken:
    return VerifiedToken(issuer, claims, "kid")


def _rules(*rules: dict[str, Any]) -> TokenRules:
    return TokenRules([TokenRule(**r) for r in rules])


def test_claim_values_by_shape() -> None:
    claims = {"scp": "read  write", "groups": ["g1", 2, None, "g2"], "oid": "o", "roles": {"a": 1}}
    assert claim_values(claims, "scp") == {"read", "write"}
    assert claim_values(claims, "groups") == {"g1", "g2"}
    assert claim_values(claims, "oid") == {"o"}
    assert claim_values(claims, "roles") == frozenset()
    assert claim_values(claims, "missing") == frozenset()


def test_first_match_wins_and_each_condition() -> None:
    rules = _rules(
        {"object_ids": ["user-1"], "subscription": "sub_user"},
        {"app_ids": ["app-1", "app-2"], "subscription": "sub_app"},
        {"groups": ["g-eng"], "subscription": "sub_group"},
        {"roles": ["Gateway.Admin"], "subscription": "sub_role"},
        {"scopes": ["gateway.use"], "tenants": ["t-1"], "subscription": "sub_scope"},
    )

    def sub(**claims: Any) -> str | None:
        match = rules.match(_token(**claims))
        return None if match is None else match.subscription_id

    assert sub(oid="user-1", azp="app-1") == "sub_user"  # first rule wins
    assert sub(azp="app-2") == "sub_app"
    assert sub(appid="app-1") == "sub_app"  # v1.0 tokens name the app in appid
    assert sub(groups=["x", "g-eng"]) == "sub_group"
    assert sub(roles=["Gateway.Admin"]) == "sub_role"
    assert sub(scp="openid gateway.use", tid="t-1") == "sub_scope"
    assert sub(scp="gateway.use", tid="t-2") is None  # both conditions must hold
    assert sub(groups="g-eng") == "sub_group"  # a single string counts as one value
    assert sub(oid=["user-1"]) is None  # a list where one identifier belongs: no match
    assert sub(scp=["gateway.use"], tid="t-1") == "sub_scope"  # scp as a list (Okta)
    assert sub() is None
    match = rules.match(_token(roles=["Gateway.Admin"]))
    assert match is not None and match.index == 3


def test_issuer_condition() -> None:
    rules = _rules({"issuer": "https://other/v2.0", "app_ids": ["a"], "subscription": "s"})
    assert rules.match(_token(azp="a")) is None
    assert rules.match(_token("https://other/v2.0", azp="a")) is not None


def test_an_empty_rule_is_refused_by_the_config() -> None:
    with pytest.raises(ValidationError, match="at least one condition"):
        TokenRule(subscription="sub_x")


def test_claim_matcher_for_admin_sign_in() -> None:
    admins = ClaimMatcher(roles=frozenset({"Gateway.Admin"}))
    assert admins.matches(_token(roles=["Gateway.Admin"]))
    assert not admins.matches(_token(roles=["Gateway.User"]))
    assert ClaimMatcher().matches(_token())  # no condition: everything (rules forbid this)
