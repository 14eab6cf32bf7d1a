"""The ceiling for a Python proxy: a bare pass-through, no policy at all.

uvicorn (uvloop + httptools) serving a raw ASGI app that forwards every request,
path and query unchanged, to one upstream through one pooled aiohttp session.
JSON answers are read whole and sent with their length; event streams are
relayed chunk by chunk as they arrive. Nothing else: no auth, no limits, no
usage parsing, no logging. Run: ``python bench/bare_proxy.py --port 9003 --upstream
http://127.0.0.1:9001``.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
HOP = {b"host", b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"upgrade"}


def make_app(upstream: str) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI app forwarding to ``upstream``; owns one ClientSession for its lifespan."""
    session: aiohttp.ClientSession | None = None

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while (msg := await receive())["type"] != "lifespan.shutdown":
                connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
                session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
                await send({"type": "lifespan.startup.complete"})
            if session is not None:
                await session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert session is not None
        assert scope["type"] == "http"
        body, more = b"", True
        while more:
            msg = await receive()
            body, more = body + msg.get("body", b""), msg.get("more_body", False)
        url = (
            upstream
            + scope["raw_path"].decode()
            + (("?" + scope["query_string"].decode()) if scope["query_string"] else "")
        )
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k not in HOP}
        async with session.request(scope["method"], url, data=body, headers=headers) as resp:
            out = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in HOP]
            if resp.content_type != "text/event-stream":
                data = await resp.read()
                out.append((b"content-length", str(len(data)).encode()))
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                await send({"type": "http.response.body", "body": data})
                return
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bare pass-through proxy for benchmarks")
    parser.add_argument("--port", type=int, default=9003)
    parser.add_argument("--upstream", default="http://127.0.0.1:9001")
    args = parser.parse_args(argv)
    uvicorn.run(
        make_app(args.upstream.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
