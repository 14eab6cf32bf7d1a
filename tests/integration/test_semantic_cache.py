"""The semantic cache (APIM's ``azure-openai-semantic-cache-lookup`` / ``-store``): the real
``openai`` SDK through a real gateway in front of the Azure OpenAI simulator, whose embeddings
are a hashed bag of words (wordings sharing most words are near, unrelated texts far).

One gateway serves the module; every test works with subscriptions of its own, so the
partitions (one per subscription by default) keep the tests apart. Its clock is real time
plus an offset a test may move (expiry)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.cache.semantic import dialog_text, partition_key, storable_model
from sluicegate.config.loader import ConfigError, parse_config
from sluicegate.simulator.config import SimDeployment
from sluicegate.simulator.content_safety import ContentSafetySimConfig, ContentSafetyThread
from sluicegate.simulator.server import SimulatorThread
from tests.integration.conftest import Harness, OffsetClock, sim_config
from tests.support.gateway import GatewayThread, free_port, gateway_config

CHAT = "gpt-4o-mini"
EMBEDDINGS = "text-embedding-3-small"
QUESTION = "What is the capital of France?"
#: Distance from QUESTION (with the role prefix) in the simulator's embeddings: ~0.07.
REWORDED = "What is the capital city of France?"
UNRELATED = "How do I bake sourdough bread at home?"


class ShiftedClock(OffsetClock):
    """``OffsetClock`` whose monotonic reading moves with the offset too (cache expiry is
    measured on it)."""

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


def _cache(**policy: Any) -> dict[str, Any]:
    return {"embeddings_deployment": EMBEDDINGS, **policy}


PRODUCTS: list[dict[str, Any]] = [
    {
        "name": "cached",
        "semantic_cache": _cache(score_threshold=0.15),
        # Nothing reserved at admission: the counters hold exactly what was settled.
        "limits": {
            "tokens_per_minute": 10_000_000,
            "estimate_prompt_tokens": False,
            "remaining_tokens_header": "x-remaining",
        },
    },
    {"name": "strict", "semantic_cache": _cache()},  # the default threshold, 0.05
    {"name": "shared", "semantic_cache": _cache(score_threshold=0.15, vary_by="product")},
    {"name": "down", "semantic_cache": _cache(embeddings_deployment="emb-down")},
    {
        "name": "slow",
        "semantic_cache": _cache(embeddings_deployment="emb-slow", timeout_seconds=0.3),
    },
    {"name": "plain"},
    {
        "name": "guarded",
        "semantic_cache": _cache(score_threshold=0.15),
        "content_safety": {"service": "cs", "categories": {"Hate": 4}},
    },
]
CS_KEY = "content-safety-key-0123456789abcdef"


@dataclass
class Cached:
    harness: Harness
    clock: ShiftedClock

    def client(self, product: str) -> openai.AzureOpenAI:
        return self.harness.sdk(self.harness.new_key(product=product).primary_key or "")

    def calls(self, deployment: str) -> int:
        """Requests the simulator served for ``deployment``."""
        return sum(1 for e in self.harness.sim_log() if e.get("deployment") == deployment)

    def records(self, request_id: str) -> list[UsageRecord]:
        """The ledger's records of ``request_id`` and of the embeddings calls made for it."""
        deadline = time.monotonic() + 5
        while True:
            rows = self.harness.records()
            found = [
                r
                for r in rows
                if r.request_id == request_id or r.extra.get("for_request") == request_id
            ]
            if any(r.request_id == request_id for r in found) or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def lookups(self, product: str, result: str) -> float:
        registry = self.harness.gw.gateway.metrics.registry
        labels = {"product": product, "result": result}
        return registry.get_sample_value("sluicegate_semantic_cache_lookups_total", labels) or 0.0


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cached]:
    tmp = tmp_path_factory.mktemp("semantic-cache")
    slow = SimDeployment(name="emb-slow", model=EMBEDDINGS, kind="embeddings", ttft_ms=3000)
    sim = SimulatorThread(sim_config(deployments=[*sim_config().deployments, slow])).start()
    safety = ContentSafetyThread(
        ContentSafetySimConfig(api_keys=[CS_KEY], words={"grimhate": {"Hate": 6}})
    ).start()
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = gateway_config(
        tmp,
        {"sim": sim.url, "dead": down},
        deployments=[
            {"name": CHAT, "backend": "sim", "model": CHAT},
            {"name": EMBEDDINGS, "backend": "sim", "model": EMBEDDINGS},
            {"name": "emb-down", "backend": "dead", "model": EMBEDDINGS},
            {"name": "emb-slow", "backend": "sim", "model": EMBEDDINGS},
        ],
        products=PRODUCTS,
        content_safety=[
            {"name": "cs", "url": safety.url, "auth": {"type": "api-key", "key_env": "SG_CS"}}
        ],
    )
    clock = ShiftedClock()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SG_CS", CS_KEY)
        gw = GatewayThread(config, clock=clock).start()  # the key is read here
    try:
        yield Cached(Harness(gw, sim), clock)
    finally:
        gw.stop()
        sim.stop()
        safety.stop()


