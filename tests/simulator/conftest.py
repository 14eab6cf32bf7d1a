"""Fixtures: a simulator on loopback driven by a FakeClock, and SSE helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest

from sluicegate.clock import FakeClock
from sluicegate.simulator import SimConfig, SimDeployment, SimulatorHandle, start_simulator
from sluicegate.simulator.server import SimulatorThread

KEY = "test-key-1"
BEARER = "eyJ.test.token"
API = "api-version=2024-10-21"


def make_config(**overrides: Any) -> SimConfig:
    """Three deployments: a limited chat one, an unlimited chat one, an embeddings one.

    ``chat`` has 600 RPM, the reference's example (azure-openai-api.md §8): 100 requests per
    10 s (what ``x-ratelimit-remaining-requests`` counts down from) and 10 per second."""
    base: dict[str, Any] = {
        "deployments": [
            SimDeployment(name="chat", model="gpt-4o-mini-2024-07-18", tpm=1000, rpm=600),
            SimDeployment(name="free", model="gpt-4o-2024-08-06"),
            SimDeployment(
                name="embed", model="text-embedding-3-small", kind="embeddings", dimensions=64
            ),
        ],
        "api_keys": [KEY],
        "bearer_tokens": [BEARER],
        "region": "Test Region",
        "seed": 1,
    }
    base.update(overrides)
    return SimConfig(**base)


def chat_url(deployment: str = "chat") -> str:
    return f"/openai/deployments/{deployment}/chat/completions?{API}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sim(clock: FakeClock) -> AsyncIterator[SimulatorHandle]:
    handle = await start_simulator(make_config(), clock=clock)
    try:
        yield handle
    finally:
        await handle.close()


@pytest.fixture
async def client(sim: SimulatorHandle) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url, headers={"api-key": KEY}, timeout=10) as c:
        yield c


@pytest.fixture
def sim_thread() -> Iterator[SimulatorThread]:
    with SimulatorThread(make_config()) as thread:
        yield thread


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (asserting the framing is exact)."""
    assert text.endswith("\n\n"), "every event ends with a blank line"
    events = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        data = [line for line in lines if line.startswith("data: ")]
        assert len(data) == 1, block
        events.append(data[0].removeprefix("data: "))
    return events


def sse_json(text: str) -> list[dict[str, Any]]:
    """Parsed JSON events of a chat/completions stream, checking ``[DONE]`` comes last."""
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    assert "[DONE]" not in events[:-1]
    return [orjson.loads(e) for e in events[:-1]]
