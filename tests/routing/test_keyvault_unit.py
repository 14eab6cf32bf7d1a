"""VaultKey's schedule: re-read every interval, failed reads retried sooner (5, 10, 20 … s, at
most the interval) while the held key stays, a pinned version read once — driven step by step
(no sleeping).

The client here stands in for ``azure-keyvault-secrets`` (an external library); the real one
is exercised against a fake Key Vault over HTTPS in test_keyvault.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from sluicegate.config.model import KeyVaultSecretConfig
from sluicegate.upstream.keyvault import VaultKey, VaultKeyError


class Client:
    """Answers ``get_secret`` like SecretClient: the current value and its version."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.version = 1
        self.fail = False
        self.calls: list[tuple[str, str | None]] = []
        self.closed = False

    def get_secret(self, name: str, version: str | None = None) -> SimpleNamespace:
        self.calls.append((name, version))
        if self.fail:
            raise RuntimeError("vault unreachable\nsecond line")
        return SimpleNamespace(
            value=self.value, properties=SimpleNamespace(version=f"v{self.version}")
        )

    def rotate(self, value: str) -> None:
        self.value, self.version = value, self.version + 1

    def close(self) -> None:
        self.closed = True


class Sleeps:
    """A sleep the test releases step by step."""

    def __init__(self) -> None:
        self.asked: asyncio.Queue[float] = asyncio.Queue()
        self.go: asyncio.Queue[None] = asyncio.Queue()

    async def __call__(self, seconds: float) -> None:
        await self.asked.put(seconds)
        await self.go.get()

    async def next(self) -> float:
        return await asyncio.wait_for(self.asked.get(), 5)

    async def release(self) -> float:
        """Let the pending sleep end; the next sleep asked for (the read in between done)."""
        self.go.put_nowait(None)
        return await self.next()


def _config(**options: object) -> KeyVaultSecretConfig:
    return KeyVaultSecretConfig.model_validate(
        {"vault_url": "https://kv.vault.azure.net", "secret": "aoai-key", **options}
    )


async def test_rereads_every_interval_and_retries_failures_sooner() -> None:
    client, sleeps = Client("key-1"), Sleeps()
    key = VaultKey(_config(refresh_seconds=60), {}, name="b", client=client, sleep=sleeps)
    await key.start()
    try:
        assert (key.value, key.version, client.calls) == ("key-1", "v1", [("aoai-key", None)])
        assert await sleeps.next() == 60
        client.rotate("key-2")
        assert await sleeps.release() == 60
        assert (key.value, key.version, key.seen()) == ("key-2", "v2", ["key-1", "key-2"])
        client.fail = True
        assert await sleeps.release() == 5  # retried sooner …
        assert await sleeps.release() == 10
        assert await sleeps.release() == 20
        assert await sleeps.release() == 40
        assert await sleeps.release() == 60  # … never later than the interval
        assert key.value == "key-2" and key.last_error == "vault unreachable"
        client.fail = False
        assert await sleeps.release() == 60
        assert key.last_error is None and key.failures == 5 and key.reads == 3
        assert "key-2" not in repr(key)
    finally:
        await key.aclose()
    assert client.closed


async def test_a_pinned_version_is_read_once() -> None:
    client, sleeps = Client("key-1"), Sleeps()
    key = VaultKey(_config(version="abc123"), {}, client=client, sleep=sleeps)
    await key.start()
    await asyncio.sleep(0)
    assert client.calls == [("aoai-key", "abc123")] and sleeps.asked.empty()
    await key.aclose()


async def test_the_start_fails_on_an_unreadable_or_empty_secret() -> None:
    client = Client("key-1")
    client.fail = True
    key = VaultKey(_config(), {}, name="b", client=client)
    with pytest.raises(VaultKeyError) as info:
        await key.start()
    assert str(info.value) == (
        "backend b: cannot read its api-key from Key Vault secret 'aoai-key' in "
        "https://kv.vault.azure.net (RuntimeError: vault unreachable)"
    )
    with pytest.raises(RuntimeError, match="has not been read"):
        _ = key.value
    client.fail, client.value = False, "  \n"
    with pytest.raises(VaultKeyError, match=r"\(VaultKeyError: the secret is empty\)"):
        await key.start()
    await key.aclose()


