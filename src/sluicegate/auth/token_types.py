"""What token validation answers, without the validator: refusal reasons, the refusal, and a
verified token. Kept apart from ``auth.tokens`` (which needs PyJWT and cryptography, ~10 MiB per
worker) so that code handling these answers loads nothing heavy until tokens are configured.
``auth.tokens`` re-exports them."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class TokenFailure(enum.StrEnum):
    """Why a token was refused: the ``code`` of the error body and the metrics label."""

    MALFORMED = "TokenMalformed"
    EXPIRED = "TokenExpired"
    NOT_YET_VALID = "TokenNotYetValid"
    AUDIENCE = "TokenAudienceInvalid"
    ISSUER = "TokenIssuerInvalid"
    SIGNATURE = "TokenSignatureInvalid"
    UNKNOWN_KEY = "TokenSigningKeyUnknown"
    ALGORITHM = "TokenAlgorithmNotAllowed"
    CLAIM_MISSING = "TokenClaimMissing"
    #: A required claim (``required_claims``) without the values the gateway requires.
    CLAIM_INVALID = "TokenClaimInvalid"
    NOT_ACCEPTED = "TokensNotAccepted"
    #: The subscription's product takes tokens only (``require_token``), and none came.
    REQUIRED = "TokenRequired"
    UNAVAILABLE = "IdentityProviderUnavailable"
    NO_RULE = "NoMatchingTokenRule"
    NO_SUBSCRIPTION = "TokenSubscriptionNotFound"
    CREDENTIALS_DISAGREE = "CredentialsDisagree"
    #: Admin side: the token is valid but holds none of the admin groups or roles.
    NOT_ADMIN = "NotAnAdmin"


class TokenError(Exception):
    """A refused token: 401 (invalid), 403 (valid but not mapped) or 503 (keys unavailable)."""

    def __init__(
        self,
        reason: TokenFailure,
        message: str,
        status: int = 401,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @property
    def code(self) -> str:
        return self.reason.value


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token whose signature, issuer, audience and lifetime have been checked."""

    issuer: str
    claims: Mapping[str, Any]
    key_id: str | None

    @property
    def caller(self) -> str | None:
        """Who is calling: the object id (``oid``) of the user or service principal, else
        the client application (``azp``/``appid``), else ``sub``; at most 200 characters."""
        for name in ("oid", "azp", "appid", "sub"):
            value = self.claims.get(name)
            if isinstance(value, str) and value:
                return value[:200]
        return None
