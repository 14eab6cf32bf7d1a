"""Azure-like TPM/RPM over loopback, with the window driven by a FakeClock."""

from __future__ import annotations

import httpx

from sluicegate.clock import FakeClock
from tests.simulator.conftest import chat_url

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
    assert r2.headers["x-ratelimit-remaining-requests"] == "8"
    clock.advance(10)
    r3 = await client.post(chat_url(), json=big)
    assert r3.status_code == 429
    # 224 tokens must leave the window: the first charge does, 60 s after it was made.
    assert r3.headers["retry-after"] == "40"
    assert r3.headers["retry-after-ms"] == "40000"
    assert r3.headers["x-ratelimit-remaining-tokens"] == "184"  # a refusal charges nothing
    assert r3.headers["x-ratelimit-remaining-requests"] == "8"
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


async def test_rpm_429_says_call_rate_limit(client: httpx.AsyncClient, clock: FakeClock) -> None:
    small = {**HI, "max_tokens": 1}
    remaining = []
    for _ in range(10):
        resp = await client.post(chat_url(), json=small)
        assert resp.status_code == 200
        remaining.append(int(resp.headers["x-ratelimit-remaining-requests"]))
        clock.advance(1)
    assert remaining == list(range(9, -1, -1))
    refused = await client.post(chat_url(), json=small)
    assert refused.status_code == 429
    # The first request (t=0) leaves the window at t=60; now is t=10.
    assert refused.headers["retry-after"] == "50"
    assert refused.headers["retry-after-ms"] == "50000"
    assert "call rate limit" in refused.json()["error"]["message"]
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    clock.advance(50)
    assert (await client.post(chat_url(), json=small)).status_code == 200


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
