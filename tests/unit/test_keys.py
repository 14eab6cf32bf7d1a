import pytest

from sluicegate.auth.keys import KeyHasher, display_prefix, generate_key, load_key_secret


def test_keys_are_long_random_and_distinct() -> None:
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert key.startswith("sg-")
        assert len(key) == 3 + 43  # 256 bits in base64url


def test_hash_verifies_only_the_same_key() -> None:
    hasher = KeyHasher(b"0123456789abcdef0123")
    key = generate_key()
    digest = hasher.digest(key)
    assert hasher.matches(key, digest)
    assert not hasher.matches(key + "x", digest)
    assert KeyHasher(b"another-secret-000000").digest(key) != digest
    assert "0123456789" not in repr(hasher)


@pytest.mark.parametrize("secret_length", [16, 63, 64, 65, 200])
def test_digest_is_hmac_sha256(secret_length: int) -> None:
    """Stored digests from any earlier version stay valid: the digest is plain HMAC-SHA256."""
    import hmac
    import secrets

    secret = secrets.token_bytes(secret_length)
    hasher = KeyHasher(secret)
    for key in (generate_key(), "", "ключ-🔑", "x" * 500, "bad\udcffsurrogate"):
        raw = key.encode("utf-8", "surrogateescape")
        assert hasher.digest(key) == hmac.digest(secret, raw, "sha256")
        assert hasher.digest(key) == hasher.digest(key)  # the shared states are not consumed


def test_prefix_shows_little() -> None:
    key = generate_key()
    prefix = display_prefix(key)
    assert key.startswith(prefix.rstrip("…"))
    assert len(prefix.rstrip("…")) == 11


def test_secret_file_is_created_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "key-secret"
    first = load_key_secret("NOPE", {}, path)
    assert load_key_secret("NOPE", {}, path) == first
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_key_secret("SECRET", {"SECRET": "from-env"}, path) == b"from-env"
    with pytest.raises(RuntimeError):
        load_key_secret("NOPE", {}, None)
