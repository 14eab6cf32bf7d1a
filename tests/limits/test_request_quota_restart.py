"""A request quota survives a gateway restart counting what its counter counted: one per
admitted request. Embedded mode (counters in memory, ledger in SQLite), the real openai SDK
through a real gateway whose product has a semantic cache (its embeddings calls are ledger
records of their own, not requests of the client's), and a client that leaves while still
sending its body (never admitted)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import openai

from sluicegate.accounting.records import Outcome
from sluicegate.simulator.server import SimulatorThread
from tests.integration.conftest import Harness
from tests.support.gateway import GatewayThread, gateway_config

HEADER = "x-remaining-requests-quota"
QUOTA = 100
CHAT = "gpt-4o-mini"
EMBEDDINGS = "text-embedding-3-small"
MESSAGES: Any = [{"role": "user", "content": "What is the capital of France?"}]


def start(tmp_path: Path, sim: SimulatorThread) -> Harness:
    cfg = gateway_config(
        tmp_path,
        {"sim": sim.url},
        deployments=[
            {"name": CHAT, "backend": "sim", "model": CHAT},
            {"name": EMBEDDINGS, "backend": "sim", "model": EMBEDDINGS},
        ],
        products=[
            {
                "name": "cached",
                "deployments": ["*"],
                "semantic_cache": {"embeddings_deployment": EMBEDDINGS},
                "limits": {
                    "request_quota": QUOTA,
                    "request_quota_period": "monthly",
                    "remaining_requests_quota_header": HEADER,
                },
            }
        ],
    )
    return Harness(GatewayThread(cfg).start(), sim)


def ask(client: openai.AzureOpenAI) -> Any:
    return client.chat.completions.with_raw_response.create(model=CHAT, messages=MESSAGES)


def leave_while_sending_the_body(h: Harness, key: str) -> None:
    """A chat request whose client closes the connection halfway through its body."""
    host, port = h.url.removeprefix("http://").split(":")
    head = (
        f"POST /openai/deployments/{CHAT}/chat/completions?api-version=2024-10-21 HTTP/1.1\r\n"
        f"Host: {host}\r\napi-key: {key}\r\ncontent-type: application/json\r\n"
        "content-length: 1000\r\n\r\n"
    )
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(head.encode() + b'{"messages": [')
        time.sleep(0.2)


def test_the_request_quota_is_seeded_with_the_admitted_requests_only(
    tmp_path: Path, simulator: SimulatorThread, stop_later: list[Harness]
) -> None:
    first = start(tmp_path, simulator)
    stop_later.append(first)
    key = first.new_key(product="cached").primary_key or ""
    client = first.sdk(key)
    try:
        miss, hit = ask(client), ask(client)
    finally:
        client.close()
    assert (miss.headers["x-sluicegate-cache"], hit.headers["x-sluicegate-cache"]) == (
        "miss",
        "hit",
    )
    assert (miss.headers[HEADER], hit.headers[HEADER]) == (str(QUOTA - 1), str(QUOTA - 2))
    leave_while_sending_the_body(first, key)
    # The two requests, the cache's embeddings call for each, and the one that left.
    records = first.records(expect=5)
    assert sorted(r.operation for r in records) == [
        "chat/completions",
        "chat/completions",
        "chat/completions",
        "embeddings",
        "embeddings",
    ]
    assert [r.outcome for r in records if r.deployment is None] == [Outcome.ABORTED]
    first.gw.stop()

    second = start(tmp_path, simulator)  # the same ledger, the same keys
    stop_later.append(second)
    client = second.sdk(key)
    try:
        ask(client)  # the window before the seed lands (docs/limits.md): counted once
        seeder = second.gw.gateway.quota_seeder
        assert seeder is not None
        deadline = time.monotonic() + 10
        while seeder.applied < 1:
            assert time.monotonic() < deadline, "the request quota was not seeded"
            time.sleep(0.02)
        assert seeder.applied_requests == 2
        assert ask(client).headers[HEADER] == str(QUOTA - 4)
    finally:
        client.close()
