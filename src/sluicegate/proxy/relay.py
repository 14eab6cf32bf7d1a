"""Forwarding a request to its backend and relaying the answer to the client.

JSON answers are read whole (they are small) and their ``usage`` read; streams are relayed
event by event as they arrive, never buffered whole, with the usage picked out of the final
chunk. The upstream response is always released in this module's own ``finally`` — also when
the client disconnects or the task is cancelled — and a disconnecting client closes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
import orjson

from sluicegate.accounting.records import Outcome
from sluicegate.clock import Clock
from sluicegate.proxy.asgi import Receive, Scope, Send
from sluicegate.proxy.context import RequestContext
from sluicegate.proxy.errors import GatewayError
from sluicegate.tokens.usage import StreamScanner, Usage, usage_from_body
from sluicegate.upstream.backend import Backend
from sluicegate.upstream.headers import client_response_headers, upstream_request_headers

log = logging.getLogger("sluicegate.relay")


async def forward(
    ctx: RequestContext,
    backend: Backend,
    scope: Scope,
    receive: Receive,
    send: Send,
    url: str,
    clock: Clock,
) -> None:
    """Send the request upstream and relay the response. Raises ``GatewayError`` only before
    anything was sent to the client."""
    headers = upstream_request_headers(scope["headers"], backend.auth_headers, ctx.request_id)
    backend.in_flight += 1
    try:
        try:
            async with asyncio.timeout(backend.first_byte_timeout):
                response = await backend.session.request(
                    scope["method"],
                    url,
                    data=ctx.body or None,
                    headers=headers,
                    allow_redirects=False,
                )
        except TimeoutError:
            ctx.outcome = Outcome.BACKEND_ERROR
            raise GatewayError(
                504,
                "BackendTimeout",
                f"The backend did not answer within {backend.first_byte_timeout:g} s. Retry later.",
                retry_after=1,
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            ctx.outcome = Outcome.BACKEND_ERROR
            raise GatewayError(
                502,
                "BackendUnavailable",
                "The gateway could not reach the backend that serves this deployment "
                f"({type(exc).__name__}). Retry later.",
                retry_after=1,
            ) from None
        try:
            ctx.status = response.status
            if response.status >= 500 or response.status == 429:
                ctx.outcome = Outcome.BACKEND_ERROR
            elif response.status >= 400:
                ctx.outcome = Outcome.CLIENT_ERROR
            if response.content_type == "text/event-stream":
                await _relay_stream(ctx, response, receive, send, clock)
            else:
                await _relay_whole(ctx, response, send, clock)
        finally:
            if ctx.outcome is Outcome.ABORTED:
                response.close()
            else:
                response.release()
    finally:
        backend.in_flight -= 1


async def _relay_whole(
    ctx: RequestContext, response: aiohttp.ClientResponse, send: Send, clock: Clock
) -> None:
    try:
        data = await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        ctx.outcome = Outcome.BACKEND_ERROR
        raise GatewayError(
            502,
            "BackendUnavailable",
            f"The backend's response broke off ({type(exc).__name__}). Retry later.",
            retry_after=1,
        ) from None
    if ctx.route.metered and response.status < 300:
        ctx.usage, ctx.model = usage_from_body(data)
    headers = client_response_headers(response.raw_headers, ctx.response_headers)
    headers.append((b"content-length", str(len(data)).encode("ascii")))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    ctx.ttfb = clock.monotonic()
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _relay_stream(
    ctx: RequestContext,
    response: aiohttp.ClientResponse,
    receive: Receive,
    send: Send,
    clock: Clock,
) -> None:
    scanner = StreamScanner(strip_usage_chunk=ctx.injected_usage)
    headers = client_response_headers(response.raw_headers, ctx.response_headers)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    gone = asyncio.Event()
    watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, gone, response))
    broke: str | None = None
    try:
        async for chunk in response.content.iter_any():
            out = scanner.feed(chunk)
            if out:
                if ctx.ttfb is None:
                    ctx.ttfb = clock.monotonic()
                await send({"type": "http.response.body", "body": out, "more_body": True})
            if gone.is_set():
                break
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        broke = type(exc).__name__
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    ctx.usage, ctx.model = scanner.usage, scanner.model or ctx.model
    if gone.is_set() and not scanner.done:
        ctx.outcome = Outcome.ABORTED
        _estimate(ctx, scanner)
        return
    tail = scanner.flush()
    if broke is not None or not scanner.done:
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
        if ctx.usage is None:
            _estimate(ctx, scanner)
    await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _watch_disconnect(
    receive: Receive, gone: asyncio.Event, response: aiohttp.ClientResponse
) -> None:
    """Wait for the client to go away; then close the upstream response at once."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            response.close()
            return


def _estimate(ctx: RequestContext, scanner: StreamScanner) -> None:
    """No usage came back: estimate the completion from the text the client received."""
    if ctx.usage is not None:
        return
    from sluicegate.tokens.estimate_text import estimate_text_tokens

    model = ctx.deployment.model if ctx.deployment else None
    completion = estimate_text_tokens(scanner.relayed_text(), model)
    prompt = ctx.prompt_estimate
    if prompt is None:
        from sluicegate.tokens.estimate import estimate_request_tokens

        prompt = estimate_request_tokens(
            ctx.json or {}, ctx.route.operation, model, 0
        ).prompt_tokens
    ctx.usage = Usage(prompt, completion, prompt + completion)
    ctx.usage_estimated = True
