"""``products[].message_log`` and the top-level ``message_log``: parsed, checked, compiled
onto the runtime's products."""

from __future__ import annotations

from typing import Any

import pytest

from sluicegate.config.loader import ConfigError, parse_config
from sluicegate.messages.config import MessageLogPolicy
from sluicegate.runtime import compile_runtime


def _config(**more: Any) -> dict[str, Any]:
    return {
        "backends": [{"name": "east", "url": "https://east.example.com"}],
        "deployments": [{"name": "gpt-4o", "backend": "east"}],
        "products": [
            {"name": "logged", "message_log": {"chunk_bytes": 4096}},
            {"name": "plain"},
        ],
        **more,
    }


def test_the_policy_reaches_the_runtime_product_and_the_sink_has_defaults() -> None:
    config = parse_config(_config())
    runtime = compile_runtime(config, {})
    policy = runtime.products["logged"].message_log
    assert policy == MessageLogPolicy(chunk_bytes=4096)
    assert (policy.prompts, policy.completions, policy.max_bytes) == (True, True, 2 * 1024 * 1024)
    assert runtime.products["plain"].message_log is None
    sink = config.message_log
    assert (sink.path, sink.max_file_bytes, sink.backup_count) == (
        "var/messages.jsonl",
        100 * 1024 * 1024,
        5,
    )


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        ({"prompts": False, "completions": False}, "both false"),
        ({"max_bytes": 10}, "max_bytes"),
        ({"chunk_bytes": 0}, "chunk_bytes"),
        ({"prompt": True}, "prompt"),
    ],
)
def test_bad_policies_are_refused(policy: dict[str, Any], problem: str) -> None:
    data = _config()
    data["products"][0]["message_log"] = policy
    with pytest.raises(ConfigError, match=problem):
        parse_config(data)


def test_a_bad_sink_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_pending"):
        parse_config(_config(message_log={"path": "x.jsonl", "max_pending": 0}))
