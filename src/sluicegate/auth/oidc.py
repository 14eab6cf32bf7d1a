"""OIDC discovery and an issuer's signing keys (JWKS), cached and refreshed.

One :class:`KeySet` per configured issuer. It learns ``issuer`` and ``jwks_uri`` from the
discovery document, keeps the key set in memory and fetches it again

- when a token names a key id it does not know, at most once per ``min_refresh`` seconds
  (a stranger sending random key ids gets one refresh per interval, not one per request);
- in the background, when the set is older than ``max_age`` (keys the IdP has withdrawn
  stop being accepted).

Fetches go through an async :class:`JsonFetcher` (aiohttp in production) with a timeout, so
the event loop never blocks on the network; concurrent refreshes share one fetch.
Concurrency: one event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from sluicegate.clock import Clock
from sluicegate.config.oidc import OidcIssuerConfig, check_fetch_url

if TYPE_CHECKING:
    import aiohttp
    from jwt import PyJWK

log = logging.getLogger("sluicegate.auth")

#: A key set with more entries than this is cut (Entra ID publishes a handful).
MAX_KEYS = 64
MAX_DOCUMENT_BYTES = 1024 * 1024


class FetchError(Exception):
    """A discovery document or key set could not be fetched or made no sense."""


class KeySetError(Exception):
    """The key a token names cannot be used; ``str()`` says why (safe to show)."""


class KeyNotFound(KeySetError):
    pass


class KeyUnsuitable(KeySetError):
    """The key exists but not for the token's algorithm (or its JWK is unusable)."""


class KeySetUnavailable(KeySetError):
    """No key set could be loaded from the issuer (its endpoints did not answer)."""


class JsonFetcher(Protocol):
    async def __call__(self, url: str) -> dict[str, Any]:
        """The JSON object at ``url``; raises ``FetchError``."""


class HttpFetcher:
    """GETs small JSON documents (and POSTs OAuth token requests) with aiohttp. ``start()``
    inside the event loop first.

    aiohttp is imported here, not at the top: a gateway that accepts no tokens does not load
    it at all (the request path has its own client, upstream/client.py), ~14 MiB less per
    worker."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        import aiohttp

        if self._session is None:
            # trust_env: HTTPS_PROXY / HTTP_PROXY / NO_PROXY are honoured, as by the other
            # Azure clients (azure-identity, Key Vault): a gateway whose only way out is an
            # egress proxy must still reach its identity provider.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout), trust_env=True
            )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, url: str) -> dict[str, Any]:
        status, doc = await self._request("GET", url)
        if status != 200:
            raise FetchError(f"{url} answered {status}")
        return doc

    async def post_form(self, url: str, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        """POST an urlencoded form (an OAuth token request): the status and the JSON object
        answered, whatever the status (OAuth errors come as 400 with a JSON body). Raises
        ``FetchError`` when there is no JSON object to read."""
        return await self._request("POST", url, dict(form))

    async def _request(
        self, method: str, url: str, form: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        import aiohttp

        if self._session is None:
            await self.start()
        assert self._session is not None
        try:
            async with self._session.request(
                method,
                url,
                data=form,
                headers={"accept": "application/json"},
                allow_redirects=False,
            ) as resp:
                status = resp.status
                # ``read(n)`` answers what has arrived so far, up to n bytes, not the whole
                # body: a document in several TCP segments or TLS records (a JWKS with
                # certificate chains) would be cut. Read to the end, one byte past the cap.
                parts: list[bytes] = []
                size = 0
                while size <= MAX_DOCUMENT_BYTES:
                    part = await resp.content.read(MAX_DOCUMENT_BYTES + 1 - size)
                    if not part:
                        break
                    parts.append(part)
                    size += len(part)
                data = b"".join(parts)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise FetchError(f"{url} could not be fetched ({type(exc).__name__})") from exc
        if len(data) > MAX_DOCUMENT_BYTES:
            raise FetchError(f"{url} is larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise FetchError(f"{url} answered {status}, not JSON") from None
        if not isinstance(doc, dict):
            raise FetchError(f"{url} answered {status}, not a JSON object")
        return status, doc


#: Which algorithms a key of each type (and curve) can verify.
_FAMILY: dict[tuple[str, str | None], frozenset[str]] = {
    ("RSA", None): frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("EC", "P-521"): frozenset({"ES512"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
    ("OKP", "Ed448"): frozenset({"EdDSA"}),
}


_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def parse_jwks(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Key id → JWK of the signature keys in a JWKS document. Symmetric (``oct``) keys, keys
    for encryption and entries without a usable type are dropped: they must never verify a
    token. An entry without ``kid`` is kept under ``""``."""
    entries = doc.get("keys")
    if not isinstance(entries, list):
        raise FetchError("the key set has no 'keys' list")
    keys: dict[str, dict[str, Any]] = {}
    for entry in entries[:MAX_KEYS]:
        if not isinstance(entry, dict):
            continue
        kty, crv = entry.get("kty"), entry.get("crv")
        if not isinstance(kty, str) or (crv is not None and not isinstance(crv, str)):
            continue
        if (kty, None if kty == "RSA" else crv) not in _FAMILY:
            continue
        if entry.get("use", "sig") != "sig":
            continue
        kid = entry.get("kid", "")
        if isinstance(kid, str):
            # Only the public part: a key set that leaks private members must not make the
            # gateway build (and try to verify with) a private key.
            keys.setdefault(kid, {k: v for k, v in entry.items() if k not in _PRIVATE_MEMBERS})
    return keys


