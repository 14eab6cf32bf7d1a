"""Streaming is really streamed, and a client that hangs up still gets its usage written."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from sluicegate.simulator.config import SimDeployment
from sluicegate.simulator.server import SimulatorThread
from tests.integration.conftest import Harness, sim_config
from tests.support.gateway import BACKEND_KEY, GatewayThread, gateway_config


@pytest.fixture
def slow_harness(tmp_path: Path):  # type: ignore[no-untyped-def]
    slow = SimDeployment(
        name="gpt-4o-mini", model="gpt-4o-mini", kind="chat", ttft_ms=50, tokens_per_second=20
    )
    sim = SimulatorThread(sim_config(deployments=[slow], api_keys=[BACKEND_KEY]))
    sim.start()
    gw = GatewayThread(
        gateway_config(
            tmp_path,
            {"sim": sim.url},
            deployments=[{"name": "gpt-4o-mini", "backend": "sim", "model": "gpt-4o-mini"}],
        )
    )
    gw.start()
    yield Harness(gw, sim)
    gw.stop()
    sim.stop()


def test_first_event_arrives_long_before_the_last_is_sent(slow_harness: Harness) -> None:
    key = slow_harness.new_key().primary_key
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True}
    url = (
        f"{slow_harness.url}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    )
    started = time.monotonic()
    arrivals: list[float] = []
    with httpx.stream("POST", url, json=body, headers={"api-key": key or ""}, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - started)
    # 40 tokens at 20/s take two seconds to generate: the first event must be here long before.
    assert arrivals[0] < 0.8
    assert arrivals[-1] > 1.5
    assert len(arrivals) >= 40


def test_client_disconnect_mid_stream_is_recorded_as_aborted(slow_harness: Harness) -> None:
    key = slow_harness.new_key().primary_key
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True}
    url = (
        f"{slow_harness.url}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    )
    seen = 0
    with httpx.stream("POST", url, json=body, headers={"api-key": key or ""}, timeout=30) as resp:
        for line in resp.iter_lines():
            if '"content"' in line:
                seen += 1
            if seen >= 10:
                break  # hang up after ten tokens; the rest would take ten more seconds
    deadline = time.monotonic() + 5
    records = []
    while time.monotonic() < deadline:
        records = slow_harness.records()
        if records:
            break
        time.sleep(0.1)
    assert len(records) == 1
    r = records[0]
    assert r.outcome == "aborted"
    assert r.usage_estimated
    assert 9 <= r.completion_tokens <= 14
    # The gateway closed the upstream stream at once: the backend did not finish it.
    time.sleep(0.5)
    entries = [e for e in slow_harness.sim_log() if e.get("streamed")]
    assert len(entries) == 1
    assert entries[0]["client_gone"] is True
    assert entries[0]["tokens_sent"] < 100
