"""A request that finds every pooled connection to its backend busy waits for one at most
``first_byte``; running out of that wait says nothing about the backend's health. It is no
failure for the breaker: the request fails over to another member, or, with none left, gets
503 ``BackendBusy`` with ``Retry-After: 1``.

A real gateway over loopback backends whose one connection (``max_connections: 1``) is held
by a stream that lasts until the test ends it; the other client is the openai SDK.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.wire_backend import Request, WireBackend, chunk, event, head, wait_for
from tests.routing.harness import Routed
from tests.support.gateway import gateway_config

_CONTENT = {
    "id": "c1",
    "object": "chat.completion.chunk",
    "model": "gpt-4o",
    "choices": [{"index": 0, "delta": {"content": "w "}, "finish_reason": None}],
}
_USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def _backend(name: str, stop: threading.Event) -> WireBackend:
    """A stream of an event every 0.1 s until ``stop`` (at most 30 s), then its usage and
    ``[DONE]``; a JSON answer naming the backend for a request that is not a stream."""

    async def answer(request: Request, writer: asyncio.StreamWriter) -> None:
        if not request.json().get("stream"):
            body = json.dumps(
                {
                    "id": "c2",
                    "object": "chat.completion",
                    "model": "gpt-4o",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": name}}],
                    "usage": _USAGE,
                }
            ).encode()
            writer.write(head(length=len(body)) + body)
            await writer.drain()
            return
        writer.write(head(content_type="text/event-stream"))
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            writer.write(chunk(event(_CONTENT)))
            await writer.drain()
            await asyncio.sleep(0.1)
        end = event({**_CONTENT, "choices": [], "usage": _USAGE}) + b"data: [DONE]\n\n"
        writer.write(chunk(end) + chunk(b""))
        await writer.drain()

    return WireBackend(answer)


@contextmanager
def _routed(tmp_path: Path, backends: dict[str, WireBackend]) -> Iterator[Routed]:
    """A gateway whose deployment gpt-4o is a pool over ``backends`` (in order of priority),
    each with one connection and a first-byte limit of 1 s."""
    config = gateway_config(
        tmp_path,
        {name: b.url for name, b in backends.items()},
        deployments=[
            {
                "name": "gpt-4o",
                "model": "gpt-4o",
                "pool": [{"backend": name, "priority": i + 1} for i, name in enumerate(backends)],
            }
        ],
    )
    for entry in config["backends"]:
        entry["max_connections"] = 1
        entry["timeouts"] = {"first_byte": 1, "between_chunks": 5}
    routed = Routed(config, {})
    try:
        yield routed
    finally:
        routed.stop()


class _Stream(threading.Thread):
    """A client reading a stream to its end (in a thread), keeping its event data."""

    def __init__(self, routed: Routed) -> None:
        super().__init__(daemon=True)
        self.routed = routed
        self.events: list[str] = []

    def run(self) -> None:
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream(
            "POST", self.routed.chat_url(), json=body,
            headers={"api-key": self.routed.key}, timeout=60,
        ) as resp:  # fmt: skip
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])


def _client(routed: Routed) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=routed.url, api_key=routed.key, api_version="2024-10-21", max_retries=0
    )


def _ask(routed: Routed) -> Any:
    return _client(routed).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )


def _breaker(routed: Routed, target: str) -> str:
    return routed.gw.gateway.router.targets[target].breaker.describe(time.time())


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # ends the streams of a test that failed half-way


def test_a_one_member_pool_with_no_free_connection_answers_503_backend_busy(
    tmp_path: Path, stop: threading.Event
) -> None:
    backend = _backend("b", stop)
    with backend.running(), _routed(tmp_path, {"b": backend}) as routed:
        holder = _Stream(routed)
        holder.start()
        wait_for(lambda: holder.events, what="the stream holding the connection")
        with pytest.raises(openai.InternalServerError) as refused:
            _ask(routed)
        assert (refused.value.status_code, refused.value.code) == (503, "BackendBusy")
        assert refused.value.response.headers["retry-after"] == "1"
        assert _breaker(routed, "b/gpt-4o") == "closed (failures=0, throttles=0)"
        assert routed.states()["b"]["last_error"] is None
        stop.set()
        holder.join(30)
        assert holder.events[-1] == "[DONE]"
        busy, streamed = sorted(routed.records(2), key=lambda r: r.streamed)
        assert (busy.status, busy.outcome, busy.error_code) == (503, "backend_error", "BackendBusy")
        assert busy.extra["upstream_error"] == "BackendBusy"
        assert (streamed.outcome, streamed.total_tokens) == ("ok", 8)
        assert len(backend.requests) == 1  # the refused request never reached the backend


def test_a_busy_member_fails_over_without_counting_against_it(
    tmp_path: Path, stop: threading.Event
) -> None:
    first, second = _backend("b", stop), _backend("c", stop)
    with (
        first.running(),
        second.running(),
        _routed(tmp_path, {"b": first, "c": second}) as routed,
    ):
        holder = _Stream(routed)
        holder.start()
        wait_for(lambda: holder.events, what="the stream holding b's connection")
        reply = _ask(routed)
        assert reply.choices[0].message.content == "c"
        assert _breaker(routed, "b/gpt-4o") == "closed (failures=0, throttles=0)"
        stop.set()
        holder.join(30)
        records = [r for r in routed.records(3) if not r.streamed]
        assert [(r.attempt, r.backend, r.status, r.error_code) for r in records] == [
            (1, "b", 503, "BackendBusy"),
            (2, "c", 200, None),
        ]
