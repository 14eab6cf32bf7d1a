"""Required claims (APIM's ``<required-claims>`` of ``validate-jwt`` / ``validate-azure-ad-token``):
conditions every valid token must meet, checked by the validator after the signature, the
issuer, the audience and the lifetime, before the token rules.

Pure decisions, no I/O. :class:`RequiredClaims` compiles the configured list once; ``check``
returns None for a token that meets every condition, else the refusal (401). Messages name
the claim, never the token's values nor the values the gateway requires (those can be group
or application ids an outsider has no business learning).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sluicegate.auth.token_types import TokenError, TokenFailure
from sluicegate.config.oidc import RequiredClaim


def _scalar_text(value: object) -> str | None:
    """A scalar claim value as JSON writes it (``true``, ``12``, ``1.5``); None otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return value
    return None


def required_claim_values(value: object, name: str, separator: str | None) -> frozenset[str]:
    """The values of a claim as a required claim compares them: a string (split at
    ``separator``; ``scp`` at whitespace when none is given), each scalar of a list (strings
    split too), ``true``/``false`` and numbers as JSON writes them (``groups: [1, 2]`` holds
    ``"1"`` and ``"2"``). Anything else (null, an object, an empty string) is no value."""
    items: Iterable[object] = value if isinstance(value, list) else (value,)
    out: set[str] = set()
    for item in items:
        text = _scalar_text(item)
        if text is None:
            continue
        if not isinstance(item, str):
            out.add(text)
            continue
        if separator is not None:
            out.update(part.strip() for part in item.split(separator))
        elif name == "scp":
            out.update(item.split())
        else:
            out.add(item)
    out.discard("")
    return frozenset(out)


def _present(value: object) -> bool:
    """Whether a claim is there with some content (not absent, null, ``""`` or ``[]``): one
    whose values are none the gateway compares (objects) is present but cannot match."""
    if isinstance(value, str):
        return bool(value.strip())
    return value is not None and value != []


@dataclass(frozen=True, slots=True)
class _Condition:
    name: str
    values: frozenset[str]
    match_all: bool
    separator: str | None

    def failure(self, claims: Mapping[str, Any]) -> TokenError | None:
        raw = claims.get(self.name)
        found = required_claim_values(raw, self.name, self.separator)
        if not found and not _present(raw):
            return TokenError(
                TokenFailure.CLAIM_MISSING,
                f"Access denied: the token has no '{self.name}' claim, which this gateway "
                "requires. Request a token that carries it (ask the gateway's operators which "
                "values are accepted).",
            )
        if not self.values:
            return None
        if self.match_all:
            if self.values <= found:
                return None
            want = "every one of the values"
        else:
            if self.values & found:
                return None
            want = "one of the values"
        return TokenError(
            TokenFailure.CLAIM_INVALID,
            f"Access denied: the token's '{self.name}' claim does not hold {want} this gateway "
            "requires. Ask the gateway's operators which values are accepted.",
        )


class RequiredClaims:
    """The required claims of a configuration, compiled once. Immutable, safe to share."""

    def __init__(self, claims: Sequence[RequiredClaim]) -> None:
        self._conditions = tuple(
            _Condition(c.name, frozenset(c.values), c.match == "all", c.separator) for c in claims
        )

    def __bool__(self) -> bool:
        return bool(self._conditions)

    def check(self, claims: Mapping[str, Any]) -> TokenError | None:
        """None when ``claims`` meet every condition, else the first failure (a 401)."""
        for condition in self._conditions:
            failure = condition.failure(claims)
            if failure is not None:
                return failure
        return None

    def __repr__(self) -> str:
        return f"RequiredClaims({[c.name for c in self._conditions]})"
