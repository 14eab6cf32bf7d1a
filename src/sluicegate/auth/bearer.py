"""Client authentication by token: a bearer JWT → who is calling → which subscription.

:class:`TokenAuthenticator` is what the request path calls. It validates the token
(``auth.tokens``), applies the ``token_rules`` (``auth.rules``) and returns the subscription
id and the caller's identity; the pipeline then treats the request exactly like a
key-authenticated one (same subscription checks, limits, routing and ledger).

Refusals are ``TokenError`` (401 invalid, 403 valid but not mapped, 503 keys unavailable).
Each is logged, without the token, with its reason and what the token claimed to be.
Refusals with status 403 are counted through ``on_refused`` (401s are counted from the
usage record by the metrics, like refused keys).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sluicegate.auth.rules import TokenRules
from sluicegate.auth.tokens import (
    TokenError,
    TokenFailure,
    TokenValidator,
    VerifiedToken,
    short_claim,
)
from sluicegate.clock import Clock
from sluicegate.config.model import GatewayConfig

log = logging.getLogger("sluicegate.auth")


@dataclass(frozen=True, slots=True)
class TokenMatch:
    subscription_id: str
    caller: str | None
    rule_index: int
    token: VerifiedToken


class TokenAuthenticator:
    """Validator plus rules. ``start()``/``aclose()`` delegate to the validator."""

    def __init__(
        self,
        validator: TokenValidator,
        rules: TokenRules,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.validator = validator
        self.rules = rules
        self._on_refused = on_refused

    @classmethod
    def from_config(
        cls,
        config: GatewayConfig,
        clock: Clock,
        on_refused: Callable[[str], None] | None = None,
    ) -> TokenAuthenticator | None:
        """None when the configuration has no ``oidc`` section."""
        if config.oidc is None:
            return None
        return cls(TokenValidator(config.oidc, clock), TokenRules(config.token_rules), on_refused)

    async def start(self) -> None:
        await self.validator.start()

    async def aclose(self) -> None:
        await self.validator.aclose()

    async def authenticate(self, token: str, request_id: str = "") -> TokenMatch:
        """The subscription the token maps to, or ``TokenError``."""
        try:
            verified = await self.validator.validate(token)
        except TokenError as exc:
            self._log(exc, request_id)
            raise
        match = self.rules.match(verified)
        if match is None:
            claims = verified.claims
            refusal = TokenError(
                TokenFailure.NO_RULE,
                "The token is valid, but no token rule of this gateway maps its caller "
                f"(oid {short_claim(claims.get('oid'))}, app "
                f"{short_claim(claims.get('azp') or claims.get('appid'))}) to a "
                "subscription. Ask the gateway's operators to add a rule for your "
                "application, group or role.",
                403,
            )
            self.refused(refusal, request_id, verified)
            raise refusal
        return TokenMatch(match.subscription_id, verified.caller, match.index, verified)

    def refused(
        self, exc: TokenError, request_id: str = "", token: VerifiedToken | None = None
    ) -> None:
        """Log and count a refusal decided after validation (403s)."""
        self._log(exc, request_id, token)
        if self._on_refused is not None and exc.status == 403:
            self._on_refused(exc.code)

    def _log(self, exc: TokenError, request_id: str, token: VerifiedToken | None = None) -> None:
        extra: dict[str, object] = {"reason": exc.code, "request_id": request_id}
        if token is not None:
            extra["caller"] = token.caller
            extra["issuer"] = token.issuer
        level = logging.WARNING if exc.status == 503 else logging.INFO
        log.log(level, "token refused: %s", exc.code, extra=extra)

    def no_subscription(self, match: TokenMatch, request_id: str = "") -> TokenError:
        """The error for a rule that names a subscription the gateway does not know."""
        exc = TokenError(
            TokenFailure.NO_SUBSCRIPTION,
            f"The token matched token_rules[{match.rule_index}], which names subscription "
            f"{match.subscription_id!r}, but no such subscription exists. Ask the gateway's "
            "operators to fix the rule.",
            403,
        )
        self.refused(exc, request_id, match.token)
        return exc

    def __repr__(self) -> str:
        return f"TokenAuthenticator({self.validator!r}, {self.rules!r})"