def ask(client: openai.AzureOpenAI, content: str, **more: Any) -> Any:
    """A chat completion's raw response (headers and the parsed answer)."""
    return client.chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": content}], **more
    )


# -- hits and misses ------------------------------------------------------------------------------


def test_a_repeated_question_is_answered_from_the_cache(cached: Cached) -> None:
    client = cached.client("cached")
    chats, embeds = cached.calls(CHAT), cached.calls(EMBEDDINGS)
    hits, misses = cached.lookups("cached", "hit"), cached.lookups("cached", "miss")
    first = ask(client, QUESTION)
    assert first.headers["x-sluicegate-cache"] == "miss"
    assert (cached.calls(CHAT), cached.calls(EMBEDDINGS)) == (chats + 1, embeds + 1)
    second = ask(client, QUESTION)
    assert second.headers["x-sluicegate-cache"] == "hit"
    assert cached.calls(CHAT) == chats + 1  # the backend did not see it
    assert cached.calls(EMBEDDINGS) == embeds + 2
    answer = second.parse()  # a valid chat.completion for the SDK: the stored one
    assert answer.object == "chat.completion"
    assert answer.model_dump() == first.parse().model_dump()
    assert second.headers["content-type"] == "application/json"
    assert (cached.lookups("cached", "hit"), cached.lookups("cached", "miss")) == (
        hits + 1,
        misses + 1,
    )
    # The ledger: the hit with no tokens and no backend, and each request's embeddings call.
    hit_id = second.headers["x-sluicegate-request-id"]
    records = cached.records(hit_id)
    hit = next(r for r in records if r.request_id == hit_id)
    assert (hit.status, hit.outcome, hit.operation, hit.deployment, hit.backend) == (
        200,
        Outcome.OK,
        "chat/completions",
        CHAT,
        None,
    )
    assert (hit.prompt_tokens, hit.completion_tokens, hit.total_tokens) == (0, 0, 0)
    assert hit.extra == {"semantic_cache": "hit"}
    (embedding,) = [r for r in records if r.request_id != hit_id]
    assert (embedding.operation, embedding.deployment, embedding.backend) == (
        "embeddings",
        EMBEDDINGS,
        "sim",
    )
    assert (embedding.status, embedding.outcome) == (200, Outcome.OK)
    assert embedding.prompt_tokens > 0 and embedding.completion_tokens == 0
    assert embedding.subscription_id == hit.subscription_id
    assert embedding.product == "cached"
    assert embedding.extra["semantic_cache"] == "embedding"
    miss_records = cached.records(first.headers["x-sluicegate-request-id"])
    assert len(miss_records) == 2  # the answer and its embeddings call


def test_a_reworded_question_hits_at_a_loose_threshold_and_misses_at_a_strict_one(
    cached: Cached,
) -> None:
    for product, expected in (("cached", "hit"), ("strict", "miss")):
        client = cached.client(product)
        assert ask(client, QUESTION).headers["x-sluicegate-cache"] == "miss"
        chats = cached.calls(CHAT)
        assert ask(client, REWORDED).headers["x-sluicegate-cache"] == expected, product
        assert cached.calls(CHAT) == chats + (expected == "miss")


def test_an_unrelated_question_misses(cached: Cached) -> None:
    client = cached.client("cached")
    ask(client, QUESTION)
    chats = cached.calls(CHAT)
    assert ask(client, UNRELATED).headers["x-sluicegate-cache"] == "miss"
    assert cached.calls(CHAT) == chats + 1


def test_subscriptions_do_not_share_answers_unless_vary_by_is_product(cached: Cached) -> None:
    one, other = cached.client("cached"), cached.client("cached")
    ask(one, QUESTION)
    assert ask(other, QUESTION).headers["x-sluicegate-cache"] == "miss"
    one, other = cached.client("shared"), cached.client("shared")
    ask(one, UNRELATED)
    assert ask(other, UNRELATED).headers["x-sluicegate-cache"] == "hit"
    # Never across products: "shared" stored this answer, "cached" has never seen it.
    assert ask(cached.client("cached"), UNRELATED).headers["x-sluicegate-cache"] == "miss"


