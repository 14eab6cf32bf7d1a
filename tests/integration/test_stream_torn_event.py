"""A stream that breaks off in the middle of an event ends with the ``StreamInterrupted``
error event the client can parse: the torn event is dropped, not sent in front of it (one
``data:`` line holding both is no JSON, and the openai SDK raised a JSON error instead of
the gateway's)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from tests.integration.conftest import gateway_over
from tests.integration.wire_backend import Request, WireBackend, chunk, content_event, head


async def _torn(request: Request, writer: asyncio.StreamWriter) -> bool:
    """Two content events, then half of a third, and the connection closes."""
    writer.write(head(content_type="text/event-stream"))
    for data in (content_event("one "), content_event("two ")):
        writer.write(chunk(data))
        await writer.drain()
        await asyncio.sleep(0.02)
    third = content_event("three")
    writer.write(chunk(third[: len(third) // 2]))
    await writer.drain()
    return False


def test_the_sdk_sees_stream_interrupted_after_an_event_torn_in_half(tmp_path: Path) -> None:
    backend = WireBackend(_torn)
    with backend.running(), gateway_over(tmp_path, backend.url) as harness:
        client = harness.sdk(harness.new_key().primary_key or "")
        stream = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        texts: list[str] = []

        def read() -> None:
            for part in stream:
                texts.extend(c.delta.content or "" for c in part.choices)

        with pytest.raises(openai.APIError) as broken:
            read()
        (record,) = harness.records(expect=1)
    assert broken.value.code == "StreamInterrupted"
    assert "partial" in broken.value.message
    assert texts == ["one ", "two "]
    assert (record.outcome, record.error_code) == ("backend_error", "StreamInterrupted")
    assert record.usage_estimated and record.completion_tokens > 0
