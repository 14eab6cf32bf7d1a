"""A backend: its base URL, its credentials and a pooled HTTP client.

One ``UpstreamPool`` (upstream/client.py) per backend keeps connections alive between
requests. The backend's key is read once at start — from the environment, or from Azure Key
Vault by a ``VaultKey`` (upstream/keyvault.py) that re-reads it in the background — and held
only here; ``repr`` never shows it. Backends authenticated with Entra ID hold a ``TokenSource``
(upstream/identity.py) that keeps a bearer token fresh in the background.

Timeouts: the pool bounds only the TCP (and TLS) connect (``timeouts.connect``); the relay
enforces ``first_byte`` (until the status line, and for streams until the first chunk) and
``between_chunks`` (every later read) itself, so that a long first byte is not cut short by
the between-chunks limit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from sluicegate.clock import Clock, SystemClock
from sluicegate.config.model import BackendConfig
from sluicegate.upstream.client import UpstreamPool
from sluicegate.upstream.identity import TokenSource, credential_for
from sluicegate.upstream.keyvault import VaultKey

log = logging.getLogger("sluicegate.upstream")

#: At most one "failed before any answer" warning per backend in this many seconds.
CONNECT_WARNING_INTERVAL_S = 10.0


class Backend:
    """A configured backend. The connection pool is created by ``open()``."""

    def __init__(
        self,
        config: BackendConfig,
        environ: dict[str, str] | None = None,
        clock: Clock | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.config = config
        self.name = config.name
        self.base_url = config.url
        self.kind = config.kind
        self.auth_headers: list[tuple[str, str]] = []
        #: The api-key when it comes from Key Vault (read by ``open()``, then kept current).
        self.vault_key: VaultKey | None = None
        if config.auth.type == "api-key" and config.auth.key_vault is not None:
            try:
                self.vault_key = VaultKey(config.auth.key_vault, env, name=config.name)
            except Exception as exc:
                raise RuntimeError(f"backend {config.name}: {exc}") from None
        elif config.auth.type == "api-key":
            assert config.auth.key_env is not None
            key = env.get(config.auth.key_env)
            if not key:
                raise RuntimeError(
                    f"backend {config.name}: environment variable {config.auth.key_env} is not set"
                )
            self.auth_headers.append((config.auth.header.lower(), key))
        self._clock = clock or SystemClock()
        self._warned_at: float | None = None
        self._unwarned = 0
        self.token_source: TokenSource | None = None
        if config.auth.entra:
            try:
                credential = credential_for(config.auth, env)
            except Exception as exc:
                raise RuntimeError(f"backend {config.name}: {exc}") from None
            self.token_source = TokenSource(
                credential,
                config.auth.scope,
                self._clock,
                refresh_before=config.auth.refresh_before_seconds,
                name=config.name,
                wait=config.timeouts.connect,
            )
        self.first_byte_timeout = config.timeouts.first_byte
        self.between_chunks_timeout = config.timeouts.between_chunks
        self._client: UpstreamPool | None = None
        self.in_flight = 0
        #: Set by the router: (state, headroom tokens) for the admin view and metrics.
        self.status_source: Callable[[], tuple[str | None, int | None]] | None = None

    @property
    def state(self) -> str | None:
        """``open`` or ``half-open`` while routing keeps this backend (or one of its
        deployments) out; None when its circuit is closed, so that views fall back to the
        health recent answers show (healthy, degraded, throttled, …)."""
        if self.status_source is None:
            return None
        state = self.status_source()[0]
        return None if state in (None, "closed") else state

    @property
    def headroom_tokens(self) -> int | None:
        """Tokens the backend last said it accepts (summed over its deployments)."""
        return self.status_source()[1] if self.status_source is not None else None

    async def request_auth(self) -> list[tuple[str, str]]:
        """The headers that authenticate one request (a held token is read without I/O;
        raises ``BackendAuthError`` when no token can be had)."""
        if self.vault_key is not None:
            # The key held now: a rotation read in the background applies from here on.
            return [(self.config.auth.header.lower(), self.vault_key.value)]
        if self.token_source is None:
            return self.auth_headers
        return [("authorization", "Bearer " + await self.token_source.token())]

    @property
    def client(self) -> UpstreamPool:
        if self._client is None:
            raise RuntimeError(f"backend {self.name} is not open")
        return self._client

    async def open(self) -> None:
        """Read the Key Vault key (raising ``VaultKeyError`` if it cannot be: nothing is open
        then), open the connection pool and start the background refreshes."""
        if self.vault_key is not None:
            await self.vault_key.start()
        self._client = UpstreamPool(
            self.config.url,
            max_connections=self.config.max_connections,
            connect_timeout=self.config.timeouts.connect,
            keepalive_seconds=30,
        )
        if self.token_source is not None:
            await self.token_source.start()

    async def close(self) -> None:
        if self.vault_key is not None:
            await self.vault_key.aclose()
        if self.token_source is not None:
            await self.token_source.aclose()
        if self._client is not None:
            await self._client.close()
            self._client = None

    def connect_failed(self, exc: BaseException) -> None:
        """Say why a connection to this backend failed (a refused port, an unverifiable
        certificate, a name that does not resolve): a warning at most every
        ``CONNECT_WARNING_INTERVAL_S`` seconds, with how many failures it stands for."""
        now = self._clock.monotonic()
        if self._warned_at is not None and now - self._warned_at < CONNECT_WARNING_INTERVAL_S:
            self._unwarned += 1
            return
        more = f" ({self._unwarned} more since the last warning)" if self._unwarned else ""
        log.warning(
            "backend %s: a request to %s failed before any answer: %s: %s%s",
            self.name, self.base_url, type(exc).__name__, exc, more,
        )  # fmt: skip
        self._warned_at, self._unwarned = now, 0

    def secrets(self) -> list[str]:
        """The secret values this backend holds or has held (for tests that prove none
        leaks): its key — every value read from Key Vault since start, rotated-out ones
        included — or its current Entra ID token."""
        held = self.token_source.held if self.token_source is not None else None
        vault = self.vault_key.seen() if self.vault_key is not None else []
        return [value for _, value in self.auth_headers] + vault + ([held.value] if held else [])

    def __repr__(self) -> str:
        return f"Backend(name={self.name!r}, url={self.base_url!r}, in_flight={self.in_flight})"