@pytest.mark.parametrize(
    "changed",
    [
        {"temperature": 0.2},
        {"max_tokens": 4096},
        {"seed": 42},
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "capital", "parameters": {"type": "object"}},
                }
            ]
        },
    ],
    ids=["temperature", "max_tokens", "seed", "tools"],
)
def test_parameters_that_change_the_answer_partition_the_cache(
    cached: Cached, changed: dict[str, Any]
) -> None:
    client = cached.client("cached")
    ask(client, QUESTION, temperature=0.7)
    chats = cached.calls(CHAT)
    assert ask(client, QUESTION, **{"temperature": 0.7, **changed}).headers[
        "x-sluicegate-cache"
    ] == ("miss")
    assert cached.calls(CHAT) == chats + 1
    # The same parameters again: a hit.
    assert ask(client, QUESTION, **{"temperature": 0.7, **changed}).headers[
        "x-sluicegate-cache"
    ] == ("hit")


def test_a_stored_answer_expires_after_ttl_seconds(cached: Cached) -> None:
    client = cached.client("cached")
    ask(client, QUESTION)
    cached.clock.offset += 119  # ttl_seconds: 120 (the default)
    assert ask(client, QUESTION).headers["x-sluicegate-cache"] == "hit"
    cached.clock.offset += 2
    chats = cached.calls(CHAT)
    assert ask(client, QUESTION).headers["x-sluicegate-cache"] == "miss"
    assert cached.calls(CHAT) == chats + 1
    assert ask(client, QUESTION).headers["x-sluicegate-cache"] == "hit"  # stored again


def test_streams_are_neither_looked_up_nor_stored(cached: Cached) -> None:
    client = cached.client("cached")
    ask(client, QUESTION)
    embeds, chats = cached.calls(EMBEDDINGS), cached.calls(CHAT)
    with client.chat.completions.with_streaming_response.create(
        model=CHAT, messages=[{"role": "user", "content": QUESTION}], stream=True
    ) as streamed:
        assert streamed.headers["x-sluicegate-cache"] == "skip"
        assert list(streamed.iter_lines())
    assert (cached.calls(EMBEDDINGS), cached.calls(CHAT)) == (embeds, chats + 1)


def test_a_dialog_over_max_message_count_is_not_looked_up(cached: Cached) -> None:
    client = cached.client("cached")
    embeds = cached.calls(EMBEDDINGS)
    system = {"role": "system", "content": "Be brief."}  # not counted: ignored
    turns: list[Any] = [system] + [{"role": "user", "content": f"Q{i}"} for i in range(10)]
    answer = client.chat.completions.with_raw_response.create(model=CHAT, messages=turns)
    assert answer.headers["x-sluicegate-cache"] == "miss"  # 10 messages: the limit
    turns.append({"role": "user", "content": "Q10"})
    answer = client.chat.completions.with_raw_response.create(model=CHAT, messages=turns)
    assert answer.headers["x-sluicegate-cache"] == "skip"
    assert cached.calls(EMBEDDINGS) == embeds + 1


def test_an_answer_cut_by_length_is_not_stored(cached: Cached) -> None:
    client = cached.client("cached")
    first = ask(client, UNRELATED, max_tokens=3)
    assert first.parse().choices[0].finish_reason == "length"
    assert ask(client, UNRELATED, max_tokens=3).headers["x-sluicegate-cache"] == "miss"


def test_content_safety_checks_the_prompt_before_the_cache_is_asked(cached: Cached) -> None:
    client = cached.client("guarded")
    embeds = cached.calls(EMBEDDINGS)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        ask(client, "a grimhate question")
    assert refused.value.code == "content_filter"
    assert cached.calls(EMBEDDINGS) == embeds  # refused before any lookup
    ask(client, QUESTION)
    assert ask(client, QUESTION).headers["x-sluicegate-cache"] == "hit"  # a clean prompt


# -- failure and cost -----------------------------------------------------------------------------


def test_a_failing_embeddings_backend_fails_open(cached: Cached) -> None:
    client = cached.client("down")
    errors = cached.lookups("down", "error")
    chats = cached.calls(CHAT)
    answer = ask(client, QUESTION)
    assert answer.parse().choices[0].message.content
    assert answer.headers["x-sluicegate-cache"] == "skip"
    assert cached.calls(CHAT) == chats + 1
    assert cached.lookups("down", "error") == errors + 1
    records = cached.records(answer.headers["x-sluicegate-request-id"])
    failed = [r for r in records if r.operation == "embeddings"]
    assert failed and all(r.outcome is Outcome.BACKEND_ERROR for r in failed)
    assert all(r.deployment == "emb-down" and r.total_tokens == 0 for r in failed)


