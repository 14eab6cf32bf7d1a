"""The semantic cache, reviewed: what a hit logs, which request parts partition the cache or
are compared, the records of a failed-over embeddings call, a client that leaves during the
lookup, a hanging embeddings backend, concurrent misses, and the size of what is stored. The
real ``openai`` SDK through a real gateway in front of the simulator (one gateway for the
module; each test works with subscriptions of its own, and the products a test changes the
state of are its own)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from sluicegate.accounting.records import UsageRecord
from sluicegate.cache.semantic import MAX_ANSWER_BYTES, SemanticCache, dialog_text
from sluicegate.cache.vectors import unit_vector
from sluicegate.clock import FakeClock
from sluicegate.config.model import ProductSemanticCacheConfig
from sluicegate.simulator.config import SimDeployment
from sluicegate.simulator.server import SimulatorThread
from tests.integration.conftest import Harness, sim_config
from tests.support.gateway import GatewayThread, free_port, gateway_config

CHAT = "gpt-4o-mini"
EMBEDDINGS = "text-embedding-3-small"
QUESTION = "What is the capital of France?"

PRODUCTS: list[dict[str, Any]] = [
    {"name": "cached", "semantic_cache": {"embeddings_deployment": EMBEDDINGS}},
    {
        "name": "logged",
        "semantic_cache": {"embeddings_deployment": EMBEDDINGS},
        "message_log": {},
    },
    {"name": "failover", "semantic_cache": {"embeddings_deployment": "emb-failover"}},
    {
        "name": "hung",
        "semantic_cache": {"embeddings_deployment": "emb-slow", "timeout_seconds": 0.3},
    },
    {
        "name": "patient",
        "semantic_cache": {"embeddings_deployment": "emb-slow", "timeout_seconds": 10},
    },
]
#: An embeddings deployment that takes this long to answer.
SLOW_MS = 1500


@dataclass
class Review:
    harness: Harness
    log: Path

    def key(self, product: str) -> tuple[str, str]:
        issued = self.harness.new_key(product=product)
        return issued.subscription.id, issued.primary_key or ""

    def client(self, product: str, api_version: str = "2024-10-21") -> openai.AzureOpenAI:
        return openai.AzureOpenAI(
            azure_endpoint=self.harness.url,
            api_key=self.key(product)[1],
            api_version=api_version,
            max_retries=0,
        )

    def calls(self, deployment: str) -> int:
        return sum(1 for e in self.harness.sim_log() if e.get("deployment") == deployment)

    def records(self, request_id: str, expect: int) -> list[UsageRecord]:
        """The records of ``request_id`` and of the embeddings calls made for it (waits for
        ``expect`` of them, up to 5 s)."""
        deadline = time.monotonic() + 5
        while True:
            found = [
                r
                for r in self.harness.records()
                if r.request_id == request_id or r.extra.get("for_request") == request_id
            ]
            if len(found) >= expect or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def entries(self, request_id: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 5
        while True:
            found: list[dict[str, Any]] = []
            if self.log.exists():
                lines = self.log.read_bytes().splitlines()
                found = [e for e in map(orjson.loads, lines) if e["RequestId"] == request_id]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


@pytest.fixture(scope="module")
def review(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Review]:
    tmp = tmp_path_factory.mktemp("semantic-cache-review")
    log = tmp / "logs" / "messages.jsonl"
    slow = SimDeployment(name="emb-slow", model=EMBEDDINGS, kind="embeddings", ttft_ms=SLOW_MS)
    sim = SimulatorThread(sim_config(deployments=[*sim_config().deployments, slow])).start()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = gateway_config(
        tmp,
        {"sim": sim.url, "dead": dead},
        deployments=[
            {"name": CHAT, "backend": "sim", "model": CHAT},
            {"name": EMBEDDINGS, "backend": "sim", "model": EMBEDDINGS},
            {"name": "emb-slow", "backend": "sim", "model": EMBEDDINGS},
            {
                "name": "emb-failover",
                "model": EMBEDDINGS,
                "pool": [
                    {"backend": "dead", "backend_deployment": EMBEDDINGS, "priority": 1},
                    {"backend": "sim", "backend_deployment": EMBEDDINGS, "priority": 2},
                ],
            },
        ],
        products=PRODUCTS,
        message_log={"path": str(log)},
    )
    gw = GatewayThread(config).start()
    try:
        yield Review(Harness(gw, sim), log)
    finally:
        gw.stop()
        sim.stop()


def ask(client: openai.AzureOpenAI, content: str = QUESTION, **more: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": content}], **more
    )


def test_a_hit_is_logged_with_the_answer_the_client_got(review: Review) -> None:
    client = review.client("logged")
    miss, hit = ask(client), ask(client)
    assert hit.headers["x-sluicegate-cache"] == "hit"
    content = hit.parse().choices[0].message.content
    assert content
    (entry,) = review.entries(hit.headers["x-sluicegate-request-id"])
    assert entry["ResponseMessages"] == content
    assert entry["RequestMessages"] == f"user: {QUESTION}"
    assert entry["StatusCode"] == 200 and entry["TotalTokens"] == 0
    (stored,) = review.entries(miss.headers["x-sluicegate-request-id"])
    assert stored["ResponseMessages"] == content and stored["TotalTokens"] > 0


def test_every_attempt_of_a_failed_over_embeddings_call_is_marked_as_the_caches(
    review: Review,
) -> None:
    """The first member of emb-failover does not listen: its attempt fails over to the
    simulator. Both attempts are records of the same subscription, and both say what they
    were made for (a record of the cache's call without its marks would be charged back as
    an embeddings request the subscription never made)."""
    sub, key = review.key("failover")
    client = openai.AzureOpenAI(
        azure_endpoint=review.harness.url, api_key=key, api_version="2024-10-21", max_retries=0
    )
    answer = ask(client)
    assert answer.headers["x-sluicegate-cache"] == "miss"
    request_id = answer.headers["x-sluicegate-request-id"]
    review.records(request_id, 3)
    calls = sorted(
        (
            r
            for r in review.harness.records()
            if r.subscription_id == sub and r.operation == "embeddings"
        ),
        key=lambda r: r.attempt,
    )
    assert [(r.attempt, r.backend) for r in calls] == [(1, "dead"), (2, "sim")]
    for record in calls:
        assert record.extra["semantic_cache"] == "embedding"
        assert record.extra["for_request"] == request_id
        assert (record.deployment, record.product) == ("emb-failover", "failover")
    assert calls[0].total_tokens == 0 and calls[1].total_tokens > 0


def test_the_api_version_partitions_the_cache(review: Review) -> None:
    """Azure's answer depends on the API version the client asked for (its members, its
    content filter results, which parameters it accepts): an answer stored for one version
    does not answer another."""
    _, key = review.key("cached")

    def client(version: str) -> openai.AzureOpenAI:
        return openai.AzureOpenAI(
            azure_endpoint=review.harness.url, api_key=key, api_version=version, max_retries=0
        )

    newer, older = client("2024-10-21"), client("2024-06-01")
    assert ask(newer).headers["x-sluicegate-cache"] == "miss"
    chats = review.calls(CHAT)
    assert ask(older).headers["x-sluicegate-cache"] == "miss"
    assert review.calls(CHAT) == chats + 1
    assert ask(older).headers["x-sluicegate-cache"] == "hit"
    assert ask(newer).headers["x-sluicegate-cache"] == "hit"


def test_a_legacy_function_call_is_part_of_the_dialog_compared() -> None:
    """A dialog with a function call (the legacy ``function_call``, as with ``tool_calls``)
    is compared with its call: two dialogs that asked for different calls and got the same
    result are different questions."""

    def dialog(city: str) -> list[dict[str, Any]]:
        call = {"name": "weather", "arguments": orjson.dumps({"city": city}).decode()}
        return [
            {"role": "user", "content": "What is the weather like?"},
            {"role": "assistant", "content": None, "function_call": call},
            {"role": "function", "name": "weather", "content": "sunny, 20 C"},
        ]

    paris, oslo = dialog_text(dialog("Paris"), True), dialog_text(dialog("Oslo"), True)
    assert paris is not None and oslo is not None
    assert paris != oslo
    assert 'weather({"city":"Paris"})' in paris


def test_an_earlier_audio_answer_is_not_compared_as_text() -> None:
    """An assistant message that refers to an earlier audio answer (``audio.id``) holds its
    meaning outside the text: not looked up, as an audio part is not."""
    turns = [
        {"role": "user", "content": "Say something."},
        {"role": "assistant", "audio": {"id": "audio_abc123"}},
        {"role": "user", "content": "Again, please."},
    ]
    assert dialog_text(turns, True) is None


def test_an_answer_over_max_answer_bytes_is_not_stored() -> None:
    """An answer of many MiB (many choices with their logprobs) would push hundreds of
    others out of the store for one prompt: answers over ``MAX_ANSWER_BYTES`` are relayed,
    not kept."""
    policy = ProductSemanticCacheConfig(embeddings_deployment=EMBEDDINGS)
    cache = SemanticCache("p", policy, FakeClock())
    query = unit_vector([1.0, 0.5, -0.25])

    def answer(size: int) -> bytes:
        choice = {"index": 0, "finish_reason": "stop", "message": {"content": "x" * size}}
        return orjson.dumps({"object": "chat.completion", "model": "m", "choices": [choice]})

    cache._store(b"small", query, answer(1000))
    cache._store(b"big", query, answer(MAX_ANSWER_BYTES))
    assert len(cache.store.candidates(b"small", 0.0)) == 1
    assert cache.store.candidates(b"big", 0.0) == []


def test_a_client_gone_during_the_lookup_is_not_forwarded_to_the_model(review: Review) -> None:
    """A client that leaves while its prompt is being embedded gets no answer: its prompt
    is not sent to the model after the lookup (as after content safety's check), which
    would spend the model's tokens on an answer no one reads."""
    sub, key = review.key("patient")
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}]}).encode()
    head = (
        f"POST /openai/deployments/{CHAT}/chat/completions?api-version=2024-10-21 "
        f"HTTP/1.1\r\nhost: 127.0.0.1\r\napi-key: {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    chats, embeds = review.calls(CHAT), review.calls("emb-slow")
    with socket.create_connection(("127.0.0.1", review.harness.gw.port), timeout=5) as client:
        client.sendall(head.encode() + body)
        time.sleep(0.3)  # the embeddings call is under way: the client leaves
    deadline = time.monotonic() + 5
    while review.calls("emb-slow") == embeds:  # the call ends (the simulator logs it)
        assert time.monotonic() < deadline, "the embeddings call never ended"
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while True:
        chat = [
            r
            for r in review.harness.records()
            if r.subscription_id == sub and r.operation == "chat/completions"
        ]
        if chat or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [(r.status, r.backend) for r in chat] == [(499, None)]
    assert review.calls(CHAT) == chats


def test_after_an_embeddings_call_timed_out_lookups_pause(review: Review) -> None:
    """An embeddings backend that hangs is never a failure its breaker hears of (the call is
    given up first, at ``timeout_seconds``): without a pause every request of the product
    would wait that long before it is routed. After a timeout the product's requests go
    straight on (``skip``, no embeddings call) for ``PAUSE_AFTER_TIMEOUT_SECONDS``."""
    _, key = review.key("hung")
    client = openai.AzureOpenAI(
        azure_endpoint=review.harness.url, api_key=key, api_version="2024-10-21", max_retries=0
    )
    first = ask(client)
    assert first.headers["x-sluicegate-cache"] == "skip"
    assert len(review.records(first.headers["x-sluicegate-request-id"], 2)) == 2
    started = time.monotonic()
    second = ask(client)
    took = time.monotonic() - started
    assert second.headers["x-sluicegate-cache"] == "skip"
    assert second.parse().choices[0].message.content
    second_id = second.headers["x-sluicegate-request-id"]
    deadline = time.monotonic() + 5
    while not any(r.request_id == second_id for r in review.records(second_id, 1)):
        assert time.monotonic() < deadline, "no record of the request"
        time.sleep(0.02)
    # An embeddings call's record is written before the request is routed: it would be here.
    assert [r.operation for r in review.records(second_id, 1)] == ["chat/completions"]
    assert took < 0.3


def test_concurrent_identical_misses_each_get_their_answer_and_the_next_one_hits(
    review: Review,
) -> None:
    """Not coalesced: each of the concurrent first askers is routed and gets its own answer
    (its own id); each stores it, and the store stays consistent: the next ask is a hit that
    answers one of them whole."""
    client = review.client("cached")
    question = "Which river runs through the city of Vienna?"
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: ask(client, question), range(6)))
    assert all(a.headers["x-sluicegate-cache"] in ("miss", "hit") for a in answers)
    bodies = {a.parse().id: a.parse().model_dump() for a in answers}
    hit = ask(client, question)
    assert hit.headers["x-sluicegate-cache"] == "hit"
    assert hit.parse().model_dump() == bodies[hit.parse().id]
