"""Who may use the admin side, and what a refusal leaves behind.

``AdminAccess.authorize(Authorization header)`` is the admin API's check. It accepts

- the admin token (``admin.auth``, compared in constant time), or
- with ``admin.entra`` configured, an Entra ID access token that validates for the *admin*
  configuration (issuer, audience, signature, lifetime, algorithm) and carries an admin group
  or role (``admin.entra``).

Nothing else opens it: a subscription key is neither the admin token nor a JWT; a client
token is a JWT for the client audiences, which the admin configuration does not accept.

Every refusal (also the dashboard's, through ``refused``) is counted in
``sluicegate_auth_failures_total{reason}`` with a reason from a fixed set, all starting with
``Admin`` so that they are told apart from client failures (``AdminTokenInvalid``,
``AdminCredentialsMissing``, ``AdminNotAnAdmin``, ``AdminTokenExpired``, ...), and logged at
``info`` on ``sluicegate.admin`` with the reason, the client address and, for a valid token,
who it was. The credential itself is never logged nor put in a message.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sluicegate.admin.auth import AdminAuth
from sluicegate.auth.credentials import looks_like_jwt
from sluicegate.auth.token_types import TokenError, TokenFailure, VerifiedToken

if TYPE_CHECKING:
    from sluicegate.admin.entra import AdminEntra

log = logging.getLogger("sluicegate.admin")


class AdminFailure(enum.StrEnum):
    """Reasons of admin refusals that are not a token check's (metrics labels)."""

    MISSING = "AdminCredentialsMissing"
    TOKEN_INVALID = "AdminTokenInvalid"
    SIGNIN_STATE = "AdminSignInStateInvalid"
    SIGNIN_NONCE = "AdminSignInNonceInvalid"
    SIGNIN_FAILED = "AdminSignInFailed"


def token_reason(failure: TokenFailure) -> str:
    """The metrics label of an admin token refusal: ``Admin`` + the token failure's code."""
    return f"Admin{failure.value}"


@dataclass(frozen=True, slots=True)
class AdminCaller:
    """An authenticated administrator: by the admin token, or by an Entra ID token."""

    method: str  # "token" or "entra"
    token: VerifiedToken | None = None

    @property
    def name(self) -> str | None:
        return None if self.token is None else self.token.caller


class AdminDenied(Exception):
    """A refused admin request. ``code`` goes into the error body, ``reason`` is the metrics
    label; ``message`` says what to do and never holds the credential."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        reason: str,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason
        self.retry_after = retry_after


_HOW = (
    "send the admin token as 'Authorization: Bearer <token>'"
    " (or an Entra ID access token of an administrator, where admin.entra is configured)"
)


class AdminAccess:
    """The admin side's credentials check (see the module docstring)."""

    def __init__(
        self,
        auth: AdminAuth,
        entra: AdminEntra | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.auth = auth
        self.entra = entra
        self._on_failure = on_failure

    async def authorize(self, header: str | None, client: str = "") -> AdminCaller:
        """The caller behind an ``Authorization`` header, or ``AdminDenied``: 401 (no or
        invalid credentials), 403 (a valid token of someone who is not an administrator),
        503 (admin access disabled, or the IdP's keys cannot be loaded)."""
        if not self.auth.enabled:
            # Not an attempt that failed: the gateway is configured that way.
            raise AdminDenied(503, "Unavailable", self.auth.problem, "")
        scheme, _, value = (header or "").partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            raise self._denied(401, "Unauthorized", _HOW, AdminFailure.MISSING, client)
        if self.auth.check_token(value):
            return AdminCaller("token")
        if not looks_like_jwt(value):
            raise self._denied(
                401,
                "Unauthorized",
                f"that is not the admin token: {_HOW}",
                AdminFailure.TOKEN_INVALID,
                client,
            )
        if self.entra is None:
            raise self._denied(
                401,
                TokenFailure.NOT_ACCEPTED.value,
                "this gateway does not accept Entra ID tokens on the admin API (admin.entra "
                "is not configured): send the admin token as 'Authorization: Bearer <token>'",
                token_reason(TokenFailure.NOT_ACCEPTED),
                client,
            )
        verified: VerifiedToken | None = None
        try:
            verified = await self.entra.validator.validate(value)
            self.entra.require_admin(verified)
        except TokenError as exc:
            raise self._denied(
                exc.status,
                exc.code,
                _admin_message(exc),
                token_reason(exc.reason),
                client,
                None if verified is None else verified.caller,
                exc.retry_after,
            ) from None
        return AdminCaller("entra", verified)

    def _denied(
        self,
        status: int,
        code: str,
        message: str,
        reason: str,
        client: str,
        caller: str | None = None,
        retry_after: float | None = None,
    ) -> AdminDenied:
        self.refused(reason, status, client=client, surface="api", caller=caller)
        return AdminDenied(status, code, message, reason, retry_after)

    def refused(
        self,
        reason: str,
        status: int,
        *,
        client: str = "",
        surface: str = "api",
        caller: str | None = None,
    ) -> None:
        """Count and log one failed admin authentication (without the credential)."""
        reason = str(reason)  # an AdminFailure member logs and labels as its plain value
        if self._on_failure is not None:
            self._on_failure(reason)
        extra: dict[str, object] = {
            "reason": reason,
            "status": status,
            "surface": surface,
            "client": client,
        }
        if caller is not None:
            extra["caller"] = caller
        level = logging.WARNING if status == 503 else logging.INFO
        log.log(level, "admin authentication refused: %s", reason, extra=extra)


def _admin_message(exc: TokenError) -> str:
    """A token refusal's message, saying which configuration it was checked against."""
    if exc.reason is TokenFailure.NOT_ADMIN:
        return exc.message
    return f"The admin API refused the Entra ID token (checked against admin.entra): {exc.message}"
