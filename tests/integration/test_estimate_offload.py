"""An answer without usage is estimated off the event loop when it is large: while the
gateway counts a multi-megabyte prompt (or answer) for the record, another tenant's small
request is served.

With limits off, admission counts nothing (``prompt_estimate`` is None), so the relay counts
the prompt itself when the backend reports no usage; it did so on the event loop, whatever
the prompt's size, as it counted a JSON answer's text: 1.5 MB of text without a break held
every tenant's requests for seconds. The tests need no timing bound: they ask that the small
request completes before the large one's record is written (the order in which the two
records reach a sink of the gateway's, and the moment the small answer arrived).
"""

from __future__ import annotations

import asyncio
import random
import string
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from sluicegate.accounting.records import UsageRecord
from tests.integration.conftest import Harness, posted_aside
from tests.integration.wire_backend import LoopbackServer
from tests.support.gateway import GatewayThread, gateway_config

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
#: Random letters without a break: no piece repeats, so nothing is cached, and a count of
#: the whole takes seconds (~1.5 µs a byte).
LARGE_BYTES = 1_500_000
#: The prompt of a request asking the backend for a large answer.
WRITE_A_LOT = "write a lot"
SMALL_TEXT = "four words right here"


def _letters(size: int, seed: int) -> str:
    return "".join(random.Random(seed).choices(string.ascii_lowercase, k=size))


class _UsagelessBackend(LoopbackServer):
    """A backend that never reports usage (an OpenAI-compatible server; one that ignores
    ``stream_options``), on loopback. Chat requests get a JSON answer, or with ``stream`` an
    SSE stream sent as ``stream_mode`` says: ``whole`` (one write, with its length),
    ``parts`` (chunked, the first event apart from the rest) or ``endless`` (the first event,
    then one more every 20 ms until the gateway closes the connection). The answer is
    ``SMALL_TEXT``, or ``LARGE_BYTES`` of letters for a prompt of ``WRITE_A_LOT``.
    ``large_answered`` is set once a large prompt or a large answer has been answered (its
    first event, for a stream), ``closed_by_gateway`` when the gateway closed an endless
    stream."""

    def __init__(self, stream_mode: str = "whole") -> None:
        super().__init__()
        self.stream_mode = stream_mode
        self.large_text = _letters(LARGE_BYTES, seed=7)
        self.large_answered = threading.Event()
        self.closed_by_gateway = threading.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = orjson.loads(await reader.readexactly(length))
                prompt = body["messages"][0]["content"]
                text = self.large_text if prompt == WRITE_A_LOT else SMALL_TEXT
                large = len(prompt) > 100_000 or prompt == WRITE_A_LOT
                if body.get("stream"):
                    await self._stream(reader, writer, text, large)
                else:
                    answer = orjson.dumps(
                        {
                            "id": "c1",
                            "object": "chat.completion",
                            "model": "gpt-4o-mini",
                            "choices": [
                                {
                                    "index": 0,
                                    "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text},
                                }
                            ],
                        }
                    )
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(answer), answer)
                    )
                    await writer.drain()
                if large:
                    self.large_answered.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: str, large: bool
    ) -> None:
        """Send ``text`` as a chat stream without usage (an ``endless`` one until the gateway
        closes the connection)."""
        words = text.split(" ")
        events = [
            b"data: %s\n\n"
            % orjson.dumps(
                {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "model": "gpt-4o-mini",
                    "choices": [{"index": 0, "delta": {"content": word + " "}}],
                }
            )
            for word in words
        ]
        events.append(b"data: [DONE]\n\n")
        sse = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        if self.stream_mode == "whole":
            data = b"".join(events)
            writer.write(sse + b"content-length: %d\r\n\r\n%s" % (len(data), data))
            await writer.drain()
            return
        writer.write(sse + b"transfer-encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (len(events[0]), events[0]))
        await writer.drain()
        if self.stream_mode == "endless":
            if large:
                self.large_answered.set()
            more = b"data: %s\n\n" % orjson.dumps(
                {"id": "c1", "choices": [{"index": 0, "delta": {"content": "more "}}]}
            )
            try:
                while not reader.at_eof():  # until the gateway closes the connection
                    await asyncio.sleep(0.02)  # pacing only: a token every 20 ms
                    writer.write(b"%x\r\n%s\r\n" % (len(more), more))
                    await writer.drain()
            finally:
                self.closed_by_gateway.set()
            return
        await asyncio.sleep(0.05)  # pacing only: the rest comes in a later read
        rest = b"".join(events[1:])
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        await writer.drain()


@contextmanager
def _gateway(
    tmp_path: Path, backend: _UsagelessBackend, **listen: Any
) -> Iterator[tuple[Harness, list[tuple[float, UsageRecord]]]]:
    """A gateway without limits (admission counts nothing) in front of ``backend``, and the
    records its pipeline writes, each with the moment it was written (a sink of its own, next
    to the ledger's)."""
    written: list[tuple[float, UsageRecord]] = []
    with backend.serving() as url:
        config = gateway_config(
            tmp_path,
            {"scripted": url},
            deployments=[{"name": "gpt-4o-mini", "backend": "scripted", "model": "gpt-4o-mini"}],
        )
        config["listen"] = {**config["listen"], **listen}
        gw = GatewayThread(config)
        assert gw.gateway.pipeline.sinks is gw.gateway.sinks
        gw.gateway.sinks.append(lambda record: written.append((time.monotonic(), record)))
        gw.start()
        try:
            yield Harness(gw, None), written  # type: ignore[arg-type]  # no simulator here
        finally:
            gw.stop()


def _written(written: list[tuple[float, UsageRecord]], owner: str) -> tuple[float, UsageRecord]:
    """The record of ``owner``'s request and when it was written, once it has been: the
    counting thread runs at a low priority, so on a busy machine a count takes a while."""
    deadline = time.monotonic() + 120
    while not (found := [(at, record) for at, record in written if record.owner == owner]):
        assert time.monotonic() < deadline, f"no record of {owner}'s request"
        time.sleep(0.02)
    (one,) = found
    return one


def _small_request(harness: Harness, key: str) -> float:
    """Another tenant's small request; the moment its whole answer arrived."""
    response = httpx.post(
        harness.url + CHAT,
        json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5},
        headers={"api-key": key},
        timeout=120,
    )
    done = time.monotonic()
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == SMALL_TEXT
    return done


