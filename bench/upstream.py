"""A fake Azure OpenAI chat-completions upstream that costs as little as possible.

It is the benchmark's baseline: every proxy under test forwards to it, and it is
measured alone first. It must be cheaper than any proxy, so it is a raw asyncio
``Protocol`` (uvloop when available) speaking HTTP/1.1 keep-alive, with every
response built once at start-up. Request parsing is the minimum that is still
correct for what proxies send: headers up to the blank line, a body framed by
``Content-Length`` or ``Transfer-Encoding: chunked``, pipelined requests, and
HTTP/1.0 (answered with ``Connection: close``).

Routes (POST only; anything else is a 404 in Azure's error shape):

* ``/openai/deployments/{deployment}/chat/completions?api-version=...`` (Azure, dated)
* ``/openai/v1/chat/completions`` (Azure v1)
* ``/v1/chat/completions`` and ``/chat/completions`` (OpenAI shape)

A body containing ``"stream": true`` gets a server-sent event stream of about 30
events, each written with its own ``write`` call (Azure flushes per event), with
the usage chunk before ``data: [DONE]`` when the body asks for
``"include_usage": true`` (``--stream-gap-ms`` spaces the events in time, as a model
generating tokens does; by default they are written back to back); any other body gets a
~600-byte JSON completion with ``usage``. ``GET /__stats`` returns request counters as
JSON so the harness can check that a proxy really reached the upstream, and by which path.

Run: ``python bench/upstream.py --port 9001``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
from collections import Counter
from collections.abc import Iterator
from typing import ClassVar, Final, cast

_STREAM_RE: Final = re.compile(rb'"stream"\s*:\s*true')
_USAGE_RE: Final = re.compile(rb'"include_usage"\s*:\s*true')
_PATHS: Final = (
    (re.compile(rb"^/openai/deployments/[^/?]+/chat/completions\?(?:.*&)?api-version="), "azure"),
    (re.compile(rb"^/openai/v1/chat/completions(?:\?|$)"), "azure-v1"),
    (re.compile(rb"^/v1/chat/completions(?:\?|$)"), "openai-v1"),
    (re.compile(rb"^/chat/completions(?:\?|$)"), "openai"),
)
_MAX_HEADER: Final = 65536
_FILTERS: Final = {
    "hate": {"filtered": False, "severity": "safe"},
    "self_harm": {"filtered": False, "severity": "safe"},
    "sexual": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": False, "severity": "safe"},
}
_USAGE: Final = {
    "completion_tokens": 26,
    "prompt_tokens": 19,
    "total_tokens": 45,
    "completion_tokens_details": {"reasoning_tokens": 0},
    "prompt_tokens_details": {"cached_tokens": 0},
}
_ANSWER: Final = (
    "Sure! A token bucket refills at a fixed rate and each request takes tokens from it, "
    "so short bursts pass while the long-run average stays under the limit."
)
_WORDS: Final = _ANSWER.split(" ")
_SHORT_ANSWER: Final = "A token bucket refills at a fixed rate."
_COMMON_HEADERS: Final = (
    b"apim-request-id: 6b7c1f3e-0d8a-4d6e-9a51-3f2f3c0f9b11\r\n"
    b"x-request-id: 0f3d5c2a-8b9e-4f1a-b7c6-2d4e6f8a0b1c\r\n"
    b"x-ms-region: Sweden Central\r\n"
    b"x-ratelimit-remaining-requests: 9999\r\n"
    b"x-ratelimit-remaining-tokens: 9999000\r\n"
)


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def completion_body() -> bytes:
    """The non-streaming answer: Azure's shape, about 750 bytes."""
    return _dumps(
        {
            "choices": [
                {
                    "content_filter_results": _FILTERS,
                    "finish_reason": "stop",
                    "index": 0,
                    "logprobs": None,
                    "message": {"content": _SHORT_ANSWER, "refusal": None, "role": "assistant"},
                }
            ],
            "created": 1750697159,
            "id": "chatcmpl-BkW2tq0Xh5bYw1fV3rGd8PzL9sQmA",
            "model": "gpt-4o-mini-2024-07-18",
            "object": "chat.completion",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
            "system_fingerprint": "fp_b705f0c291",
            "usage": _USAGE,
        }
    )


