"""One upstream attempt: send the request to a backend and relay the answer to the client —
unless it fails before the first byte went out, in which case ``AttemptFailed`` says how and
nothing was sent (the caller may try another backend; see ``proxy/failover.py``).

JSON answers are read whole (they are small) and their ``usage`` read; streams are relayed
event by event as they arrive, never buffered whole, with the usage picked out of the final
chunk. A stream's first chunk is read before the client gets the status line, so a backend
that answers 200 and then breaks off before sending anything still fails over invisibly. An
answer without usage is estimated (``_estimate``), in the counting thread when the prompt
left to count or the answer is large, so that counting never holds the event loop.

Timeouts: ``first_byte`` bounds everything up to the status line (and, for streams, the first
chunk); ``between_chunks`` bounds every later read. The upstream response is always released
(or closed, when unfinished) in this module's own ``finally`` — also when the client
disconnects or the task is cancelled — and a disconnecting client closes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from sluicegate.accounting.records import Outcome
from sluicegate.clock import Clock
from sluicegate.proxy import errors
from sluicegate.proxy.asgi import Receive, Scope, Send, disconnect_hook
from sluicegate.proxy.context import RequestContext
from sluicegate.proxy.deadlines import Deadlines
from sluicegate.routing.retry import Outcome as AttemptOutcome
from sluicegate.routing.retry_after import retry_after_from_body, retry_after_from_headers
from sluicegate.tokens.counting import count_text
from sluicegate.tokens.estimate import estimate_request_tokens
from sluicegate.tokens.estimate_text import estimate_text_tokens
from sluicegate.tokens.offload import INLINE_COUNT_BYTES, counting_thread
from sluicegate.tokens.usage import (
    RELAYED_KEPT_BYTES,
    StreamScanner,
    Usage,
    answer_text,
    usage_from_body,
)
from sluicegate.upstream.backend import Backend
from sluicegate.upstream.client import UpstreamResponse
from sluicegate.upstream.headers import client_response_headers, upstream_request_headers

log = logging.getLogger("sluicegate.relay")

_INFINITY = float("inf")


#: How much of a failed answer's body is read (for the wait an Azure 429 message names).
_ERROR_BODY_LIMIT = 64 * 1024


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
) -> None:
    """Send one attempt and relay its answer. Raises ``AttemptFailed`` (nothing sent to the
    client) on a connection error, a timeout before the first byte, a body that broke off
    before the first byte, or a status for which ``retryable(status)`` is true.
    ``on_headers`` receives every answer's headers (for headroom), failed ones included.
    Raises ``GatewayError`` (400, nothing sent anywhere) for a request that HTTP/1.1 cannot
    carry as built: not an attempt that failed, so no backend is blamed for it."""
    headers = upstream_request_headers(scope["headers"], list(auth), ctx.request_id)
    deadlines = ctx.deadlines
    deadline = deadlines.now() + backend.first_byte_timeout
    backend.in_flight += 1
    try:
        try:
            with deadlines.at(deadline):
                response = await backend.client.request(scope["method"], url, headers.items(), body)
        except TimeoutError:
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
            if response.content_type == "text/event-stream":
                first = await _first_chunk(deadlines, backend, response, deadline)
                _set_status(ctx, status)
                finished = await _relay_stream(
                    ctx, response, first, scope, receive, send, clock, backend
                )
            else:
                data = await _read_body(deadlines, backend, response, None)
                finished = True
                _set_status(ctx, status)
                await _send_whole(ctx, response, data, scope, send, clock)
        finally:
            if finished and ctx.outcome is not Outcome.ABORTED:
                response.release()
            else:
                response.close()
    finally:
        backend.in_flight -= 1


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


async def _first_chunk(
    deadlines: Deadlines, backend: Backend, response: UpstreamResponse, deadline: float
) -> bytes:
    try:
        with deadlines.at(deadline):
            first = await response.readany()
    except TimeoutError:
        raise _timed_out(backend, "no first chunk") from None
    except OSError as exc:
        raise _broken(backend, exc) from None
    if not first:
        raise _broken(backend, None)
    return first


async def _read_body(
    deadlines: Deadlines, backend: Backend, response: UpstreamResponse, limit: int | None
) -> bytes:
    """The whole body (up to ``limit`` bytes), each read bounded by ``between_chunks``."""
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
                if limit is not None and size >= limit:
                    break
                watch.deadline = deadlines.now() + between
    except (OSError, TimeoutError) as exc:
        raise _broken(backend, exc) from None
    return b"".join(parts)


async def _send_whole(
    ctx: RequestContext,
    response: UpstreamResponse,
    data: bytes,
    scope: Scope,
    send: Send,
    clock: Clock,
) -> None:
    if ctx.route.metered and response.status < 300:
        ctx.usage, ctx.model = usage_from_body(data)
        if ctx.usage is None:  # a backend that reports none: estimated, never zero
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
    await send({"type": "http.response.start", "status": status, "headers": headers})
    ctx.ttfb = clock.monotonic()
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _relay_stream(
    ctx: RequestContext,
    response: UpstreamResponse,
    first: bytes,
    scope: Scope,
    receive: Receive,
    send: Send,
    clock: Clock,
    backend: Backend,
) -> bool:
    """Relay a stream whose first chunk was read; True if the upstream body was read to its
    end (the connection can be reused)."""
    scanner = StreamScanner(strip_usage_chunk=ctx.injected_usage)
    headers = client_response_headers(response.raw_headers, ctx.response_headers)
    if response.at_eof():
        # The whole answer came with the first read (under load a stream is often all
        # generated before the gateway reads it): nothing is left to wait for, so no
        # disconnect watch is set up, and it leaves whole, with its length, in one write
        # (not in chunked framing, which would copy it once more).
        body = scanner.feed(first)
        body += _stream_end(ctx, scanner, None)
        if ctx.usage is None:
            await _estimate_relayed(ctx, scanner)
        headers.append((b"content-length", str(len(body)).encode("ascii")))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        if body and ctx.ttfb is None:
            ctx.ttfb = clock.monotonic()
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return True
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    try:
        held, ended, broke, gone = await _relay_events(
            ctx, response, first, scanner, scope, receive, send, clock, backend
        )
    except asyncio.CancelledError:
        _cut_short(ctx, scanner)  # at shutdown, mid-stream
        raise
    if gone and not scanner.done:
        ctx.outcome = Outcome.ABORTED
        ctx.usage, ctx.model = scanner.usage, scanner.model or ctx.model
        if ctx.usage is None:
            await _estimate_relayed(ctx, scanner)
        return False
    tail = _stream_end(ctx, scanner, broke)
    if ctx.usage is None:
        await _estimate_relayed(ctx, scanner)
    if held and ctx.ttfb is None:
        ctx.ttfb = clock.monotonic()
    await send({"type": "http.response.body", "body": held + tail, "more_body": False})
    return ended and broke is None


def _cut_short(ctx: RequestContext, scanner: StreamScanner) -> None:
    """A stream cut off before its end by the task's cancellation (a shutdown): the record
    still says what the client got, the backend's usage if it came, else the estimate of
    what was relayed, made at once (``_estimate_now``)."""
    ctx.usage, ctx.model = scanner.usage, scanner.model or ctx.model
    if ctx.usage is None:
        _estimate_now(ctx, scanner.relayed_text, scanner.relayed_bytes, scanner.relayed_share)


async def _estimate_relayed(ctx: RequestContext, scanner: StreamScanner) -> None:
    """A stream ended, or was left by its client, without usage, though the gateway asked
    for it: a backend that ignores ``stream_options`` (an older API version, another
    OpenAI-compatible server), a ``response.failed`` without it, or a stream cut short.
    Counted as an estimate of what was relayed, never as zero, which would pass for the
    backend's count and settle limits at nothing."""
    await _estimate(ctx, scanner.relayed_text, scanner.relayed_bytes, scanner.relayed_share)


