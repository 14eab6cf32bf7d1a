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
interval. A trip's end is adopted capped at the adopting breaker's own ``max_trip`` from when
it arrives (``Router.apply``): a peer with a longer rule cannot keep a backend out longer than
this instance's rule allows.

When Redis cannot be reached each instance keeps routing on its own state (fail open: a
routing store outage must not stop traffic); a warning is logged once per outage and the
exchange resumes by itself. After a failed round the pool's idle connections are closed, so
that the next round connects anew: behind an address that follows the primary after a
failover (a Kubernetes Service, HAProxy, a DNS name), a kept connection would keep writing to
the demoted node and be refused (``READONLY``) for ever.

Responses affinity's shared ids (``RedisResponseIds``, made by ``response_ids()``) have their
own small connection pool on the same Redis: ``{prefix}resp:{id}`` keys, written as soon as
an answer's id is known and read only by requests that name a well-formed id this instance
does not know (docs/routing.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sluicegate.routing.affinity import Held
from sluicegate.routing.headroom import Report
from sluicegate.routing.state import Listener, SharedHeadroom, SharedTrip, SharedUpdate

log = logging.getLogger("sluicegate.routing")

_TRIP = "trip:"
_HEADROOM = "headroom:"

#: How long Redis keeps a response id by default: Azure keeps a stored response 30 days.
RESPONSE_ID_TTL = 30 * 24 * 3600
#: Connections of the response-id store's own pool (lookups wait for one, up to the socket
#: timeout; the writer uses one at a time).
RESPONSE_ID_CONNECTIONS = 4
#: Seconds a lookup that found nothing is remembered (repeats of an unknown id skip Redis),
#: and how many such misses are kept.
MISS_SECONDS = 5.0
MAX_MISSES = 10_000
#: Seconds after a failed Redis call during which lookups are skipped (answer None at once):
#: an outage costs one socket timeout per back-off, not one per request.
BACKOFF_SECONDS = 5.0


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
        self._url: str | None = None
        self._socket_timeout = socket_timeout
        if isinstance(url_or_client, str):
            self._client: aioredis.Redis = aioredis.Redis.from_url(
                url_or_client,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                max_connections=4,
            )
            self._owns_client = True
            self._url = url_or_client
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

    def response_ids(self, ttl: int = RESPONSE_ID_TTL) -> RedisResponseIds:
        """The response-id store of Responses affinity (``{prefix}resp:{id}``, kept ``ttl``
        seconds); closed with the store. Given a URL, it has its own small connection pool:
        requests that look ids up never wait behind (or hold up) the state exchange."""
        if self._response_ids is None:
            if self._url is not None:
                pool = aioredis.BlockingConnectionPool.from_url(
                    self._url,
                    socket_timeout=self._socket_timeout,
                    socket_connect_timeout=self._socket_timeout,
                    max_connections=RESPONSE_ID_CONNECTIONS,
                    timeout=self._socket_timeout,
                )
                client = aioredis.Redis.from_pool(pool)
                self._response_ids = RedisResponseIds(client, self._prefix, ttl, owns_client=True)
            else:
                self._response_ids = RedisResponseIds(self._client, self._prefix, ttl)
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


class RedisResponseIds:
    """Responses affinity's shared ids (``routing/affinity.py``): ``{prefix}resp:{id}`` →
    ``"<backend>\\t<subscription id>"`` (a tab between), kept ``ttl`` seconds.

    ``remember`` never waits: it queues the id, and one writer task (started when the queue
    was empty) sends everything queued meanwhile as one pipeline of ``SET … EX``; under load
    the writes of many answers share a round trip. ``forget`` (a deleted response) queues a
    ``DEL`` the same way. A write that fails is dropped (the id is
    still known to this instance) and counted in ``write_errors``, with a warning once per
    outage. ``lookup`` is at most one ``GET``: an id found missing is remembered as missing
    for ``MISS_SECONDS`` (at most ``MAX_MISSES`` of them), and after a failure (counted in
    ``lookup_errors``) lookups answer None without trying for ``BACKOFF_SECONDS`` (the
    request is routed as if the id were unknown). ``clock``: monotonic seconds."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        ttl: int = RESPONSE_ID_TTL,
        *,
        owns_client: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._owns_client = owns_client
        self._clock = clock
        self.key_prefix = f"{prefix}resp:"
        self.ttl = ttl
        #: Writes to send: an id's holder, or None to delete it (the latest call wins).
        self._queued: dict[str, Held | None] = {}
        self._writer: asyncio.Task[None] | None = None
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._retry_at = 0.0
        self.written = 0
        self.write_errors = 0
        self.lookups = 0
        self.lookup_errors = 0
        self.healthy = True

    def remember(self, response_id: str, held: Held) -> None:
        self._queued[response_id] = held
        self._misses.pop(response_id, None)
        self._start_writer()

    def forget(self, response_id: str) -> None:
        """Queue a ``DEL`` of ``response_id`` (a deleted response), with the writes."""
        self._queued[response_id] = None
        self._start_writer()

    def _start_writer(self) -> None:
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
                        for response_id, held in batch.items():
                            key = self.key_prefix + response_id
                            if held is None:
                                pipe.delete(key)
                            else:
                                pipe.set(key, f"{held[0]}\t{held[1]}", ex=self.ttl)
                        await pipe.execute()
                except (RedisError, OSError) as exc:
                    self.write_errors += len(batch)
                    self._unhealthy("writing", exc)
                    return
                self.written += len(batch)
                self._healthy()
        finally:
            self._writer = None

    async def lookup(self, response_id: str) -> Held | None:
        now = self._clock()
        if now < self._retry_at:
            return None  # Redis failed a moment ago: not waited for again yet
        misses = self._misses
        missed = misses.get(response_id)
        if missed is not None:
            if now < missed:
                return None
            del misses[response_id]
        self.lookups += 1
        try:
            value: bytes | str | None = await self._client.get(self.key_prefix + response_id)
        except (RedisError, OSError) as exc:
            self.lookup_errors += 1
            self._retry_at = self._clock() + BACKOFF_SECONDS
            self._unhealthy("looking up", exc)
            return None
        self._healthy()
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        backend, tab, owner = (text or "").partition("\t")
        if not tab or not backend or not owner:  # missing (or not written by this version)
            misses[response_id] = self._clock() + MISS_SECONDS
            if len(misses) > MAX_MISSES:
                misses.popitem(last=False)
            return None
        return backend, owner

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
        """Wait (briefly) for the writes queued so far; close the own connections."""
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(writer), timeout=1.0)
        if self._owns_client:
            await self._client.aclose()

    def __repr__(self) -> str:
        return (
            f"RedisResponseIds(prefix={self.key_prefix!r}, queued={len(self._queued)}, "
            f"written={self.written}, write_errors={self.write_errors}, "
            f"lookups={self.lookups}, lookup_errors={self.lookup_errors})"
        )
