"""Streaming is really streamed, and a client that hangs up still gets its usage written."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson

from sluicegate.accounting.records import UsageRecord
from tests.integration.conftest import Harness
from tests.support.gateway import GatewayThread, free_port, gateway_config


def test_first_event_arrives_long_before_the_last_is_sent(slow_harness: Harness) -> None:
    key = slow_harness.new_key().primary_key
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True}
    url = (
        f"{slow_harness.url}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    )
    started = time.monotonic()
    arrivals: list[float] = []
    with httpx.stream("POST", url, json=body, headers={"api-key": key or ""}, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["transfer-encoding"] == "chunked"  # relayed as it comes
        assert "content-length" not in resp.headers
        for line in resp.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - started)
    # 40 tokens at 20/s take two seconds to generate: the first event must be here long before.
    assert arrivals[0] < 0.8
    assert arrivals[-1] > 1.5
    assert len(arrivals) >= 40


def test_client_disconnect_mid_stream_is_recorded_as_aborted(slow_harness: Harness) -> None:
    key = slow_harness.new_key().primary_key
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True}
    url = (
        f"{slow_harness.url}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    )
    seen = 0
    with httpx.stream("POST", url, json=body, headers={"api-key": key or ""}, timeout=30) as resp:
        for line in resp.iter_lines():
            if '"content"' in line:
                seen += 1
            if seen >= 10:
                break  # hang up after ten tokens; the rest would take ten more seconds
    deadline = time.monotonic() + 5
    records = []
    while time.monotonic() < deadline:
        records = slow_harness.records()
        if records:
            break
        time.sleep(0.1)
    assert len(records) == 1
    r = records[0]
    assert r.outcome == "aborted"
    assert r.usage_estimated
    assert 9 <= r.completion_tokens <= 14
    # The gateway closed the upstream stream at once: the backend did not finish it.
    time.sleep(0.5)
    entries = [e for e in slow_harness.sim_log() if e.get("streamed")]
    assert len(entries) == 1
    assert entries[0]["client_gone"] is True
    assert entries[0]["tokens_sent"] < 100


_EVENTS = (
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"content":"four words right here"},"finish_reason":null}]}'
    b"\n\n"
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}\n\n'
    b"data: [DONE]\n\n"
)


class _LingeringUpstream:
    """A backend that sends a whole stream, ``[DONE]`` included, and then keeps the response
    open for a few seconds before ending it (as a busy server may): the client has its whole
    answer and leaves before the backend's stream has ended. With ``linger=None`` the end of
    the response goes in the same write as the events: the gateway reads the whole answer at
    once, as it often does under load."""

    def __init__(self, linger: float | None = 3.0, events: bytes = _EVENTS) -> None:
        self.linger = linger
        self.events = events
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> _LingeringUpstream:
        self._thread.start()
        start = asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            answer = (
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
                + f"{len(self.events):x}\r\n".encode()
                + self.events
                + b"\r\n"
            )
            if self.linger is None:
                writer.write(answer + b"0\r\n\r\n")
                await writer.drain()
                return
            writer.write(answer)
            await writer.drain()
            await asyncio.sleep(self.linger)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@contextlib.contextmanager
def _gateway_before(upstream: _LingeringUpstream, tmp_path: Path) -> Iterator[Harness]:
    """A gateway whose one deployment, gpt-4o-mini, is served by ``upstream``."""
    gw = GatewayThread(
        gateway_config(
            tmp_path,
            {"scripted": upstream.url},
            deployments=[{"name": "gpt-4o-mini", "backend": "scripted", "model": "gpt-4o-mini"}],
        )
    ).start()
    try:
        yield Harness(gw, None)  # type: ignore[arg-type]  # no simulator here
    finally:
        gw.stop()


_CHAT_URL = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"


def test_a_client_that_leaves_after_done_got_a_complete_answer(tmp_path: Path) -> None:
    """The SDKs stop reading at ``data: [DONE]`` and may close the connection before the
    backend's stream has ended: the answer was complete, and the record says so."""
    with _LingeringUpstream() as upstream, _gateway_before(upstream, tmp_path) as harness:
        key = harness.new_key().primary_key
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        lines: list[str] = []
        with httpx.stream(
            "POST", harness.url + _CHAT_URL, json=body, headers={"api-key": key or ""}, timeout=30
        ) as resp:
            for line in resp.iter_lines():
                lines.append(line)
                if line == "data: [DONE]":
                    break  # as the SDKs do; the response is closed unfinished
        assert lines[-1] == "data: [DONE]"
        records = harness.records(expect=1)
    assert len(records) == 1
    r = records[0]
    assert (r.outcome, r.error_code) == ("ok", None)
    assert (r.prompt_tokens, r.completion_tokens, r.usage_estimated) == (9, 4, False)


def _stream_in_one_read(
    tmp_path: Path, events: bytes, responses: bool = False
) -> tuple[list[str], UsageRecord]:
    """Stream through the gateway from a backend whose whole answer (head, events and end)
    arrives in one write; the client does not ask for usage. Returns the client's lines and
    the request's record. ``responses``: ask the Responses API instead of chat."""
    with (
        _LingeringUpstream(linger=None, events=events) as upstream,
        _gateway_before(upstream, tmp_path) as harness,
    ):
        key = harness.new_key().primary_key
        body: dict[str, object] = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        url = harness.url + _CHAT_URL
        if responses:
            body = {"model": "gpt-4o-mini", "input": "hi", "stream": True}
            url = harness.url + "/openai/v1/responses"
        with httpx.stream(
            "POST", url, json=body, headers={"api-key": key or ""}, timeout=30
        ) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            raw = resp.read()
            # All of it was in hand: it left whole, with its length, not chunked.
            assert "transfer-encoding" not in resp.headers
            assert resp.headers["content-length"] == str(len(raw))
            lines = [line for line in raw.decode().splitlines() if line]
        records = harness.records(expect=1)
    assert len(records) == 1
    return lines, records[0]


