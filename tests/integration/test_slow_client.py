"""A client that stops reading holds nothing of a backend's for long: a stream it stopped
taking is cut after ``timeouts.client_write`` (its backend connection closed, its record
written and its reservation settled), and an answer read whole gives its connection back to
the pool before it is written to a client that may never take it.

Real sockets throughout: the stalled client shrinks its receive buffer (``SO_RCVBUF``) and
stops reading, so that the gateway's writes to it really block.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, cast

import pytest

from sluicegate.server import GatewayHttpProtocol
from tests.integration.conftest import Harness
from tests.integration.wire_backend import (
    Request,
    WireBackend,
    chunk,
    event,
    head,
    wait_for,
)
from tests.support.gateway import GatewayThread, gateway_config

_CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
_TARGET = "b/gpt-4o"  # the deployment's one member: backend/deployment
_BLOCK = (
    event(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "model": "gpt-4o",
            "choices": [{"index": 0, "delta": {"content": "word "}, "finish_reason": None}],
        }
    )
    * 64
)
#: The longest stream the backend writes (far past every socket buffer on the way).
_STREAM_LIMIT = 256 * 1024 * 1024


def _answer(content: str = "hi", tokens: int = 1) -> bytes:
    return json.dumps(
        {
            "id": "c2",
            "object": "chat.completion",
            "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens},
        }
    ).encode()


async def _endless_stream_or_json(request: Request, writer: asyncio.StreamWriter) -> None:
    """A stream of content events that goes on until the gateway hangs up (bounded), or a
    small JSON answer."""
    if not request.json().get("stream"):
        body = _answer()
        writer.write(head(length=len(body)) + body)
        await writer.drain()
        return
    writer.write(head(content_type="text/event-stream"))
    for _ in range(_STREAM_LIMIT // len(_BLOCK)):
        writer.write(chunk(_BLOCK))
        await writer.drain()
    writer.write(chunk(b"data: [DONE]\n\n") + chunk(b""))
    await writer.drain()


@contextmanager
def _gateway(tmp_path: Path, backend: WireBackend, **timeouts: float) -> Iterator[Harness]:
    """A gateway whose deployment gpt-4o is backend ``b``, at most one connection to it."""
    config = gateway_config(
        tmp_path,
        {"b": backend.url},
        deployments=[{"name": "gpt-4o", "backend": "b", "model": "gpt-4o"}],
    )
    (entry,) = config["backends"]
    entry["max_connections"] = 1
    entry["timeouts"] = {"first_byte": 2, "between_chunks": 5, **timeouts}
    gw = GatewayThread(config).start()
    try:
        yield Harness(gw, None)  # type: ignore[arg-type]  # no simulator here
    finally:
        gw.stop()


def _stalled_client(port: int) -> socket.socket:
    """A connection whose receive buffer is as small as the kernel allows (set before
    connecting: it sets the window offered), and which will not be read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


