"""A backend: its base URL, its credentials and a pooled HTTP client.

One ``aiohttp.ClientSession`` per backend keeps connections alive between requests. The
backend's key is read once at start and held only here; ``repr`` never shows it.
"""

from __future__ import annotations

import os

import aiohttp

from sluicegate.config.model import BackendConfig


class Backend:
    """A configured backend. The session is created by ``open()`` inside the event loop."""

    def __init__(self, config: BackendConfig, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.config = config
        self.name = config.name
        self.base_url = config.url
        self.kind = config.kind
        self.auth_headers: list[tuple[str, str]] = []
        if config.auth.type == "api-key":
            assert config.auth.key_env is not None
            key = env.get(config.auth.key_env)
            if not key:
                raise RuntimeError(
                    f"backend {config.name}: environment variable {config.auth.key_env} is not set"
                )
            self.auth_headers.append((config.auth.header.lower(), key))
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=config.timeouts.connect,
            sock_read=config.timeouts.between_chunks,
        )
        self.first_byte_timeout = config.timeouts.first_byte
        self._session: aiohttp.ClientSession | None = None
        self.in_flight = 0

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"backend {self.name} is not open")
        return self._session

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections,
            keepalive_timeout=30,
            enable_cleanup_closed=False,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self.timeout,
            auto_decompress=True,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def secrets(self) -> list[str]:
        """The secret values this backend holds (for tests that prove none leaks)."""
        return [value for _, value in self.auth_headers]

    def __repr__(self) -> str:
        return f"Backend(name={self.name!r}, url={self.base_url!r}, in_flight={self.in_flight})"
