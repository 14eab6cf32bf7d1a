"""Configuration of client authentication by Entra ID / OIDC tokens (``oidc``, ``token_rules``)
and the network settings that go with it. See docs/entra-id.md.

Kept beside ``config.model`` (which imports these models) so that the gateway's main model
stays readable; everything here is data, validated once.
"""

from __future__ import annotations

import ipaddress
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Asymmetric JWS algorithms a token may be signed with. HMAC (``HS*``) and ``none`` are never
#: accepted: with a public JWKS, an HMAC "signature" keyed with the public key is forgeable by
#: anyone (algorithm confusion).
ASYMMETRIC_ALGORITHMS = frozenset(
    {
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
        "ES256", "ES384", "ES512", "EdDSA",
    }
)  # fmt: skip
DEFAULT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256")

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_fetch_url(value: str, what: str) -> str:
    """An IdP URL must be https (an http one is accepted only on loopback, for tests and
    local IdPs): keys fetched in clear text could be swapped by anyone on the path."""
    parts = urlsplit(value)
    if not parts.hostname:
        raise ValueError(f"{what} must be a URL with a host, got {value!r}")
    if parts.scheme == "https":
        return value
    if parts.scheme == "http" and parts.hostname in _LOOPBACK:
        return value
    raise ValueError(f"{what} must be an https:// URL (http:// only on loopback), got {value!r}")


def check_networks(values: list[str], what: str) -> list[str]:
    """Each value an IP address or a CIDR network (``10.0.0.0/8``, ``2001:db8::/32``)."""
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{what}: {value!r} is not an IP address or CIDR network") from None
    return values


def check_algorithms(value: list[str]) -> list[str]:
    """At least one algorithm, every one of them asymmetric."""
    if not value:
        raise ValueError("name at least one algorithm")
    for alg in value:
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise ValueError(
                f"{alg!r} is not allowed: only asymmetric algorithms "
                f"({', '.join(sorted(ASYMMETRIC_ALGORITHMS))}) can be checked against a "
                "public key set; 'none' and HMAC (HS*) would let anyone forge tokens"
            )
    return value


class RequiredClaim(_Strict):
    """A claim every token must carry (APIM's ``<required-claims><claim name match
    separator>``). ``match: all`` (APIM's default): the token's claim holds every one of
    ``values``; ``any``: at least one. No ``values``: the claim must be present (not null,
    not empty). A token's claim counts as its string values: a string (split at
    ``separator`` when one is given; ``scp`` at spaces by default), each scalar of a list,
    ``true``/``false`` and numbers as JSON writes them. A token that fails is refused with
    401 (``TokenClaimMissing`` when it lacks the claim, ``TokenClaimInvalid`` otherwise).
    A value no token could match (empty, padded, holding the separator) is refused."""

    name: str = Field(min_length=1, max_length=256)
    values: list[str] = Field(default_factory=list)
    match: Literal["all", "any"] = "all"
    separator: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _values_can_match(self) -> RequiredClaim:
        # A token's values are split at the separator (scp at whitespace) and stripped, and
        # empty ones dropped: such a configured value could never match, and every token
        # would be refused.
        for value in self.values:
            if not value.strip() or value != value.strip():
                raise ValueError(
                    f"required claim {self.name!r}: a value cannot be empty or have "
                    "surrounding whitespace (no token could match it)"
                )
            if self.separator is not None and self.separator in value:
                raise ValueError(
                    f"required claim {self.name!r}: the value {value!r} contains the "
                    f"separator {self.separator!r} (a token's claim is split at it, so no "
                    "token could match it)"
                )
            if self.separator is None and self.name == "scp" and any(c.isspace() for c in value):
                raise ValueError(
                    "required claim 'scp': a value cannot contain whitespace (scp is split "
                    "at whitespace, so no token could match it)"
                )
        return self


