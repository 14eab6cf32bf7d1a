"""A multi-megabyte prompt is counted off the event loop: while the gateway counts it, another
tenant's small request is served.

Counting a prompt is pure Python; a long run of text without a break (one piece of the
tokenizer's pre-split) cost ~6 µs a byte on the event loop, so one request of a few MB froze
the gateway for every tenant for seconds (8 MB, the default body limit: ~50 s). The test
needs no timing bound: it only asks that the small request completes before the large one's
estimate does (observed by wrapping the admitter's estimate function in this process, where
the gateway runs in a thread).
"""

from __future__ import annotations

import random
import string
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sluicegate.proxy import admission as admission_module
from sluicegate.simulator.server import SimulatorThread
from sluicegate.tokens.estimate import TokenEstimate, estimate_request_tokens
from sluicegate.tokens.offload import counting_thread
from tests.integration.conftest import Harness, posted_aside
from tests.support.gateway import GatewayThread, gateway_config

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
#: Random letters without a break: no piece and no slice repeats, so none is cached, and
#: the count takes seconds even at the bounded cost (~1.5 µs a byte).
LARGE_BYTES = 1_500_000


@pytest.fixture
def gateway(tmp_path: Path, simulator: SimulatorThread) -> Iterator[Harness]:
    config = gateway_config(
        tmp_path,
        {"sim": simulator.url},
        deployments=[{"name": "gpt-4o-mini", "backend": "sim", "model": "gpt-4o-mini"}],
        products=[
            {
                "name": "starter",
                "deployments": ["*"],
                "limits": {"tokens_per_minute": 10**9, "requests_per_minute": 1000},
            }
        ],
    )
    gw = GatewayThread(config).start()
    yield Harness(gw, simulator)
    gw.stop()


def test_a_huge_prompt_does_not_hold_other_tenants_requests(
    gateway: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    large_key = gateway.new_key(owner="team-a", name="large").primary_key or ""
    small_key = gateway.new_key(owner="team-b", name="small").primary_key or ""
    counting = threading.Event()
    counted: dict[str, Any] = {}

    def observed(body: Any, *args: Any, **kwargs: Any) -> TokenEstimate:
        large = len(str(body.get("messages", ""))) > LARGE_BYTES
        if large:
            counted["thread"] = threading.current_thread().name
            counting.set()
        estimate = estimate_request_tokens(body, *args, **kwargs)
        if large:
            counted["done"] = time.monotonic()
        return estimate

    monkeypatch.setattr(admission_module, "estimate_request_tokens", observed)
    rng = random.Random(11)
    prompt = "".join(rng.choices(string.ascii_lowercase, k=LARGE_BYTES))
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 5}
    with posted_aside(gateway.url + CHAT, body, large_key) as large:
        assert counting.wait(timeout=60), "the large request was never counted"
        response = httpx.post(
            gateway.url + CHAT,
            json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5},
            headers={"api-key": small_key},
            timeout=120,
        )
        small_done = time.monotonic()
    assert response.status_code == 200
    assert large["status"] == 200
    assert counted["thread"] == counting_thread().name
    # The small request went in, through the limiter, to the backend and back, while the
    # large one was still being counted.
    assert small_done < counted["done"], (
        f"the small request ended {small_done - counted['done']:.2f} s after the large "
        "one's count: the event loop was held"
    )