async def test_retries_stay_at_the_interval_while_failures_go_on() -> None:
    """The retry backoff doubles up to the interval and stays there while the reads keep
    failing; only a successful read starts it over."""
    client, sleeps = Client("key-1"), Sleeps()
    key = VaultKey(_config(refresh_seconds=100), {}, name="b", client=client, sleep=sleeps)
    await key.start()
    try:
        assert await sleeps.next() == 100
        client.fail = True
        waits = [await sleeps.release() for _ in range(10)]
        assert waits == [5, 10, 20, 40, 80, 100, 100, 100, 100, 100]
        assert key.failures == 10 and key.value == "key-1"
        client.fail = False
        assert await sleeps.release() == 100  # read: back to the interval
        client.fail = True
        assert [await sleeps.release() for _ in range(3)] == [5, 10, 20]  # started over
    finally:
        await key.aclose()


# A value that cannot be sent as a header: CR/LF inside it, another control character, or a
# character outside Latin-1 (``UpstreamPool`` would refuse every request: a 400 for the client).
_MALFORMED = {
    "crlf": ("key-2a\r\nx-injected: 1", "a line break"),
    "lf": ("key-2a\nkey-2b", "a line break"),
    "nul": ("key-2a\x00", "a control character (U+0000)"),
    "non-latin-1": ("key-2a\u2013key-2b", "a character outside Latin-1"),
}


@pytest.mark.parametrize(("value", "what"), _MALFORMED.values(), ids=_MALFORMED)
async def test_a_malformed_value_is_a_failed_read_and_the_held_key_stays(
    value: str, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, sleeps = Client("key-1"), Sleeps()
    key = VaultKey(_config(refresh_seconds=60), {}, name="b", client=client, sleep=sleeps)
    await key.start()
    try:
        assert await sleeps.next() == 60
        client.rotate(value)
        assert await sleeps.release() == 5  # a failed read: retried sooner
        reason = f"the secret's value cannot be sent as a header: it has {what} in it"
        assert (key.value, key.version, key.seen()) == ("key-1", "v1", ["key-1"])
        assert (key.failures, key.reads, key.last_error) == (1, 1, reason)
        (warning,) = [r.getMessage() for r in caplog.records if r.name == "sluicegate.upstream"]
        assert warning.startswith(
            "backend b: re-reading Key Vault secret aoai-key in https://kv.vault.azure.net "
            f"failed (VaultKeyError: {reason}); keeping the key held"
        )
        assert "key-2" not in warning
        client.rotate("  key-3\n")  # fixed (surrounding whitespace is stripped)
        assert await sleeps.release() == 60
        assert (key.value, key.seen(), key.last_error) == ("key-3", ["key-1", "key-3"], None)
    finally:
        await key.aclose()


@pytest.mark.parametrize(("value", "what"), _MALFORMED.values(), ids=_MALFORMED)
async def test_the_start_fails_on_a_malformed_value(value: str, what: str) -> None:
    key = VaultKey(_config(), {}, name="b", client=Client(value))
    with pytest.raises(VaultKeyError) as info:
        await key.start()
    assert str(info.value) == (
        "backend b: cannot read its api-key from Key Vault secret 'aoai-key' in "
        "https://kv.vault.azure.net (VaultKeyError: the secret's value cannot be sent as a "
        f"header: it has {what} in it)"
    )
    assert "key-2" not in str(info.value) and key.seen() == [] and key.failures == 1
    with pytest.raises(RuntimeError, match="has not been read"):
        _ = key.value
    await key.aclose()


def test_values_that_can_be_sent_are_accepted() -> None:
    from sluicegate.upstream.keyvault import _check_header_value

    for value in ("0123456789abcdef" * 2, "a b\tc", "caf\u00e9", "~!@#$%^&*()_+{}|:<>?"):
        _check_header_value(value)
