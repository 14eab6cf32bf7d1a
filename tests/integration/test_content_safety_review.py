"""Content safety, found by review, through a real gateway: a check that failed (``on_error:
allow``) left the request's task marked as cancelling (Python 3.11's TaskGroup), so the
request's backend timeout that followed was taken for a shutdown: no failover."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sluicegate.simulator.server import SimulatorThread
from tests.routing.harness import Routed, body, chat_deployment, pool_config, start_sim
from tests.support.gateway import free_port


@pytest.fixture
def sims() -> Iterator[dict[str, SimulatorThread]]:
    started = {
        "hung": start_sim(chat_deployment(hang_rate=1.0, hang_max_s=5)),
        "good": start_sim(chat_deployment()),
    }
    yield started
    for sim in started.values():
        sim.stop()


def test_a_timeout_after_a_failed_check_still_fails_over(
    tmp_path: Path, sims: dict[str, SimulatorThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SG_TEST_CS_KEY", "content-safety-key-0123456789abcdef")
    unreachable = f"http://127.0.0.1:{free_port()}"  # nothing listens: every call fails
    config = pool_config(
        tmp_path,
        sims,
        [{"backend": "hung", "priority": 1}, {"backend": "good", "priority": 2}],
        timeouts={"hung": {"first_byte": 0.5}},
        products=[
            {
                "name": "starter",
                "deployments": ["*"],
                "content_safety": {
                    "service": "cs",
                    "categories": {"Hate": 4},
                    "shield_prompt": True,
                    "on_error": "allow",
                },
            }
        ],
        content_safety=[
            {
                "name": "cs",
                "url": unreachable,
                "auth": {"type": "api-key", "key_env": "SG_TEST_CS_KEY"},
                "timeout_seconds": 5,
            }
        ],
    )
    routed = Routed(config, sims)
    try:
        answer = httpx.post(
            routed.chat_url(), json=body(5), headers={"api-key": routed.key}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        records = routed.records(2)
        assert [(r.attempt, r.backend, r.status) for r in records] == [
            (1, "hung", 504),
            (2, "good", 200),
        ]
    finally:
        routed.stop()
