"""The dashboard's Entra ID sign-in: OAuth 2.0 authorization code flow with PKCE (S256).

``begin(redirect_uri)`` makes a fresh ``state``, ``nonce`` and PKCE verifier, and returns the
identity provider's ``authorization_endpoint`` URL to send the browser to plus the value of
the sign-in cookie that remembers them. The cookie is signed (``AdminAuth.seal``, purpose
``signin``) and expires after ``SIGNIN_SECONDS``; nothing is kept on the server, so the
callback may reach any gateway instance that shares the admin token.

``finish(query, cookie)`` handles the callback: the ``state`` must equal the cookie's (else
the callback was not started in this browser: login CSRF, a stale tab, tampering); an error
from the identity provider is reported as such; the code is exchanged at ``token_endpoint``
(with the verifier, the same ``redirect_uri`` and, for a confidential client, the secret); the
``id_token`` must validate for the admin configuration with ``aud`` = ``client_id``, carry the
cookie's ``nonce``, and belong to an administrator (``admin.entra`` groups or roles).

Every failure is a :class:`SignInError` with the HTTP status the page should have, a message
for the person signing in, and a metrics reason (see ``admin.access``). Messages never contain
the code, the verifier, the secret or a token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import orjson

from sluicegate.admin.access import AdminFailure, token_reason
from sluicegate.admin.auth import AdminAuth
from sluicegate.auth.oidc import FetchError
from sluicegate.auth.token_types import TokenError, TokenFailure, VerifiedToken
from sluicegate.clock import Clock
from sluicegate.config.oidc import check_fetch_url

if TYPE_CHECKING:
    from sluicegate.admin.entra import AdminEntra

SIGNIN_COOKIE = "sluicegate_signin"
#: How long a started sign-in may take (the user may have to type a password and MFA code).
SIGNIN_SECONDS = 600
CALLBACK_PATH = "/dashboard/auth/callback"
SCOPE = "openid profile"
_PURPOSE = "signin"


class SignInError(Exception):
    """A failed sign-in: ``status`` of the page, ``reason`` for the metrics (empty: not a
    failed authentication, e.g. the IdP is unreachable before anyone signed in), a
    ``message`` safe to show, and ``caller`` when a valid ID token said who it was."""

    def __init__(self, status: int, reason: str, message: str, caller: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.caller = caller


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: base64url(sha256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class PendingSignIn:
    """What the callback needs to know about the sign-in it finishes."""

    state: str
    nonce: str
    verifier: str
    redirect_uri: str
    expires: int

    @classmethod
    def new(cls, redirect_uri: str, now: float) -> PendingSignIn:
        return cls(
            state=secrets.token_urlsafe(24),
            nonce=secrets.token_urlsafe(24),
            # 64 characters of the unreserved set: within RFC 7636's 43..128.
            verifier=secrets.token_urlsafe(48),
            redirect_uri=redirect_uri,
            expires=int(now + SIGNIN_SECONDS),
        )

    def encode(self) -> str:
        data = [self.state, self.nonce, self.verifier, self.redirect_uri, self.expires]
        return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, payload: str) -> PendingSignIn | None:
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            data: Any = orjson.loads(raw)
        except (ValueError, orjson.JSONDecodeError):
            return None
        if not isinstance(data, list) or len(data) != 5:
            return None
        state, nonce, verifier, redirect_uri, expires = data
        if not all(isinstance(v, str) for v in (state, nonce, verifier, redirect_uri)):
            return None
        if not isinstance(expires, int) or isinstance(expires, bool):
            return None
        return cls(state, nonce, verifier, redirect_uri, expires)


class EntraSignIn:
    """See the module docstring."""

    def __init__(self, entra: AdminEntra, auth: AdminAuth, clock: Clock) -> None:
        self.entra = entra
        self.auth = auth
        self.clock = clock

    @property
    def config_redirect_uri(self) -> str | None:
        return self.entra.config.redirect_uri

    async def begin(self, redirect_uri: str) -> tuple[str, str]:
        """(the authorization URL, the sign-in cookie's value). Raises ``SignInError``."""
        endpoint = await self._endpoint("authorization_endpoint")
        pending = PendingSignIn.new(redirect_uri, self.clock.now())
        params = {
            "client_id": self.entra.config.client_id,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "response_mode": "query",
            "scope": SCOPE,
            "state": pending.state,
            "nonce": pending.nonce,
            "code_challenge": pkce_challenge(pending.verifier),
            "code_challenge_method": "S256",
        }
        joiner = "&" if "?" in endpoint else "?"
        return endpoint + joiner + urlencode(params), self.auth.seal(_PURPOSE, pending.encode())

    async def finish(self, query: Mapping[str, str], cookie: str | None) -> VerifiedToken:
        """The administrator's verified ID token, or ``SignInError``."""
        pending = self._pending(cookie)
        state = query.get("state", "")
        if pending is None or not hmac.compare_digest(
            state.encode("utf-8", "surrogateescape"), pending.state.encode("ascii")
        ):
            raise SignInError(
                400,
                AdminFailure.SIGNIN_STATE,
                "This sign-in cannot be matched to one started in this browser: it may have "
                f"taken longer than {SIGNIN_SECONDS // 60} minutes, been started in another "
                "browser or tab, or been tampered with. Start the sign-in again.",
            )
        error = query.get("error")
        if error:
            description = _printable(query.get("error_description", ""))
            raise SignInError(
                403 if error == "access_denied" else 401,
                AdminFailure.SIGNIN_FAILED,
                f"Entra ID did not sign you in ({_printable(error)}"
                f"{': ' + description if description else ''}).",
            )
        code = query.get("code")
        if not code:
            raise SignInError(
                400, AdminFailure.SIGNIN_FAILED, "Entra ID sent no authorization code back."
            )
        id_token = await self._exchange(code, pending)
        try:
            verified = await self.entra.verify_id_token(id_token)
        except TokenError as exc:
            raise SignInError(
                exc.status,
                token_reason(exc.reason),
                f"The ID token from Entra ID was refused: {exc.message}",
            ) from None
        nonce = verified.claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(
            nonce.encode("utf-8", "surrogateescape"), pending.nonce.encode("ascii")
        ):
            raise SignInError(
                401,
                AdminFailure.SIGNIN_NONCE,
                "The ID token does not carry the nonce of this sign-in (a replayed or mixed-up "
                "token). Start the sign-in again.",
                verified.caller,
            )
        try:
            return self.entra.require_admin(verified)
        except TokenError as exc:
            raise SignInError(
                exc.status, token_reason(exc.reason), exc.message, verified.caller
            ) from None

    def _pending(self, cookie: str | None) -> PendingSignIn | None:
        payload = self.auth.unseal(_PURPOSE, cookie)
        pending = None if payload is None else PendingSignIn.decode(payload)
        if pending is None or pending.expires <= self.clock.now():
            return None
        return pending

    async def _endpoint(self, name: str) -> str:
        """An endpoint from the discovery document (fetched again, rate-limited, if the IdP
        has not answered yet)."""
        key_set = self.entra.key_set
        if not key_set.metadata:
            await key_set.discover_on_demand()
        if not key_set.metadata:
            raise SignInError(
                503,
                "",
                f"Entra ID cannot be reached at the moment ({key_set.last_error or 'no answer'}"
                "). Try again in a minute, or sign in with the admin token.",
            )
        url = key_set.metadata.get(name)
        if not isinstance(url, str):
            raise SignInError(502, "", f"The identity provider's discovery document has no {name}.")
        try:
            return check_fetch_url(url, name)
        except ValueError as exc:
            raise SignInError(502, "", f"The identity provider's {exc}.") from None

    async def _exchange(self, code: str, pending: PendingSignIn) -> str:
        """The ``id_token`` the token endpoint gives for ``code``."""
        url = await self._endpoint("token_endpoint")
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": pending.redirect_uri,
            "client_id": self.entra.config.client_id,
            "code_verifier": pending.verifier,
            "scope": SCOPE,
        }
        if self.entra.client_secret:
            form["client_secret"] = self.entra.client_secret
        try:
            status, doc = await self.entra.http.post_form(url, form)
        except FetchError as exc:
            raise SignInError(
                502,
                AdminFailure.SIGNIN_FAILED,
                f"Entra ID's token endpoint did not answer properly ({exc}). Try again.",
            ) from None
        if status != 200:
            error = _printable(str(doc.get("error", status)))
            description = _printable(str(doc.get("error_description", "")))
            raise SignInError(
                502 if status >= 500 else 401,
                AdminFailure.SIGNIN_FAILED,
                f"Entra ID refused to complete the sign-in ({error}"
                f"{': ' + description if description else ''}). Start the sign-in again.",
            )
        id_token = doc.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise SignInError(
                502,
                token_reason(TokenFailure.MALFORMED),
                "Entra ID's answer has no ID token (is 'openid' a permitted scope of the "
                "admin app registration?).",
            )
        return id_token


def _printable(text: str, limit: int = 300) -> str:
    """Text from the identity provider, fit for a message: printable and short."""
    clean = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."