def _stream_end(ctx: RequestContext, scanner: StreamScanner, broke: str | None) -> bytes:
    """Take the stream's usage into ``ctx`` and return what is left to send after the events
    relayed: the scanner's rest, and an error event when the stream was not complete. A
    ``ctx.usage`` left None is the caller's to estimate (``_estimate_relayed``)."""
    ctx.usage, ctx.model = scanner.usage, scanner.model or ctx.model
    tail = scanner.flush()
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
        tail += b"data: " + orjson.dumps(error) + b"\n\n"
    elif scanner.failed:
        # Whole, and the client has the backend's own account of the failure; the record
        # says it failed, so that dashboards and charge-back do not count it as served.
        ctx.outcome = Outcome.BACKEND_ERROR
        ctx.error_code = "ResponseFailed"
    return tail


async def _relay_events(
    ctx: RequestContext,
    response: UpstreamResponse,
    first: bytes,
    scanner: StreamScanner,
    scope: Scope,
    receive: Receive,
    send: Send,
    clock: Clock,
    backend: Backend,
) -> tuple[bytes, bool, str | None, bool]:
    """Relay the events of a stream still arriving until it ends, breaks off or the client
    leaves (the backend's response is closed at once then). Returns the events held back to
    leave with the stream's end, whether the backend's body was read to its end, why it
    broke off (None: it did not), and whether the client left."""
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
    ended = False
    held = b""  # the last events, sent with the end of the stream
    between = backend.between_chunks_timeout
    loop_time = ctx.deadlines.loop().time
    try:
        # One watch for the whole relay: its deadline is moved before each read and lifted
        # while the client is sent to (a slow reader is not the backend's fault).
        with ctx.deadlines.at(_INFINITY) as watch:
            chunk = first
            while chunk:
                out = scanner.feed(chunk)
                if response.at_eof():
                    # The backend's answer is all in: these events leave with the stream's
                    # end, in one write.
                    held, ended = out, True
                    break
                if out:
                    if ctx.ttfb is None:
                        ctx.ttfb = clock.monotonic()
                    watch.deadline = _INFINITY
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if gone:
                    break
                watch.deadline = loop_time() + between
                chunk = await response.readany()
            else:
                ended = True
    except TimeoutError:
        broke = f"no data for {between:g} s"
    except OSError as exc:
        broke = type(exc).__name__
    finally:
        if hook is not None:
            hook.remove(client_gone)
        elif watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    return held, ended, broke, gone


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