def stream_events(include_usage: bool) -> list[bytes]:
    """The streaming answer as SSE events, ``data: [DONE]`` last."""
    base = {
        "created": 1750697159,
        "id": "chatcmpl-BkW2tq0Xh5bYw1fV3rGd8PzL9sQmA",
        "model": "gpt-4o-mini-2024-07-18",
        "object": "chat.completion.chunk",
        "system_fingerprint": "fp_b705f0c291",
    }

    def choice(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
        return {
            "choices": [
                {
                    "content_filter_results": {},
                    "delta": delta,
                    "finish_reason": finish,
                    "index": 0,
                    "logprobs": None,
                }
            ],
            **base,
        }

    chunks: list[object] = [
        {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _FILTERS}],
        },
        choice({"content": "", "refusal": None, "role": "assistant"}),
    ]
    chunks += [choice({"content": (" " if i else "") + w}) for i, w in enumerate(_WORDS)]
    chunks.append(choice({}, "stop"))
    if include_usage:
        chunks.append({"choices": [], **base, "usage": _USAGE})
    return [b"data: " + _dumps(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _fixed(status: bytes, ctype: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: "
        + ctype
        + b"\r\n"
        + _COMMON_HEADERS
        + extra
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )


_JSON: Final = _fixed(b"200 OK", b"application/json; charset=utf-8", completion_body())
_NOT_FOUND: Final = _fixed(
    b"404 Not Found",
    b"application/json; charset=utf-8",
    b'{"error":{"code":"404","message":"Resource not found"}}',
)
_STREAM_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    + _COMMON_HEADERS
    + b"cache-control: no-cache\r\nx-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n"
)
_STREAM_HEAD_10: Final = _STREAM_HEAD.replace(b"transfer-encoding: chunked\r\n", b"")
_STREAMS: Final = {u: [_chunk(e) for e in stream_events(u)] + [b"0\r\n\r\n"] for u in (False, True)}
_STREAMS_10: Final = {u: stream_events(u) for u in (False, True)}
STATS: Final[Counter[str]] = Counter()


class UpstreamProtocol(asyncio.Protocol):
    """One connection. Not thread-safe; the event loop calls it serially."""

    #: ``--stream-writes once``: each stream in one write instead of one per event (a
    #: diagnostic: what the proxies pay for receiving the events as separate segments).
    whole_streams: ClassVar[bool] = False
    #: ``--stream-gap-ms``: seconds between a stream's events (0: all at once). Paced streams
    #: arrive at a proxy event by event, as a model generating tokens sends them, so every
    #: event costs the proxy a read and a write (a diagnostic: the per-event cost).
    event_gap: ClassVar[float] = 0.0

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        # A paced stream in progress: requests that arrive meanwhile wait for its end
        # (answers on one connection must not interleave).
        self.busy = False
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        STATS["connections"] += 1

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        self._serve_buffered()

    def _serve_buffered(self) -> None:
        while not self.busy and self.transport is not None and self.buf and self._one_request():
            pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def _one_request(self) -> bool:
        """Answer the first complete request in the buffer; False when more bytes are needed."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEADER:
                self._close()
            return False
        first = buf.find(b"\r\n")
        method, target, version = [*buf[:first].split(b" ", 2), b"", b""][:3]
        head = buf[first:end].lower() + b"\r\n"
        start = end + 4
        if b"\r\ntransfer-encoding:" in head and b"chunked" in head:
            body, consumed = _dechunk(buf, start)
            if consumed < 0:
                return False
        else:
            at = head.find(b"\r\ncontent-length:")
            length = int(head[at + 17 : head.index(b"\r\n", at + 2)]) if at >= 0 else 0
            consumed = start + length
            if len(buf) < consumed:
                return False
            body = buf[start:consumed]
        self.buf = buf[consumed:]
        http10 = version == b"HTTP/1.0"
        close = http10 or b"\r\nconnection: close\r\n" in head
        self._answer(method, target, body, close, http10)
        return True

    def _answer(self, method: bytes, target: bytes, body: bytes, close: bool, http10: bool) -> None:
        transport = self.transport
        assert transport is not None
        if method == b"GET" and target == b"/__stats":
            transport.write(_fixed(b"200 OK", b"application/json", _dumps(dict(STATS))))
        elif method == b"POST" and (kind := _route(target)) is not None:
            STATS["path:" + kind] += 1
            if _STREAM_RE.search(body):
                STATS["stream"] += 1
                self._stream(bool(_USAGE_RE.search(body)), http10)
            else:
                STATS["json"] += 1
                transport.write(_JSON)
        else:
            STATS["not_found"] += 1
            transport.write(_NOT_FOUND)
        if close:
            if self.busy:
                self.close_after = True  # once the paced stream has ended
            else:
                self._close()

    def _stream(self, include_usage: bool, http10: bool) -> None:
        transport = self.transport
        assert transport is not None
        # HTTP/1.0 has no chunked encoding: the stream ends when the connection closes.
        transport.write(_STREAM_HEAD_10 if http10 else _STREAM_HEAD)
        events = (_STREAMS_10 if http10 else _STREAMS)[include_usage]
        if self.whole_streams:
            transport.write(b"".join(events))
            return
        if self.event_gap > 0:
            self.busy = True
            self._paced(iter(events))
            return
        # One write per event, as Azure flushes per event: proxies relay chunk by chunk.
        for event in events:
            transport.write(event)

    def _paced(self, events: Iterator[bytes]) -> None:
        """Write the next event and schedule the one after; at the end, serve the requests
        that waited (or close, when the request asked for it)."""
        if self.transport is None:
            return
        event = next(events, None)
        if event is not None:
            self.transport.write(event)
            asyncio.get_running_loop().call_later(self.event_gap, self._paced, events)
            return
        self.busy = False
        if self.close_after:
            self._close()
        else:
            self._serve_buffered()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


def _route(target: bytes) -> str | None:
    for rx, kind in _PATHS:
        if rx.match(target):
            return kind
    return None


def _dechunk(buf: bytes, pos: int) -> tuple[bytes, int]:
    """Decode a chunked body starting at ``pos``: (body, end offset), or (b"", -1) if incomplete."""
    parts: list[bytes] = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return b"", -1
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            # Skip trailers up to the blank line.
            end = buf.find(b"\r\n\r\n", pos - 2)
            return (b"".join(parts), end + 4) if end >= 0 else (b"", -1)
        if len(buf) < pos + size + 2:
            return b"", -1
        parts.append(buf[pos : pos + size])
        pos += size + 2


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"upstream listening on http://{host}:{port}", flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument(
        "--stream-writes",
        choices=("event", "once"),
        default="event",
        help="one write per stream event (default, as Azure flushes) or the whole stream at once",
    )
    parser.add_argument(
        "--stream-gap-ms",
        type=float,
        default=0.0,
        help="pace streams: milliseconds between events (default 0: written back to back)",
    )
    args = parser.parse_args(argv)
    UpstreamProtocol.whole_streams = args.stream_writes == "once"
    UpstreamProtocol.event_gap = max(0.0, args.stream_gap_ms) / 1000
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
