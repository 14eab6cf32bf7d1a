"""A stream whose body ends cleanly (its terminal chunk came) right after ``data: [DONE]``,
without the blank line that ends an SSE event, is whole: ``[DONE]`` has no other reading.
The client gets ``data: [DONE]`` with its blank line and the stream ends normally; the
record is ``ok`` with the backend's usage, not ``StreamInterrupted``."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import gateway_over
from tests.integration.wire_backend import Request, WireBackend, chunk, content_event, event, head

_USAGE = event(
    {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o",
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }
)


def _backend(tail: bytes, release: threading.Event | None) -> WireBackend:
    """Two content events and the usage chunk, then ``tail`` and the terminal chunk. With
    ``release``, the first event goes alone and the rest waits for it (the stream is relayed
    as it arrives); without, the whole answer is written at once."""

    async def answer(request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(head(content_type="text/event-stream"))
        first, rest = content_event("one "), content_event("two ") + _USAGE
        if release is not None:
            writer.write(chunk(first))
            await writer.drain()
            deadline = time.monotonic() + 10
            while not release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        else:
            rest = first + rest
        writer.write(chunk(rest) + chunk(tail) + chunk(b""))
        await writer.drain()

    return WireBackend(answer)


@pytest.mark.parametrize(
    ("tail", "held"),
    [
        (b"data: [DONE]", True),
        (b"data: [DONE]\n", True),
        (b"data: [DONE]\r\n", True),
        (b"data: [DONE] \t\r\n", True),
        (b"data: [DONE]", False),
    ],
)
def test_a_stream_ending_in_done_without_its_blank_line_is_whole(
    tmp_path: Path, tail: bytes, held: bool
) -> None:
    release = threading.Event() if held else None
    backend = _backend(tail, release)
    with backend.running(), gateway_over(tmp_path, backend.url) as harness:
        client = harness.sdk(harness.new_key().primary_key or "")
        texts: list[str] = []
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        ) as response:
            lines = []
            for line in response.iter_lines():
                if release is not None:
                    release.set()  # the first event is in: the backend sends the rest
                lines.append(line)
        (record,) = harness.records(expect=1)
        stream = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        for part in stream:  # the SDK's own reading ends without an error
            if release is not None:
                release.set()
            texts.extend(c.delta.content or "" for c in part.choices)
    assert lines[-2:] == ["data: [DONE]", ""]
    assert not any("StreamInterrupted" in line for line in lines)
    assert "".join(texts) == "one two "
    assert (record.outcome, record.error_code, record.streamed) == ("ok", None, True)
    assert (record.prompt_tokens, record.completion_tokens) == (9, 2)
    assert not record.usage_estimated
