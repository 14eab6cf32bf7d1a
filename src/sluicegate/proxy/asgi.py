"""Small ASGI helpers for the hot path (pure ASGI: no framework per request)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import orjson

from sluicegate.proxy.errors import GatewayError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_CT = (b"content-type", b"application/json; charset=utf-8")


class ClientGone(Exception):
    """The client disconnected before the request was read."""


#: Scope extension under which the gateway's HTTP protocol (``server.GatewayHttpProtocol``)
#: offers a :class:`DisconnectHook` for the request.
DISCONNECT_HOOK = "sluicegate.disconnect"


class DisconnectHook:
    """Callbacks run, in the event loop, when the client's connection is lost.

    The ASGI way to learn of a disconnect is a task blocked in ``receive()``; for a stream
    that is a task per request. The gateway's own HTTP protocol offers this hook instead
    (``scope["extensions"][DISCONNECT_HOOK]["hook"]``), so a relay registers a callback and pays
    nothing unless the client really leaves. Other servers: no hook, use ``receive()``.

    ``transport`` (the connection's): what ``abort`` drops.
    """

    __slots__ = ("_callbacks", "fired", "transport")

    def __init__(self, transport: asyncio.Transport | None = None) -> None:
        self._callbacks: list[Callable[[], None]] = []
        self.transport = transport
        self.fired = False

    def abort(self) -> None:
        """Drop the client's connection at once, bytes not yet written included
        (``transport.abort()``): for a client that took nothing for ``client_write``. The
        connection is then lost as for a client that left (the callbacks run, the request
        hears ``http.disconnect``). Left to uvicorn, an unfinished response is closed with
        ``close()``, which waits for the buffered bytes to be written: a client that never
        reads again would keep its connection, and a slot of ``listen.max_connections``,
        until it hung up. Nothing without a transport (a hook made without one)."""
        if self.transport is not None:
            self.transport.abort()

    def add(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on disconnect (at once if the client has already gone)."""
        if self.fired:
            callback()
        else:
            self._callbacks.append(callback)

    def remove(self, callback: Callable[[], None]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def fire(self) -> None:
        """Called by the protocol when the connection is lost; runs each callback once."""
        self.fired = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                logging.getLogger("sluicegate.proxy").exception("a disconnect callback failed")


def disconnect_hook(scope: Mapping[str, object]) -> DisconnectHook | None:
    """The request's disconnect hook, when the server offers one."""
    extensions = scope.get("extensions")
    entry = extensions.get(DISCONNECT_HOOK) if isinstance(extensions, dict) else None
    hook = entry.get("hook") if isinstance(entry, dict) else None
    return hook if isinstance(hook, DisconnectHook) else None


async def send_bytes(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode("ascii"))],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(
    send: Send, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send_bytes(send, status, orjson.dumps(obj), [JSON_CT, *(headers or [])])


async def send_error(send: Send, error: GatewayError, extra: list[tuple[bytes, bytes]]) -> None:
    headers = [JSON_CT, *extra]
    headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in error.headers)
    await send_bytes(send, error.status, error.body(), headers)


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes with 413 (early, from
    ``content-length``, when the client declares it)."""
    declared = header(scope, b"content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise GatewayError(400, "InvalidRequest", "Content-Length is not a number.") from None
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise _too_large(limit)
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        "RequestEntityTooLarge",
        f"The request body is larger than this gateway accepts ({limit} bytes). "
        "Send a smaller request.",
    )
