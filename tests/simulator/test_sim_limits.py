"""Azure-like TPM/RPM over loopback, with the windows driven by a FakeClock.

TPM: a sliding minute charged with the arrival estimate. RPM: Azure's short windows, RPM/6
per 10 s and RPM/60 per 1 s, with ``x-ratelimit-remaining-requests`` reporting the 10-s
budget (azure-openai-api.md §8, apim-policies.md §5).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from sluicegate.clock import FakeClock
from sluicegate.simulator import SimDeployment, SimulatorHandle, start_simulator
from tests.simulator.conftest import KEY, chat_url, make_config

HI = {"messages": [{"role": "user", "content": "hi"}]}  # 8 prompt tokens


async def test_tpm_charges_the_estimate_and_429s_with_exact_waits(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    big = {**HI, "max_tokens": 400}  # estimate 408, although the answer is capped lower
    r1 = await client.post(chat_url(), json=big)
    assert r1.status_code == 200
    assert r1.headers["x-ratelimit-remaining-tokens"] == "592"
    clock.advance(10)
    r2 = await client.post(chat_url(), json=big)
    assert r2.headers["x-ratelimit-remaining-tokens"] == "184"
    clock.advance(10)
    r3 = await client.post(chat_url(), json=big)
    assert r3.status_code == 429
    # 224 tokens must leave the window: the first charge does, 60 s after it was made.
    assert r3.headers["retry-after"] == "40"
    assert r3.headers["retry-after-ms"] == "40000"
    assert r3.headers["x-ratelimit-remaining-tokens"] == "184"  # a refusal charges nothing
    # The 10-s request window is empty again (the last request was 10 s ago), and a refusal
    # does not count as a request.
    assert r3.headers["x-ratelimit-remaining-requests"] == "100"
    assert r3.headers["x-ratelimit-limit-tokens"] == "1000"
    error = r3.json()["error"]
    assert error["code"] == "429"
    assert error["message"].startswith(
        "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
        "2024-10-21 have exceeded token rate limit"
    )
    assert "Please retry after 40 seconds" in error["message"]
    clock.advance(39.5)
    r4 = await client.post(chat_url(), json=big)
    assert r4.status_code == 429
    assert (r4.headers["retry-after"], r4.headers["retry-after-ms"]) == ("1", "500")
    clock.advance(0.5)
    r5 = await client.post(chat_url(), json=big)
    assert r5.status_code == 200
    assert r5.headers["x-ratelimit-remaining-tokens"] == "184"


@pytest.fixture
async def rpm_sim(clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    """Deployments limited by requests only: 300 RPM (the reference's header example) and
    30 RPM (5 per 10 s, 1 per second: the 10-s window binds before the 1-s one)."""
    deployments = [
        SimDeployment(name="r300", model="gpt-4o-2024-08-06", rpm=300),
        SimDeployment(name="r30", model="gpt-4o-2024-08-06", rpm=30),
    ]
    handle: SimulatorHandle = await start_simulator(
        make_config(deployments=deployments), clock=clock
    )
    try:
        async with httpx.AsyncClient(
            base_url=handle.url, headers={"api-key": KEY}, timeout=10
        ) as c:
            yield c
    finally:
        await handle.close()


SMALL = {**HI, "max_tokens": 1}


async def test_remaining_requests_reports_the_ten_second_budget(
    rpm_sim: httpx.AsyncClient, clock: FakeClock
) -> None:
    # 300 RPM → 50 per 10 s: the header starts at 50 (apim-policies.md §5), not 300.
    seen = []
    for _ in range(3):
        resp = await rpm_sim.post(chat_url("r300"), json=SMALL)
        assert resp.status_code == 200
        seen.append(resp.headers["x-ratelimit-remaining-requests"])
        clock.advance(1)
    assert seen == ["49", "48", "47"]
    assert resp.headers["x-ratelimit-limit-requests"] == "300"  # the deployment's limit
    clock.advance(10)  # the 10-s window has emptied
    resp = await rpm_sim.post(chat_url("r300"), json=SMALL)
    assert resp.headers["x-ratelimit-remaining-requests"] == "49"


async def test_a_burst_429s_on_the_one_second_window_while_the_header_looks_positive(
    rpm_sim: httpx.AsyncClient, clock: FakeClock
) -> None:
    # 300 RPM → 5 per second: the 6th request of a burst is refused although the 10-s
    # budget still shows 45 (Microsoft Q&A 2156987, cited in apim-policies.md §5).
    for expected in range(49, 44, -1):
        resp = await rpm_sim.post(chat_url("r300"), json=SMALL)
        assert resp.status_code == 200
        assert resp.headers["x-ratelimit-remaining-requests"] == str(expected)
    clock.advance(0.25)
    refused = await rpm_sim.post(chat_url("r300"), json=SMALL)
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-remaining-requests"] == "45"
    # The burst's first request leaves the 1-s window 0.75 s from now.
    assert (refused.headers["retry-after"], refused.headers["retry-after-ms"]) == ("1", "750")
    error = refused.json()["error"]
    assert error["code"] == "429"  # Azure's classic body, request-count wording
    assert "call rate limit" in error["message"]
    clock.advance(0.75)
    assert (await rpm_sim.post(chat_url("r300"), json=SMALL)).status_code == 200


async def test_six_hundred_rpm_allows_ten_requests_in_one_second(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    # The reference's example: 600 RPM → more than 10 requests in one second get 429.
    for _ in range(10):
        assert (await client.post(chat_url(), json=SMALL)).status_code == 200
    assert (await client.post(chat_url(), json=SMALL)).status_code == 429
    clock.advance(1)
    assert (await client.post(chat_url(), json=SMALL)).status_code == 200


async def test_the_ten_second_window_refuses_until_its_oldest_request_leaves(
    rpm_sim: httpx.AsyncClient, clock: FakeClock
) -> None:
    # 30 RPM → 5 per 10 s, 1 per second: one request a second fills the 10-s window by t=4.
    remaining = []
    for _ in range(5):
        resp = await rpm_sim.post(chat_url("r30"), json=SMALL)
        assert resp.status_code == 200
        remaining.append(int(resp.headers["x-ratelimit-remaining-requests"]))
        clock.advance(1)
    assert remaining == [4, 3, 2, 1, 0]
    refused = await rpm_sim.post(chat_url("r30"), json=SMALL)  # t=5
    assert refused.status_code == 429
    # The first request (t=0) leaves the 10-s window at t=10; a per-minute count of 30
    # would still have had room.
    assert (refused.headers["retry-after"], refused.headers["retry-after-ms"]) == ("5", "5000")
    assert "call rate limit" in refused.json()["error"]["message"]
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    clock.advance(4.5)
    again = await rpm_sim.post(chat_url("r30"), json=SMALL)
    assert again.status_code == 429
    assert again.headers["retry-after-ms"] == "500"
    clock.advance(0.5)
    resp = await rpm_sim.post(chat_url("r30"), json=SMALL)
    assert resp.status_code == 200
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"  # t=1…4 and this one


async def test_remaining_tokens_decrease_by_each_estimate(client: httpx.AsyncClient) -> None:
    seen = []
    for max_tokens in (10, 20, 30):
        resp = await client.post(chat_url(), json={**HI, "max_tokens": max_tokens})
        seen.append(int(resp.headers["x-ratelimit-remaining-tokens"]))
    assert seen == [1000 - 18, 1000 - 18 - 28, 1000 - 18 - 28 - 38]


async def test_limits_can_be_reset_for_the_next_test(client: httpx.AsyncClient) -> None:
    await client.post(chat_url(), json={**HI, "max_tokens": 900})
    assert (await client.post(chat_url(), json={**HI, "max_tokens": 900})).status_code == 429
    assert (await client.delete("/_sim/limits")).status_code == 200
    assert (await client.post(chat_url(), json={**HI, "max_tokens": 900})).status_code == 200
