"""Streamed answers: Azure's exact chunk sequence, usage only on request, pacing."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest

from sluicegate.clock import FakeClock
from sluicegate.simulator import SimDeployment, start_simulator
from sluicegate.simulator.tokens import completion_text
from tests.simulator.conftest import API, KEY, chat_url, make_config, sse_events, sse_json

ASK = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5}


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_stream_sequence(client: httpx.AsyncClient, include_usage: bool) -> None:
    body = dict(ASK)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    resp = await client.post(chat_url("free"), json=body)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["x-request-id"]
    chunks = sse_json(resp.text)
    first, role, *tokens, finish = chunks[: 2 + 5 + 1]
    # 1. prompt filter results only, with empty id/model and no choices
    assert first["choices"] == []
    assert (first["id"], first["model"], first["object"], first["created"]) == ("", "", "", 0)
    assert first["prompt_filter_results"][0]["prompt_index"] == 0
    # 2. the role chunk
    assert role["choices"][0]["delta"] == {"content": "", "refusal": None, "role": "assistant"}
    assert role["object"] == "chat.completion.chunk"
    assert role["model"] == "gpt-4o-2024-08-06"
    assert role["id"].startswith("chatcmpl-")
    # 3. one chunk per token; concatenated they are the JSON answer's text
    assert [t["choices"][0]["delta"] for t in tokens] == [
        {"content": p} for p in ("The", " sluice", " gate", " opens", " and")
    ]
    assert "".join(t["choices"][0]["delta"]["content"] for t in tokens) == completion_text(5)
    assert all(t["choices"][0]["finish_reason"] is None for t in tokens)
    assert {t["id"] for t in [role, *tokens, finish]} == {role["id"]}
    # 4. the finish chunk ("length": max_tokens cut the answer)
    assert finish["choices"][0]["delta"] == {}
    assert finish["choices"][0]["finish_reason"] == "length"
    if include_usage:
        assert len(chunks) == 9
        usage_chunk = chunks[-1]
        assert usage_chunk["choices"] == []
        assert usage_chunk["id"] == role["id"]
        assert usage_chunk["usage"]["prompt_tokens"] == 4 + 1 + 3
        assert usage_chunk["usage"]["completion_tokens"] == 5
        assert usage_chunk["usage"]["total_tokens"] == 13
        assert all(c["usage"] is None for c in chunks[1:-1])
    else:
        assert len(chunks) == 8
        assert all("usage" not in c for c in chunks)


async def test_stream_finishes_with_stop_without_max_tokens(client: httpx.AsyncClient) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    chunks = sse_json((await client.post(chat_url("free"), json=body)).text)
    assert len(chunks) == 2 + 16 + 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_truth_log_for_streams(client: httpx.AsyncClient) -> None:
    await client.delete("/_sim/log")
    body = {**ASK, "stream_options": {"include_usage": True}}
    await client.post(chat_url("free"), json=body)
    (entry,) = (await client.get("/_sim/log")).json()
    assert entry["streamed"] is True
    assert entry["include_usage"] is True
    assert entry["stream_options"] == {"include_usage": True}
    assert (entry["completion_tokens"], entry["tokens_sent"]) == (5, 5)
    assert entry["client_gone"] is False


async def test_legacy_completions_stream(client: httpx.AsyncClient) -> None:
    body = {
        "prompt": "a b",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp = await client.post(f"/openai/deployments/free/completions?{API}", json=body)
    chunks = sse_json(resp.text)
    assert chunks[0]["choices"] == []
    assert "".join(c["choices"][0]["text"] for c in chunks[1:4]) == completion_text(3)
    assert chunks[4]["choices"][0]["finish_reason"] == "length"
    assert chunks[5]["usage"]["total_tokens"] == 5


async def test_responses_stream_events(client: httpx.AsyncClient) -> None:
    body = {"model": "free", "input": "hi", "stream": True}
    resp = await client.post("/openai/v1/responses", json=body)
    assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = [orjson.loads(e) for e in sse_events(resp.text)]
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[4:20] == ["response.output_text.delta"] * 16
    assert kinds[20:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "".join(e["delta"] for e in events[4:20]) == completion_text(16)
    assert events[-1]["response"]["usage"]["output_tokens"] == 16
    assert "[DONE]" not in resp.text


async def test_stream_is_paced_and_flushed_per_token() -> None:
    paced = SimDeployment(name="paced", model="m", ttft_ms=150, tokens_per_second=40)
    handle = await start_simulator(make_config(deployments=[paced]), clock=FakeClock())
    try:
        arrivals: list[tuple[float, bytes]] = []
        async with httpx.AsyncClient(base_url=handle.url, headers={"api-key": KEY}) as c:
            start = time.monotonic()
            body = {**ASK, "max_tokens": 8}
            async with c.stream("POST", chat_url("paced"), json=body) as resp:
                async for raw in resp.aiter_raw():
                    arrivals.append((time.monotonic() - start, raw))
        first_token = next(t for t, raw in arrivals if b'"content":"The"' in raw)
        assert first_token >= 0.14  # time to first token
        # 8 tokens at 40/s: the last one is due 7/40 s after the first.
        assert arrivals[-1][0] - first_token >= 0.15
        assert len(arrivals) >= 5  # written as produced, not in one piece
        assert b"".join(raw for _, raw in arrivals).endswith(b"data: [DONE]\n\n")
    finally:
        await handle.close()
