"""Backend api-keys held in Azure Key Vault: read at start, re-read in the background.

``VaultKey`` holds one backend's api-key, read from a Key Vault secret (``auth.key_vault``)
with ``azure-keyvault-secrets``' ``SecretClient``:

* ``start()`` reads the secret and raises ``VaultKeyError`` when it cannot (the message names
  the vault and the secret and says why, never a value): a gateway that cannot authenticate
  to a backend does not start;
* a background task reads the secret again every ``refresh_seconds`` (unless a version is
  pinned: versions never change), so a rotated key — a new version of the secret — is used by
  the requests that start after it was read, without a restart. A failed read is logged as a
  warning (no value in it) and the held key stays in use; it is tried again sooner than the
  next interval: 5 s after the first failure in a row, then twice as long after each further
  one, up to ``refresh_seconds`` — and ``refresh_seconds`` while the failures go on; the first
  successful read brings back the interval, and the next failure starts again at 5 s;
* a value that cannot be sent as a header — a line break or another control character inside
  it (surrounding whitespace is stripped), or a character outside Latin-1 — is refused like a
  failed read (counted, logged without the value; the held key stays, the start fails): sent,
  it would fail every request with a 400 blamed on the client;
* ``value`` is the held key, read without I/O: the request path never waits for the vault;
* ``seen()`` lists every value held since start (the most recent ``_SEEN_MAX``), so that
  checks that no key leaks cover keys that were rotated out too.

The SDK speaks Key Vault's challenge protocol: its first request carries no token, the vault
answers 401 with ``WWW-Authenticate: Bearer authorization="<authority>/<tenant>",
resource="https://vault.azure.net"``, and the SDK asks the credential for a token for that
resource (so no scope is configured here). It refuses a challenge whose resource is not the
vault URL's domain (``verify_challenge_resource``, left on: a look-alike server cannot obtain
a vault token). The client is synchronous (``requests``, like azure-identity's credentials),
so every read runs in a worker thread. Its transport honours the standard ``HTTPS_PROXY``/
``NO_PROXY`` and ``REQUESTS_CA_BUNDLE`` variables (an egress proxy, a private CA).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from sluicegate.config.model import KeyVaultSecretConfig
from sluicegate.threads import in_daemon_thread
from sluicegate.upstream.identity import TokenCredential, credential_for

log = logging.getLogger("sluicegate.upstream")

#: Seconds one read may take (the SDK's own retries included) before it counts as failed.
_READ_TIMEOUT = 60.0
#: Retries of failed reads, after the first: 5 s, doubling, never longer than the interval.
_RETRY_FIRST = 5.0
#: What an HTTP field value may hold (RFC 9110 5.5: visible characters, obs-text, space and
#: tab), i.e. what ``UpstreamPool`` can send: Latin-1 without control characters.
_FIELD_CHARS = frozenset("\t" + "".join(map(chr, [*range(0x20, 0x7F), *range(0x80, 0x100)])))
_SEEN_MAX = 32


class VaultKeyError(Exception):
    """The secret cannot be read; the message names the vault and the secret, never a
    value."""


class VaultKey:
    """One backend's api-key from a Key Vault secret, kept current in the background (module
    docstring). ``client`` is the ``SecretClient`` to read with (built from ``config`` and
    ``environ`` when None; tests pass their own only to count reads). Use from one event
    loop; ``start`` and ``aclose`` from its lifespan. ``sleep`` is injected for tests."""

    def __init__(
        self,
        config: KeyVaultSecretConfig,
        environ: Mapping[str, str],
        *,
        name: str = "backend",
        client: Any = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.name = name
        self._client = client if client is not None else _secret_client(config, environ)
        self._sleep = sleep
        self._value: str | None = None
        self._seen: list[str] = []
        self._task: asyncio.Task[None] | None = None
        #: The version of the secret the held value is (from the vault's answer).
        self.version: str | None = None
        self.reads = 0
        self.failures = 0
        self.last_error: str | None = None

    @property
    def value(self) -> str:
        """The held key (no I/O). Only valid after ``start()`` succeeded."""
        if self._value is None:
            raise RuntimeError(f"backend {self.name}: the Key Vault key has not been read")
        return self._value

    def seen(self) -> list[str]:
        """Every value held since start, oldest first (bounded)."""
        return list(self._seen)

    async def start(self) -> None:
        """Read the secret (raising ``VaultKeyError`` if that fails) and, unless a version is
        pinned, start re-reading it every ``refresh_seconds``."""
        try:
            await self._read()
        except Exception as exc:
            raise VaultKeyError(
                f"backend {self.name}: cannot read its api-key from Key Vault secret "
                f"{self.config.secret!r} in {self.config.vault_url} "
                f"({type(exc).__name__}: {_safe(exc)})"
            ) from None
        if self._task is None and self.config.version is None:
            self._task = asyncio.get_running_loop().create_task(
                self._refresh_loop(), name=f"sluicegate-vault-key-{self.name}"
            )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

    async def _read(self) -> None:
        try:
            # A daemon thread: a read hung on the vault (or its token endpoint) holds neither
            # the gateway's stop nor its exit (``threads.in_daemon_thread``).
            secret = await asyncio.wait_for(
                in_daemon_thread(
                    f"sluicegate-vault-read-{self.name}",
                    functools.partial(
                        self._client.get_secret, self.config.secret, self.config.version
                    ),
                ),
                _READ_TIMEOUT,
            )
            value = (secret.value or "").strip()
            if not value:
                raise VaultKeyError("the secret is empty")
            _check_header_value(value)
        except Exception as exc:
            self.failures += 1
            self.last_error = _safe(exc)
            raise
        self.reads += 1
        self.last_error = None
        version = secret.properties.version
        if value != self._value:
            if self._value is not None:
                log.info(
                    "backend %s: api-key rotated (Key Vault secret %s, version %s)",
                    self.name,
                    self.config.secret,
                    version,
                )
            self._value = value
            if value not in self._seen:
                self._seen = [*self._seen, value][-_SEEN_MAX:]
        self.version = version

    async def _refresh_loop(self) -> None:
        interval = self.config.refresh_seconds
        wait = interval
        failing = False  # the last read failed: ``wait`` is a retry's
        while True:
            await self._sleep(wait)
            try:
                await self._read()
            except Exception as exc:
                wait = min(interval, wait * 2 if failing else _RETRY_FIRST)
                failing = True
                log.warning(
                    "backend %s: re-reading Key Vault secret %s in %s failed (%s: %s); "
                    "keeping the key held, trying again in %.3g s",
                    self.name,
                    self.config.secret,
                    self.config.vault_url,
                    type(exc).__name__,
                    _safe(exc),
                    wait,
                )
                continue
            wait, failing = interval, False

    def __repr__(self) -> str:
        return (
            f"VaultKey({self.name!r}, {self.config.reference!r}, version={self.version!r}, "
            f"reads={self.reads}, failures={self.failures})"
        )


def _secret_client(config: KeyVaultSecretConfig, environ: Mapping[str, str]) -> Any:
    from azure.core.credentials import TokenCredential as AzureTokenCredential
    from azure.keyvault.secrets import SecretClient

    credential: TokenCredential = credential_for(config, environ)
    # Bounded: a read is a background chore (or the start), so a few quick retries of
    # connection errors and 5xx/429 are enough; the next interval tries again anyway.
    return SecretClient(
        config.vault_url,
        # azure-identity's credentials offer get_token as well as get_token_info.
        cast(AzureTokenCredential, credential),
        retry_total=3,
        retry_backoff_max=10,
        connection_timeout=10,
        read_timeout=30,
    )


def _check_header_value(value: str) -> None:
    """Raise ``VaultKeyError`` (saying what is wrong, never the value) if ``value`` cannot be
    sent as a header value."""
    bad = next((c for c in value if c not in _FIELD_CHARS), None)
    if bad is None:
        return
    if bad in "\r\n":
        what = "a line break"
    elif ord(bad) < 0x100:
        what = f"a control character (U+{ord(bad):04X})"
    else:
        what = "a character outside Latin-1"
    raise VaultKeyError(f"the secret's value cannot be sent as a header: it has {what} in it")


def _safe(exc: BaseException) -> str:
    """An exception's message, first line only. Key Vault's error messages (azure-core's
    ``HttpResponseError``: "(SecretNotFound) A secret with (name/id) … was not found …") and
    azure-identity's hold no secret; a successful read raises nothing."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
