"""Entra ID tokens for backends: managed identity, workload identity or a service principal.

``credential_for(auth, environ)`` builds the ``azure-identity`` credential a backend's
``auth`` section (or a Key Vault reference's ``credential``) asks for; ``TokenSource`` holds
that backend's current token and refreshes it in a background task before it expires, so the
request path only reads a string:

* a token is refreshed ``refresh_before`` seconds before it expires (at most half its lifetime
  into it, so short-lived tokens are refreshed too); a failed refresh — or a failed first
  fetch — is retried with backoff (1, 2, 4 … 30 s after the failures in a row) while the held
  token stays in use;
* a token is *usable* until a margin before its ``expires_on``: ``_EXPIRY_MARGIN`` (60 s), but
  never more than half the refresh lead above (so a quarter of a short lifetime at most): a
  request never sends a token that expires in flight or by a skewed clock, and the background
  refresh always starts before its token stops being usable. A fetch that brings a token
  already inside its margin (azure-identity hands back its cached token when its own refresh
  failed) counts as a failed fetch;
* ``token()`` returns the held token without I/O whenever it is usable; only when there is
  none (the first fetch failed, or every refresh failed until the margin) does a request wait
  for a fetch, and concurrent requests share that one fetch. A request waits at most
  ``wait`` seconds (the backend's ``timeouts.connect``: getting its token is part of reaching
  it), then its attempt fails (``BackendAuthError``) and the request fails over; the fetch
  goes on for the next requests. ``start()`` waits as long for the first token;
* after a failed fetch, requests do not start another one for a while (1 s, doubling with
  each failure in a row up to 30 s; a successful fetch resets it): they fail at once
  (``BackendAuthError`` with the last failure's reason), so a burst of requests against a
  failing identity endpoint costs one call, not one per burst. A fetch already under way —
  the background retry's — is still shared.

``azure-identity`` caches tokens itself and hands out a new one only within five minutes of
expiry (or after the server's ``refresh_in``); asked earlier it returns the cached one, which
the source notices (same expiry) and asks again shortly after. Its credentials are synchronous
(they use ``requests``), so every fetch runs in a thread of its own, never on the event loop,
and a daemon one (``threads.in_daemon_thread``): a fetch hung on an identity endpoint that
never answers holds neither the gateway's stop nor its exit. The credentials are built with
transport timeouts (connect 5 s, read 10 s a try) instead of azure-core's 300 s, so a hung
fetch ends and the background retries go on.
Nothing here contacts the instance metadata endpoint unless the environment makes
``ManagedIdentityCredential`` choose it (no ``IDENTITY_ENDPOINT``, ``MSI_ENDPOINT`` or
workload identity variables: that is IMDS on an Azure VM).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sluicegate.clock import Clock
from sluicegate.config.model import EntraIdentityConfig
from sluicegate.threads import in_daemon_thread

log = logging.getLogger("sluicegate.upstream")

#: Retries of failed fetches (the background's and the request path's): 1 s, doubling, at most
#: 30 s; a successful fetch starts again from 1 s.
_BACKOFF_FIRST = 1.0
_BACKOFF_MAX = 30.0
#: A token stops being usable this long before it expires (less for short-lived tokens:
#: ``expiry_margin``).
_EXPIRY_MARGIN = 60.0
_FETCH_TIMEOUT = 30.0
#: Transport timeouts of every credential's requests (azure-core's default: 300 s each). A
#: token endpoint answers in milliseconds; azure-identity retries a try that timed out.
TRANSPORT_TIMEOUTS: dict[str, Any] = {"connection_timeout": 5, "read_timeout": 10}


class TokenCredential(Protocol):
    """What ``azure-identity`` credentials offer (``SupportsTokenInfo``)."""

    def get_token_info(self, *scopes: str, options: Any = None) -> Any: ...


class BackendAuthError(Exception):
    """No token could be obtained for a backend; the message says why (no secret in it)."""


@dataclass(frozen=True, slots=True)
class HeldToken:
    value: str
    expires_on: float
    fetched_at: float


def credential_for(auth: EntraIdentityConfig, environ: Mapping[str, str]) -> TokenCredential:
    """The ``azure-identity`` credential for an Entra identity: a backend's ``auth`` section
    or a Key Vault reference (``auth.identity_type`` says which kind; see EntraIdentityConfig).

    ``environ`` supplies the service principal's secret and workload identity's variables;
    ``ManagedIdentityCredential`` itself reads ``os.environ`` (its endpoint variables).
    """
    from azure.identity import (
        ClientSecretCredential,
        ManagedIdentityCredential,
        WorkloadIdentityCredential,
    )

    kwargs: dict[str, Any] = dict(TRANSPORT_TIMEOUTS)
    if auth.authority_host:
        kwargs["authority"] = auth.authority_host
    kind = auth.identity_type
    if kind == "managed-identity":
        return ManagedIdentityCredential(client_id=auth.client_id, **TRANSPORT_TIMEOUTS)
    if kind == "workload-identity":
        tenant = auth.tenant_id or environ.get("AZURE_TENANT_ID")
        client = auth.client_id or environ.get("AZURE_CLIENT_ID")
        token_file = environ.get("AZURE_FEDERATED_TOKEN_FILE")
        if not (tenant and client and token_file):
            raise BackendAuthError(
                "workload identity needs a tenant and client id (auth.tenant_id/client_id or "
                "AZURE_TENANT_ID/AZURE_CLIENT_ID) and AZURE_FEDERATED_TOKEN_FILE"
            )
        return WorkloadIdentityCredential(
            tenant_id=tenant, client_id=client, token_file_path=token_file, **kwargs
        )
    if kind == "service-principal":
        assert auth.tenant_id and auth.client_id and auth.client_secret_env
        secret = environ.get(auth.client_secret_env)
        if not secret:
            raise BackendAuthError(
                f"environment variable {auth.client_secret_env} (the service principal's "
                "secret) is not set"
            )
        return ClientSecretCredential(auth.tenant_id, auth.client_id, secret, **kwargs)
    raise ValueError(f"auth type {kind!r} does not use Entra ID")


def refresh_lead(token: HeldToken, refresh_before: float) -> float:
    """How long before ``token`` expires it should be replaced: ``refresh_before``, but no
    later than half-way through its lifetime."""
    lifetime = max(0.0, token.expires_on - token.fetched_at)
    return min(refresh_before, lifetime / 2)


def refresh_delay(token: HeldToken, now: float, refresh_before: float) -> float:
    """Seconds from ``now`` until ``token`` should be replaced (``refresh_lead``)."""
    return max(0.0, token.expires_on - refresh_lead(token, refresh_before) - now)


def expiry_margin(token: HeldToken, refresh_before: float) -> float:
    """How long before ``token`` expires it stops being usable: ``_EXPIRY_MARGIN``, but at most
    half its refresh lead, so that the background refresh starts (and has time for a few
    retries) before requests find no usable token."""
    return min(_EXPIRY_MARGIN, refresh_lead(token, refresh_before) / 2)


def usable(token: HeldToken, now: float, refresh_before: float) -> bool:
    """Whether ``token`` may still be sent at ``now`` (before its ``expiry_margin``)."""
    return now < token.expires_on - expiry_margin(token, refresh_before)


class TokenSource:
    """One backend's bearer token, kept fresh in the background (module docstring).

    ``sleep`` waits that many seconds of the clock (injected so that tests drive the refresh
    with a fake clock). Use from one event loop; ``start`` and ``aclose`` from its lifespan.
    """

    def __init__(
        self,
        credential: TokenCredential,
        scope: str,
        clock: Clock,
        *,
        refresh_before: float = 300.0,
        name: str = "backend",
        wait: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.credential = credential
        self.scope = scope
        self.clock = clock
        self.refresh_before = refresh_before
        self.name = name
        self.wait = wait
        self._sleep = sleep
        self._held: HeldToken | None = None
        self._usable_until = -math.inf  # when ``_held`` stops being usable (``usable``)
        self._fetching: asyncio.Task[HeldToken] | None = None
        self._task: asyncio.Task[None] | None = None
        #: After a failed fetch: no new fetch for requests before this (``clock.monotonic()``).
        self._retry_at: float | None = None
        self._retry_backoff = _BACKOFF_FIRST
        self._failure: str | None = None
        self.fetches = 0
        self.failures = 0
        #: Requests that had to wait for a fetch (no usable token was held).
        self.waited = 0
        #: Requests failed at once, without a fetch, after a failed one (module docstring).
        self.refused = 0
        self.last_error: str | None = None

    @property
    def held(self) -> HeldToken | None:
        return self._held

    def valid(self) -> str | None:
        """The held token if it is still usable, i.e. not within its ``expiry_margin`` of
        expiring (no I/O)."""
        # Per request: one comparison against the time the token stops being usable, worked
        # out once when the token was stored.
        if self.clock.now() < self._usable_until:
            held = self._held
            assert held is not None
            return held.value
        return None

    async def token(self) -> str:
        """A usable token: the held one, or (only when none is usable) a fresh fetch, waited
        for at most ``wait`` seconds (``BackendAuthError`` then; the fetch goes on). Shortly
        after a failed fetch, ``BackendAuthError`` at once (module docstring)."""
        value = self.valid()
        if value is not None:
            return value
        fetching = self._fetching is not None and not self._fetching.done()
        if not fetching and self._retry_at is not None:
            left = self._retry_at - self.clock.monotonic()
            if left > 0:
                self.refused += 1
                raise BackendAuthError(f"{self._failure}; next try in {left:.1f} s")
        self.waited += 1
        try:
            held = await self._fetched()
        except BackendAuthError:
            raise
        except TimeoutError:
            raise BackendAuthError(f"no token within {self.wait:g} s (still fetching)") from None
        except Exception as exc:
            raise BackendAuthError(f"{type(exc).__name__}: {_safe(exc)}") from None
        return held.value

    async def start(self) -> None:
        """Fetch the first token, waiting at most ``wait`` seconds (a failure is logged, not
        raised: the fetch goes on or the background task retries, and requests meanwhile
        fail over) and start refreshing."""
        try:
            await self._fetched()
        except TimeoutError:
            log.error(
                "backend %s: no Entra ID token yet (no answer within %g s); still fetching",
                self.name,
                self.wait,
            )
        except Exception as exc:
            log.error(
                "backend %s: no Entra ID token yet (%s); retrying in the background",
                self.name,
                _safe(exc),
            )
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._refresh_loop(), name=f"sluicegate-token-{self.name}"
            )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _fetched(self) -> HeldToken:
        """The fetch under way (or a new one), waited for at most ``wait`` seconds
        (``TimeoutError``); giving up leaves the fetch running for the next caller."""
        return await asyncio.wait_for(asyncio.shield(self._fetch_shared()), self.wait)

    def _fetch_shared(self) -> asyncio.Task[HeldToken]:
        task = self._fetching
        if task is None or task.done():
            task = self._fetching = asyncio.get_running_loop().create_task(self._fetch())
            # Its failure is counted in ``_fetch``; whoever stopped waiting need not read it.
            task.add_done_callback(_retrieve)
        return task

    async def _fetch(self) -> HeldToken:
        try:
            info = await asyncio.wait_for(
                in_daemon_thread(
                    f"sluicegate-token-fetch-{self.name}",
                    functools.partial(self.credential.get_token_info, self.scope),
                ),
                _FETCH_TIMEOUT,
            )
            previous = self._held
            value, expires_on = str(info.token), float(info.expires_on)
            now = self.clock.now()
            if previous is not None and previous.value == value:
                held = previous  # azure-identity's cached token again: keep its lifetime
            else:
                held = HeldToken(value, expires_on, now)
            if not usable(held, now, self.refresh_before):
                # azure-identity hands back its cached token when its own refresh failed.
                raise BackendAuthError(
                    f"the token obtained expires in {held.expires_on - now:.0f} s"
                )
        except Exception as exc:
            self.failures += 1
            self.last_error = _safe(exc)
            self._failure = (
                self.last_error if isinstance(exc, BackendAuthError) else
                f"{type(exc).__name__}: {self.last_error}"
            )  # fmt: skip
            self._retry_at = self.clock.monotonic() + self._retry_backoff
            self._retry_backoff = min(self._retry_backoff * 2, _BACKOFF_MAX)
            raise
        self.fetches += 1
        self._held = held
        self._usable_until = held.expires_on - expiry_margin(held, self.refresh_before)
        self.last_error = None
        self._retry_at, self._retry_backoff = None, _BACKOFF_FIRST
        return held

    async def _refresh_loop(self) -> None:
        # ``backoff`` is the wait after the latest failure; the start's fetch failing (no token
        # held yet) is the first one.
        backoff = _BACKOFF_FIRST
        failed = self._held is None
        while True:
            if failed:
                await self._sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            held = self._held
            if held is not None:
                # Also after a failure's wait: a request may have fetched a token meanwhile.
                delay = refresh_delay(held, self.clock.now(), self.refresh_before)
                if delay > 0:
                    await self._sleep(delay)
            previous = self._held
            try:
                fresh = await self._fetch_shared()
            except Exception as exc:
                log.warning(
                    "backend %s: token refresh failed (%s); retrying in %.0f s",
                    self.name,
                    _safe(exc),
                    backoff,
                )
                failed = True
                continue
            failed, backoff = False, _BACKOFF_FIRST
            if previous is not None and fresh.expires_on <= previous.expires_on:
                # azure-identity handed back its cached token (not yet in its own refresh
                # window): ask again a little later rather than spin.
                await self._sleep(min(5.0, max(0.1, fresh.expires_on - self.clock.now()) / 4))

    def __repr__(self) -> str:
        held = self._held
        until = f"{held.expires_on - self.clock.now():.0f}s left" if held else "none"
        return (
            f"TokenSource({self.name!r}, scope={self.scope!r}, token={until}, "
            f"fetches={self.fetches}, failures={self.failures})"
        )


def _retrieve(task: asyncio.Task[HeldToken]) -> None:
    if not task.cancelled():
        task.exception()


def _safe(exc: BaseException) -> str:
    """An exception's message, first line only (azure-identity's messages hold no secret,
    but they can be long)."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
