"""Entra ID for administrators: which tokens prove an administrator (``admin.entra``).

:class:`AdminEntra` owns the admin side's token validator (``auth.tokens.TokenValidator``,
built from ``admin.entra`` and nothing else: the client side's ``oidc`` issuers, audiences and
``token_rules`` play no part here) and the admin decision: a validated token belongs to an
administrator when it carries one of the configured ``groups`` *or* one of the ``roles``.

Both the admin API (access tokens, through ``admin.access``) and the dashboard sign-in (ID
tokens, ``admin.signin``) go through it; they share one key set and one HTTP session.
"""

from __future__ import annotations

from collections.abc import Mapping

from sluicegate.auth.oidc import HttpFetcher, KeySet
from sluicegate.auth.rules import ClaimMatcher
from sluicegate.auth.tokens import TokenError, TokenFailure, TokenValidator, VerifiedToken
from sluicegate.clock import Clock
from sluicegate.config.admin import AdminEntraConfig


class AdminEntra:
    """See the module docstring. ``await start()`` in the event loop (never fails: an IdP
    that does not answer is tried again later), ``await aclose()`` at shutdown."""

    def __init__(self, config: AdminEntraConfig, clock: Clock, environ: Mapping[str, str]) -> None:
        self.config = config
        self.http = HttpFetcher(config.fetch_timeout_seconds)
        self.validator = TokenValidator(config.oidc(), clock, fetch=self.http)
        # Two matchers, because one ClaimMatcher with both would need a group AND a role.
        self._matchers = tuple(
            m
            for m in (
                ClaimMatcher(groups=frozenset(config.groups)),
                ClaimMatcher(roles=frozenset(config.roles)),
            )
            if m.groups or m.roles
        )
        env = config.client_secret_env
        #: The client secret (confidential client), or None (public client: PKCE only).
        self.client_secret: str | None = (environ.get(env) or None) if env else None

    @property
    def problem(self) -> str:
        """Why the dashboard sign-in cannot work (empty when it can)."""
        env = self.config.client_secret_env
        if env and not self.client_secret:
            return f"Entra ID sign-in is not available: set the environment variable {env}"
        return ""

    @property
    def key_set(self) -> KeySet:
        return self.validator.key_sets[0]

    async def start(self) -> None:
        await self.http.start()
        await self.validator.start()

    async def aclose(self) -> None:
        await self.validator.aclose()
        await self.http.aclose()

    def is_admin(self, token: VerifiedToken) -> bool:
        return any(m.matches(token) for m in self._matchers)

    def require_admin(self, token: VerifiedToken) -> VerifiedToken:
        """``token`` when it is an administrator's, else ``TokenError`` 403 ``NotAnAdmin``."""
        if self.is_admin(token):
            return token
        claims = token.claims
        who = claims.get("preferred_username") or claims.get("upn") or token.caller
        overage = ""
        if "_claim_names" in claims:
            overage = (
                " Entra ID left the groups out of the token because the user is in too many "
                "(group overage): use app roles for administrators."
            )
        raise TokenError(
            TokenFailure.NOT_ADMIN,
            f"{_short(who)} is signed in, but is not an administrator of this gateway: the token "
            "carries none of the admin groups or roles (admin.entra.groups / roles)."
            f"{overage} Ask the gateway's operators for access.",
            403,
        )

    async def verify_id_token(self, token: str) -> VerifiedToken:
        """A dashboard sign-in's ID token: valid with ``aud`` = ``client_id`` (the access
        token audiences do not apply). The admin check is the caller's (after the nonce)."""
        verified = await self.validator.validate(token, audiences=[self.config.client_id])
        aud = verified.claims.get("aud")
        azp = verified.claims.get("azp")
        # OIDC Core 3.1.3.7: with several audiences, azp must name this client.
        if isinstance(aud, list) and len(aud) > 1 and azp != self.config.client_id:
            raise TokenError(
                TokenFailure.AUDIENCE,
                "the ID token names several audiences and was not issued to this gateway's "
                "admin app (azp).",
            )
        return verified

    def __repr__(self) -> str:
        return f"AdminEntra(client_id={self.config.client_id!r}, {self.validator!r})"


def _short(value: object) -> str:
    text = value if isinstance(value, str) and value else "The caller"
    return text[:120]
