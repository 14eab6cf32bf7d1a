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
            self._client: aioredis.Redis = aioredis.Redis.from_url(
                url_or_client,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                max_connections=4,
            )
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
        if self._owns_client:
            await self._client.aclose()

    def __repr__(self) -> str:
        return (
            f"RedisStateStore(hash={self.hash_key!r}, interval={self.interval}, "
            f"healthy={self.healthy}, pending={len(self._pending)}, rounds={self.rounds})"
        )
