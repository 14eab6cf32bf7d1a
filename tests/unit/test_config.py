from pathlib import Path

import pytest

from sluicegate.config.loader import ConfigError, environment_problems, load_config, parse_config

GOOD = {
    "backends": [
        {
            "name": "east",
            "url": "https://east.example.com",
            "auth": {"type": "api-key", "key_env": "EAST_KEY"},
        }
    ],
    "deployments": [{"name": "gpt-4o", "backend": "east"}],
    "products": [{"name": "p", "deployments": ["gpt-4o"]}],
}


def test_a_good_config() -> None:
    cfg = parse_config(GOOD)
    assert cfg.mode == "embedded"
    assert cfg.deployments[0].upstream_name == "gpt-4o"
    assert environment_problems(cfg, {}) == [
        "backends[0].auth.key_env: environment variable EAST_KEY is not set"
    ]
    assert environment_problems(cfg, {"EAST_KEY": "x"}) == []


def test_every_error_is_reported_with_its_location() -> None:
    bad = {
        "backends": [
            {"name": "east", "url": "https://east.example.com"},
            {"name": "west", "url": "ftp://nope", "auth": {"type": "api-key"}},
        ],
        "deployments": [{"name": "gpt-4o", "backend": "east"}],
        "products": [{"name": "p", "deployments": ["gpt-4o"]}],
        "listen": {"port": 99999},
        "typo": 1,
    }
    with pytest.raises(ConfigError) as info:
        parse_config(bad, "gw.yaml")
    text = "\n".join(info.value.problems)
    assert "backends[1].url: " in text
    assert "backends[1].auth: " in text
    assert "listen.port: " in text
    assert "typo: " in text
    assert info.value.explain().startswith("gw.yaml: 4 problem(s)")


def test_cross_references_are_checked() -> None:
    bad = dict(
        GOOD,
        deployments=[{"name": "gpt-4o", "backend": "nowhere"}],
        products=[{"name": "p", "deployments": ["gpt-5"]}],
    )
    with pytest.raises(ConfigError) as info:
        parse_config(bad)
    assert any(
        p.startswith("deployments[0].backend: unknown backend 'nowhere'")
        for p in info.value.problems
    )
    assert any(
        p.startswith("products[0].deployments: unknown deployment 'gpt-5'")
        for p in info.value.problems
    )


def test_yaml_syntax_errors_have_a_line(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("backends: [\n  - name: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line" in info.value.problems[0]


def test_a_key_secret_too_short_is_a_problem_found_before_start() -> None:
    """``serve`` refuses to start with a message, instead of a traceback from the hasher."""
    cfg = parse_config(GOOD)
    env = {"EAST_KEY": "x"}
    (problem,) = environment_problems(cfg, {**env, "SLUICEGATE_KEY_SECRET": "short"})
    assert "SLUICEGATE_KEY_SECRET must hold at least 16 bytes" in problem
    assert environment_problems(cfg, {**env, "SLUICEGATE_KEY_SECRET": "é" * 8}) == []  # 16 bytes
    assert environment_problems(cfg, env) == []  # embedded mode makes its own


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_bytes("listen:\n  host: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        "byte 19: not UTF-8 text (invalid continuation byte); save the file as UTF-8"
    ]


def test_a_key_given_twice_is_a_config_error(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys silently: a pasted setting must not change
    the configuration unseen."""
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "products:\n"
        "  - name: team\n"
        "    deployments: ['*']\n"
        "    limits: {tpm: 1000}\n"
        "    limits: {tpm: 100000}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == ["line 5, column 5: 'limits' is given twice in this mapping"]
