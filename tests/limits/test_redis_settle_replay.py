"""Settles that fail while Redis is unreachable are replayed when it answers again, once.

On private redis-servers of the test's own (``tests/support/redis_server.py``), stopped and
started again, and behind a TCP proxy of the test's that can lose a reply after Redis ran the
command and then refuse connections for a while. The store's retry interval runs on the fake
clock; only the servers take real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sluicegate.clock import FakeClock
from sluicegate.limits.admission import Reservation
from sluicegate.limits.limiter import Limiter, LimitRequest
from sluicegate.limits.policy import LimitPolicy
from sluicegate.limits.redis_store import HELD_SUFFIX, ORIGIN_SUFFIX, RedisStore
from sluicegate.metrics.registry import GatewayMetrics
from tests.support.redis_server import RedisServer

QUOTA = LimitPolicy(tokens_per_minute=100_000, token_quota=100_000, token_quota_period="monthly")


@pytest.fixture
def persistent_server() -> Iterator[RedisServer]:
    """A private Redis whose data survives a stop and start (AOF, written at shutdown)."""
    with RedisServer(extra_args=("--appendonly", "yes")) as server:
        yield server


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private Redis that starts empty again after a stop (a lost cache node)."""
    with RedisServer() as private:
        yield private


def probe_client(url: str) -> aioredis.Redis:
    """The test's own client, reconnecting once after a restart dropped its connection."""
    return aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 1))


async def counters(client: aioredis.Redis, prefix: str, key: str) -> tuple[int, int, int]:
    """``key``'s quota counter, its TPM window's sum and its quota's tokens in flight."""
    quota = tpm = held = -1
    async for name in client.scan_iter(match=f"{prefix}{key}:*"):
        text = name.decode()
        if text.endswith(":tpm"):
            tpm = int(await client.hget(name, "-1") or -1)
        elif text.endswith(HELD_SUFFIX):
            held = sum(int(v) for v in (await client.hgetall(name)).values())
        elif not text.endswith(ORIGIN_SUFFIX) and ":quota:" in text:
            quota = int(await client.get(name) or -1)
    return quota, tpm, max(held, 0)


async def recover(store: RedisStore, limiter: Limiter, clock: FakeClock) -> None:
    """After the retry interval, an admission probes Redis (of another key) and succeeds;
    the replay it starts has ended when this returns."""
    clock.advance(store.retry_interval_s)
    probe = await limiter.admit([LimitRequest("sub:probe", QUOTA, 1)])
    assert probe.allowed and probe.reservation is not None
    assert probe.reservation.origin == "redis"
    await store.replayed()


async def admit(limiter: Limiter, key: str, tokens: int) -> Reservation:
    admission = await limiter.admit([LimitRequest(key, QUOTA, tokens)])
    assert admission.allowed and admission.reservation is not None
    assert admission.reservation.origin == "redis"
    return admission.reservation


async def test_a_settle_that_failed_lands_once_redis_is_back(
    persistent_server: RedisServer, clock: FakeClock
) -> None:
    """Admitted with an estimate of 5,000, Redis stops, the request settles at 200: the
    settle fails and is queued, not dropped. Once Redis is back (with its data), the replay
    leaves the quota and the TPM window at the real usage and nothing in flight."""
    prefix = f"sgtest:{uuid.uuid4().hex}:"
    store = RedisStore(persistent_server.url, prefix, clock, fail_mode="closed")
    metrics = GatewayMetrics()
    metrics.watch_limit_store(store)
    limiter = Limiter(store, clock)
    client = probe_client(persistent_server.url)
    try:
        reservation = await admit(limiter, "sub:t", 5000)
        assert await counters(client, prefix, "sub:t") == (5000, 5000, 5000)

        persistent_server.stop()
        await limiter.settle(reservation, 200)
        # Two adjustments (its TPM window's and its quota's), queued, not dropped.
        assert store.stats.failed_adjustments == 2 and store.queued_adjustments == 2
        assert b"sluicegate_limit_adjustments_queued 2.0" in metrics.render()

        persistent_server.start()
        assert await counters(client, prefix, "sub:t") == (5000, 5000, 5000)  # survived
        await recover(store, limiter, clock)
        assert await counters(client, prefix, "sub:t") == (200, 200, 0)
        assert store.queued_adjustments == 0
        assert (store.stats.replayed_adjustments, store.stats.dropped_adjustments) == (2, 0)
        rendered = metrics.render()
        assert b"sluicegate_limit_adjustments_replayed_total 2.0" in rendered
        assert b"sluicegate_limit_adjustments_queued 0.0" in rendered
    finally:
        await store.aclose()
        await client.aclose()


