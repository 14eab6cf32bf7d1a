"""A backend on loopback that writes its answers byte by byte as a test scripts them: for the
relay's tests that need an answer larger than the socket buffers, one that stops half-way
until the test says, or a stream that goes on until the gateway hangs up.

``WireBackend(handler)``: every request is passed to ``handler(request, writer)``, a coroutine
that writes the raw HTTP/1.1 answer (``head`` and ``chunk`` help). The connection is kept for
the next request unless the handler returns False. ``requests`` logs every request;
``hangups`` counts the connections the gateway closed while an answer was being written
(the handler's ``drain`` failed).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tests.support.gateway import free_port


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Handler = Callable[[Request, asyncio.StreamWriter], Awaitable[bool | None]]


def head(
    status: int = 200, content_type: str = "application/json", length: int | None = None
) -> bytes:
    """A status line and headers: ``length`` bytes of body, else chunked."""
    framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    return f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n{framing}\r\n\r\n".encode()


def chunk(data: bytes) -> bytes:
    """One HTTP chunk (``b""``: the last)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(data: dict[str, Any], name: str | None = None) -> bytes:
    """One SSE event."""
    line = b"data: " + json.dumps(data).encode() + b"\n\n"
    return f"event: {name}\n".encode() + line if name else line


def content_event(text: str, model: str = "gpt-4o") -> bytes:
    """One chat stream event carrying ``text`` as its content delta."""
    return event(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        }
    )


def wait_for(condition: Callable[[], object], within: float = 30.0, what: str = "") -> None:
    """Poll ``condition`` until it holds, at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what or condition}")
        time.sleep(0.02)


class LoopbackServer:
    """An asyncio server on a free loopback port, run by an event loop in a thread of its own:
    a subclass answers each connection in ``_serve``. ``serving()`` starts it (once) and
    stops it when its block ends."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @contextmanager
    def serving(self) -> Iterator[str]:
        """Serve while the block runs; yields the server's URL."""
        self._thread.start()
        start = asyncio.start_server(self._serve, "127.0.0.1", self.port)
        server = asyncio.run_coroutine_threadsafe(start, self._loop).result(10)
        try:
            yield self.url
        finally:
            server.close()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


class WireBackend(LoopbackServer):
    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.requests: list[Request] = []
        self.hangups = 0

    @contextmanager
    def running(self) -> Iterator[WireBackend]:
        with self.serving():
            yield self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = raw.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = Request(method, target, headers, body)
                self.requests.append(request)
                try:
                    keep = await self.handler(request, writer)
                except ConnectionError:
                    self.hangups += 1
                    return
                if keep is False:
                    return
        finally:
            writer.close()
