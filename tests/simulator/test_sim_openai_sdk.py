"""The official ``openai`` package (3.x) against the simulator, both client styles."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import AzureOpenAI, OpenAI
from openai.types.chat import ChatCompletionMessageParam

from sluicegate.simulator.server import SimulatorThread
from sluicegate.simulator.tokens import completion_text, embedding_vector
from tests.simulator.conftest import KEY

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "count to three"}
]  # 4 + 3 + 3 = 10 prompt tokens


def azure(sim: SimulatorThread, max_retries: int = 2) -> AzureOpenAI:
    return AzureOpenAI(
        azure_endpoint=sim.url, api_key=KEY, api_version="2024-10-21", max_retries=max_retries
    )


def test_azure_client_chat(sim_thread: SimulatorThread) -> None:
    with azure(sim_thread) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="free",
            messages=MESSAGES,
            max_tokens=6,
        )
        result = raw.parse()
    assert raw.headers["x-ms-deployment-name"] == "free"
    assert result.choices[0].message.content == completion_text(6)
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (10, 6)
    assert result.usage.completion_tokens_details is not None
    assert result.usage.completion_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize("include_usage", [False, True])
def test_azure_client_stream(sim_thread: SimulatorThread, include_usage: bool) -> None:
    with azure(sim_thread) as client:
        stream = client.chat.completions.create(
            model="free",
            messages=MESSAGES,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True} if include_usage else openai.omit,
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion_text(4)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    usages = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usages) == 1
        assert usages[0].total_tokens == 14
    else:
        assert usages == []


def test_azure_client_embeddings(sim_thread: SimulatorThread) -> None:
    with azure(sim_thread) as client:
        # The SDK asks for base64 by default and decodes it back into floats.
        result = client.embeddings.create(model="embed", input=["hello world", "bye"])
    assert len(result.data) == 2
    assert result.data[0].embedding == pytest.approx(
        list(embedding_vector("hello world", 64)), abs=1e-6
    )
    assert result.usage.prompt_tokens == 3


def test_azure_client_errors_map_to_sdk_exceptions(sim_thread: SimulatorThread) -> None:
    with azure(sim_thread, max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="nope", messages=MESSAGES)
        assert missing.value.code == "DeploymentNotFound"
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(
                model="free",
                messages=MESSAGES,
                extra_headers={"x-sim-fault": "429:3"},
            )
        assert limited.value.response.headers["retry-after-ms"] == "3000"
        assert limited.value.request_id == limited.value.response.headers["x-request-id"]
    bad = AzureOpenAI(azure_endpoint=sim_thread.url, api_key="wrong", api_version="2024-10-21")
    with bad, pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="free", messages=MESSAGES)


def test_sdk_retries_a_forced_500_and_the_log_shows_each_attempt(
    sim_thread: SimulatorThread,
) -> None:
    httpx.delete(f"{sim_thread.url}/_sim/log")
    with azure(sim_thread, max_retries=1) as client, pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="free",
            messages=MESSAGES,
            extra_headers={"x-sim-fault": "500"},
        )
    log = httpx.get(f"{sim_thread.url}/_sim/log").json()
    assert [e["headers"]["x-stainless-retry-count"] for e in log] == ["0", "1"]
    assert all(e["api_key_present"] for e in log)


def test_v1_openai_client(sim_thread: SimulatorThread) -> None:
    with OpenAI(base_url=sim_thread.url + "/openai/v1", api_key=KEY) as client:
        chat = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=3)
        assert chat.choices[0].message.content == completion_text(3)
        stream = client.chat.completions.create(
            model="chat",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [c.usage for c in stream if c.usage is not None]
        assert usage[0].completion_tokens == 16
        emb = client.embeddings.create(model="embed", input="a b", dimensions=8)
        assert len(emb.data[0].embedding) == 8
        response = client.responses.create(model="free", input="hello", max_output_tokens=5)
        assert response.output_text == completion_text(5)
        assert response.usage is not None
        assert response.usage.output_tokens == 5
        events = list(client.responses.create(model="free", input="hello", stream=True))
        assert events[-1].type == "response.completed"
        assert [m.id for m in client.models.list()] == ["chat", "free", "embed"]
    log = httpx.get(f"{sim_thread.url}/_sim/log").json()
    assert all(e["authorization_present"] and not e["api_key_present"] for e in log)