class OidcIssuerConfig(_Strict):
    """One trusted token issuer: an Entra ID tenant (``https://login.microsoftonline.com/
    <tenant>/v2.0/.well-known/openid-configuration``), an Azure Government authority, or any
    OIDC provider."""

    #: The provider's OpenID configuration document (issuer and ``jwks_uri`` come from it).
    discovery_url: str
    #: Accepted ``aud`` values (any one must match), e.g. ``https://cognitiveservices.azure.com``
    #: or the gateway's app registration id / ``api://`` URI.
    audiences: list[str] = Field(min_length=1)
    #: Accepted ``iss`` values. Default: the ``issuer`` of the discovery document. Entra ID
    #: v1.0 tokens (``https://sts.windows.net/<tenant>/``) need it listed here explicitly when
    #: the discovery document is the v2.0 one.
    issuers: list[str] = Field(default_factory=list)
    allowed_algorithms: list[str] = Field(default_factory=lambda: list(DEFAULT_ALGORITHMS))
    #: Claims every token of this issuer must carry (beside ``oidc.required_claims``).
    required_claims: list[RequiredClaim] = Field(default_factory=list)

    @field_validator("discovery_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_fetch_url(value, "discovery_url")

    @field_validator("allowed_algorithms")
    @classmethod
    def _asymmetric(cls, value: list[str]) -> list[str]:
        return check_algorithms(value)


class OidcConfig(_Strict):
    """Token authentication for clients (``Authorization: Bearer <JWT>``)."""

    issuers: list[OidcIssuerConfig] = Field(min_length=1, max_length=16)
    #: Clock skew tolerated on ``exp`` and ``nbf``, in seconds.
    leeway_seconds: float = Field(default=60.0, ge=0, le=300)
    #: A token signed with a key id the gateway does not know makes it fetch the JWKS again,
    #: at most once per this many seconds per issuer (strangers cannot make it hammer the IdP).
    jwks_min_refresh_seconds: float = Field(default=60.0, ge=0)
    #: The key set is fetched again in the background this often (keys the IdP has withdrawn
    #: stop being accepted).
    jwks_max_age_seconds: float = Field(default=3600.0, gt=0)
    #: Timeout of one fetch of the discovery document or the key set.
    fetch_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    #: Longer tokens are refused without being parsed.
    max_token_bytes: int = Field(default=16 * 1024, ge=1024, le=256 * 1024)
    #: Claims every token must carry, whatever its issuer (APIM's ``required-claims``);
    #: checked after the signature, before the token rules.
    required_claims: list[RequiredClaim] = Field(default_factory=list)


class TokenRule(_Strict):
    """Maps a validated token to a subscription. Within a rule every condition given must hold
    (and); within one condition any listed value matches (or). Rules are tried in order; the
    first that matches wins."""

    #: The subscription id (``sub_…``) whose limits, product and charge-back the caller shares.
    subscription: str = Field(min_length=1)
    #: Only tokens of this issuer (its ``iss`` value).
    issuer: str | None = None
    #: ``tid``: the caller's tenant.
    tenants: list[str] = Field(default_factory=list)
    #: ``azp`` (v2.0 tokens) or ``appid`` (v1.0 tokens): the client application.
    app_ids: list[str] = Field(default_factory=list)
    #: ``oid``: the user's or the service principal's object id.
    object_ids: list[str] = Field(default_factory=list)
    #: ``groups``: Entra group object ids (a token with group overage carries none).
    groups: list[str] = Field(default_factory=list)
    #: ``roles``: app roles assigned to the user or application.
    roles: list[str] = Field(default_factory=list)
    #: ``scp``: delegated scopes (space-separated in the token).
    scopes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _some_condition(self) -> TokenRule:
        if not (
            self.issuer
            or self.tenants
            or self.app_ids
            or self.object_ids
            or self.groups
            or self.roles
            or self.scopes
        ):
            raise ValueError(
                "a token rule needs at least one condition (issuer, tenants, app_ids, "
                "object_ids, groups, roles or scopes): an empty rule would match every token"
            )
        return self
