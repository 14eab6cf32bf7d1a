"""TCP proxies in front of Redis, for tests: a Redis failover behind one address (two private
redis-servers and a proxy that sends each new connection to the current primary, as a
Kubernetes Service, HAProxy or a DNS name would), and a proxy that loses one reply."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

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


class ReplyDroppingProxy:
    """A TCP proxy to the Redis on port ``target`` (the test Redis by default) that can lose
    one reply: when armed, it forwards the next EVALSHA to Redis, reads Redis's reply (so the
    command has run) and closes the client's connection instead of passing the reply on, as
    a network failure at the worst moment would. Every other exchange is forwarded as it is;
    so is every later connection, unless ``refuse_after_drop``: then each new connection is
    closed at once until ``heal()`` (so the client's immediate reconnect and resend fail too).
    """

    def __init__(self, target: int = 6379, *, refuse_after_drop: bool = False) -> None:
        self.target = target
        self.refuse_after_drop = refuse_after_drop
        self.refusing = False
        self.armed = False
        self.connections = 0
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._serving: set[asyncio.Task[Any]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    def heal(self) -> None:
        """Accept new connections again (after a drop with ``refuse_after_drop``)."""
        self.refusing = False

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._serving, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        self.connections += 1
        if self.refusing:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += (writer, up_writer)
        sent_evalsha = False  # the client's last command (redis-py awaits each reply)

        async def to_redis() -> None:
            nonlocal sent_evalsha
            while data := await reader.read(65536):
                sent_evalsha = b"$7\r\nEVALSHA\r\n" in data
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                # An error (NOSCRIPT) means nothing ran: only a reply of a batch that ran is lost.
                if self.armed and sent_evalsha and not data.startswith(b"-"):
                    self.armed = False
                    self.dropped += 1
                    self.refusing = self.refuse_after_drop
                    writer.close()
                    up_writer.close()
                    return
                writer.write(data)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(to_redis(), to_client())
        except (ConnectionError, OSError):
            writer.close()
            up_writer.close()


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
