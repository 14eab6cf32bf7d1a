"""Configuration of Entra ID / OIDC sign-in for administrators (``admin.entra``). See the
admin section of docs/entra-id.md.

This is a configuration of its own, separate from the client side (``oidc`` and
``token_rules``): its own app registration (``client_id``), its own audiences and its own
admin groups or roles. A token that satisfies one side says nothing to the other, so client
tokens never open the admin API and admin tokens are not client credentials (unless the
client side's own audiences and rules independently accept them).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from sluicegate.config.oidc import (
    DEFAULT_ALGORITHMS,
    OidcConfig,
    OidcIssuerConfig,
    _Strict,
    check_algorithms,
    check_fetch_url,
)


class AdminEntraConfig(_Strict):
    """Administrators sign in with Entra ID (dashboard) or send an Entra ID access token
    (admin API). An administrator must hold at least one of ``groups`` or ``roles``."""

    #: The tenant's OpenID configuration document (issuer, ``jwks_uri``,
    #: ``authorization_endpoint``, ``token_endpoint`` come from it).
    discovery_url: str
    #: The admin app registration's application (client) id: the OAuth client of the
    #: dashboard sign-in and the audience of its ID tokens.
    client_id: str = Field(min_length=1, max_length=200)
    #: Environment variable holding the client secret (a confidential client). Without it the
    #: dashboard signs in as a public client; PKCE (S256) is used either way.
    client_secret_env: str | None = None
    #: Accepted ``aud`` of access tokens sent to the admin API. Default: ``[client_id]`` (what
    #: Entra ID v2.0 puts in tokens for the app's own API); add ``api://<client_id>`` for v1.0
    #: tokens. Keep these different from the client side's ``oidc`` audiences.
    audiences: list[str] = Field(default_factory=list)
    #: Accepted ``iss`` values. Default: the ``issuer`` of the discovery document.
    issuers: list[str] = Field(default_factory=list)
    #: Entra group object ids whose members are administrators.
    groups: list[str] = Field(default_factory=list)
    #: App roles (of the admin app registration) whose holders are administrators.
    roles: list[str] = Field(default_factory=list)
    allowed_algorithms: list[str] = Field(default_factory=lambda: list(DEFAULT_ALGORITHMS))
    #: Clock skew tolerated on ``exp`` and ``nbf``, in seconds.
    leeway_seconds: float = Field(default=60.0, ge=0, le=300)
    #: Timeout of one call to the identity provider (discovery, keys, code exchange).
    fetch_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    #: The dashboard's callback as the identity provider sees it, e.g.
    #: ``https://gateway.example.com/dashboard/auth/callback``. Recommended in production
    #: (behind a proxy the request's own URL is not the public one); default: derived from
    #: the request.
    redirect_uri: str | None = None

    @field_validator("discovery_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_fetch_url(value, "discovery_url")

    @field_validator("redirect_uri")
    @classmethod
    def _redirect(cls, value: str | None) -> str | None:
        if value is None:
            return None
        check_fetch_url(value, "redirect_uri")
        if urlsplit(value).fragment:
            raise ValueError("redirect_uri must not have a fragment (#...)")
        return value

    @field_validator("allowed_algorithms")
    @classmethod
    def _asymmetric(cls, value: list[str]) -> list[str]:
        return check_algorithms(value)

    @model_validator(mode="after")
    def _someone_is_admin(self) -> AdminEntraConfig:
        if not (self.groups or self.roles):
            raise ValueError(
                "admin.entra needs at least one of 'groups' or 'roles': without them every "
                "user of the tenant would be an administrator"
            )
        return self

    @property
    def accepted_audiences(self) -> list[str]:
        return self.audiences or [self.client_id]

    def oidc(self) -> OidcConfig:
        """The same settings in the shape the token validator takes (one issuer)."""
        return OidcConfig(
            issuers=[
                OidcIssuerConfig(
                    discovery_url=self.discovery_url,
                    audiences=self.accepted_audiences,
                    issuers=self.issuers,
                    allowed_algorithms=self.allowed_algorithms,
                )
            ],
            leeway_seconds=self.leeway_seconds,
            fetch_timeout_seconds=self.fetch_timeout_seconds,
        )
