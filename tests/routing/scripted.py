"""A scripted backend on loopback, for the routing tests that need exact answers in an exact
order (the simulator answers by its rate limits and faults it is told per request, so a
retry of the same request gets the same fault).

``ScriptedBackend(script)``: the n-th request (1-based) gets ``script(n)``, an ``Answer``.
Every request is logged in ``hits`` with its arrival, its status line and its end
(``time.monotonic()``, each taken just before the backend sends it, so that a client that has
the answer sees them set), so a test can tell what reached the backend while its breaker was
open, or how many at once.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from tests.support.gateway import free_port


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    #: Seconds before the status line.
    delay: float = 0.0
    #: Hold the answer until this many requests have arrived (then ``delay``): concurrent
    #: requests all reach the backend before any of them is answered.
    together: int = 0
    #: A stream (``text/event-stream``) of this many content events, then the usage chunk
    #: and ``[DONE]``; 0: a JSON answer.
    chunks: int = 0
    #: Seconds after each content event.
    chunk_delay: float = 0.0
    #: Break the stream off (connection closed) after its content events: no usage, no
    #: ``[DONE]``.
    cut: bool = False
    #: Break the answer off in the middle of its body (connection closed): a JSON answer
    #: after half its body (its ``content-length`` says the whole), a stream after its
    #: content events and half of one more (so with ``chunks=0``, before any whole event).
    torn: bool = False
    #: A stream even without content events (``chunks=0`` is otherwise a JSON answer).
    stream: bool = False
    #: Hold the status line (after ``delay``) until this is set (at most 10 s): the test
    #: decides when the answer comes.
    hold: threading.Event | None = None
    #: Hold the body (after the status line) until this is set (at most 10 s).
    hold_body: threading.Event | None = None


@dataclass
class Hit:
    number: int
    status: int
    arrived: float
    #: When the status line was sent.
    answered: float | None = None
    #: When the last of the body was sent (a cut stream: when it was cut).
    ended: float | None = None


async def _held(event: threading.Event | None) -> None:
    """Wait (without blocking the server's loop) until ``event`` is set, at most 10 s."""
    deadline = time.monotonic() + 10
    while event is not None and not event.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _chunk(i: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}],
    }


_USAGE = {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


class ScriptedBackend:
    """See the module docstring. ``start()``/``stop()``."""

    def __init__(self, script: Callable[[int], Answer]) -> None:
        self.script = script
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        self.port = free_port()
        config = uvicorn.Config(
            self._app,
            host="127.0.0.1",
            port=self.port,
            log_level="critical",
            loop="asyncio",
            lifespan="off",
            interface="asgi3",  # a bound method: uvicorn would take it for ASGI 2
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ScriptedBackend:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the scripted backend did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def arrivals(self) -> list[tuple[float, int]]:
        """(arrival, status) of every request so far, in arrival order."""
        with self._lock:
            return [(h.arrived, h.status) for h in self.hits]

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while True:
            message = await receive()
            if not message.get("more_body"):
                break
        with self._lock:
            hit = Hit(len(self.hits) + 1, 0, time.monotonic())
            self.hits.append(hit)
        answer = self.script(hit.number)
        hit.status = answer.status
        await self._answer(answer, hit, send)

    async def _answer(self, answer: Answer, hit: Hit, send: Any) -> None:
        deadline = time.monotonic() + 10
        while len(self.hits) < answer.together and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if answer.delay:
            await asyncio.sleep(answer.delay)
        await _held(answer.hold)
        headers = [(k.encode(), v.encode()) for k, v in answer.headers.items()]
        if answer.chunks or answer.stream:
            headers.append((b"content-type", b"text/event-stream"))
            start = {"type": "http.response.start", "status": answer.status, "headers": headers}
            hit.answered = time.monotonic()
            await send(start)
            await _held(answer.hold_body)
            for i in range(answer.chunks):
                await send(
                    {"type": "http.response.body", "body": _event(_chunk(i)), "more_body": True}
                )
                await asyncio.sleep(answer.chunk_delay)
            if answer.torn:
                half = _event(_chunk(answer.chunks))
                half = half[: len(half) // 2]
                await send({"type": "http.response.body", "body": half, "more_body": True})
            hit.ended = time.monotonic()
            if answer.cut or answer.torn:
                # An exception mid-body: uvicorn drops the connection without the chunked
                # framing's end, as a backend that died would.
                raise ConnectionAbortedError("scripted cut")
            tail = _event({**_chunk(0), "choices": [], "usage": _USAGE}) + b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            return
        if answer.status == 200:
            payload: dict[str, Any] = {
                "id": "chatcmpl-scripted",
                "object": "chat.completion",
                "model": "gpt-4o",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            }
        else:
            payload = {"error": {"code": str(answer.status), "message": "scripted failure"}}
        data = json.dumps(payload).encode()
        headers.append((b"content-type", b"application/json"))
        if not (answer.torn or answer.hold_body):
            hit.answered = hit.ended = time.monotonic()
            start = {"type": "http.response.start", "status": answer.status, "headers": headers}
            await send(start)
            await send({"type": "http.response.body", "body": data, "more_body": False})
            return
        # The head on its own, then (part of) the body.
        headers.append((b"content-length", str(len(data)).encode()))
        hit.answered = time.monotonic()
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await _held(answer.hold_body)
        if not answer.torn:
            hit.ended = time.monotonic()
            await send({"type": "http.response.body", "body": data, "more_body": False})
            return
        half = data[: len(data) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})
        hit.ended = time.monotonic()
        raise ConnectionAbortedError("scripted tear")