def test_a_slow_embeddings_call_is_given_up_after_timeout_seconds(cached: Cached) -> None:
    client = cached.client("slow")
    errors = cached.lookups("slow", "error")
    started = time.monotonic()
    answer = ask(client, QUESTION)
    assert time.monotonic() - started < 2.0  # not the 3 s the embeddings take
    assert answer.headers["x-sluicegate-cache"] == "skip"
    assert answer.parse().choices[0].message.content
    assert cached.lookups("slow", "error") == errors + 1
    records = cached.records(answer.headers["x-sluicegate-request-id"])
    (call,) = [r for r in records if r.operation == "embeddings"]
    assert (call.deployment, call.status, call.outcome, call.error_code) == (
        "emb-slow",
        504,
        Outcome.BACKEND_ERROR,
        "EmbeddingsTimeout",
    )


def test_a_product_without_a_cache_never_calls_embeddings(cached: Cached) -> None:
    client = cached.client("plain")
    embeds, chats = cached.calls(EMBEDDINGS), cached.calls(CHAT)
    for _ in range(2):
        assert "x-sluicegate-cache" not in ask(client, QUESTION).headers
    assert (cached.calls(EMBEDDINGS), cached.calls(CHAT)) == (embeds, chats + 2)


def test_the_limits_charge_the_embeddings_tokens_and_nothing_for_a_hit(cached: Cached) -> None:
    client = cached.client("cached")
    first = ask(client, QUESTION)  # a miss: its answer and its embeddings call
    second = ask(client, QUESTION)  # a hit: its embeddings call only
    third = ask(client, UNRELATED)  # admitted after both settled: reads the counter
    assert second.headers["x-sluicegate-cache"] == "hit"
    charged = 10_000_000 - int(third.headers["x-remaining"])
    records = cached.records(first.headers["x-sluicegate-request-id"]) + cached.records(
        second.headers["x-sluicegate-request-id"]
    )
    assert len(records) == 4
    assert charged == sum(r.total_tokens for r in records)
    assert sum(r.total_tokens for r in records if r.operation == "embeddings") > 0


# -- configuration and pure parts -----------------------------------------------------------------


def _config(tmp: Path, **policy: Any) -> dict[str, Any]:
    return gateway_config(
        tmp,
        {"b": "http://127.0.0.1:1"},
        products=[{"name": "p", "semantic_cache": {"embeddings_deployment": EMBEDDINGS, **policy}}],
    )


def test_the_configuration_is_checked_at_load(tmp_path: Path) -> None:
    parse_config(_config(tmp_path))  # the defaults, with a known deployment
    with pytest.raises(ConfigError, match="unknown deployment 'nope'"):
        parse_config(_config(tmp_path, embeddings_deployment="nope"))
    with pytest.raises(ConfigError, match="'caller' needs an oidc section"):
        parse_config(_config(tmp_path, vary_by="caller"))
    with pytest.raises(ConfigError, match="score_threshold"):
        parse_config(_config(tmp_path, score_threshold=1.5))


def test_the_dialog_text_is_canonical_and_only_text() -> None:
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "What  is\nthe capital?"}
    assert dialog_text([system, user], True) == "user: What is the capital?"
    assert dialog_text([system, user], False) == "system: Be brief.\nuser: What is the capital?"
    parts = {"role": "user", "content": [{"type": "text", "text": "What is the capital?"}]}
    assert dialog_text([parts], True) == "user: What is the capital?"
    # Limits: messages counted without the system ones; characters as sent.
    assert dialog_text([system, user, user], True, max_messages=2) is not None
    assert dialog_text([system, user, user, user], True, max_messages=2) is None
    assert dialog_text([user], True, max_chars=26) == "user: What is the capital?"  # 26
    assert dialog_text([user], True, max_chars=25) is None
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    assert dialog_text([{"role": "user", "content": [image]}], True) is None
    assert dialog_text([system], True) is None  # nothing left to compare
    assert dialog_text("not a list", True) is None


def test_the_partition_ignores_only_bookkeeping() -> None:
    base = {"messages": [], "temperature": 1, "stream": False, "user": "u1"}
    key = partition_key("p", "sub", CHAT, base)
    assert key == partition_key("p", "sub", CHAT, {**base, "user": "u2", "messages": [1]})
    assert key != partition_key("p", "sub", CHAT, {**base, "temperature": 0})
    assert key != partition_key("p", "other", CHAT, base)
    assert key != partition_key("q", "sub", CHAT, base)
    assert key != partition_key("p", "sub", "gpt-4o", base)


def test_only_whole_text_answers_are_stored() -> None:
    def answer(finish: str, **message: Any) -> bytes:
        body = {
            "object": "chat.completion",
            "model": "m",
            "choices": [{"finish_reason": finish, "message": {"content": "hi", **message}}],
        }
        return orjson.dumps(body)

    assert storable_model(answer("stop")) == (True, "m")
    assert storable_model(answer("length"))[0] is False
    assert storable_model(answer("content_filter"))[0] is False
    assert storable_model(answer("stop", tool_calls=[{"id": "c"}]))[0] is False
    assert storable_model(b"not json")[0] is False
