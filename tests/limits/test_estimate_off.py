"""``estimate_prompt_tokens: false`` through a real gateway (real simulator, the openai SDK),
as APIM's ``estimate-prompt-tokens="false"`` and its token-rate-limiting lab (100 TPM): no
estimate is reserved up front, requests are admitted while the window's count is below the
limit, the usage the backend reports is charged when the answer ends, and once it has passed
the limit the next requests get 429 with Retry-After.

The gateway reserved the completion budget anyway (1,024 tokens when a request sets no
max_tokens), more than the whole limit: every such request got 429 TokenRequestTooLarge
with ``x-should-retry: false``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from sluicegate.simulator.server import SimulatorThread
from tests.integration.conftest import Harness, sim_config
from tests.support.gateway import GatewayThread, gateway_config

API_VERSION = "2024-10-21"
MESSAGES: Any = [{"role": "user", "content": "hello hello hello"}]
TPM = 100
# The simulator counts 10 prompt tokens and, without max_tokens, answers 16: 26 a request.
USAGE = 26


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    sim = SimulatorThread(sim_config())
    sim.start()
    cfg = gateway_config(
        tmp_path,
        {"sim": sim.url},
        deployments=[{"name": "gpt-4o-mini", "backend": "sim", "model": "gpt-4o-mini"}],
        products=[
            {
                "name": "starter",
                "deployments": ["*"],
                "limits": {"tokens_per_minute": TPM, "estimate_prompt_tokens": False},
            }
        ],
    )
    h = Harness(GatewayThread(cfg).start(), sim)
    yield h
    h.gw.stop()
    sim.stop()


def _chat(h: Harness, key: str, **extra: Any) -> tuple[int, str | None, dict[str, str], int]:
    """One chat completion through the openai SDK, without retries: (status, the error code
    or None, the response headers, the usage's total tokens or 0)."""
    client = openai.AzureOpenAI(
        azure_endpoint=h.url, api_key=key, api_version=API_VERSION, max_retries=0
    )
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, **extra
        )
    except openai.APIStatusError as exc:
        code = exc.body.get("code") if isinstance(exc.body, dict) else None
        return exc.status_code, code, dict(exc.response.headers), 0
    finally:
        client.close()
    completion = raw.parse()
    assert completion.usage is not None
    return raw.http_response.status_code, None, dict(raw.headers), completion.usage.total_tokens


def test_without_max_tokens_requests_pass_until_the_reported_usage_passes_the_limit(
    harness: Harness,
) -> None:
    key = harness.new_key(name="lab").primary_key or ""
    used = 0
    for _ in range(4):  # admitted at 0, 26, 52 and 78 tokens: below 100 each time
        status, code, headers, total = _chat(harness, key)
        assert (status, code) == (200, None), headers
        assert total == USAGE
        assert headers["x-ratelimit-remaining-tokens"] == str(TPM - used)  # nothing reserved
        used += total
    assert used > TPM  # the last one pushed the window over: let through, as in APIM

    status, code, headers, _ = _chat(harness, key)
    assert (status, code) == (429, "TokenRateLimitExceeded")
    assert 1 <= int(headers["retry-after"]) <= 60
    assert "x-should-retry" not in headers  # the SDK may retry it
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert sum(1 for _ in harness.sim_log()) == 4  # the refused one never reached the backend


def test_max_tokens_does_not_count_against_the_limit(harness: Harness) -> None:
    """As in APIM, an explicit max_tokens is not reserved either, even above the limit; the
    answer's usage is what is charged."""
    key = harness.new_key(name="big").primary_key or ""
    status, code, headers, total = _chat(harness, key, max_tokens=500)
    assert (status, code) == (200, None), headers
    assert total > TPM
    status, code, headers, _ = _chat(harness, key, max_tokens=5)
    assert (status, code) == (429, "TokenRateLimitExceeded")
    assert "retry-after" in headers and "x-should-retry" not in headers
