"""Putting an answer on the wire: whole, streamed (paced), cut half-way, or never (hang).

These functions do the I/O the handlers decided on; they record what really went out
(``tokens_sent``, ``client_gone``) in the call's truth record.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from sluicegate.simulator.sse import StreamPlan
from sluicegate.simulator.state import Call, SimulatorState

SSE_TYPE = "text/event-stream; charset=utf-8"
_HANG_POLL_S = 0.05


async def send_body(request: web.Request, call: Call, body: bytes, cut: bool) -> web.StreamResponse:
    """The whole JSON body, or with ``cut`` its first half under the full ``content-length``
    followed by a closed connection (the client sees a truncated body)."""
    if not cut:
        return call.respond(200, body)
    call.record.status = 200
    response = web.StreamResponse(status=200, headers=call.headers)
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    if request.transport is not None:
        request.transport.close()
    return response


async def send_stream(
    request: web.Request,
    call: Call,
    plan: StreamPlan,
    tokens_per_second: float,
    delay: float,
    cut: bool,
) -> web.StreamResponse:
    """Status and headers after ``delay`` s (time to first token), then the events.

    Token *i* is due ``i / tokens_per_second`` s after the first; each wake-up writes every
    token already due in one write, so high rates do not cost one sleep per token. With
    ``tokens_per_second`` 0 the whole stream goes out in one write. ``cut`` stops after half
    the tokens and closes the connection: no finish chunk, no usage, no ``[DONE]``.
    """
    if delay > 0:
        await asyncio.sleep(delay)
    headers = dict(call.headers)
    headers["content-type"] = SSE_TYPE
    headers["cache-control"] = "no-cache"
    headers["x-accel-buffering"] = "no"
    call.record.status = 200
    response = web.StreamResponse(status=200, headers=headers)
    stop = plan.count // 2 if cut else plan.count
    sent = 0
    try:
        await response.prepare(request)
        if tokens_per_second <= 0:
            await response.write(plan.head + plan.tokens(0, stop) + (b"" if cut else plan.tail))
            sent = stop
        else:
            await response.write(plan.head)
            loop = asyncio.get_running_loop()
            start = loop.time()
            while sent < stop:
                due = min(stop, int((loop.time() - start) * tokens_per_second) + 1)
                if due > sent:
                    await response.write(plan.tokens(sent, due))
                    sent = due
                if sent < stop:
                    await asyncio.sleep(max(0.0, start + sent / tokens_per_second - loop.time()))
            if not cut:
                await response.write(plan.tail)
    except ConnectionError:
        call.record.client_gone = True
    finally:
        call.record.tokens_sent = sent
    if cut and request.transport is not None:
        request.transport.close()
    return response


async def hang(
    request: web.Request, call: Call, state: SimulatorState, max_s: float
) -> web.StreamResponse:
    """Answer nothing until the client disconnects, ``max_s`` passes or the app shuts down;
    then drop the connection. Polls the transport, so it also works without aiohttp's handler
    cancellation (with it, the client's hang-up cancels this coroutine directly)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_s
    while loop.time() < deadline and not state.closing:
        transport = request.transport
        if transport is None or transport.is_closing():
            call.record.client_gone = True
            break
        await asyncio.sleep(_HANG_POLL_S)
    transport = request.transport
    if transport is not None:
        transport.close()
    # Nothing reaches the client: the transport is closed and aiohttp drops this response.
    return web.Response(status=504)
