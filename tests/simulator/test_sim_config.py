"""Simulator config: YAML loading, validation messages, the demo default."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluicegate.simulator.config import (
    DEFAULT_SIM_API_KEY,
    SimConfig,
    SimConfigError,
    SimDeployment,
    default_sim_config,
    load_sim_config,
)


def test_load_yaml(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(
        """
region: East US
seed: 7
api_keys: [k1, k2]
bearer_tokens: [t1]
deployments:
  - name: mini
    model: gpt-4o-mini-2024-07-18
    tpm: 1000
    rpm: 6
    ttft_ms: 120
    tokens_per_second: 80
    error_rate: 0.1
  - name: emb
    model: text-embedding-3-small
    kind: embeddings
    dimensions: 256
"""
    )
    config = load_sim_config(path)
    assert config.region == "East US"
    assert config.seed == 7
    assert config.api_keys == ["k1", "k2"]
    mini = config.deployment("mini")
    assert mini is not None
    assert (mini.kind, mini.tpm, mini.rpm, mini.ttft_ms, mini.error_rate) == (
        "chat",
        1000,
        6,
        120,
        0.1,
    )
    assert mini.completion_cap == 16 * 64
    emb = config.deployment("emb")
    assert emb is not None
    assert emb.dimensions == 256
    assert config.deployment("nope") is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("deployments: [{name: a, model: m, kind: images}]", "deployments.0.kind"),
        ("deployments: [{name: a, model: m, tpm: 0}]", "deployments.0.tpm"),
        ("deployments: [{name: a, model: m, error_rate: 0.6, cut_rate: 0.6}]", "must not exceed 1"),
        (
            "deployments: [{name: a, model: m}, {name: a, model: n}]",
            "duplicate deployment names: a",
        ),
        ("surprise: 1", "surprise"),
        ("- a list", "top level must be a mapping"),
        ("deployments: [", "not valid YAML"),
    ],
)
def test_invalid_files_say_what_is_wrong(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SimConfigError) as info:
        load_sim_config(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SimConfigError, match="cannot read"):
        load_sim_config(tmp_path / "absent.yaml")


def test_default_config_has_the_demo_deployments() -> None:
    config = default_sim_config()
    assert [(d.name, d.kind) for d in config.deployments] == [
        ("gpt-4o-mini", "chat"),
        ("gpt-4o", "chat"),
        ("text-embedding-3-small", "embeddings"),
    ]
    assert config.api_keys == [DEFAULT_SIM_API_KEY]
    assert all(d.tpm and d.tpm >= 100_000 for d in config.deployments)


def test_models_are_immutable() -> None:
    config = SimConfig(deployments=[SimDeployment(name="a", model="m")])
    with pytest.raises(ValueError, match="frozen"):
        config.region = "x"
