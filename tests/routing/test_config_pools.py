"""Pool, retry, breaker, headroom and Entra settings in gateway.yaml: additive, validated."""

from __future__ import annotations

from typing import Any

import pytest

from sluicegate.config.loader import ConfigError, parse_config
from sluicegate.runtime import compile_runtime


def _config(deployments: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "backends": [
            {"name": "ptu", "url": "https://ptu.example", "kind": "ptu"},
            {"name": "payg", "url": "https://payg.example"},
        ],
        "deployments": deployments,
        "products": [{"name": "p"}],
        **extra,
    }


def test_a_plain_backend_is_a_one_member_pool() -> None:
    config = parse_config(
        _config([{"name": "gpt-4o", "backend": "payg", "backend_deployment": "gpt-4o-eu"}])
    )
    (member,) = config.deployments[0].members()
    assert (member.backend, member.backend_deployment, member.priority) == ("payg", "gpt-4o-eu", 1)
    assert config.routing.headroom.enabled and config.routing.retry.max_attempts == 3


def test_pools_compile_with_primary_and_kinds() -> None:
    config = parse_config(
        _config(
            [
                {
                    "name": "gpt-4o",
                    "backend_deployment": "gpt-4o-2024",
                    "pool": [
                        {
                            "backend": "payg",
                            "priority": 2,
                            "weight": 3,
                            "backend_deployment": "gpt4o-we",
                        },
                        {"backend": "ptu", "priority": 1},
                    ],
                }
            ],
            routing={"headroom": False, "circuit_breaker": {"throttles": 2}},
        )
    )
    dep = config.deployments[0]
    assert dep.backend == "ptu"  # the primary, for reports
    runtime = compile_runtime(config, {})
    d = runtime.deployments["gpt-4o"]
    assert d.backend.name == "ptu" and d.upstream_name == "gpt-4o-2024"
    assert [(m.backend, m.deployment, m.priority, m.weight, m.kind) for m in d.members] == [
        ("payg", "gpt4o-we", 2, 3, "paygo"),
        ("ptu", "gpt-4o-2024", 1, 1, "ptu"),
    ]
    assert not config.routing.headroom.enabled
    assert config.routing.circuit_breaker.throttles == 2


@pytest.mark.parametrize(
    ("deployment", "extra", "problem"),
    [
        ({"name": "d", "pool": [{"backend": "nope"}]}, {}, "pool[0].backend: unknown backend"),
        ({"name": "d", "pool": [{"backend": "ptu"}, {"backend": "ptu"}]}, {}, "already a member"),
        ({"name": "d", "backend": "payg", "pool": [{"backend": "ptu"}]}, {}, "not a member"),
        ({"name": "d", "pool": []}, {}, "at least 1"),
        ({"name": "d", "pool": [{"backend": "ptu", "weight": 0}]}, {}, "greater than or equal"),
        (
            {"name": "d", "backend": "ptu"},
            {"routing": {"retry": {"statuses": [404]}}},
            "client error",
        ),
        (
            {"name": "d", "backend": "ptu"},
            {"routing": {"circuit_breaker": {"trip_seconds": 90}}},
            "max_trip_seconds",
        ),
    ],
)
def test_bad_pools_are_explained(
    deployment: dict[str, Any], extra: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_config([deployment], **extra))
    assert problem in info.value.explain()


def test_entra_auth_settings() -> None:
    config = parse_config(
        {
            **_config([{"name": "d", "backend": "ptu"}]),
            "backends": [
                {
                    "name": "ptu",
                    "url": "https://ptu.example",
                    "auth": {
                        "type": "service-principal",
                        "tenant_id": "t",
                        "client_id": "c",
                        "client_secret_env": "SP_SECRET",
                        "authority_host": "https://login.microsoftonline.us",
                    },
                }
            ],
        }
    )
    auth = config.backends[0].auth
    assert auth.entra and auth.scope == "https://cognitiveservices.azure.com/.default"
    with pytest.raises(RuntimeError, match="SP_SECRET"):
        compile_runtime(config, {})