@pytest.mark.parametrize(
    ("stream_mode", "large_part"),
    [
        (None, "prompt"),  # a JSON answer
        ("whole", "prompt"),  # a stream read whole in one read
        ("parts", "prompt"),  # a stream relayed event by event
        (None, "answer"),  # a JSON answer of 1.5 MB of text to a small prompt
    ],
)
def test_a_large_estimate_does_not_hold_other_tenants_requests(
    tmp_path: Path, stream_mode: str | None, large_part: str
) -> None:
    backend = _UsagelessBackend(stream_mode or "whole")
    with _gateway(tmp_path, backend) as (harness, written):
        large_key = harness.new_key(owner="team-a", name="large").primary_key or ""
        small_key = harness.new_key(owner="team-b", name="small").primary_key or ""
        prompt = _letters(LARGE_BYTES, seed=11) if large_part == "prompt" else WRITE_A_LOT
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 5,
            "stream": stream_mode is not None,
        }
        with posted_aside(harness.url + CHAT, body, large_key) as large:
            # The backend has answered: the gateway now estimates the usage it did not get.
            assert backend.large_answered.wait(timeout=60), "the large request never got back"
            small_done = _small_request(harness, small_key)
        assert large["status"] == 200
        large_written, record = _written(written, "team-a")
        small_written, _ = _written(written, "team-b")
        ledger = {record.owner: record for record in harness.records(expect=2)}
    # The small request went in, to the backend and back, and was recorded, while the large
    # one's usage was still being counted.
    assert small_done < large_written, (
        f"the small request ended {small_done - large_written:.2f} s after the large one's "
        "record was written: the event loop was held"
    )
    assert small_written < large_written
    assert (record.outcome, record.usage_estimated) == ("ok", True)
    if large_part == "prompt":
        assert record.prompt_tokens > 100_000
    else:
        assert record.prompt_tokens > 0
        assert record.completion_tokens > 100_000
    assert record.total_tokens == record.prompt_tokens + record.completion_tokens
    assert ledger["team-a"] == record
    assert ledger["team-b"].usage_estimated


