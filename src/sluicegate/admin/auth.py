"""Admin credentials: the bearer token of the admin API and the dashboard's session cookie.

The token is read once, at start, from the environment variable ``admin.token_env``; with no
token (or one shorter than ``MIN_TOKEN_LENGTH``) the admin API and the dashboard refuse every
call. The token is only ever compared in constant time with ``hmac.compare_digest``; it is a
different secret from every subscription key (those are looked up by their keyed hash in the
subscription index, which the admin token is not in), so neither opens the other's door.

Dashboard sessions are stateless: ``<expiry>.<nonce>.<hmac>``, signed with a key derived from
the admin token, so every gateway instance with the same token accepts them and changing the
token ends every session. A CSRF token for forms is derived from the session the same way, and
``seal`` signs other short-lived values (the Entra ID sign-in's state) for one purpose each.
That is why admin access, Entra ID sign-in included, needs the admin token set.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

MIN_TOKEN_LENGTH = 16
SESSION_SECONDS = 12 * 3600
COOKIE_NAME = "sluicegate_session"


class AdminAuth:
    """Checks admin credentials. Immutable and thread-safe."""

    def __init__(self, token: str | None, env_name: str) -> None:
        self.env_name = env_name
        self._token = token.encode("utf-8") if token else b""
        self.enabled = len(self._token) >= MIN_TOKEN_LENGTH
        self._session_key = hmac.new(
            self._token or secrets.token_bytes(32), b"sluicegate dashboard session v1", "sha256"
        ).digest()

    def __repr__(self) -> str:
        return f"AdminAuth(env={self.env_name!r}, enabled={self.enabled})"

    @property
    def problem(self) -> str:
        """Why admin access is disabled (empty when it is enabled)."""
        if self.enabled:
            return ""
        if not self._token:
            return f"the admin API is disabled: set the environment variable {self.env_name}"
        return f"the admin API is disabled: {self.env_name} must hold at least 16 characters"

    def check_token(self, presented: str) -> bool:
        """Constant-time comparison with the admin token."""
        if not self.enabled:
            return False
        return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), self._token)

    def check_authorization(self, header: str | None) -> bool:
        """``Authorization: Bearer <token>``."""
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and self.check_token(value.strip())

    # -- dashboard sessions ----------------------------------------------------------------

    def _sign(self, payload: str) -> str:
        return hmac.new(self._session_key, payload.encode("ascii"), hashlib.sha256).hexdigest()

    def new_session(self, now: float) -> str:
        payload = f"{int(now + SESSION_SECONDS)}.{secrets.token_hex(16)}"
        return f"{payload}.{self._sign(payload)}"

    def check_session(self, cookie: str | None, now: float) -> bool:
        if not self.enabled or not cookie or not cookie.isascii():
            return False
        payload, _, signature = cookie.rpartition(".")
        expiry, _, _nonce = payload.partition(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return False
        return expiry.isdigit() and int(expiry) > now

    def seal(self, purpose: str, payload: str) -> str:
        """``<payload>.<hmac>``: ``payload`` (ASCII, no secret worth hiding) signed for one
        ``purpose`` with the session key, so that a value signed for one purpose (the
        dashboard sign-in's pending state) is never valid for another (a session)."""
        return f"{payload}.{self._sign(purpose + ':' + payload)}"

    def unseal(self, purpose: str, value: str | None) -> str | None:
        """The payload of a ``seal``ed value, or None when it is not intact."""
        if not self.enabled or not value or not value.isascii():
            return None
        payload, _, signature = value.rpartition(".")
        if not payload or not hmac.compare_digest(signature, self._sign(purpose + ":" + payload)):
            return None
        return payload

    def csrf_token(self, cookie: str) -> str:
        return self._sign("csrf:" + cookie.rpartition(".")[2])

    def check_csrf(self, cookie: str | None, presented: str | None) -> bool:
        if not cookie or not presented or not cookie.isascii() or not presented.isascii():
            return False
        return hmac.compare_digest(presented, self.csrf_token(cookie))
