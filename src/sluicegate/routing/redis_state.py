"""Backend state shared through Redis (cluster mode), off the request path.

Everything lives in one hash, ``{prefix}targets``, with two fields per target:
``trip:{key}`` (JSON: open until, reason, throttled) and ``headroom:{key}`` (JSON: remaining
and limit tokens/requests, reported at). A background task does, every ``interval`` seconds:

1. push: one pipelined ``HSET`` of what this instance published since the last round (only
   the latest report per target; a trip only if it ends later than the one already pushed),
   plus a ``PEXPIRE`` so that an abandoned hash disappears;
2. pull: one ``HGETALL``, and the listeners hear every field that changed since last pull.

So a request never waits for Redis: a trip reaches the other instances within about one
interval (0.25 s by default), and the cost is two round trips per instance per interval,
whatever the traffic. Concurrent writers of one field: the last write wins — for trips, each
instance's breaker keeps the later end it has seen (``force_open`` never shortens), so a
shorter trip written last is harmless; for reports, a slightly older report may win for one
interval.

When Redis cannot be reached each instance keeps routing on its own state (fail open: a
routing store outage must not stop traffic); a warning is logged once per outage and the
exchange resumes by itself. After a failed round the pool's idle connections are closed, so
that the next round connects anew: behind an address that follows the primary after a
failover (a Kubernetes Service, HAProxy, a DNS name), a kept connection would keep writing to
the demoted node and be refused (``READONLY``) for ever.

Responses affinity's shared ids (``RedisResponseIds``, made by ``response_ids()``) use the
same client: ``{prefix}resp:{id}`` keys, written after the answers that carry them and read
only by requests that name an id this instance does not know (docs/routing.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sluicegate.routing.headroom import Report
from sluicegate.routing.state import Listener, SharedHeadroom, SharedTrip, SharedUpdate

log = logging.getLogger("sluicegate.routing")

_TRIP = "trip:"
_HEADROOM = "headroom:"


def _encode_trip(trip: SharedTrip) -> bytes:
    return orjson.dumps({"until": trip.open_until, "reason": trip.reason, "t": trip.throttled})


def _encode_headroom(h: SharedHeadroom) -> bytes:
    r = h.report
    return orjson.dumps(
        {
            "rt": r.remaining_tokens,
            "rr": r.remaining_requests,
            "lt": r.limit_tokens,
            "lr": r.limit_requests,
            "at": h.reported_at,
        }
    )


def decode_field(field: str, value: bytes) -> SharedUpdate | None:
    """One hash field back into an update; None for anything unreadable (ignored)."""
    try:
        data: dict[str, Any] = orjson.loads(value)
        if field.startswith(_TRIP):
            trip = SharedTrip(float(data["until"]), str(data["reason"]), bool(data["t"]))
            return SharedUpdate(field[len(_TRIP) :], trip=trip)
        if field.startswith(_HEADROOM):
            report = Report(data["rt"], data["rr"], data.get("lt"), data.get("lr"))
            return SharedUpdate(
                field[len(_HEADROOM) :], headroom=SharedHeadroom(report, float(data["at"]))
            )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return None


class RedisStateStore:
    """A :class:`~sluicegate.routing.state.BackendStateStore` on Redis (module docstring).

    ``url_or_client``: a ``redis://`` URL (the store owns its client) or a client the caller
    owns. ``prefix`` starts the hash's name (give each gateway deployment its own).
    ``ttl`` (seconds) is how long the hash outlives the last write.
    """

    def __init__(
        self,
        url_or_client: str | aioredis.Redis,
        prefix: str,
        *,
        interval: float = 0.25,
        ttl: float = 3600.0,
        socket_timeout: float = 0.5,
    ) -> None:
        if isinstance(url_or_client, str):
            # Blocking: a response-id lookup (``RedisResponseIds``) that finds every
            # connection busy waits for one (up to ``socket_timeout``) instead of failing.
            pool = aioredis.BlockingConnectionPool.from_url(
                url_or_client,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                max_connections=8,
                timeout=socket_timeout,
            )
            self._client: aioredis.Redis = aioredis.Redis.from_pool(pool)
            self._owns_client = True
        else:
            self._client = url_or_client
            self._owns_client = False
        self.hash_key = f"{prefix}targets"
        self.interval = interval
        self.ttl_ms = int(ttl * 1000)
        self._listeners: list[Listener] = []
        self._pending: dict[str, bytes] = {}
        self._pending_trip_ends: dict[str, float] = {}
        self._seen: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.healthy = True
        self.rounds = 0
        self._response_ids: RedisResponseIds | None = None
        self._prefix = prefix

    def response_ids(self) -> RedisResponseIds:
        """The response-id store of Responses affinity, on this store's connections
        (``{prefix}resp:{id}``); closed with the store."""
        if self._response_ids is None:
            self._response_ids = RedisResponseIds(self._client, self._prefix)
        return self._response_ids

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def publish_trip(self, key: str, trip: SharedTrip) -> None:
        if self._pending_trip_ends.get(key, 0.0) >= trip.open_until:
            return
        self._pending_trip_ends[key] = trip.open_until
        self._pending[_TRIP + key] = _encode_trip(trip)

    def publish_headroom(self, key: str, headroom: SharedHeadroom) -> None:
        self._pending[_HEADROOM + key] = _encode_headroom(headroom)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="sluicegate-routing-sync"
            )

    async def _run(self) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(self.interval)

    async def sync(self) -> None:
        async with self._lock:  # the loop and a caller (tests, shutdown) never interleave
            pending, self._pending = self._pending, {}
            try:
                if pending:
                    async with self._client.pipeline(transaction=False) as pipe:
                        pipe.hset(self.hash_key, mapping=pending)  # type: ignore[arg-type]
                        pipe.pexpire(self.hash_key, self.ttl_ms)
                        await pipe.execute()
                raw: dict[bytes | str, bytes | str] = await self._client.hgetall(self.hash_key)
            except (RedisError, OSError) as exc:
                # Keep what was not pushed (newer publications win over it).
                self._pending = {**pending, **self._pending}
                # Reconnect next round (module docstring). Idle ones only: the failed
                # connection is back in the pool, and a client the caller owns may have
                # commands of its own in progress on others.
                with contextlib.suppress(Exception):
                    await self._client.connection_pool.disconnect(inuse_connections=False)
                if self.healthy:
                    self.healthy = False
                    log.warning(
                        "routing state: Redis unreachable (%s); each instance routes "
                        "on its own state until it is back",
                        type(exc).__name__,
                    )
                return
            if not self.healthy:
                self.healthy = True
                log.warning("routing state: Redis reachable again")
            self.rounds += 1
        self._deliver(raw)

    def _deliver(self, raw: dict[bytes | str, bytes | str]) -> None:
        for raw_field, raw_value in raw.items():
            field = raw_field if isinstance(raw_field, str) else raw_field.decode("utf-8")
            value = raw_value.encode() if isinstance(raw_value, str) else raw_value
            if self._seen.get(field) == value:
                continue
            self._seen[field] = value
            update = decode_field(field, value)
            if update is None:
                continue
            for listener in self._listeners:
                try:
                    listener(update)
                except Exception:
                    log.exception("a routing state listener failed")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pending:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.sync(), timeout=1.0)
        if self._response_ids is not None:
            await self._response_ids.aclose()
        if self._owns_client:
            await self._client.aclose()

    def __repr__(self) -> str:
        return (
            f"RedisStateStore(hash={self.hash_key!r}, interval={self.interval}, "
            f"healthy={self.healthy}, pending={len(self._pending)}, rounds={self.rounds})"
        )


#: How long Redis keeps a response id: Azure keeps a stored response for 30 days.
RESPONSE_ID_TTL = 30 * 24 * 3600


class RedisResponseIds:
    """Responses affinity's shared ids (``routing/affinity.py``): ``{prefix}resp:{id}`` →
    the backend's name, kept ``RESPONSE_ID_TTL`` seconds.

    ``remember`` never waits: it queues the id, and one writer task (started when the queue
    was empty) sends everything queued meanwhile as one pipeline of ``SET … EX``; under load
    the writes of many answers share a round trip. A write that fails is dropped (the id is
    still known to this instance) and counted in ``write_errors``, with a warning once per
    outage. ``lookup`` is one ``GET``, for a continuation this instance does not know; a
    failure is counted (``lookup_errors``) and answers None (the request is routed as if the
    id were unknown). Both share the routing store's client and connection pool."""

    def __init__(self, client: aioredis.Redis, prefix: str, ttl: int = RESPONSE_ID_TTL) -> None:
        self._client = client
        self.key_prefix = f"{prefix}resp:"
        self.ttl = ttl
        self._queued: dict[str, str] = {}
        self._writer: asyncio.Task[None] | None = None
        self.written = 0
        self.write_errors = 0
        self.lookups = 0
        self.lookup_errors = 0
        self.healthy = True

    def remember(self, response_id: str, backend: str) -> None:
        self._queued[response_id] = backend
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(
                self._write(), name="sluicegate-response-ids"
            )

    async def _write(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, {}
                try:
                    async with self._client.pipeline(transaction=False) as pipe:
                        for response_id, backend in batch.items():
                            pipe.set(self.key_prefix + response_id, backend, ex=self.ttl)
                        await pipe.execute()
                except (RedisError, OSError) as exc:
                    self.write_errors += len(batch)
                    self._unhealthy("writing", exc)
                    return
                self.written += len(batch)
                self._healthy()
        finally:
            self._writer = None

    async def lookup(self, response_id: str) -> str | None:
        self.lookups += 1
        try:
            value: bytes | str | None = await self._client.get(self.key_prefix + response_id)
        except (RedisError, OSError) as exc:
            self.lookup_errors += 1
            self._unhealthy("looking up", exc)
            return None
        self._healthy()
        if value is None:
            return None
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    def _unhealthy(self, doing: str, exc: BaseException) -> None:
        if self.healthy:
            self.healthy = False
            log.warning(
                "responses affinity: %s response ids in Redis failed (%s); continuations "
                "this instance did not learn itself are routed as usual until it is back",
                doing,
                type(exc).__name__,
            )

    def _healthy(self) -> None:
        if not self.healthy:
            self.healthy = True
            log.warning("responses affinity: Redis reachable again")

    async def aclose(self) -> None:
        """Wait (briefly) for the writes queued so far."""
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(writer), timeout=1.0)

    def __repr__(self) -> str:
        return (
            f"RedisResponseIds(prefix={self.key_prefix!r}, queued={len(self._queued)}, "
            f"written={self.written}, write_errors={self.write_errors}, "
            f"lookups={self.lookups}, lookup_errors={self.lookup_errors})"
        )
