"""A token quota survives a gateway restart (embedded mode: counters in memory, ledger in
SQLite): the new gateway seeds the quota from the ledger, so a team cannot spend its quota
again after each deploy. Through the real openai SDK."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import pytest

from sluicegate.simulator.server import SimulatorThread
from tests.integration.conftest import Harness
from tests.support.gateway import GatewayThread, gateway_config

HEADER = "x-remaining-quota-tokens"
MESSAGES: Any = [{"role": "user", "content": "hello hello hello"}]
# The simulator counts 10 prompt tokens for this message; max_tokens=10: 20 a request.
TOKENS_PER_REQUEST = 20


def start(tmp_path: Path, sim: SimulatorThread, limits: dict[str, Any]) -> Harness:
    cfg = gateway_config(
        tmp_path,
        {"sim": sim.url},
        deployments=[{"name": "gpt-4o-mini", "backend": "sim", "model": "gpt-4o-mini"}],
        products=[{"name": "starter", "deployments": ["*"], "limits": limits}],
    )
    return Harness(GatewayThread(cfg).start(), sim)


def chat(client: openai.AzureOpenAI) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=10
    )


def wait_seeded(h: Harness) -> None:
    seeder = h.gw.gateway.quota_seeder
    assert seeder is not None
    deadline = time.monotonic() + 10
    while seeder.applied < 1:
        assert time.monotonic() < deadline, "the quota was not seeded"
        time.sleep(0.02)


def test_the_remaining_quota_survives_a_restart(tmp_path: Path, simulator: SimulatorThread) -> None:
    limits = {
        "token_quota": 1000,
        "token_quota_period": "monthly",
        # Nothing reserved up front: the header is exactly the quota less the usage so far.
        "estimate_prompt_tokens": False,
        "remaining_quota_header": HEADER,
    }
    first = start(tmp_path, simulator, limits)
    try:
        key = first.new_key().primary_key or ""
        client = first.sdk(key)
        for n in range(5):
            answer = chat(client)
            assert int(answer.headers[HEADER]) == 1000 - n * TOKENS_PER_REQUEST
        assert sum(r.total_tokens for r in first.records(expect=5)) == 5 * TOKENS_PER_REQUEST
    finally:
        first.gw.stop()

    second = start(tmp_path, simulator, limits)  # the same ledger, the same keys
    try:
        client = second.sdk(key)
        # The window: admitted against the new counter before its seed lands, counted once.
        chat(client)
        wait_seeded(second)
        answer = chat(client)
        assert int(answer.headers[HEADER]) == 1000 - 6 * TOKENS_PER_REQUEST  # not 980
        assert sum(r.total_tokens for r in second.records(expect=7)) == 7 * TOKENS_PER_REQUEST
    finally:
        second.gw.stop()


def test_an_exhausted_quota_stays_exhausted_after_a_restart(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    limits = {"token_quota": 50, "token_quota_period": "monthly"}
    first = start(tmp_path, simulator, limits)
    try:
        key = first.new_key().primary_key or ""
        client = first.sdk(key)
        chat(client)
        chat(client)
        with pytest.raises(openai.PermissionDeniedError):  # 40 used, 20 more asked of 50
            chat(client)
    finally:
        first.gw.stop()

    second = start(tmp_path, simulator, limits)
    try:
        client = second.sdk(key)
        chat(client)  # the window before the seed lands (docs/limits.md)
        wait_seeded(second)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            chat(client)
        assert refused.value.status_code == 403
        assert refused.value.body is not None
        assert "TokenQuotaExceeded" in str(refused.value.body)
    finally:
        second.gw.stop()
