"""``auth.key_vault``: an api-key backend takes its key from ``key_env`` or a Key Vault secret
reference, exactly one; mistakes are reported with their location."""

from __future__ import annotations

from typing import Any, TypedDict

import pytest

from sluicegate.config.loader import ConfigError, environment_problems, parse_config
from sluicegate.config.model import KeyVaultSecretConfig
from sluicegate.upstream.identity import credential_for


class _Vault(TypedDict):
    """The two required fields of a vault reference, typed so that ``**VAULT`` checks."""

    vault_url: str
    secret: str


VAULT: _Vault = {"vault_url": "https://myvault.vault.azure.net/", "secret": "aoai-key"}


def _config(auth: dict[str, Any]) -> dict[str, Any]:
    return {
        "backends": [{"name": "east", "url": "https://east.example.com", "auth": auth}],
        "deployments": [{"name": "gpt-4o", "backend": "east"}],
        "products": [{"name": "p", "deployments": ["gpt-4o"]}],
    }


def _problems(auth: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(_config(auth))
    return info.value.problems


def test_a_key_vault_reference_with_its_defaults() -> None:
    cfg = parse_config(_config({"type": "api-key", "key_vault": VAULT}))
    vault = cfg.backends[0].auth.key_vault
    assert vault is not None
    assert vault.vault_url == "https://myvault.vault.azure.net"
    assert (vault.secret, vault.version, vault.refresh_seconds) == ("aoai-key", None, 3600.0)
    assert vault.credential == "managed-identity" and vault.identity_type == "managed-identity"
    assert vault.reference == "https://myvault.vault.azure.net/secrets/aoai-key"
    # Nothing to check in the environment: whether the secret is readable is seen at start.
    assert environment_problems(cfg, {}) == []


def test_exactly_one_source_of_the_key() -> None:
    (both,) = _problems({"type": "api-key", "key_env": "K", "key_vault": VAULT})
    assert both.startswith("backends[0].auth: auth type api-key takes the key from key_env")
    assert both.endswith("or from key_vault, not both")
    (neither,) = _problems({"type": "api-key"})
    assert neither.startswith("backends[0].auth: auth type api-key needs key_env (")
    assert "or key_vault" in neither
    (wrong_type,) = _problems({"type": "managed-identity", "key_vault": VAULT})
    assert wrong_type.startswith(
        "backends[0].auth: key_vault is for auth type api-key (the key to send), not "
        "managed-identity"
    )


@pytest.mark.parametrize(
    ("change", "where", "says"),
    [
        ({"vault_url": "http://myvault.vault.azure.net"}, "key_vault.vault_url", "https://"),
        ({"vault_url": "https://v.vault.azure.net/secrets/x"}, "key_vault.vault_url", "path"),
        ({"secret": "aoai_key"}, "key_vault.secret", "pattern"),
        ({"version": "../x"}, "key_vault.version", "pattern"),
        ({"refresh_seconds": 0}, "key_vault.refresh_seconds", "greater than 0"),
        ({"credential": "password"}, "key_vault.credential", "managed-identity"),
        (
            {"credential": "service-principal", "client_id": "c"},
            "key_vault",
            "credential service-principal needs tenant_id, client_id and client_secret_env",
        ),
        ({"authority_host": "http://login"}, "key_vault", "authority_host must be an https://"),
        ({"typo": 1}, "key_vault.typo", "Extra inputs"),
    ],
)
def test_key_vault_mistakes_are_reported_where_they_are(
    change: dict[str, Any], where: str, says: str
) -> None:
    (problem,) = _problems({"type": "api-key", "key_vault": {**VAULT, **change}})
    assert problem.startswith(f"backends[0].auth.{where}: "), problem
    assert says in problem


def test_a_service_principal_secret_missing_from_the_environment_is_a_start_problem() -> None:
    vault = {
        **VAULT,
        "credential": "service-principal",
        "tenant_id": "t",
        "client_id": "c",
        "client_secret_env": "KV_SP_SECRET",
    }
    cfg = parse_config(_config({"type": "api-key", "key_vault": vault}))
    (problem,) = environment_problems(cfg, {})
    where = "backends[0].auth.key_vault.client_secret_env"
    assert problem == f"{where}: environment variable KV_SP_SECRET is not set"
    assert environment_problems(cfg, {"KV_SP_SECRET": "s"}) == []


def test_the_vault_credential_is_built_like_a_backends() -> None:
    from azure.identity import ClientSecretCredential, ManagedIdentityCredential

    mi = credential_for(KeyVaultSecretConfig(**VAULT, client_id="abc"), {})
    assert isinstance(mi, ManagedIdentityCredential)
    sp = KeyVaultSecretConfig(
        **VAULT,
        credential="service-principal",
        tenant_id="t",
        client_id="c",
        client_secret_env="S",
    )
    assert isinstance(credential_for(sp, {"S": "x"}), ClientSecretCredential)