def test_a_stream_left_by_its_client_is_estimated_off_the_loop(tmp_path: Path) -> None:
    """The client of a stream with a large prompt hangs up mid-stream: the record is
    ``aborted``, with the prompt counted, and counting it holds nobody else."""
    backend = _UsagelessBackend("endless")
    with _gateway(tmp_path, backend) as (harness, written):
        large_key = harness.new_key(owner="team-a", name="large").primary_key or ""
        small_key = harness.new_key(owner="team-b", name="small").primary_key or ""
        body = {
            "messages": [{"role": "user", "content": _letters(LARGE_BYTES, seed=13)}],
            "stream": True,
        }
        with httpx.stream(
            "POST", harness.url + CHAT, json=body, headers={"api-key": large_key}, timeout=120
        ) as response:
            assert response.status_code == 200
            first = next(response.iter_lines())
            assert first.startswith("data: ") and '"four ' in first
        # Hung up: the gateway closes the backend's stream (at once, in the disconnect's
        # callback), then estimates what was relayed.
        assert backend.closed_by_gateway.wait(timeout=60)
        small_done = _small_request(harness, small_key)
        large_written, record = _written(written, "team-a")
        ledger = {record.owner: record for record in harness.records(expect=2)}
    assert small_done < large_written, (
        f"the small request ended {small_done - large_written:.2f} s after the large one's "
        "record was written: the event loop was held"
    )
    assert (record.outcome, record.usage_estimated) == ("aborted", True)
    assert record.prompt_tokens > 100_000
    assert record.completion_tokens > 0
    assert ledger["team-a"] == record


def test_a_request_cancelled_while_its_estimate_is_counted_keeps_an_estimate(
    tmp_path: Path,
) -> None:
    """A shutdown with no grace cancels a request while the counting thread counts its large
    prompt: the count cannot be waited for, yet the record (one) is written with an estimate
    (the prompt at four characters a token), not zero tokens; the client, sent nothing yet,
    gets the 503 of a service going away."""
    backend = _UsagelessBackend()
    with _gateway(tmp_path, backend, graceful_shutdown_seconds=0) as (harness, written):
        key = harness.new_key(owner="team-a", name="large").primary_key or ""
        body = {"messages": [{"role": "user", "content": _letters(LARGE_BYTES, seed=17)}]}
        with posted_aside(harness.url + CHAT, body, key) as large:
            assert backend.large_answered.wait(timeout=60), "the large request never got back"
            harness.gw.stop()  # counting takes seconds: the request is cancelled meanwhile
    assert large["status"] == 503
    ((_, record),) = written
    assert (record.outcome, record.status, record.usage_estimated) == ("aborted", 503, True)
    assert LARGE_BYTES // 4 <= record.prompt_tokens <= LARGE_BYTES // 4 + 100
    assert 3 <= record.completion_tokens <= 6
    assert record.total_tokens == record.prompt_tokens + record.completion_tokens


def test_a_stream_cancelled_mid_way_gets_its_estimate_at_once(tmp_path: Path) -> None:
    """A shutdown with no grace cancels a stream with a large prompt mid-way: the request's
    task is being cancelled, so its estimate is made at once, the large prompt at four
    characters a token (no tokenizer, which would hold the loop, and the shutdown, for
    seconds), what was relayed counted as usual."""
    backend = _UsagelessBackend("endless")
    with _gateway(tmp_path, backend, graceful_shutdown_seconds=0) as (harness, written):
        key = harness.new_key(owner="team-a", name="large").primary_key or ""
        body = {
            "messages": [{"role": "user", "content": _letters(LARGE_BYTES, seed=19)}],
            "stream": True,
        }
        with httpx.stream(
            "POST", harness.url + CHAT, json=body, headers={"api-key": key}, timeout=120
        ) as response:
            assert response.status_code == 200
            assert '"four ' in next(response.iter_lines())
            harness.gw.stop()  # the stream goes on: it is cancelled
    ((_, record),) = written
    assert (record.outcome, record.streamed, record.usage_estimated) == ("aborted", True, True)
    assert LARGE_BYTES // 4 <= record.prompt_tokens <= LARGE_BYTES // 4 + 100
    assert record.completion_tokens > 0
    assert record.total_tokens == record.prompt_tokens + record.completion_tokens
