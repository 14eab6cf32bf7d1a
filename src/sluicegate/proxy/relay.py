"""One upstream attempt: send the request to a backend and relay the answer to the client —
unless it fails before the first byte went out, in which case ``AttemptFailed`` says how and
nothing was sent (the caller may try another backend; see ``proxy/failover.py``).

A metered JSON answer is read whole (up to ``WHOLE_ANSWER_LIMIT``) and its ``usage`` read;
any answer that came whole with its first read leaves in one write, with its length. The
rest is relayed in parts as they arrive, never buffered whole: streams event by event, with
the usage picked out of the final chunk; other answers (a file download, a metered answer
past the limit, whose usage is looked for in its last part) as they come. A stream's first
chunk is read before the client gets the status line, so a backend that answers 200 and then
breaks off before sending anything still fails over invisibly. Only metered answers are
counted: an answer without usage is estimated (``_estimate``), in the counting thread when
the prompt left to count or the answer is large, so that counting never holds the event
loop.

Timeouts: ``first_byte`` bounds everything up to the status line (and, for streams, the first
chunk), from when a pooled connection was free: the wait for one has a bound of the same
length, and running out of it is not the backend's failure (outcome ``BUSY``);
``between_chunks`` bounds every later read; ``client_write`` every send to the client (a
client whose connection takes nothing for that long is treated as gone). The upstream
response is always released (or closed, when unfinished) in this module's own ``finally`` —
also when the client disconnects or the task is cancelled — and a disconnecting client closes
it at once. A body read to its end goes back to the pool before the client is written to.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson

from sluicegate.accounting.records import Outcome
from sluicegate.clock import Clock
from sluicegate.proxy import errors
from sluicegate.proxy.asgi import Message, Receive, Scope, Send, disconnect_hook
from sluicegate.proxy.context import RequestContext
from sluicegate.proxy.deadlines import Deadlines, Watch
from sluicegate.routing.retry import Outcome as AttemptOutcome
from sluicegate.routing.retry_after import retry_after_from_body, retry_after_from_headers
from sluicegate.routing.router import BUSY
from sluicegate.tokens.counting import count_text
from sluicegate.tokens.estimate import estimate_request_tokens
from sluicegate.tokens.estimate_text import estimate_text_tokens
from sluicegate.tokens.offload import INLINE_COUNT_BYTES, counting_thread
from sluicegate.tokens.usage import (
    RELAYED_KEPT_BYTES,
    StreamScanner,
    Usage,
    answer_text,
    model_name,
    usage_from_body,
    usage_from_object,
)
from sluicegate.upstream.backend import Backend
from sluicegate.upstream.client import UpstreamResponse
from sluicegate.upstream.headers import (
    client_response_headers,
    relayed_length,
    upstream_request_headers,
)

log = logging.getLogger("sluicegate.relay")

_INFINITY = float("inf")

#: A chat stream's last event, and its line alone (as a backend may end its body with it).
_DONE_EVENT = b"data: [DONE]\n\n"
_DONE = _DONE_EVENT.rstrip()


#: How much of a failed answer's body is read (for the wait an Azure 429 message names).
_ERROR_BODY_LIMIT = 64 * 1024

#: A metered answer (not a stream) is read whole up to this size, for its usage, and leaves
#: in one write; past it, it is relayed in parts and its usage looked for in its last part.
#: The largest usual answer fits: embeddings of 2048 inputs × 3072 dimensions are ~60 MB as
#: JSON floats (the SDKs ask for base64 by default, ~33 MB).
WHOLE_ANSWER_LIMIT = 64 * 1024 * 1024
#: The last bytes of an answer relayed in parts kept to find its usage (a few hundred bytes
#: from its end, after ``choices``/``data``/``output``).
TAIL_KEPT_BYTES = 64 * 1024


class AttemptFailed(Exception):
    """An attempt failed and nothing reached the client. ``outcome`` is for the router and
    the retry policy; ``status``/``code``/``message`` describe it for the record and, if
    this was the last attempt, for the client."""

    def __init__(self, outcome: AttemptOutcome, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.status = status
        self.code = code
        self.message = message


def _timed_out(backend: Backend, what: str) -> AttemptFailed:
    return AttemptFailed(
        AttemptOutcome(None, "timeout"),
        504,
        "BackendTimeout",
        f"Backend {backend.name} did not answer within {backend.first_byte_timeout:g} s ({what}).",
    )


def _broken(backend: Backend, exc: BaseException | None, error: str = "broken") -> AttemptFailed:
    detail = type(exc).__name__ if exc is not None else "no data"
    return AttemptFailed(
        AttemptOutcome(None, error),
        502,
        "BackendUnavailable",
        f"Backend {backend.name} could not be reached or broke off ({detail}).",
    )


async def attempt(
    ctx: RequestContext,
    backend: Backend,
    scope: Scope,
    receive: Receive,
    send: Send,
    url: str,
    body: bytes,
    auth: Sequence[tuple[str, str]],
    clock: Clock,
    *,
    retryable: Callable[[int], bool],
    on_headers: Callable[[Sequence[tuple[bytes, bytes]]], None],
    on_response_id: Callable[[str], None] | None = None,
) -> None:
    """Send one attempt and relay its answer. Raises ``AttemptFailed`` (nothing sent to the
    client) on a connection error, a timeout before the first byte, a body that broke off
    before the first byte, no free pooled connection in time (outcome ``busy``: not the
    backend's failure), or a status for which ``retryable(status)`` is true.
    ``on_headers`` receives every answer's headers (for headroom), failed ones included.
    Raises ``GatewayError`` (400, nothing sent anywhere) for a request that HTTP/1.1 cannot
    carry as built: not an attempt that failed, so no backend is blamed for it.
    ``on_response_id`` (Responses creations only, for Responses affinity) receives the id of
    a 2xx answer: a JSON answer's top-level ``id`` (from the parse that reads its usage),
    before the answer goes out (past ``WHOLE_ANSWER_LIMIT``, from its first bytes when the
    ``id`` is the object's first member: ``leading_response_id``); a stream's from its first
    event, ``response.created``."""
    headers = upstream_request_headers(scope["headers"], list(auth), ctx.request_id)
    deadlines = ctx.deadlines
    client = backend.client
    deadline = deadlines.now() + backend.first_byte_timeout
    backend.in_flight += 1
    try:
        queued = False
        try:
            with deadlines.at(deadline) as watch:
                if client.full:
                    # Every connection the pool may open is busy (with other answers, or held
                    # by clients that read slowly): wait for one, at most ``first_byte``. Only
                    # then does the backend's own wait begin, with its whole ``first_byte``.
                    queued = True
                    while client.full:
                        await client.wait_for_room()
                    queued = False
                    deadline = watch.deadline = deadlines.now() + backend.first_byte_timeout
                response = await client.request(scope["method"], url, headers.items(), body)
        except TimeoutError:
            if queued:
                raise _busy(backend) from None
            raise _timed_out(backend, "no status line") from None
        except OSError as exc:
            backend.connect_failed(exc)
            raise _broken(backend, exc, "connection") from None
        except ValueError as exc:
            # The request could not be written as built (a line break or space where it
            # would change the framing): the request's fault, never the backend's. Counted
            # as a connection failure, it would open the backends' breakers for everyone.
            log.info("request %s not forwarded: %s", ctx.request_id, exc)
            raise errors.bad_request(
                "InvalidRequest",
                "The request cannot be forwarded: its path or a header holds characters "
                "that HTTP/1.1 does not allow there. Fix the request and send it again.",
            ) from None
        finished = False
        try:
            on_headers(response.raw_headers)
            status = response.status
            if retryable(status):
                raise await _failed_answer(deadlines, backend, response, clock)
            if status >= 300:
                on_response_id = None
            if ctx.messages is not None:  # the message log keeps what the client is sent
                send = ctx.messages.tee(send, response.content_type == "text/event-stream", status)
            if response.content_type == "text/event-stream":
                finished = await _relay_stream(
                    ctx, backend, response, scope, receive, send, clock, deadline, on_response_id
                )
            else:
                finished = await _relay_answer(
                    ctx, backend, response, scope, receive, send, clock, on_response_id
                )
        finally:
            if finished and ctx.outcome is not Outcome.ABORTED:
                response.release()
            else:
                response.close()
    finally:
        backend.in_flight -= 1


def _busy(backend: Backend) -> AttemptFailed:
    """No pooled connection to ``backend`` came free within ``first_byte``: the request never
    reached it, and the wait says nothing about its health, so the outcome is ``BUSY``, which
    the router keeps out of the breaker (``proxy/failover.py`` fails over, or answers 503)."""
    return AttemptFailed(
        AttemptOutcome(None, BUSY),
        503,
        "BackendBusy",
        f"Every connection the gateway may open to backend {backend.name} stayed in use for "
        f"{backend.first_byte_timeout:g} s.",
    )


def _set_status(ctx: RequestContext, status: int) -> None:
    ctx.status = status
    if status >= 500 or status == 429:
        ctx.outcome = Outcome.BACKEND_ERROR
    elif status >= 400:
        ctx.outcome = Outcome.CLIENT_ERROR


async def _failed_answer(
    deadlines: Deadlines, backend: Backend, response: UpstreamResponse, clock: Clock
) -> AttemptFailed:
    """A retryable status: read (a bounded part of) the body for the wait it names."""
    status = response.status
    wait = retry_after_from_headers(response.raw_headers, clock.now())
    code = str(status)
    with contextlib.suppress(OSError, TimeoutError, AttemptFailed):
        data = await _read_body(deadlines, backend, response, _ERROR_BODY_LIMIT)
        if len(data) < _ERROR_BODY_LIMIT:
            response.release()  # read to the end: the connection stays in the pool
        if wait is None and status == 429:
            wait = retry_after_from_body(data)
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
            error = orjson.loads(data).get("error") or {}
            code = str(error.get("code") or code)
    return AttemptFailed(
        AttemptOutcome(status, None, wait),
        status,
        code,
        f"Backend {backend.name} answered {status}.",
    )


async def _read_body(
    deadlines: Deadlines, backend: Backend, response: UpstreamResponse, limit: int
) -> bytes:
    """The body up to ``limit`` bytes, each read bounded by ``between_chunks``."""
    parts: list[bytes] = []
    size = 0
    between = backend.between_chunks_timeout
    try:
        with deadlines.after(between) as watch:
            while True:
                chunk = await response.readany()
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
                if size >= limit:
                    break
                watch.deadline = deadlines.now() + between
    except (OSError, TimeoutError) as exc:
        raise _broken(backend, exc) from None
    return b"".join(parts)


async def _relay_answer(
    ctx: RequestContext,
    backend: Backend,
    response: UpstreamResponse,
    scope: Scope,
    receive: Receive,
    send: Send,
    clock: Clock,
    on_response_id: Callable[[str], None] | None = None,
) -> bool:
    """Relay an answer that is not a stream; True if its body was read to its end.

    A metered answer (2xx) is read whole, up to ``WHOLE_ANSWER_LIMIT``, for its usage; any
    other only as far as its first read. Whole, it leaves in one write with its length,
    after the upstream connection went back to the pool (``_send_whole``); a body that
    breaks off before that fails the attempt (``AttemptFailed``, nothing sent). An answer
    still arriving past that (a file download, an error answer in several reads, a metered
    answer past the limit) is relayed in parts as they come (``_relay_parts``), keeping only
    the last ``TAIL_KEPT_BYTES`` of a metered one, where its usage is; with the backend's
    ``Content-Length`` when the body is not decoded on the way (``relayed_length``), else
    chunked."""
    deadlines = ctx.deadlines
    between = backend.between_chunks_timeout
    status = response.status
    metered = status < 300 and ctx.route.metered
    limit = WHOLE_ANSWER_LIMIT if metered else 0
    parts: list[bytes] = []
    size = 0
    sending = False
    try:
        with deadlines.after(between) as watch:
            try:
                while chunk := await response.readany():
                    parts.append(chunk)
                    if response.at_eof():
                        break  # all in: no need to ask for the end
                    size += len(chunk)
                    if size >= limit:
                        break  # more to come: relayed in parts
                    watch.deadline = deadlines.now() + between
            except OSError as exc:
                raise _broken(backend, exc) from None
            if not chunk or response.at_eof():
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                # Read to its end: back to the pool before the client is written to, which
                # may take up to ``client_write``.
                response.release()
                _set_status(ctx, status)
                sending = True
                await _send_whole(
                    ctx, backend, response, data, metered, scope, send, clock, watch,
                    on_response_id,
                )  # fmt: skip
                return True
    except TimeoutError as exc:
        if sending:
            _client_stalled(ctx, backend, scope)
            return False
        raise _broken(backend, exc) from None
    _set_status(ctx, status)
    if on_response_id is not None:
        # A Responses creation's answer past the limit (large images, say): its id is
        # learned from its first bytes, before they go out.
        response_id = leading_response_id(parts)
        if response_id is not None:
            on_response_id(response_id)
    headers = client_response_headers(response.raw_headers, ctx.response_headers)
    if (length := relayed_length(response.raw_headers)) is not None:
        # Relayed byte for byte: the backend's length holds, and the client can tell a whole
        # download from one cut short (and show its progress) without chunked framing.
        headers.append((b"content-length", length))
    start = {"type": "http.response.start", "status": status, "headers": headers}
    tail = _Tail() if metered else None

    async def finish(held: bytes) -> bytes:
        if tail is not None:
            await _tail_usage(ctx, tail)
        return held

    try:
        complete, broke, gone, _ = await _relay_parts(
            ctx, backend, response, start, parts, tail.feed if tail else _as_is, finish,
            scope, receive, send, clock,
        )  # fmt: skip
    except asyncio.CancelledError:
        if tail is not None and ctx.usage is None:  # at shutdown, mid-answer
            ctx.usage, model = tail.usage()
            ctx.model = model or ctx.model
            if ctx.usage is None:
                _estimate_now(ctx, _no_text, 0)
        raise
    if complete:
        return True
    if gone:
        ctx.outcome = Outcome.ABORTED
    elif broke is not None:
        # Part of the body went out: the client can only see an answer cut short (the
        # connection closes without its end), and the breaker hears of a broken body.
        ctx.outcome = Outcome.BACKEND_ERROR
        ctx.error_code = "AnswerInterrupted"
        log.info(
            "request %s: backend %s broke off its answer (%s)", ctx.request_id, backend.name, broke
        )
    if tail is not None and ctx.usage is None:
        await _tail_usage(ctx, tail)
    return False


async def _send_whole(
    ctx: RequestContext,
    backend: Backend,
    response: UpstreamResponse,
    data: bytes,
    metered: bool,
    scope: Scope,
    send: Send,
    clock: Clock,
    watch: Watch,
    on_response_id: Callable[[str], None] | None = None,
) -> None:
    """Send a whole answer (head and body in one write), its usage taken first when
    ``metered``; ``watch`` (the read's) then bounds the sends by ``client_write``. With
    ``on_response_id``, the answer's ``id`` (read in the same parse as its usage) goes to it
    before the answer goes out."""
    if metered:
        if on_response_id is None:
            ctx.usage, ctx.model = usage_from_body(data)
        else:
            ctx.usage, ctx.model, response_id = _usage_and_id(data)
            if response_id is not None:
                # Learned before the answer goes out: the client cannot continue it sooner.
                on_response_id(response_id)
        if ctx.usage is None:  # a backend that reports none: estimated, never zero
            watch.deadline = _INFINITY
            await _estimate(ctx, functools.partial(answer_text, data), len(data))
    headers = client_response_headers(response.raw_headers, ctx.response_headers)
    if ctx.consumed_headers and ctx.usage is not None and not ctx.usage_estimated:
        # As APIM's tokens-consumed-header-name: the backend's count, so only once known.
        consumed = str(ctx.usage.total_tokens).encode("ascii")
        headers.extend((name, consumed) for name in ctx.consumed_headers)
    status = response.status
    if status in (204, 304):
        pass  # no content, and no Content-Length either (RFC 9110 §8.6)
    elif data or scope["method"] != "HEAD":
        headers.append((b"content-length", str(len(data)).encode("ascii")))
    else:
        # A HEAD answer's length is the GET answer's: the backend's, not the empty body's.
        raw = response.raw_headers
        headers.extend((b"content-length", v) for n, v in raw if n.lower() == b"content-length")
    watch.deadline = ctx.deadlines.now() + backend.config.timeouts.client_write
    await send({"type": "http.response.start", "status": status, "headers": headers})
    ctx.ttfb = clock.monotonic()
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _usage_and_id(body: bytes) -> tuple[Usage | None, str | None, str | None]:
    """``usage_from_body`` and the answer's top-level ``id`` (a Responses object's), from
    one parse."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None, None
    if not isinstance(obj, dict):
        return None, None, None
    response_id = obj.get("id")
    return (
        usage_from_object(obj.get("usage")),
        model_name(obj.get("model")),
        response_id if isinstance(response_id, str) and response_id else None,
    )


#: A Responses object whose first member is its id: ``{"id": "resp_…"``, compact or indented
#: (Azure and OpenAI write ``id`` first). Only the top level's first member is the object's
#: own id; an ``"id"`` further in may be an output item's.
_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*"([A-Za-z0-9_-]{1,133})"')
#: How much of an answer's start ``leading_response_id`` looks at.
_LEADING_BYTES = 512


def leading_response_id(parts: Sequence[bytes]) -> str | None:
    """The id of a Responses object from its first bytes (``parts``: the answer's first
    reads), when it is the object's first member; None otherwise. For answers too large to
    be parsed whole (``WHOLE_ANSWER_LIMIT``): reading on for an ``id`` placed later would mean
    holding the whole answer back."""
    head = parts[0] if parts else b""
    if len(head) < _LEADING_BYTES and len(parts) > 1:
        joined = bytearray()
        for part in parts:
            joined += part[: _LEADING_BYTES - len(joined)]
            if len(joined) >= _LEADING_BYTES:
                break
        head = bytes(joined)
    match = _LEADING_ID.match(head, 0, _LEADING_BYTES)
    return match.group(1).decode("ascii") if match is not None else None


class _CreatedId:
    """A Responses stream's ``feed`` that hands the id in its first event,
    ``response.created``, to ``learn`` (once; the first event with data decides). Only
    Responses creations pay for it: other streams feed the scanner directly."""

    __slots__ = ("_feed", "_learn", "_pending")

    def __init__(self, feed: Callable[[bytes], bytes], learn: Callable[[str], None]) -> None:
        self._feed = feed
        self._learn = learn
        self._pending = True

    def feed(self, chunk: bytes) -> bytes:
        out = self._feed(chunk)
        if self._pending and b"data:" in out:
            self._pending = False
            response_id = created_response_id(out)
            if response_id is not None:
                self._learn(response_id)
        return out


def created_response_id(events: bytes) -> str | None:
    """The ``response.id`` of the first event with data in ``events`` (whole SSE events, LF
    line ends) when it is a ``response.created`` (its JSON's ``type``; streams with and
    without ``event:`` lines alike); None otherwise."""
    if events.startswith(b"data:"):
        start = 0
    else:
        start = events.find(b"\ndata:") + 1
        if start == 0:
            return None
    end = events.find(b"\n", start)
    try:
        event = orjson.loads(events[start + 5 : end if end >= 0 else len(events)])
        if event["type"] != "response.created":
            return None
        response_id = event["response"]["id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return response_id if isinstance(response_id, str) and response_id else None


async def _relay_stream(
    ctx: RequestContext,
    backend: Backend,
    response: UpstreamResponse,
    scope: Scope,
    receive: Receive,
    send: Send,
    clock: Clock,
    deadline: float,
    on_response_id: Callable[[str], None] | None = None,
) -> bool:
    """Relay a stream; True if the upstream body was read to its end (the connection can be
    reused). Its first chunk is read (by ``deadline``, the first-byte one) before anything
    is sent, so a backend that breaks off before it fails over (``AttemptFailed``).
    ``on_response_id``: see ``_CreatedId``.

    Only a metered stream's usage is taken (or estimated): the others are counted as zero,
    as their JSON counterparts are (a Responses stream resumed through the passthrough
    replays the ``usage`` its first request was charged for). The scanner still splits
    every stream into events and finds its end: that is what tells a complete stream from
    one that broke off, and what keeps a torn event from reaching the client."""
    deadlines = ctx.deadlines
    metered = ctx.route.metered
    sending = False
    try:
        with deadlines.at(deadline) as watch:
            try:
                first = await response.readany()
            except OSError as exc:
                raise _broken(backend, exc) from None
            if not first:
                raise _broken(backend, None)
            _set_status(ctx, response.status)
            scanner = StreamScanner(strip_usage_chunk=ctx.injected_usage)
            feed = scanner.feed
            if on_response_id is not None:
                feed = _CreatedId(feed, on_response_id).feed
            headers = client_response_headers(response.raw_headers, ctx.response_headers)
            if response.at_eof():
                # The whole answer came with the first read (under load a stream is often
                # all generated before the gateway reads it): nothing is left to wait for,
                # so no disconnect watch is set up, and it leaves whole, with its length, in
                # one write (not in chunked framing, which would copy it once more).
                body = feed(first) + _stream_end(ctx, scanner, None, metered)
                if metered and ctx.usage is None:
                    watch.deadline = _INFINITY
                    await _estimate_relayed(ctx, scanner)
                response.release()  # back to the pool before the client is written to
                headers.append((b"content-length", str(len(body)).encode("ascii")))
                watch.deadline = deadlines.now() + backend.config.timeouts.client_write
                sending = True
                await send(
                    {"type": "http.response.start", "status": response.status, "headers": headers}
                )
                if body and ctx.ttfb is None:
                    ctx.ttfb = clock.monotonic()
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return True
    except TimeoutError:
        if sending:
            _client_stalled(ctx, backend, scope)
            return False
        raise _timed_out(backend, "no first chunk") from None
    start = {"type": "http.response.start", "status": response.status, "headers": headers}

    async def finish(held: bytes) -> bytes:
        tail = _stream_end(ctx, scanner, None, metered)
        if metered and ctx.usage is None:
            await _estimate_relayed(ctx, scanner)
        return held + tail

    try:
        complete, broke, gone, stalled = await _relay_parts(
            ctx, backend, response, start, [first], feed, finish,
            scope, receive, send, clock,
        )  # fmt: skip
    except asyncio.CancelledError:
        if metered:
            _cut_short(ctx, scanner)  # at shutdown, mid-stream
        raise
    if complete:
        return True
    if stalled or (gone and not scanner.done):
        # Left before the end reached it (a stall's last events were never written).
        ctx.outcome = Outcome.ABORTED
        if metered and ctx.usage is None:
            ctx.usage, ctx.model = scanner.usage, scanner.model or ctx.model
            if ctx.usage is None:
                await _estimate_relayed(ctx, scanner)
        return False
    tail = _stream_end(ctx, scanner, broke, metered)
    if metered and ctx.usage is None:
        await _estimate_relayed(ctx, scanner)
    if not gone:
        await _send_last(ctx, backend, scope, send, tail)  # the backend broke off: tell the client
    return False


def _cut_short(ctx: RequestContext, scanner: StreamScanner) -> None:
    """A metered stream cut off before its end by the task's cancellation (a shutdown): the
    record still says what the client got, the backend's usage if it came, else the
    estimate of what was relayed, made at once (``_estimate_now``)."""
    ctx.usage, ctx.model = scanner.usage, scanner.model or ctx.model
    if ctx.usage is None:
        _estimate_now(ctx, scanner.relayed_text, scanner.relayed_bytes, scanner.relayed_share)


async def _estimate_relayed(ctx: RequestContext, scanner: StreamScanner) -> None:
    """A metered stream ended, or was left by its client, without usage, though the gateway
    asked for it: a backend that ignores ``stream_options`` (an older API version, another
    OpenAI-compatible server), a ``response.failed`` without it, or a stream cut short.
    Counted as an estimate of what was relayed, never as zero, which would pass for the
    backend's count and settle limits at nothing."""
    await _estimate(ctx, scanner.relayed_text, scanner.relayed_bytes, scanner.relayed_share)


def _stream_end(
    ctx: RequestContext, scanner: StreamScanner, broke: str | None, metered: bool
) -> bytes:
    """Return what is left to send after the events relayed: the scanner's rest when the
    stream is complete, else an error event. A partial event that a break left is dropped:
    torn, it is no event a client can parse, and sent before the error event it would make
    that one unreadable too (one ``data:`` line holding both). ``broke``: why the body broke
    off, None when it ended cleanly; then a rest that is ``data: [DONE]`` without its blank
    line ends the stream as ``[DONE]`` does. With ``metered``, the stream's usage is taken
    into ``ctx``; a ``ctx.usage`` left None is the caller's to estimate
    (``_estimate_relayed``)."""
    if metered:
        ctx.usage, ctx.model = scanner.usage, scanner.model or ctx.model
    rest = scanner.flush()
    if not scanner.done and broke is None and rest.rstrip() == _DONE:
        # The body ended cleanly (its terminal chunk came) right after ``data: [DONE]``
        # without the blank line that ends an event. Per SSE an unterminated event at the
        # end is dropped, but ``[DONE]`` has no other reading: the stream is whole.
        scanner.done = True
        rest = _DONE_EVENT
    # Once the end of the stream went through (``[DONE]``, ``response.completed``) the answer
    # is whole, whatever happens to the connection afterwards: the SDKs stop reading there and
    # may close theirs, which closes the backend's (``client_gone``) before its last bytes.
    if not scanner.done:
        # The backend's stream ended early: tell the client in an event it can parse.
        ctx.outcome = Outcome.BACKEND_ERROR
        ctx.error_code = "StreamInterrupted"
        error = {
            "error": {
                "code": "StreamInterrupted",
                "message": "The backend's stream ended before it was complete"
                + (f" ({broke})" if broke else "")
                + ". The answer above is partial; retry the request.",
            }
        }
        return b"data: " + orjson.dumps(error) + b"\n\n"
    if scanner.failed:
        # Whole, and the client has the backend's own account of the failure; the record
        # says it failed, so that dashboards and charge-back do not count it as served.
        ctx.outcome = Outcome.BACKEND_ERROR
        ctx.error_code = "ResponseFailed"
    return rest


async def _relay_parts(
    ctx: RequestContext,
    backend: Backend,
    response: UpstreamResponse,
    start: Message,
    parts: list[bytes],
    feed: Callable[[bytes], bytes],
    finish: Callable[[bytes], Awaitable[bytes]],
    scope: Scope,
    receive: Receive,
    send: Send,
    clock: Clock,
) -> tuple[bool, str | None, bool, bool]:
    """Send ``start`` (the head), then relay ``parts`` (the body read so far; the list is
    emptied) and the rest of the body as it arrives, each part through ``feed`` (what to
    send of it now: a stream's whole events), until the body ends, breaks off, or the
    client leaves or stops reading. At the body's end the part that came with it is held
    back, the upstream connection goes back to the pool, and ``finish(held)`` gives the last
    body to send (the held part and whatever the end adds).

    Returns (complete: everything was sent and the body read to its end; why the body broke
    off, or None; the client left; the client stopped reading). A client that leaves closes
    the backend's response at once. ``between_chunks`` bounds each read, ``client_write``
    each send: a client that takes nothing for that long (its window stays shut) is treated
    as gone (``_client_stalled``) and the backend's response is closed too, so that a
    reader that stopped does not hold a pooled connection for ever."""
    gone = False

    def client_gone() -> None:
        nonlocal gone
        gone = True
        response.close()  # the backend stops generating (and billing) at once

    hook = disconnect_hook(scope)
    watcher: asyncio.Task[None] | None = None
    if hook is not None:
        hook.add(client_gone)
    else:
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, client_gone))
    broke: str | None = None
    stalled = sending = False
    between = backend.between_chunks_timeout
    client_write = backend.config.timeouts.client_write
    loop_time = ctx.deadlines.loop().time
    try:
        # One watch for the whole relay: its deadline is moved before each read (the
        # backend's ``between_chunks``) and each send (the client's ``client_write``).
        with ctx.deadlines.at(loop_time() + client_write) as watch:
            try:
                sending = True
                await send(start)
                parts.reverse()  # popped from the end as they go: each is freed once sent
                while len(parts) > 1:  # an answer past what is read whole
                    if out := feed(parts.pop()):
                        if ctx.ttfb is None:
                            ctx.ttfb = clock.monotonic()
                        watch.deadline = loop_time() + client_write
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                sending = False
                chunk = parts.pop()
                held = b""  # the last part, sent with the end of the body
                while chunk:
                    out = feed(chunk)
                    if response.at_eof():
                        held = out  # all in: this part leaves with the end, in one write
                        break
                    if out:
                        if ctx.ttfb is None:
                            ctx.ttfb = clock.monotonic()
                        watch.deadline = loop_time() + client_write
                        sending = True
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                        sending = False
                    if gone:
                        break
                    watch.deadline = loop_time() + between
                    chunk = await response.readany()
                if not gone:
                    watch.deadline = _INFINITY  # ``finish`` may count an estimate
                    body = await finish(held)
                    response.release()  # read to its end: back to the pool
                    if body and ctx.ttfb is None:
                        ctx.ttfb = clock.monotonic()
                    watch.deadline = loop_time() + client_write
                    sending = True
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                    return True, None, False, False
            except OSError as exc:
                broke = type(exc).__name__
    except TimeoutError:
        if sending:
            stalled = True
            _client_stalled(ctx, backend, scope)
            response.close()  # as for a client that left: the backend stops at once
        else:
            broke = f"no data for {between:g} s"
    finally:
        if hook is not None:
            hook.remove(client_gone)
        elif watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    return False, broke, gone, stalled


def _client_stalled(ctx: RequestContext, backend: Backend, scope: Scope) -> None:
    """The client took nothing of the answer for ``client_write`` seconds (its connection's
    window stayed shut, uvicorn's ``send`` waiting for it to drain): it is treated as gone.
    Its record is ``aborted`` (error code ``ClientWriteTimeout``): no verdict on the backend
    (the router abandons the attempt), and the request is settled and recorded now. Its
    connection is aborted (``DisconnectHook.abort``), not left to uvicorn's close, which
    would wait without limit for the unsent bytes to be written."""
    _abort_client(scope)
    ctx.outcome = Outcome.ABORTED
    ctx.error_code = "ClientWriteTimeout"
    log.info(
        "request %s: the client took nothing of the answer for %g s; treated as gone",
        ctx.request_id,
        backend.config.timeouts.client_write,
    )


async def _send_last(
    ctx: RequestContext, backend: Backend, scope: Scope, send: Send, body: bytes
) -> None:
    """Send the last body of an answer that broke off, bounded by ``client_write``: a client
    that does not take it is left, its connection aborted (the record keeps the backend's
    failure)."""
    try:
        with ctx.deadlines.after(backend.config.timeouts.client_write):
            await send({"type": "http.response.body", "body": body, "more_body": False})
    except TimeoutError:
        _abort_client(scope)
        log.info("request %s: the client did not take the end of a broken answer", ctx.request_id)


def _abort_client(scope: Scope) -> None:
    """Drop the client's connection, unsent bytes and all, where the server offers a
    ``DisconnectHook`` (elsewhere it is the server's to close)."""
    hook = disconnect_hook(scope)
    if hook is not None:
        hook.abort()


def _as_is(part: bytes) -> bytes:
    return part


def _no_text() -> str:
    return ""


class _Tail:
    """The last ``TAIL_KEPT_BYTES`` (at least) of an answer relayed in parts: where a JSON
    answer's ``usage`` is (Azure's keys are in alphabetical order, ``usage`` after the
    ``choices``/``data``; a Responses answer's few fields after it fit too)."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def feed(self, part: bytes) -> bytes:
        parts = self.parts
        parts.append(part)
        self.size += len(part)
        while self.size - len(parts[0]) >= TAIL_KEPT_BYTES:
            self.size -= len(parts.pop(0))
        return part

    def usage(self) -> tuple[Usage | None, str | None]:
        """The answer's usage and model, from the last of each key in the tail."""
        data = b"".join(self.parts)
        usage = model = None
        end = len(data)
        while usage is None and (at := data.rfind(b'"usage":', 0, end)) >= 0:
            usage = usage_from_object(_json_at(data, at + 8))
            end = at
        at = data.rfind(b'"model":')
        if at >= 0:
            model = model_name(_json_at(data, at + 8))
        return usage, model


#: Reads one JSON value at a position (``raw_decode``; orjson parses whole documents only).
_DECODER = json.JSONDecoder()


def _json_at(data: bytes, at: int) -> Any:
    """The JSON value that starts at ``data[at:]`` (after blanks), or None."""
    text = data[at : at + 4096].decode("utf-8", "replace").lstrip()
    try:
        return _DECODER.raw_decode(text)[0]
    except ValueError:
        return None


async def _tail_usage(ctx: RequestContext, tail: _Tail) -> None:
    """A metered answer relayed in parts: its usage from its tail, else an estimate (the
    prompt as admission estimated it: none of the answer's text is kept)."""
    ctx.usage, model = tail.usage()
    ctx.model = model or ctx.model
    if ctx.usage is None:
        await _estimate(ctx, _no_text, 0)


async def _watch_disconnect(receive: Receive, on_gone: Callable[[], None]) -> None:
    """Wait for the client to go away (servers without a disconnect hook), then tell."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_gone()
            return


async def _estimate(
    ctx: RequestContext, text_of: Callable[[], str], size: int, share: float = 1.0
) -> None:
    """No usage came back: put an estimate in ``ctx`` (``_estimated_usage``), marked as one.
    ``text_of()`` gives the text the client received (or its first ``share`` of it), held in
    ``size`` bytes (the answer's body, the events kept).

    Counted inline when the text and the prompt left to count (admission counted it when it
    set ``prompt_estimate``) are held in at most ``INLINE_COUNT_BYTES`` each (nearly every
    answer: no hop, nothing allocated for it); otherwise in the counting thread
    (``tokens/offload.py``), as admission counts a large prompt, so that a multi-megabyte
    prompt or answer never holds the event loop for the other tenants' requests. A request
    cancelled while it waits for that count (a shutdown) still gets its estimate, made at once
    (``_estimate_now``), before the cancellation goes on: its record is never left without
    one."""
    prompt = ctx.prompt_estimate
    if size <= INLINE_COUNT_BYTES and (prompt is not None or len(ctx.body) <= INLINE_COUNT_BYTES):
        _estimate_now(ctx, text_of, size, share)
        return
    body = ctx.json or {}
    operation = ctx.route.operation
    model = ctx.deployment.model if ctx.deployment else None
    try:
        ctx.usage = await counting_thread().run(
            lambda: _estimated_usage(body, operation, model, prompt, text_of, share)
        )
    except asyncio.CancelledError:
        # The count, begun already, is dropped: its outcome would come too late for the
        # record, which is written as the cancellation ends the request.
        _estimate_now(ctx, text_of, size, share)
        raise
    ctx.usage_estimated = True


def _estimate_now(
    ctx: RequestContext, text_of: Callable[[], str], size: int, share: float = 1.0
) -> None:
    """``_estimate`` made at once, on the event loop, for where the request cannot wait for
    the counting thread (its task is being cancelled): a prompt or a text held in more than
    ``INLINE_COUNT_BYTES`` costs ``ceil(characters / 4)`` (the rule for an unknown tokenizer:
    no tokenizer runs, so a large one costs a walk of its structure, not microseconds a
    byte); smaller ones are counted as usual."""
    prompt = ctx.prompt_estimate
    ctx.usage = _estimated_usage(
        ctx.json or {},
        ctx.route.operation,
        ctx.deployment.model if ctx.deployment else None,
        prompt,
        text_of,
        share,
        rough_prompt=prompt is None and len(ctx.body) > INLINE_COUNT_BYTES,
        rough_text=size > INLINE_COUNT_BYTES,
    )
    ctx.usage_estimated = True


def _estimated_usage(
    body: Mapping[str, Any],
    operation: str,
    model: str | None,
    prompt: int | None,
    text_of: Callable[[], str],
    share: float,
    *,
    rough_prompt: bool = False,
    rough_text: bool = False,
) -> Usage:
    """The usage of an answer that reported none: the completion from ``text_of()``, the text
    the client received (or its first ``share`` of it, scaled up), and the prompt from the
    request (``prompt``, admission's estimate, unless None). At most ``RELAYED_KEPT_BYTES``
    characters of the text are counted, the rest scaled like a stream's beyond what its
    scanner kept: a JSON answer is read whole, and no bound holds its size. ``rough_*``:
    ``ceil(characters / 4)`` instead of the tokenizer. Pure and thread-safe (run in the
    counting thread): reads its arguments only."""
    text = text_of()
    if len(text) > RELAYED_KEPT_BYTES:
        share *= RELAYED_KEPT_BYTES / len(text)
        text = text[:RELAYED_KEPT_BYTES]
    completion = count_text(text, None) if rough_text else estimate_text_tokens(text, model)
    if share < 1.0:
        completion = round(completion / share)
    if prompt is None:
        prompt = estimate_request_tokens(
            body, operation, model, 0, approximate=rough_prompt
        ).prompt_tokens
    return Usage(prompt, completion, prompt + completion)
