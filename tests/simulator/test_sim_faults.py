"""Injected faults: forced by ``x-sim-fault`` and drawn from the seeded RNG."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from sluicegate.clock import FakeClock
from sluicegate.simulator import SimDeployment, SimulatorHandle, start_simulator
from tests.simulator.conftest import KEY, chat_url, make_config

HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
STREAM = {**HI, "stream": True, "stream_options": {"include_usage": True}}


async def _log(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    return (await client.get("/_sim/log")).json()  # type: ignore[no-any-return]


async def test_forced_500_is_azure_shaped_and_charges_nothing(client: httpx.AsyncClient) -> None:
    resp = await client.post(chat_url(), json=HI, headers={"x-sim-fault": "500"})
    assert resp.status_code == 500
    assert resp.json() == {
        "error": {
            "code": "InternalServerError",
            "message": "The server had an error while processing your request. Sorry about that!",
        }
    }
    assert resp.headers["x-ratelimit-remaining-tokens"] == "1000"
    assert resp.headers["x-ratelimit-remaining-requests"] == "100"  # 10-s budget, untouched
    assert (await _log(client))[-1]["fault"] == "500"


@pytest.mark.parametrize(
    ("fault", "status", "retry_after", "retry_after_ms"),
    [
        ("429", 429, "1", "1000"),
        ("429:7", 429, "7", "7000"),
        ("503", 503, None, None),
        ("503:2.5", 503, "3", "2500"),
    ],
)
async def test_forced_status_faults(
    client: httpx.AsyncClient,
    fault: str,
    status: int,
    retry_after: str | None,
    retry_after_ms: str | None,
) -> None:
    resp = await client.post(chat_url(), json=HI, headers={"x-sim-fault": fault})
    assert resp.status_code == status
    assert resp.headers.get("retry-after") == retry_after
    assert resp.headers.get("retry-after-ms") == retry_after_ms
    assert resp.json()["error"]["code"] == ("429" if status == 429 else "ServiceUnavailable")
    if status == 429:
        assert f"retry after {retry_after} second" in resp.json()["error"]["message"]


async def test_unknown_fault_is_a_400(client: httpx.AsyncClient) -> None:
    resp = await client.post(chat_url(), json=HI, headers={"x-sim-fault": "explode"})
    assert resp.status_code == 400
    assert "x-sim-fault must be one of" in resp.json()["error"]["message"]


async def test_cut_stream_ends_without_done(client: httpx.AsyncClient) -> None:
    received: list[bytes] = []

    async def read_stream() -> None:
        headers = {"x-sim-fault": "cut"}
        async with client.stream("POST", chat_url(), json=STREAM, headers=headers) as resp:
            assert resp.status_code == 200
            async for raw in resp.aiter_raw():
                received.append(raw)

    with pytest.raises(httpx.RemoteProtocolError):
        await read_stream()
    text = b"".join(received)
    assert b'"content":"The"' in text
    assert b"[DONE]" not in text
    assert b'"finish_reason":"length"' not in text
    (entry,) = [e for e in await _log(client) if e["fault"] == "cut"]
    assert entry["tokens_sent"] == 10
    assert entry["completion_tokens"] == 20


async def test_cut_json_body_is_truncated(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post(chat_url(), json=HI, headers={"x-sim-fault": "cut"})


async def test_hang_until_the_client_gives_up(
    sim: SimulatorHandle, client: httpx.AsyncClient
) -> None:
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await client.post(chat_url(), json=HI, headers={"x-sim-fault": "hang"}, timeout=0.3)
    assert time.monotonic() - started < 2
    # The simulator notices the hang-up and records an unanswered request.
    for _ in range(100):
        entries = [e for e in await _log(client) if e["fault"] == "hang"]
        if entries:
            break
        await asyncio.sleep(0.02)
    (entry,) = entries
    assert entry["status"] == 0
    assert entry["client_gone"] is True
    assert (await client.post(chat_url("free"), json=HI)).status_code == 200  # still serving


async def test_hang_ends_at_hang_max() -> None:
    dep = SimDeployment(name="h", model="m", hang_max_s=0.2)
    handle = await start_simulator(make_config(deployments=[dep]), clock=FakeClock())
    try:
        async with httpx.AsyncClient(base_url=handle.url, headers={"api-key": KEY}) as c:
            with pytest.raises(httpx.RemoteProtocolError):  # closed with no answer at all
                await c.post(chat_url("h"), json=HI, headers={"x-sim-fault": "hang"}, timeout=5)
    finally:
        await handle.close()


async def test_slow_delays_the_first_byte(client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    resp = await client.post(chat_url("free"), json=HI, headers={"x-sim-fault": "slow:250"})
    assert resp.status_code == 200
    assert time.monotonic() - started >= 0.24


async def _outcomes(seed: int) -> list[str]:
    dep = SimDeployment(name="flaky", model="m", error_rate=0.3, cut_rate=0.2)
    handle = await start_simulator(make_config(deployments=[dep], seed=seed), clock=FakeClock())
    outcomes = []
    try:
        async with httpx.AsyncClient(base_url=handle.url, headers={"api-key": KEY}) as c:
            for _ in range(30):
                try:
                    outcomes.append(str((await c.post(chat_url("flaky"), json=HI)).status_code))
                except httpx.RemoteProtocolError:
                    outcomes.append("cut")
    finally:
        await handle.close()
    return outcomes


async def test_random_faults_repeat_with_the_seed() -> None:
    first = await _outcomes(seed=5)
    assert first == await _outcomes(seed=5)
    assert {"200", "500", "cut"} <= set(first)
    assert first != await _outcomes(seed=6)
