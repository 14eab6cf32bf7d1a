"""Which subscription a validated token belongs to: the ``token_rules`` of the configuration.

Pure decisions, no I/O. A :class:`ClaimMatcher` holds the conditions of one rule (all given
conditions must hold; within one, any listed value matches); :class:`TokenRules` tries the
rules in order and returns the first match. The admin API can reuse ``ClaimMatcher`` to
restrict Entra sign-in to an admin group or role.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sluicegate.auth.tokens import VerifiedToken
from sluicegate.config.oidc import TokenRule

#: Claims that hold one identifier: only a string value counts.
_SINGLE = frozenset({"tid", "oid", "azp", "appid", "sub", "iss"})


def claim_values(claims: Mapping[str, Any], name: str) -> frozenset[str]:
    """The string values of a claim. Single-valued claims (``oid``, ``azp``, ``appid``,
    ``tid``) count only as a string; ``scp`` is a space-separated string (or, from some
    providers, a list); ``groups`` and ``roles`` are lists of strings (a lone string is one
    value). Anything else counts as no value."""
    value = claims.get(name)
    if isinstance(value, str):
        return frozenset(value.split()) if name == "scp" else frozenset({value})
    if isinstance(value, list) and name not in _SINGLE:
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


@dataclass(frozen=True, slots=True)
class ClaimMatcher:
    """Conditions on a token's claims; an empty set means "no condition"."""

    issuer: str | None = None
    tenants: frozenset[str] = frozenset()
    app_ids: frozenset[str] = frozenset()
    object_ids: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()

    @classmethod
    def of(cls, rule: TokenRule) -> ClaimMatcher:
        return cls(
            issuer=rule.issuer,
            tenants=frozenset(rule.tenants),
            app_ids=frozenset(rule.app_ids),
            object_ids=frozenset(rule.object_ids),
            groups=frozenset(rule.groups),
            roles=frozenset(rule.roles),
            scopes=frozenset(rule.scopes),
        )

    def matches(self, token: VerifiedToken) -> bool:
        claims = token.claims
        if self.issuer is not None and token.issuer != self.issuer:
            return False
        checks = (
            (self.tenants, ("tid",)),
            (self.app_ids, ("azp", "appid")),
            (self.object_ids, ("oid",)),
            (self.groups, ("groups",)),
            (self.roles, ("roles",)),
            (self.scopes, ("scp",)),
        )
        for wanted, names in checks:
            if wanted and not any(wanted & claim_values(claims, name) for name in names):
                return False
        return True


@dataclass(frozen=True, slots=True)
class RuleMatch:
    index: int  # position in token_rules, for messages and logs
    subscription_id: str


class TokenRules:
    """The configured rules, compiled once. Immutable, safe to share."""

    def __init__(self, rules: Sequence[TokenRule]) -> None:
        self._rules = tuple((ClaimMatcher.of(r), r.subscription) for r in rules)

    def match(self, token: VerifiedToken) -> RuleMatch | None:
        """The first rule the token satisfies, or None."""
        for i, (matcher, subscription) in enumerate(self._rules):
            if matcher.matches(token):
                return RuleMatch(i, subscription)
        return None

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return f"TokenRules({len(self._rules)} rules)"
