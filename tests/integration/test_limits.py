"""Token and request limits through a real gateway: headers, 429 with a real wait, 403 when a
quota is used up until the next period, max_tokens ceilings, and the SDK backing off."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from sluicegate.clock import FakeClock
from sluicegate.simulator.server import SimulatorThread
from tests.integration.conftest import Harness, OffsetClock
from tests.support.gateway import GatewayThread, gateway_config

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"


class _ChatBody(TypedDict):
    """A chat request's body, typed so that ``**ONE_MESSAGE`` checks as SDK arguments."""

    messages: list[ChatCompletionMessageParam]
    max_tokens: int


ONE_MESSAGE: _ChatBody = {
    "messages": [{"role": "user", "content": "hello hello hello"}],
    "max_tokens": 10,
}
# The simulator counts 4 per message + words + 3 = 10 prompt tokens, so one request uses 20.
TOKENS_PER_REQUEST = 20


def limited(tmp_path: Path, sim: SimulatorThread, limits: Any, clock: Any = None) -> Harness:
    cfg = gateway_config(
        tmp_path,
        {"sim": sim.url},
        deployments=[{"name": "gpt-4o-mini", "backend": "sim", "model": "gpt-4o-mini"}],
        products=[{"name": "starter", "deployments": ["*"], "limits": limits}],
    )
    gw = GatewayThread(cfg, clock=clock)
    gw.start()
    return Harness(gw, sim)


def test_tpm_headers_and_429_with_real_wait(
    tmp_path: Path, simulator: SimulatorThread, stop_later: list[Harness]
) -> None:
    h = limited(tmp_path, simulator, {"tokens_per_minute": 100, "requests_per_minute": 50})
    stop_later.append(h)
    key = h.new_key().primary_key or ""
    statuses = []
    with httpx.Client(base_url=h.url, headers={"api-key": key}) as c:
        first = c.post(CHAT, json=ONE_MESSAGE)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "100"
        assert first.headers["x-ratelimit-limit-requests"] == "50"
        assert int(first.headers["x-ratelimit-remaining-tokens"]) == 100 - TOKENS_PER_REQUEST
        assert first.headers["x-ratelimit-remaining-requests"] == "49"
        for _ in range(6):
            r = c.post(CHAT, json=ONE_MESSAGE)
            statuses.append(r.status_code)
        refused = r
    assert statuses == [200, 200, 200, 200, 429, 429]
    body = refused.json()["error"]
    assert body["code"] == "TokenRateLimitExceeded"
    wait_ms = int(refused.headers["retry-after-ms"])
    assert 56_000 < wait_ms <= 61_000  # the first request's tokens leave the window then
    assert int(refused.headers["retry-after"]) == -(-wait_ms // 1000)
    records = h.records(expect=7)
    assert [r.status for r in records].count(429) == 2
    assert sum(r.total_tokens for r in records) == 5 * TOKENS_PER_REQUEST
    assert sum(1 for r in h.sim_log()) == 5  # refused requests never reached the backend


def test_the_consumed_tokens_header_carries_the_backends_count(
    tmp_path: Path, simulator: SimulatorThread, stop_later: list[Harness]
) -> None:
    """``tokens_consumed_header`` (APIM's tokens-consumed-header-name): the tokens the backend
    reported, on answers that report them; not on streams, whose count comes after the head."""
    limits = {"tokens_per_minute": 100_000, "tokens_consumed_header": "X-Consumed-Tokens"}
    h = limited(tmp_path, simulator, limits)
    stop_later.append(h)
    key = h.new_key().primary_key or ""
    with httpx.Client(base_url=h.url, headers={"api-key": key}) as c:
        answer = c.post(CHAT, json=ONE_MESSAGE)
        assert answer.status_code == 200
        assert answer.headers["x-consumed-tokens"] == str(answer.json()["usage"]["total_tokens"])
        streamed = c.post(CHAT, json={**ONE_MESSAGE, "stream": True})
        assert streamed.status_code == 200
        assert "x-consumed-tokens" not in streamed.headers


def test_quota_403_until_the_next_month(
    tmp_path: Path, simulator: SimulatorThread, stop_later: list[Harness]
) -> None:
    clock = FakeClock(datetime(2028, 2, 29, 23, 59, 0, tzinfo=UTC).timestamp())  # leap day
    h = limited(
        tmp_path, simulator, {"token_quota": 50, "token_quota_period": "monthly"}, clock=clock
    )
    stop_later.append(h)
    key = h.new_key().primary_key or ""
    with httpx.Client(base_url=h.url, headers={"api-key": key}) as c:
        assert c.post(CHAT, json=ONE_MESSAGE).status_code == 200
        assert c.post(CHAT, json=ONE_MESSAGE).status_code == 200
        refused = c.post(CHAT, json=ONE_MESSAGE)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "TokenQuotaExceeded"
        assert refused.headers["x-should-retry"] == "false"
        assert int(refused.headers["retry-after"]) == 60  # March starts in a minute
        clock.advance(59)
        assert c.post(CHAT, json=ONE_MESSAGE).status_code == 403
        clock.advance(1)  # 2028-03-01T00:00:00Z
        assert c.post(CHAT, json=ONE_MESSAGE).status_code == 200


def test_max_tokens_ceiling_reject_and_clamp(
    tmp_path: Path, simulator: SimulatorThread, stop_later: list[Harness]
) -> None:
    h = limited(
        tmp_path,
        simulator,
        [
            {"max_tokens_ceiling": 8, "max_tokens_action": "clamp"},
            {"tokens_per_minute": 100_000, "counter_key": "owner"},
        ],
    )
    stop_later.append(h)
    key = h.new_key().primary_key or ""
    with httpx.Client(base_url=h.url, headers={"api-key": key}) as c:
        r = c.post(CHAT, json={**ONE_MESSAGE, "max_tokens": 500})
        assert r.status_code == 200
        assert r.json()["usage"]["completion_tokens"] == 8  # clamped before forwarding
    h2 = limited(tmp_path / "b", simulator, {"max_tokens_ceiling": 8})
    stop_later.append(h2)
    key2 = h2.new_key().primary_key or ""
    r = httpx.post(
        h2.url + CHAT, json={**ONE_MESSAGE, "max_tokens": 500}, headers={"api-key": key2}
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "MaxTokensCeilingExceeded"


def test_sdk_waits_what_the_gateway_said_then_succeeds(
    tmp_path: Path, simulator: SimulatorThread, stop_later: list[Harness]
) -> None:
    clock = OffsetClock()
    h = limited(tmp_path, simulator, {"tokens_per_minute": 30}, clock=clock)
    stop_later.append(h)
    key = h.new_key().primary_key or ""
    client = openai.AzureOpenAI(
        azure_endpoint=h.url, api_key=key, api_version="2024-10-21", max_retries=2
    )
    clock.offset = -57.0  # the first request happened 57 s ago, so its tokens free up in ~3 s
    client.chat.completions.create(model="gpt-4o-mini", **ONE_MESSAGE)
    clock.offset = 0.0
    started = time.monotonic()
    reply = client.chat.completions.create(model="gpt-4o-mini", **ONE_MESSAGE)
    waited = time.monotonic() - started
    assert reply.usage is not None
    assert 2.0 < waited < 6.0
    statuses = [r.status for r in h.records(expect=3)]
    assert statuses == [200, 429, 200]
