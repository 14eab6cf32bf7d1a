"""Telling tokens from keys, and the configuration of OIDC, rules and hardening."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sluicegate.auth.credentials import find_key, looks_like_jwt
from sluicegate.config.loader import ConfigError, parse_config
from sluicegate.config.oidc import OidcIssuerConfig
from tests.support.gateway import gateway_config

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"


def test_jwt_shape() -> None:
    assert looks_like_jwt(JWT)
    assert looks_like_jwt("eyJhbGciOiJub25lIn0.eyJ4IjoxfQ.")  # alg none has no signature
    for not_jwt in ("sg-abc", "eyJabc", "eyJ.a", "a.b.c", "eyJ a.b.c", "eyJa.b.c.d", ""):
        assert not looks_like_jwt(not_jwt), not_jwt


def test_keys_and_tokens_are_collected_apart() -> None:
    found = find_key([(b"authorization", f"Bearer {JWT}".encode())], b"")
    assert (found.key, found.token, found.ambiguous) == (None, JWT, False)
    found = find_key([(b"api-key", b"sg-1"), (b"authorization", f"Bearer {JWT}".encode())], b"")
    assert (found.key, found.token, found.ambiguous) == ("sg-1", JWT, False)
    # a token in api-key is a token (by shape), the same one twice is fine
    found = find_key(
        [(b"api-key", JWT.encode()), (b"authorization", f"bearer {JWT}".encode())], b""
    )
    assert (found.key, found.token, found.ambiguous) == (None, JWT, False)
    other = JWT[:-1] + "A"
    found = find_key(
        [(b"api-key", JWT.encode()), (b"authorization", f"Bearer {other}".encode())], b""
    )
    assert found.ambiguous
    # the query parameter is a key, checked when no header carries a key
    found = find_key([(b"authorization", f"Bearer {JWT}".encode())], b"subscription-key=sg-q")
    assert (found.key, found.token) == ("sg-q", JWT)


def _config(tmp: Path, **extra: Any) -> dict[str, Any]:
    return gateway_config(tmp, {"sim": "http://127.0.0.1:9"}, **extra)


def _oidc(url: str = "https://login.microsoftonline.com/t/v2.0/.well-known/openid-configuration",
          **issuer: Any) -> dict[str, Any]:  # fmt: skip
    return {"issuers": [{"discovery_url": url, "audiences": ["api://gw"], **issuer}]}


def test_oidc_config_defaults_and_checks(tmp_path: Path) -> None:
    cfg = parse_config(_config(tmp_path, oidc=_oidc()))
    assert cfg.oidc is not None
    issuer = cfg.oidc.issuers[0]
    assert issuer.allowed_algorithms == ["RS256", "RS384", "RS512", "PS256", "ES256"]
    assert cfg.oidc.leeway_seconds == 60
    assert cfg.token_rules == []
    # existing configurations stay valid: no oidc, no rules, default limits
    plain = parse_config(_config(tmp_path))
    assert plain.oidc is None and plain.security.trusted_proxies == []
    assert plain.listen.tls_cert is None

    for bad_alg in ("HS256", "none", "RS1"):
        with pytest.raises(ConfigError, match="only asymmetric"):
            parse_config(_config(tmp_path, oidc=_oidc(allowed_algorithms=[bad_alg])))
    with pytest.raises(ConfigError, match="https"):
        parse_config(_config(tmp_path, oidc=_oidc("http://idp.example/.well-known/x")))
    parse_config(_config(tmp_path, oidc=_oidc("http://127.0.0.1:8/.well-known/x")))
    with pytest.raises(ValidationError, match="https"):
        OidcIssuerConfig(discovery_url="ftp://idp.example/x", audiences=["a"])
    with pytest.raises(ConfigError, match="audiences"):
        parse_config(_config(tmp_path, oidc=_oidc(audiences=[])))
    with pytest.raises(ConfigError, match="token_rules: rules need an oidc section"):
        parse_config(_config(tmp_path, token_rules=[{"app_ids": ["a"], "subscription": "s"}]))


def test_hardening_config(tmp_path: Path) -> None:
    cfg = parse_config(
        _config(
            tmp_path,
            security={"trusted_proxies": ["10.0.0.0/8", "::1"], "max_header_count": 50},
            products=[{"name": "p", "allowed_ips": ["192.168.0.0/16"]}],
        )
    )
    assert cfg.security.max_header_count == 50
    assert cfg.products[0].allowed_ips == ["192.168.0.0/16"]
    with pytest.raises(ConfigError, match="not an IP address"):
        parse_config(_config(tmp_path, security={"trusted_proxies": ["proxy.local"]}))
    with pytest.raises(ConfigError, match="not an IP address"):
        parse_config(_config(tmp_path, products=[{"name": "p", "allowed_ips": ["x"]}]))
    with pytest.raises(ConfigError, match="both tls_cert and tls_key"):
        parse_config(_config(tmp_path, listen={"tls_cert": "/c.pem"}))
