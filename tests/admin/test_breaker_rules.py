"""The admin views show each backend's circuit breaker rule, not only its state: its own
``backends[].circuit_breaker`` merged over ``routing.circuit_breaker``, or the global rule,
and which of the two it is. The admin API (``GET /backends``), its answer outside a gateway
(the configuration's rule), and ``sluicegate backends --json``. The dashboard's page is in
``tests/dashboard/test_breaker_rules_browser.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sluicegate.admin.service import AdminService
from sluicegate.cli.main import main
from tests.admin.harness import admin_gateway

#: Global rule, and two backends with rules of their own: ``ptu`` parks on its first 429 for
#: 5 minutes; ``vllm`` has its breaker off. ``paygo`` follows the global rule.
ROUTING: dict[str, Any] = {
    "circuit_breaker": {
        "failures": 4,
        "throttles": 2,
        "interval_seconds": 15,
        "trip_seconds": 20,
        "max_trip_seconds": 600,
        "honour_retry_after": False,
    }
}
BREAKERS: dict[str, dict[str, Any]] = {
    "ptu": {"throttles": 1, "trip_seconds": 300},
    "vllm": {"enabled": False},
}
BACKENDS = {"ptu": "SIM", "paygo": "SIM", "vllm": "SIM"}
DEPLOYMENTS = [
    {"name": "gpt-4o", "pool": [{"backend": "ptu"}, {"backend": "paygo"}], "model": "gpt-4o"},
    {"name": "local", "backend": "vllm", "backend_deployment": "gpt-4o", "model": "gpt-4o"},
]
EXPECTED: dict[str, dict[str, Any]] = {
    "ptu": {
        "source": "backend",
        "enabled": True,
        "failures": 4,
        "throttles": 1,
        "interval_seconds": 15.0,
        "trip_seconds": 300.0,
        "max_trip_seconds": 600.0,
        "honour_retry_after": False,
    },
    "paygo": {
        "source": "routing",
        "enabled": True,
        "failures": 4,
        "throttles": 2,
        "interval_seconds": 15.0,
        "trip_seconds": 20.0,
        "max_trip_seconds": 600.0,
        "honour_retry_after": False,
    },
    "vllm": {
        "source": "backend",
        "enabled": False,
        "failures": 4,
        "throttles": 2,
        "interval_seconds": 15.0,
        "trip_seconds": 20.0,
        "max_trip_seconds": 600.0,
        "honour_retry_after": False,
    },
}


@pytest.fixture
def harness(tmp_path: Path) -> Any:
    with admin_gateway(
        tmp_path, backends=BACKENDS, breakers=BREAKERS, routing=ROUTING, deployments=DEPLOYMENTS
    ) as h:
        yield h


def test_the_admin_api_shows_each_backends_effective_rule(harness: Any) -> None:
    r = harness.api.get("/backends")
    assert r.status_code == 200, r.text
    items = {b["name"]: b for b in r.json()["items"]}
    assert {name: items[name]["circuit_breaker"] for name in BACKENDS} == EXPECTED
    # The state is still there, per backend deployment.
    assert [v["state"] for v in items["ptu"]["routing"]] == ["closed"]


def test_the_rule_shown_is_the_one_the_breakers_follow(harness: Any) -> None:
    """The view reads the rule from the running router, the one its breakers were given."""
    router = harness.gw.gateway.router
    for name, rule in EXPECTED.items():
        (target,) = [t for t in router.targets.values() if t.backend == name]
        shown = {k: v for k, v in rule.items() if k != "source"}
        assert target.breaker.settings.as_config() == shown


def test_outside_a_gateway_the_configurations_rule(harness: Any) -> None:
    g = harness.gw.gateway
    service = AdminService(g.config, g.repository, g.hasher)  # no gateway's status source
    shown = {b["name"]: b["circuit_breaker"] for b in service.backends()}
    assert shown == EXPECTED


def test_the_backends_cli_json_shows_each_rows_rule(
    tmp_path: Path, harness: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(harness.gw.gateway.config.model_dump(mode="json")))
    assert main(["backends", "--config", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["items"]
    assert {(row["deployment"], row["backend"]): row["circuit_breaker"] for row in rows} == {
        ("gpt-4o", "ptu"): EXPECTED["ptu"],
        ("gpt-4o", "paygo"): EXPECTED["paygo"],
        ("local", "vllm"): EXPECTED["vllm"],
    }