class ReplyLosingProxy:
    """A TCP proxy to Redis that, when ``armed``, forwards the next EVALSHA, drops its reply
    (so Redis ran it, the client never learns) and then closes every new connection until
    ``heal()`` (so the client's immediate reconnect and resend fail too)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.armed = False
        self.blocked = False
        self.lost = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{self.port}/0"

    def heal(self) -> None:
        self.blocked = False

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        sent_evalsha = False

        async def to_redis() -> None:
            nonlocal sent_evalsha
            while data := await reader.read(65536):
                sent_evalsha = b"EVALSHA" in data
                up_writer.write(data)
                await up_writer.drain()

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                if self.armed and sent_evalsha and not data.startswith(b"-"):
                    self.armed = False
                    self.blocked = True
                    self.lost += 1
                    return
                writer.write(data)
                await writer.drain()

        pipes = [asyncio.ensure_future(to_redis()), asyncio.ensure_future(to_client())]
        for task in pipes:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for task in pipes:
            task.cancel()
        for w in (writer, up_writer):
            w.close()


@pytest.fixture
async def losing_proxy(server: RedisServer) -> AsyncIterator[ReplyLosingProxy]:
    proxy = ReplyLosingProxy(server.port)
    yield proxy
    await proxy.aclose()


async def test_a_settle_that_ran_before_its_reply_was_lost_is_replayed_once(
    server: RedisServer, losing_proxy: ReplyLosingProxy, clock: FakeClock
) -> None:
    """Redis ran the settle's batch, the reply was lost and the resend refused: the store
    cannot tell, and queues it. The replay goes under the failed batch's key, which Redis
    still holds: nothing runs twice (a second refund of 4,800 would leave the quota at 0)."""
    prefix = f"sgtest:{uuid.uuid4().hex}:"
    store = RedisStore(await losing_proxy.start(), prefix, clock, fail_mode="closed")
    limiter = Limiter(store, clock)
    client = probe_client(server.url)
    try:
        first = await admit(limiter, "sub:t", 5000)
        second = await admit(limiter, "sub:t", 5000)
        assert await counters(client, prefix, "sub:t") == (10_000, 10_000, 10_000)

        losing_proxy.armed = True
        await limiter.settle(first, 200)
        assert losing_proxy.lost == 1
        assert store.queued_adjustments == 2
        assert await counters(client, prefix, "sub:t") == (5200, 5200, 5000)  # it ran

        losing_proxy.heal()
        await recover(store, limiter, clock)
        assert store.queued_adjustments == 0 and store.stats.replayed_adjustments == 2
        assert await counters(client, prefix, "sub:t") == (5200, 5200, 5000)  # once
        await limiter.settle(second, 300)
        assert await counters(client, prefix, "sub:t") == (500, 500, 0)
    finally:
        await store.aclose()
        await client.aclose()


async def test_a_replay_leaves_a_quota_that_redis_lost_and_counted_anew_alone(
    server: RedisServer, clock: FakeClock
) -> None:
    """Redis restarts empty while the settle waits: the quota key is created again by the
    next admission (and would be seeded from the ledger, which has the real usage). The
    replayed refund of the lost estimate must not come off the new counter."""
    prefix = f"sgtest:{uuid.uuid4().hex}:"
    store = RedisStore(server.url, prefix, clock, fail_mode="closed")
    limiter = Limiter(store, clock)
    client = probe_client(server.url)
    try:
        reservation = await admit(limiter, "sub:t", 5000)
        server.stop()
        await limiter.settle(reservation, 200)
        assert store.queued_adjustments == 2
        server.start()  # empty
        clock.advance(store.retry_interval_s)
        await admit(limiter, "sub:t", 300)  # creates the quota key anew
        await store.replayed()
        assert store.stats.replayed_adjustments == 2
        assert (await counters(client, prefix, "sub:t"))[0] == 300  # not max(300 - 4800, 0)
    finally:
        await store.aclose()
        await client.aclose()


async def test_the_queue_is_bounded_and_over_windows_are_dropped(
    server: RedisServer, clock: FakeClock
) -> None:
    """At most ``max_replay`` adjustments wait (the oldest go first, counted); a TPM
    window's settle is not replayed once its bucket has left every window, while a quota's
    still is (until its period and grace are over)."""
    prefix = f"sgtest:{uuid.uuid4().hex}:"
    store = RedisStore(server.url, prefix, clock, fail_mode="closed", max_replay=3)
    limiter = Limiter(store, clock)
    tpm_only = LimitPolicy(tokens_per_minute=100_000)
    client = probe_client(server.url)
    try:
        reservations = [await admit(limiter, f"sub:{n}", 1000) for n in range(2)]
        tpm = await limiter.admit([LimitRequest("sub:tpm", tpm_only, 1000)])
        assert tpm.allowed and tpm.reservation is not None
        server.stop()
        # Each settle of sub:n is two adjustments (its TPM window and its quota).
        for reservation in reservations:
            await limiter.settle(reservation, 100)
        await limiter.settle(tpm.reservation, 100)
        assert store.stats.failed_adjustments == 5
        assert store.queued_adjustments == 3 and store.stats.dropped_adjustments == 2
        server.start()  # empty: only the drop counts matter
        clock.advance(121)  # the TPM settles' buckets have left every window
        await recover(store, limiter, clock)
        assert store.queued_adjustments == 0
        # sub:0's two went for room; sub:1's and sub:tpm's TPM settles are over: sub:1's
        # quota settle is the one replayed.
        assert store.stats.dropped_adjustments == 4
        assert store.stats.replayed_adjustments == 1
    finally:
        await store.aclose()
        await client.aclose()
