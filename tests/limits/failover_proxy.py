"""A Redis failover behind one address, for tests: two private redis-servers and a TCP proxy
(as a Kubernetes Service, HAProxy or a DNS name would) that sends each new connection to the
current primary."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis

from tests.support.redis_server import RedisServer


class PrimaryProxy:
    """A TCP proxy on 127.0.0.1 sending each new connection to ``target`` (a port)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        pipes = [
            asyncio.ensure_future(_pipe(reader, up_writer)),
            asyncio.ensure_future(_pipe(up_reader, writer)),
        ]
        for task in pipes:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for task in pipes:
            task.cancel()
        for w in (writer, up_writer):
            w.close()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def failover() -> AsyncIterator[tuple[PrimaryProxy, Callable[[], Awaitable[None]]]]:
    """Two private servers, the proxy in front of the first (the second its replica), and a
    coroutine function that swaps their roles and points the proxy at the second."""
    with RedisServer() as first, RedisServer() as second:
        async with _failover(first, second) as pair:
            yield pair


@contextlib.asynccontextmanager
async def _failover(
    first: RedisServer, second: RedisServer
) -> AsyncIterator[tuple[PrimaryProxy, Callable[[], Awaitable[None]]]]:
    a = aioredis.Redis.from_url(first.url)
    b = aioredis.Redis.from_url(second.url)
    await b.replicaof("127.0.0.1", first.port)

    async def linked() -> bool:
        return (await b.info("replication")).get("master_link_status") == "up"

    await wait_until(linked, "the replica in sync")
    proxy = PrimaryProxy(first.port)
    await proxy.start()

    async def swap() -> None:
        await b.replicaof("NO", "ONE")
        await a.replicaof("127.0.0.1", second.port)
        proxy.target = second.port

        async def demoted() -> bool:
            return (await a.role())[0] in (b"slave", "slave")

        await wait_until(demoted, "the first server demoted")

    try:
        yield proxy, swap
    finally:
        await proxy.aclose()
        await a.aclose()
        await b.aclose()
