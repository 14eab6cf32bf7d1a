"""``sluicegate config check`` lists every problem of a file in one run, each with its
location: field errors and cross-reference errors together (pydantic skips a model's
cross-reference validator once a field is invalid), and a union's errors for the branch the
input's shape chooses, never pydantic's names for its branches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sluicegate.cli.main import main
from sluicegate.config.loader import ConfigError, parse_config

#: The newcomer's file: a backend URL without a scheme, an unknown pool backend (a typo), an
#: unknown product deployment, a quota period that does not exist and a misspelt limit.
FOUR_MISTAKES: dict[str, Any] = {
    "backends": [
        {"name": "eastus-paygo", "url": "https://eastus.example.com"},
        {"name": "local", "url": "127.0.0.1:8092"},
    ],
    "deployments": [
        {"name": "gpt-4o", "pool": [{"backend": "eastus-paygoo"}, {"backend": "local"}]}
    ],
    "products": [
        {
            "name": "team",
            "deployments": ["gpt-4o", "gpt-5"],
            "limits": {
                "token_quota": 1000,
                "token_quota_period": "fortnightly",
                "tokens_per_minut": 10,
            },
        }
    ],
}


def _check(tmp_path: Path, capsys: pytest.CaptureFixture[str], data: Any) -> tuple[int, str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    code = main(["config", "check", str(path)])
    out, err = capsys.readouterr()
    return code, out + err


def test_config_check_lists_field_and_reference_errors_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = _check(tmp_path, capsys, FOUR_MISTAKES)
    assert code == 2
    problems = [line.strip() for line in text.splitlines()[1:]]
    assert text.splitlines()[0] == f"{tmp_path / 'gateway.yaml'}: 5 problem(s)"
    assert problems == [
        "backends[1].url: must be an http:// or https:// URL with a host, got '127.0.0.1:8092'",
        "products[0].limits.token_quota_period: Input should be 'hourly', 'daily', 'weekly', "
        "'monthly' or 'yearly'",
        "products[0].limits.tokens_per_minut: Extra inputs are not permitted",
        "deployments[0].pool[0].backend: unknown backend 'eastus-paygoo' "
        "(known: eastus-paygo, local)",
        "products[0].deployments: unknown deployment 'gpt-5'",
    ]
    assert "function-" not in text and "list[" not in text


def test_a_list_of_policies_reports_the_list_branch_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = dict(
        FOUR_MISTAKES,
        backends=[{"name": "eastus-paygo", "url": "https://eastus.example.com"}],
        deployments=[{"name": "gpt-4o", "backend": "eastus-paygo"}],
        products=[{"name": "team", "limits": [{"tokens_per_minute": 10}, {"token_quota": 5}]}],
    )
    code, text = _check(tmp_path, capsys, data)
    assert code == 2
    assert [line.strip() for line in text.splitlines()[1:]] == [
        "products[0].limits[1]: token_quota and token_quota_period must be set together"
    ]
    data["products"] = [{"name": "team", "limits": 5}]
    code, text = _check(tmp_path, capsys, data)
    assert [line.strip() for line in text.splitlines()[1:]] == [
        "products[0].limits: must be a limit policy (a mapping) or a list of them"
    ]


def test_reference_checks_do_not_report_entries_that_have_errors_as_unknown() -> None:
    # backends[1] and deployments[1] have errors of their own: what names them is not wrong.
    data = {
        "backends": [
            {"name": "east", "url": "https://east.example.com"},
            {"name": "west", "url": "ftp://west"},
        ],
        "deployments": [
            {"name": "a", "backend": "west"},
            {"name": "b", "backend": "east", "pool": "not a list"},
        ],
        "products": [{"name": "p", "deployments": ["a", "b", "c"]}],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "backends[1].url",
        "deployments[1].pool",
        "products[0].deployments",
    ]
    assert info.value.problems[-1].endswith("unknown deployment 'c'")


def test_cluster_mode_needs_a_redis_section_whose_url_defaults() -> None:
    cluster = dict(FOUR_MISTAKES, mode="cluster", storage={"url": "postgresql://db/gw"})
    cluster.update(
        backends=[{"name": "east", "url": "https://east.example.com"}],
        deployments=[{"name": "gpt-4o", "backend": "east"}],
        products=[{"name": "team"}],
    )
    with pytest.raises(ConfigError) as info:
        parse_config(cluster)
    assert info.value.problems == [
        "redis: cluster mode needs a redis section (`redis: {}` takes the default url "
        "redis://127.0.0.1:6379/0)"
    ]
    cfg = parse_config({**cluster, "redis": {}})
    assert cfg.redis is not None and cfg.redis.url == "redis://127.0.0.1:6379/0"