def _request(key: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {_CHAT} HTTP/1.1\r\nhost: gw\r\napi-key: {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    ).encode() + data


def _breaker(harness: Harness) -> str:
    return harness.gw.gateway.router.targets[_TARGET].breaker.describe(time.time())


@contextmanager
def _stalled_stream(tmp_path: Path) -> Iterator[tuple[WireBackend, Harness, str, socket.socket]]:
    """A stream asked for (``client_write`` 1 s) by a client that takes its head and then
    stops reading; yields once the request's record is written."""
    backend = WireBackend(_endless_stream_or_json)
    with backend.running(), _gateway(tmp_path, backend, client_write=1) as harness:
        key = harness.new_key().primary_key or ""
        stream = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        with closing(_stalled_client(harness.gw.port)) as stalled:
            stalled.sendall(_request(key, stream))
            assert stalled.recv(12) == b"HTTP/1.1 200"
            wait_for(harness.records, what="the stalled request's record")
            yield backend, harness, key, stalled


@contextmanager
def _two_pipelined(
    tmp_path: Path, client_write: float
) -> Iterator[tuple[WireBackend, Harness, str, socket.socket]]:
    """Two chat requests sent at once by a client that reads nothing, to a backend whose first
    answer is 8 MB (2,000,000 completion tokens) and every later one small."""

    async def large_then_small(request: Request, writer: asyncio.StreamWriter) -> None:
        first = len(backend.requests) == 1
        body = _answer("x" * 8_000_000, 2_000_000) if first else _answer()
        writer.write(head(length=len(body)) + body)
        await writer.drain()

    backend = WireBackend(large_then_small)
    with backend.running(), _gateway(tmp_path, backend, client_write=client_write) as harness:
        key = harness.new_key().primary_key or ""
        plain = _request(key, {"messages": [{"role": "user", "content": "hi"}]})
        with closing(_stalled_client(harness.gw.port)) as stalled:
            stalled.sendall(plain * 2)
            yield backend, harness, key, stalled


def test_a_stream_the_client_stopped_reading_is_cut_after_client_write(tmp_path: Path) -> None:
    """The client takes the head and then nothing: once the socket buffers are full, the
    gateway's send waits on it; after ``client_write`` the client counts as gone. The
    backend's connection is closed (the pool's only one is free again), the record is
    written while the client still holds its socket (aborted, the completion estimated from
    what was relayed), and the breaker heard nothing against the backend."""
    with _stalled_stream(tmp_path) as (backend, harness, key, _):
        (record,) = harness.records()
        assert (record.outcome, record.error_code) == ("aborted", "ClientWriteTimeout")
        assert record.streamed and record.usage_estimated and record.completion_tokens > 0
        wait_for(lambda: backend.hangups == 1, what="the backend's connection closed")
        runtime_backend = harness.gw.gateway.runtime.backends["b"]
        wait_for(lambda: runtime_backend.in_flight == 0, what="no attempt in flight")
        assert _breaker(harness) == "closed (failures=0, throttles=0)"
        # The one pooled connection serves the next client while this one still waits.
        reply = harness.sdk(key).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "hi"


def test_an_answer_read_whole_gives_its_connection_back_before_it_is_written(
    tmp_path: Path,
) -> None:
    """A client sends two requests at once and reads nothing: the first answer (8 MB) fills
    its connection's buffers, so the second one's write waits (uvicorn waits for the buffer
    to drain before it writes). That answer's body was read whole already: the backend's one
    pooled connection is back in the pool, and another client is served at once rather than
    timing out in the queue."""
    with _two_pipelined(tmp_path, client_write=120) as (backend, harness, key, _):
        served = backend.requests
        wait_for(lambda: len(served) == 2, what="the second request at the backend")
        reply = harness.sdk(key).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "hi"
        assert len(served) == 3
        assert _breaker(harness) == "closed (failures=0, throttles=0)"


def _open_connections(harness: Harness) -> int:
    """The gateway's open client connections (what ``/metrics`` exports), read directly: a
    scrape would open one more."""
    protocol = cast(type[GatewayHttpProtocol], harness.gw.server.config.http)
    return protocol.counts.open


def _read_to_the_end(sock: socket.socket) -> None:
    """Read what the connection still delivers until it ends (EOF or reset); fails if it
    does not end within 10 s (the gateway still holds its side open)."""
    sock.settimeout(10)
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(1 << 20):
            pass


def test_a_stalled_clients_connection_is_dropped_after_client_write(tmp_path: Path) -> None:
    """Once the relay gave up on a client that takes nothing, the gateway drops its side of
    the connection at once, unsent bytes and all (not a close, which waits for them to be
    written): the client no longer holds a slot of ``listen.max_connections``, and when it
    reads again it gets what was already on the way, then the end."""
    with _stalled_stream(tmp_path) as (_, harness, _, stalled):
        wait_for(lambda: _open_connections(harness) == 0, within=10, what="no connection")
        _read_to_the_end(stalled)
        (record,) = harness.records()
        assert (record.outcome, record.error_code) == ("aborted", "ClientWriteTimeout")


def test_a_client_stalled_before_an_answers_head_is_dropped_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two pipelined requests: the first answer (8 MB) fills the connection's buffers, so the
    second one's head cannot be written. After ``client_write`` the connection is dropped,
    rather than left to uvicorn, whose 500 for a response never started would wait for the
    buffers to drain without limit (and which hears that the connection is gone, so it
    neither logs the response as unstarted nor begins that 500)."""
    with _two_pipelined(tmp_path, client_write=1) as (_, harness, _, stalled):
        wait_for(lambda: len(harness.records()) == 2, what="both requests' records")
        wait_for(lambda: _open_connections(harness) == 0, within=10, what="no connection")
        _read_to_the_end(stalled)
        first, second = sorted(harness.records(), key=lambda r: r.completion_tokens, reverse=True)
        assert (first.outcome, first.completion_tokens) == ("ok", 2_000_000)
        assert (second.outcome, second.error_code) == ("aborted", "ClientWriteTimeout")
        assert "ASGI callable" not in caplog.text
