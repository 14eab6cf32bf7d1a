"""`sluicegate demo` run again on the same directory reuses its demo subscription instead of
adding one per run: the key printed works, and the one printed by the run before (keys are
stored hashed, so it cannot be shown again; the primary key is rotated) no longer does."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.integration.test_demo import Demo, running_demo, subscriptions

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"


def _printed_key(demo: Demo) -> str:
    found = re.search(r"^  curl .*?-H \"api-key: (\S+)\"", demo.text, re.S | re.M)
    assert found, demo.text
    return found.group(1)


def _status(demo: Demo, key: str) -> int:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = httpx.post(f"{demo.url}{CHAT}", headers={"api-key": key}, json=body, timeout=30)
    return r.status_code


def test_a_second_run_reuses_the_demo_subscription_with_a_new_key(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    with running_demo(workdir) as first:
        assert "A demo subscription was created." in first.text
        old_key = _printed_key(first)
        assert _status(first, old_key) == 200
    assert first.proc.returncode == 0
    assert subscriptions(workdir) == 1

    with running_demo(workdir) as second:
        assert subscriptions(workdir) == 1
        assert "The demo subscription of an earlier run got a new key" in second.text
        new_key = _printed_key(second)
        assert new_key != old_key
        assert _status(second, new_key) == 200
        assert _status(second, old_key) == 401
    assert second.proc.returncode == 0
