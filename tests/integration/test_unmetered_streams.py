"""Only metered streams are counted. A background Responses stream is resumed with
``GET /openai/v1/responses/{id}?stream=true``, a passthrough path, and Azure replays the
``response.completed`` event with the usage its first request was charged for: the resumed
stream's record must not count it again (charge-back would bill it twice), nor estimate
one when such a stream breaks off. The openai SDK resumes the stream as an application would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.conftest import Harness
from tests.integration.wire_backend import Request, WireBackend, chunk, event, head
from tests.support.gateway import GatewayThread, gateway_config

_USAGE = {"input_tokens": 1000, "output_tokens": 500, "total_tokens": 1500}


def _response(status: str, usage: dict[str, int] | None) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": "gpt-4o",
        "status": status,
        "output": [],
        "usage": usage,
    }


_EVENTS = [
    event(
        {"type": "response.created", "sequence_number": 0, "response": _response("queued", None)},
        "response.created",
    ),
    event(
        {
            "type": "response.output_text.delta",
            "sequence_number": 1,
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": "hello " * 20,
        },
        "response.output_text.delta",
    ),
    event(
        {
            "type": "response.completed",
            "sequence_number": 2,
            "response": _response("completed", _USAGE),
        },
        "response.completed",
    ),
]


async def _responses(request: Request, writer: asyncio.StreamWriter) -> bool:
    """The Responses stream, event by event; for ``resp_torn`` only its first two events and
    half of the last, then the connection closes."""
    writer.write(head(content_type="text/event-stream"))
    torn = "resp_torn" in request.target
    for data in _EVENTS[:2] if torn else _EVENTS:
        writer.write(chunk(data))
        await writer.drain()
        await asyncio.sleep(0.02)
    if torn:
        writer.write(chunk(_EVENTS[2][: len(_EVENTS[2]) // 2]))
        await writer.drain()
        return False
    writer.write(chunk(b""))
    await writer.drain()
    return True


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/openai/v1", api_key=key, max_retries=0)


def test_a_resumed_responses_stream_is_not_counted_again(tmp_path: Path) -> None:
    backend = WireBackend(_responses)
    with backend.running():
        gw = GatewayThread(gateway_config(tmp_path, {"b": backend.url})).start()
        try:
            harness = Harness(gw, None)  # type: ignore[arg-type]  # no simulator here
            client = _client(gw.url, harness.new_key().primary_key or "")
            created = client.responses.create(
                model="gpt-4o", input="hi", stream=True, background=True
            )
            assert [e.type for e in created][-1] == "response.completed"
            resumed = list(client.responses.retrieve("resp_1", stream=True))
            assert resumed[-1].type == "response.completed"
            assert resumed[-1].response.usage is not None  # the replayed usage reached it
            first, again = sorted(harness.records(expect=2), key=lambda r: r.ts)
            assert (first.operation, first.prompt_tokens, first.completion_tokens) == (
                "responses",
                1000,
                500,
            )
            assert (again.operation, again.outcome) == ("passthrough", "ok")
            assert (again.total_tokens, again.usage_estimated) == (0, False)
            # Broken off, it is not estimated either.
            with pytest.raises(openai.APIError) as broken:
                list(client.responses.retrieve("resp_torn", stream=True))
            assert broken.value.code == "StreamInterrupted"
            torn = sorted(harness.records(expect=3), key=lambda r: r.ts)[-1]
        finally:
            gw.stop()
    assert (torn.operation, torn.error_code) == ("passthrough", "StreamInterrupted")
    assert (torn.total_tokens, torn.usage_estimated) == (0, False)
