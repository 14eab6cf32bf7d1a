"""Validating Entra ID / OIDC access tokens (JWTs) against the configured issuers.

:class:`TokenValidator` is the reusable part (the client path uses it through
``auth.bearer``; the admin API can build its own with its own audience). PyJWT does the
cryptography; this module chooses the key, restricts the algorithms to asymmetric ones, and
checks ``exp``/``nbf`` against the injected clock (PyJWT reads the system clock) with the
configured leeway, then the required claims (``auth.claims``). Every refusal is a
:class:`TokenError` whose ``code`` comes from a fixed set (a bounded metrics label) and whose
message says why, without the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import jwt
from jwt import exceptions as jwt_errors

from sluicegate.auth.claims import RequiredClaims
from sluicegate.auth.oidc import (
    HttpFetcher,
    JsonFetcher,
    KeyNotFound,
    KeySet,
    KeySetUnavailable,
    KeyUnsuitable,
)
from sluicegate.auth.token_types import TokenError as TokenError
from sluicegate.auth.token_types import TokenFailure as TokenFailure
from sluicegate.auth.token_types import VerifiedToken as VerifiedToken
from sluicegate.clock import Clock
from sluicegate.config.oidc import OidcConfig

log = logging.getLogger("sluicegate.auth")

#: Retry-After for a token that could not be checked because the IdP did not answer.
UNAVAILABLE_RETRY_SECONDS = 10.0


def _denied(reason: TokenFailure, why: str, status: int = 401) -> TokenError:
    return TokenError(reason, f"Access denied: {why}", status)


def _when(epoch: float) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    except (OverflowError, OSError, ValueError):
        return f"{epoch:.0f} (epoch seconds)"


def short_claim(value: object) -> str:
    """A claim from an unverified token, safe and short enough to quote in a message."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class TokenValidator:
    """Validates tokens of the issuers in ``config``. ``await start()`` inside the event loop
    (fetches every issuer's keys, starts the background refresh); ``await aclose()`` at the
    end. ``validate`` is safe to call from many tasks at once."""

    def __init__(self, config: OidcConfig, clock: Clock, fetch: JsonFetcher | None = None) -> None:
        self.config = config
        self._clock = clock
        #: Owned here when no ``fetch`` is given (closed by ``aclose``).
        self._http: HttpFetcher | None = None
        if fetch is None:
            fetch = self._http = HttpFetcher(config.fetch_timeout_seconds)
        self.key_sets = [
            KeySet(
                issuer,
                fetch,
                clock,
                min_refresh=config.jwks_min_refresh_seconds,
                max_age=config.jwks_max_age_seconds,
            )
            for issuer in config.issuers
        ]
        #: Per key set: ``oidc.required_claims`` and its issuer's, compiled once.
        self._required = {
            id(ks): RequiredClaims([*config.required_claims, *ks.config.required_claims])
            for ks in self.key_sets
        }
        self._task: asyncio.Task[None] | None = None
        self._prefetch: set[asyncio.Task[None]] = set()

    async def start(self, *, background: bool = True) -> None:
        """Load every issuer's keys, waiting at most ``fetch_timeout_seconds`` (a slow IdP
        finishes in the background; one that does not answer is logged and tried again later:
        key-authenticated traffic must not wait for an IdP), then keep them fresh."""
        if self._http is not None:
            await self._http.start()
        loop = asyncio.get_running_loop()
        self._prefetch = {loop.create_task(self._refresh_quietly(ks)) for ks in self.key_sets}
        await asyncio.wait(self._prefetch, timeout=self.config.fetch_timeout_seconds)
        if background:
            self._task = loop.create_task(self._keep_fresh())

    async def aclose(self) -> None:
        tasks = [t for t in (self._task, *self._prefetch) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task, self._prefetch = None, set()
        for ks in self.key_sets:
            await ks.aclose()
        if self._http is not None:
            await self._http.aclose()

    async def refresh_due(self) -> None:
        """Refresh (with discovery) every key set that is older than its maximum age."""
        await asyncio.gather(
            *(self._refresh_quietly(ks, rediscover=True) for ks in self.key_sets if ks.due())
        )

    async def _keep_fresh(self) -> None:
        interval = min(30.0, self.config.jwks_max_age_seconds)
        while True:
            await asyncio.sleep(interval)
            await self.refresh_due()

    @staticmethod
    async def _refresh_quietly(ks: KeySet, rediscover: bool = False) -> None:
        try:
            await ks.refresh(rediscover=rediscover)
        except Exception as exc:  # keep the last good keys; the IdP may be down for a while
            log.warning(
                "token signing keys could not be loaded: %s",
                exc,
                extra={"discovery_url": ks.config.discovery_url},
            )

    async def validate(self, token: str, audiences: list[str] | None = None) -> VerifiedToken:
        """The checked token, or ``TokenError`` saying why not. ``audiences`` replaces the
        issuer's configured audiences for this call (an ID token's audience is the client
        id, whatever audiences the access tokens of the same issuer have)."""
        if len(token) > self.config.max_token_bytes:
            raise _denied(
                TokenFailure.MALFORMED,
                f"the token is longer than {self.config.max_token_bytes} bytes.",
            )
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt_errors.PyJWTError:
            raise _denied(
                TokenFailure.MALFORMED,
                "the bearer token is not a well-formed JWT. Send an access token from "
                "Entra ID (or the configured identity provider).",
            ) from None
        alg, kid = header.get("alg"), header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _denied(TokenFailure.MALFORMED, "the token's 'kid' header is not a string.")
        key_set = await self._key_set_for(unverified.get("iss"))
        if alg not in key_set.config.allowed_algorithms:
            raise _denied(
                TokenFailure.ALGORITHM,
                f"the token is signed with algorithm {short_claim(alg)}, which this gateway does "
                f"not accept (accepted: {', '.join(key_set.config.allowed_algorithms)}).",
            )
        assert isinstance(alg, str)
        try:
            key = await key_set.key(kid, alg)
        except KeyNotFound as exc:
            raise _denied(TokenFailure.UNKNOWN_KEY, f"{exc}.") from None
        except KeyUnsuitable as exc:
            raise _denied(TokenFailure.ALGORITHM, f"{exc}.") from None
        except KeySetUnavailable as exc:
            raise TokenError(
                TokenFailure.UNAVAILABLE,
                f"The token could not be checked: {exc}. Try again later.",
                503,
                UNAVAILABLE_RETRY_SECONDS,
            ) from None
        claims = self._decode(
            token, key, alg, kid, unverified, key_set, audiences or key_set.config.audiences
        )
        self._check_lifetime(claims)
        required = self._required[id(key_set)]
        if required:
            failure = required.check(claims)
            if failure is not None:
                raise failure
        return VerifiedToken(str(claims["iss"]), claims, kid)

    async def _key_set_for(self, iss: object) -> KeySet:
        if len(self.key_sets) == 1:
            return self.key_sets[0]  # a wrong iss is reported after the signature check
        for ks in self.key_sets:
            if isinstance(iss, str) and iss in ks.issuers:
                return ks
        # An issuer that has not answered yet does not know its own iss: ask it again (at most
        # once per refresh interval, like an unknown key id).
        for ks in self.key_sets:
            if not ks.issuers:
                await ks.discover_on_demand()
                if isinstance(iss, str) and iss in ks.issuers:
                    return ks
        silent = [ks.config.discovery_url for ks in self.key_sets if not ks.issuers]
        note = f" (not reachable at the moment: {', '.join(silent)})" if silent else ""
        raise _denied(
            TokenFailure.ISSUER,
            f"the token was issued by {short_claim(iss)}, which this gateway does not trust{note}.",
        )

    def _decode(
        self,
        token: str,
        key: Any,
        alg: str,
        kid: str | None,
        unverified: Mapping[str, Any],
        key_set: KeySet,
        audiences: list[str],
    ) -> dict[str, Any]:
        issuers = key_set.issuers
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=audiences,
                issuer=list(issuers),
                options={
                    "require": ["exp", "iss", "aud"],
                    "verify_exp": False,  # checked below with the injected clock
                    "verify_nbf": False,
                    "verify_iat": False,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt_errors.InvalidSignatureError:
            raise _denied(
                TokenFailure.SIGNATURE,
                f"the token's signature does not verify with the issuer's key {kid!r}.",
            ) from None
        except jwt_errors.MissingRequiredClaimError as exc:
            raise _denied(
                TokenFailure.CLAIM_MISSING, f"the token has no '{exc.claim}' claim."
            ) from None
        except jwt_errors.InvalidAudienceError:
            raise _denied(
                TokenFailure.AUDIENCE,
                f"the token is for audience {short_claim(unverified.get('aud'))}, not for this "
                f"gateway (accepted: {', '.join(audiences)}). Request the token for one of "
                "those.",
            ) from None
        except jwt_errors.InvalidIssuerError:
            raise _denied(
                TokenFailure.ISSUER,
                f"the token was issued by {short_claim(unverified.get('iss'))}, which this "
                f"gateway does not trust (trusted: "
                f"{', '.join(sorted(issuers)) or 'none discovered yet'}).",
            ) from None
        except (jwt_errors.InvalidAlgorithmError, jwt_errors.InvalidKeyError):
            raise _denied(
                TokenFailure.ALGORITHM,
                f"the token's algorithm {alg} cannot be used with the issuer's key.",
            ) from None
        except jwt_errors.PyJWTError as exc:
            raise _denied(
                TokenFailure.MALFORMED, f"the token is not valid ({type(exc).__name__})."
            ) from None
        return claims

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        now = self._clock.now()
        leeway = self.config.leeway_seconds
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not _number(exp) or (nbf is not None and not _number(nbf)):
            raise _denied(TokenFailure.MALFORMED, "the token's 'exp' or 'nbf' is not a number.")
        assert isinstance(exp, int | float)
        if exp <= now - leeway:
            raise _denied(
                TokenFailure.EXPIRED,
                f"the token expired at {_when(exp)} ({now - exp:.0f} s ago; clock skew "
                f"allowed: {leeway:.0f} s). Get a new token.",
            )
        if nbf is not None:
            assert isinstance(nbf, int | float)
            if nbf > now + leeway:
                raise _denied(
                    TokenFailure.NOT_YET_VALID,
                    f"the token is not valid before {_when(nbf)} ({nbf - now:.0f} s from now; "
                    f"clock skew allowed: {leeway:.0f} s).",
                )

    def __repr__(self) -> str:
        return f"TokenValidator({self.key_sets!r})"


def _number(value: object) -> bool:
    """A JSON number that is finite (Python's json accepts NaN and Infinity)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and abs(value) < 1e15
    except OverflowError:  # an integer too large for a float
        return False