class KeySet:
    """The signing keys of one issuer (see the module docstring)."""

    def __init__(
        self,
        config: OidcIssuerConfig,
        fetch: JsonFetcher,
        clock: Clock,
        *,
        min_refresh: float,
        max_age: float,
    ) -> None:
        self.config = config
        self._fetch_json = fetch
        self._clock = clock
        self._min_refresh = min_refresh
        self._max_age = max_age
        self._configured_issuers = frozenset(config.issuers)
        self.discovered_issuer: str | None = None
        self.jwks_uri: str | None = None
        #: The whole discovery document (the admin sign-in reads its endpoints from it).
        self.metadata: Mapping[str, Any] = {}
        self._keys: dict[str, dict[str, Any]] = {}
        self._bound: dict[tuple[str, str], PyJWK] = {}
        self._loaded_at: float | None = None  # monotonic
        self._last_demand: float | None = None  # monotonic
        self._inflight: asyncio.Task[None] | None = None
        self.fetches = 0
        self.failures = 0
        self.last_error: str | None = None

    @property
    def issuers(self) -> frozenset[str]:
        """The ``iss`` values accepted: the configured ones, else the discovered one."""
        if self._configured_issuers:
            return self._configured_issuers
        return frozenset({self.discovered_issuer}) if self.discovered_issuer else frozenset()

    @property
    def kids(self) -> list[str]:
        """The key ids of the current key set."""
        return sorted(self._keys)

    @property
    def loaded(self) -> bool:
        return self._loaded_at is not None

    def due(self) -> bool:
        """The set was never loaded, or is older than ``max_age``."""
        return self._loaded_at is None or (
            self._clock.monotonic() - self._loaded_at >= self._max_age
        )

    async def refresh(self, *, rediscover: bool = False) -> None:
        """Fetch the key set now (and the discovery document when not known yet, or with
        ``rediscover``). Concurrent callers share one fetch; raises ``FetchError``."""
        if self._inflight is None:
            task = asyncio.get_running_loop().create_task(self._fetch(rediscover))
            task.add_done_callback(self._fetched)
            self._inflight = task
        # A caller that is cancelled (client gone) must not cancel the fetch others wait for.
        await asyncio.shield(self._inflight)

    async def aclose(self) -> None:
        """Cancel a fetch in flight (at shutdown)."""
        task = self._inflight
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, FetchError):
                await task

    def _fetched(self, task: asyncio.Task[None]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here: it is also raised to every waiter

    async def _fetch(self, rediscover: bool) -> None:
        try:
            if self.jwks_uri is None or rediscover:
                await self._discover()
            assert self.jwks_uri is not None
            keys = parse_jwks(await self._fetch_json(self.jwks_uri))
        except FetchError as exc:
            self.failures += 1
            self.last_error = str(exc)
            raise
        self._keys, self._bound = keys, {}
        self._loaded_at = self._clock.monotonic()
        self.fetches += 1
        self.last_error = None
        log.info(
            "token signing keys loaded",
            extra={"discovery_url": self.config.discovery_url, "kids": sorted(keys)},
        )

    async def _discover(self) -> None:
        doc = await self._fetch_json(self.config.discovery_url)
        issuer, jwks_uri = doc.get("issuer"), doc.get("jwks_uri")
        if not isinstance(issuer, str) or not isinstance(jwks_uri, str):
            raise FetchError("the discovery document lacks 'issuer' or 'jwks_uri'")
        try:
            check_fetch_url(jwks_uri, "jwks_uri")
        except ValueError as exc:
            raise FetchError(str(exc)) from None
        self.discovered_issuer, self.jwks_uri, self.metadata = issuer, jwks_uri, doc

    async def discover_on_demand(self) -> None:
        """For an issuer that has not answered yet (its ``iss`` is unknown): join a refresh
        in flight, or start one if the on-demand rate limit allows; errors are kept in
        ``last_error``."""
        if self._inflight is None:
            now = self._clock.monotonic()
            if self._last_demand is not None and now - self._last_demand < self._min_refresh:
                return
            self._last_demand = now
        with contextlib.suppress(FetchError):
            await self.refresh()

    async def key(self, kid: str | None, alg: str) -> PyJWK:
        """The key ``kid`` bound to ``alg``. An unknown ``kid`` triggers one refresh if the
        last on-demand refresh was at least ``min_refresh`` seconds ago. Raises
        ``KeyNotFound``, ``KeyUnsuitable`` or ``KeySetUnavailable``."""
        jwk = self._find(kid)
        if jwk is None and self._inflight is not None:
            # A refresh is on its way (another request's, or the background one): wait for
            # it rather than refuse now.
            with contextlib.suppress(FetchError):
                await asyncio.shield(self._inflight)
            jwk = self._find(kid)
        if jwk is None:
            now = self._clock.monotonic()
            last = self._last_demand
            if last is not None and now - last < self._min_refresh:
                if not self.loaded:
                    raise KeySetUnavailable(
                        f"the issuer's signing keys could not be loaded ({self.last_error})"
                    )
                raise KeyNotFound(
                    f"the token is signed with key {kid!r}, which the issuer's key set does "
                    f"not contain (keys were refreshed {now - last:.0f} s ago)"
                )
            self._last_demand = now
            try:
                await self.refresh()
            except FetchError as exc:
                raise KeySetUnavailable(
                    f"the issuer's signing keys could not be refreshed ({exc})"
                ) from None
            jwk = self._find(kid)
            if jwk is None:
                raise KeyNotFound(
                    f"the token is signed with key {kid!r}, which the issuer's key set does "
                    "not contain (the key set was fetched again just now)"
                )
        return self._bind(kid or "", jwk, alg)

    def _find(self, kid: str | None) -> dict[str, Any] | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid or "")

    def _bind(self, kid: str, jwk: dict[str, Any], alg: str) -> PyJWK:
        # PyJWT is imported where keys are used: a gateway without tokens never loads it.
        from jwt import PyJWK
        from jwt.exceptions import PyJWTError

        bound = self._bound.get((kid, alg))
        if bound is not None:
            return bound
        declared = jwk.get("alg")
        if declared is not None and declared != alg:
            raise KeyUnsuitable(f"key {kid!r} is for {declared}, the token says {alg}")
        kty = jwk.get("kty")
        family = _FAMILY.get((str(kty), None if kty == "RSA" else jwk.get("crv")), frozenset())
        if alg not in family:
            raise KeyUnsuitable(f"key {kid!r} ({kty}) cannot verify {alg}")
        try:
            bound = PyJWK(jwk, algorithm=alg)
        except (PyJWTError, ValueError, TypeError) as exc:
            raise KeyUnsuitable(f"key {kid!r} in the key set is unusable") from exc
        self._bound[(kid, alg)] = bound
        return bound

    def __repr__(self) -> str:
        return (
            f"KeySet({self.config.discovery_url!r}, issuers={sorted(self.issuers)}, "
            f"kids={self.kids}, fetches={self.fetches}, failures={self.failures})"
        )