def test_a_stream_read_whole_at_once_is_relayed_and_counted(tmp_path: Path) -> None:
    """The gateway's one-read path: every event reaches the client, the usage chunk the
    gateway asked for is hidden from a client that did not, and the usage is recorded."""
    lines, r = _stream_in_one_read(tmp_path, _EVENTS)
    assert len(lines) == 2
    assert '"four words right here"' in lines[0]
    assert lines[1] == "data: [DONE]"
    assert (r.outcome, r.error_code, r.streamed) == ("ok", None, True)
    assert (r.prompt_tokens, r.completion_tokens, r.usage_estimated) == (9, 4, False)


def test_a_stream_read_whole_at_once_without_its_end_is_reported(tmp_path: Path) -> None:
    """A backend's stream that ends cleanly but without ``[DONE]``, all in one read: the
    client gets an error event it can parse, and the record an estimate and the cause."""
    cut = _EVENTS.split(b"data: {", 2)
    lines, r = _stream_in_one_read(tmp_path, b"data: {".join(cut[:2]))
    assert '"four words right here"' in lines[0]
    assert '"StreamInterrupted"' in lines[-1]
    assert (r.outcome, r.error_code) == ("backend_error", "StreamInterrupted")
    assert r.usage_estimated
    assert r.completion_tokens > 0


def test_a_stream_with_crlf_line_ends_is_relayed_and_counted(tmp_path: Path) -> None:
    """SSE allows CR LF line ends (some OpenAI-compatible servers send them): the events are
    relayed as they come (with LF line ends), the usage is the backend's, nothing is taken
    for an interrupted stream."""
    lines, r = _stream_in_one_read(tmp_path, _EVENTS.replace(b"\n", b"\r\n"))
    assert len(lines) == 2
    assert '"four words right here"' in lines[0]
    assert lines[1] == "data: [DONE]"
    assert (r.outcome, r.error_code) == ("ok", None)
    assert (r.prompt_tokens, r.completion_tokens, r.usage_estimated) == (9, 4, False)


def test_a_complete_stream_without_usage_is_counted_as_an_estimate(tmp_path: Path) -> None:
    """A backend that ignores ``stream_options`` (an older API version, another
    OpenAI-compatible server) ends its stream without usage: the record gets an estimate,
    marked as one, never a zero that would pass for the backend's count."""
    without_usage = b"".join(e + b"\n\n" for e in _EVENTS.split(b"\n\n") if b'"usage"' not in e)
    lines, r = _stream_in_one_read(tmp_path, without_usage)
    assert lines[-1] == "data: [DONE]"
    assert (r.outcome, r.error_code) == ("ok", None)
    assert r.usage_estimated
    assert r.prompt_tokens > 0
    assert 3 <= r.completion_tokens <= 6  # "four words right here"
    assert r.total_tokens == r.prompt_tokens + r.completion_tokens


def test_a_responses_stream_that_failed_without_usage_is_recorded_as_failed(
    tmp_path: Path,
) -> None:
    """``response.failed`` with ``"usage":null``: the client has the whole stream, the
    backend's failure included, and nothing after it; the record says the backend failed
    and estimates what was generated."""

    def named(payload: dict[str, object]) -> bytes:
        return b"event: %s\ndata: %s\n\n" % (str(payload["type"]).encode(), orjson.dumps(payload))

    pending = {"id": "r", "status": "in_progress", "usage": None}
    failed = {
        "id": "r",
        "model": "gpt-4o-mini",
        "status": "failed",
        "error": {"code": "server_error", "message": "The model failed."},
        "usage": None,
    }
    where = {"item_id": "m", "output_index": 0, "content_index": 0}
    events = b"".join(
        [
            named({"type": "response.created", "response": pending, "sequence_number": 0}),
            named(
                {
                    "type": "response.output_text.delta",
                    **where,
                    "delta": "four words right here",
                    "sequence_number": 1,
                }
            ),
            named({"type": "response.failed", "response": failed, "sequence_number": 2}),
        ]
    )
    lines, r = _stream_in_one_read(tmp_path, events, responses=True)
    assert lines[-1].startswith("data: ") and '"response.failed"' in lines[-1]
    assert not any("StreamInterrupted" in line for line in lines)
    assert (r.status, r.outcome, r.error_code) == (200, "backend_error", "ResponseFailed")
    assert r.usage_estimated
    assert 3 <= r.completion_tokens <= 6


def test_a_long_stream_read_whole_reaches_the_client_byte_for_byte(tmp_path: Path) -> None:
    """A stream of more than 4 KiB read whole leaves with the response's head as one
    gathered write (``server._HeadHoldingTransport``): every event arrives, in order, as the
    backend sent it; only the usage chunk the gateway asked for is held back."""
    words = [
        b'data: {"choices":[{"index":0,"delta":{"content":"w%d "}}],"model":"gpt-4o-mini"}\n\n' % i
        for i in range(200)
    ]
    usage = (
        b'data: {"choices":[],"model":"gpt-4o-mini",'
        b'"usage":{"prompt_tokens":9,"completion_tokens":200,"total_tokens":209}}\n\n'
    )
    events = b"".join(words) + usage + b"data: [DONE]\n\n"
    assert len(events) > 4 * 4096
    lines, r = _stream_in_one_read(tmp_path, events)
    expected = [w.decode().rstrip("\n") for w in words] + ["data: [DONE]"]
    assert lines == expected
    assert (r.outcome, r.prompt_tokens, r.completion_tokens, r.usage_estimated) == (
        "ok",
        9,
        200,
        False,
    )
