"""The official openai SDK, unchanged but for endpoint and key, through the gateway."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.conftest import Harness

API_VERSION = "2024-10-21"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me about the sluice gates of the Netherlands"}
]


def azure(h: Harness, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=h.url, api_key=key, api_version=API_VERSION, max_retries=0
    )


def v1(h: Harness, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{h.url}/openai/v1", api_key=key, max_retries=0)


def test_streaming_on_an_api_version_without_stream_options(harness: Harness) -> None:
    """API versions before 2024-08-01 refuse ``stream_options`` (400, "Unrecognized request
    argument"): the gateway does not add it there, the stream goes through, and its usage,
    which such a backend cannot report, is estimated."""
    key = harness.new_key().primary_key
    assert key
    client = openai.AzureOpenAI(
        azure_endpoint=harness.url, api_key=key, api_version="2024-06-01", max_retries=0
    )
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=5, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 5
    assert [c for c in chunks if c.usage is not None] == []
    (record,) = harness.records(expect=1)
    assert (record.outcome, record.streamed, record.usage_estimated) == ("ok", True, True)
    assert record.prompt_tokens > 0 and 4 <= record.completion_tokens <= 8
    with pytest.raises(openai.BadRequestError, match="stream_options"):  # the backend's rule
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )


def test_chat_with_both_clients(harness: Harness) -> None:
    key = harness.new_key().primary_key
    assert key
    for client in (azure(harness, key), v1(harness, key)):
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=7)
        assert reply.choices[0].message.content
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 7
    records = harness.records(expect=2)
    assert len(records) == 2
    assert all(r.outcome == "ok" and r.completion_tokens == 7 and not r.streamed for r in records)
    assert {r.subscription_id for r in records} == {harness.admin.list()[0][0].id}


@pytest.mark.parametrize("include_usage", [False, True])
def test_streaming_with_and_without_include_usage(harness: Harness, include_usage: bool) -> None:
    key = harness.new_key().primary_key
    assert key
    for client in (azure(harness, key), v1(harness, key)):
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            max_tokens=5,
            stream=True,
            # omit: the SDK's default, the field is not sent at all
            stream_options={"include_usage": True} if include_usage else openai.omit,
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(text.split()) == 5
        usage_chunks = [c for c in chunks if c.usage is not None]
        if include_usage:
            assert len(usage_chunks) == 1
            assert usage_chunks[0].usage is not None
            assert usage_chunks[0].usage.completion_tokens == 5
        else:
            assert usage_chunks == []  # the gateway's own usage request stays hidden
    records = harness.records(expect=2)
    assert len(records) == 2
    for r in records:
        assert r.streamed
        assert r.completion_tokens == 5
        assert r.prompt_tokens > 0
        assert not r.usage_estimated
    # The backend was always asked for usage, whatever the client said.
    upstream = [e for e in harness.sim_log() if e.get("streamed")]
    assert upstream
    assert all(e.get("include_usage") for e in upstream)


def test_embeddings_and_models(harness: Harness) -> None:
    key = harness.new_key(product="embeddings-only").primary_key
    assert key
    for client in (azure(harness, key), v1(harness, key)):
        result = client.embeddings.create(
            model="text-embedding-3-small", input=["one two three", "four"]
        )
        assert len(result.data) == 2
        assert result.usage.prompt_tokens > 0
    models = [m.id for m in v1(harness, key).models.list()]
    assert models == ["text-embedding-3-small"]
    with pytest.raises(openai.PermissionDeniedError):
        azure(harness, key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    records = harness.records(expect=4)  # two embeddings, one listing, one refusal
    ok = [r for r in records if r.outcome == "ok" and r.operation == "embeddings"]
    assert len(ok) == 2
    assert all(r.total_tokens == r.prompt_tokens > 0 for r in ok)
    assert [r.operation for r in records if r.outcome == "ok"].count("models") == 1
    refused = [r for r in records if r.outcome == "rejected"]
    assert [r.status for r in refused] == [403]


def test_a_responses_stream_cut_at_max_output_tokens_ends_cleanly(harness: Harness) -> None:
    """The simulator ends a Responses stream cut at ``max_output_tokens`` with
    ``response.incomplete``: the answer is whole as asked for, so the SDK reads it to its
    end, no ``StreamInterrupted`` follows it, and the record holds the backend's usage."""
    key = harness.new_key().primary_key
    assert key
    body = {"model": "gpt-4o-mini", "input": "Tell me about sluices", "max_output_tokens": 6}
    stream = v1(harness, key).responses.create(
        model="gpt-4o-mini", input="Tell me about sluices", max_output_tokens=6, stream=True
    )
    events = list(stream)  # the SDK raises APIError on an error event
    assert events[-1].type == "response.incomplete"
    usage = events[-1].response.usage
    assert usage is not None and usage.output_tokens == 6
    # The same request read raw: the stream's last bytes are the backend's last event.
    raw = httpx.post(
        f"{harness.url}/openai/v1/responses",
        json={**body, "stream": True},
        headers={"api-key": key},
        timeout=30,
    )
    assert raw.status_code == 200
    assert b"StreamInterrupted" not in raw.content
    last = raw.content.rstrip(b"\n").rpartition(b"\n\n")[2]
    assert last.startswith(b"event: response.incomplete\n")
    records = harness.records(expect=2)
    assert len(records) == 2
    for record in records:
        assert record.streamed and record.operation == "responses"
        assert record.outcome == "ok" and record.error_code is None
        assert not record.usage_estimated
        assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (
            usage.input_tokens,
            6,
            usage.total_tokens,
        )
