"""Responses affinity: stateful Responses API calls go to the backend that holds the response.

Azure stores a Responses API answer in the resource that served it (30 days). A continuation
(``previous_response_id``) and the calls on a stored response (``GET``/``DELETE
responses/{id}``, ``…/cancel``, ``…/input_items``, a background stream resumed with
``?stream=true``) only work there: anywhere else the id is unknown. So the gateway learns,
from each Responses answer with a 2xx status, ``response id → backend`` (the backend's
configured name), and routes a request that names an id to that backend.

Learning: ``learn(id, backend)`` (synchronous: a dict insert, and for cluster mode a queued
write that a background task sends to Redis after the answer). Routing: ``holder(id)``
(synchronous, the local map) and, in cluster mode on a local miss only, ``lookup(id)`` (one
Redis ``GET``). ``pinned(pool, backend)``: the pool's member on that backend as a one-member
pool (cached), so that the request is served by it alone: when it is out (breaker open) the
client gets that backend's refusal (429/503 with a wait), never another member's 404.

The local map is an LRU bounded by ``max_ids`` (default 100,000: about 20 MB). Used from one
event loop.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Protocol, runtime_checkable

from sluicegate.routing.pool import Member, Pool

log = logging.getLogger("sluicegate.routing")


class SharedResponseIds(Protocol):
    """Where instances share what they learned (cluster mode: Redis)."""

    def remember(self, response_id: str, backend: str) -> None:
        """Queue the write (never waits; errors are the store's to log and count)."""

    async def lookup(self, response_id: str) -> str | None:
        """The backend that holds ``response_id``; None when unknown or unreachable."""


@runtime_checkable
class ResponseIdSource(Protocol):
    """A backend state store that can share response ids too (``RedisStateStore``)."""

    def response_ids(self) -> SharedResponseIds:
        """The shared response-id store on the same connections."""


class ResponseAffinity:
    """See the module docstring. ``pools``: the pools whose Responses answers are learned."""

    __slots__ = ("_ids", "_pinned", "learned", "max_ids", "pools", "shared")

    def __init__(
        self, max_ids: int, pools: frozenset[str], shared: SharedResponseIds | None = None
    ) -> None:
        self.max_ids = max_ids
        self.pools = pools
        self.shared = shared
        self._ids: OrderedDict[str, str] = OrderedDict()
        self._pinned: dict[tuple[str, str], Pool | None] = {}
        #: Ids learned by this instance from answers (for the tests and the log).
        self.learned = 0

    def learn(self, response_id: str, backend: str) -> None:
        """``backend`` answered with (or holds) ``response_id``."""
        self._remember(response_id, backend)
        self.learned += 1
        if self.shared is not None:
            self.shared.remember(response_id, backend)

    def _remember(self, response_id: str, backend: str) -> None:
        ids = self._ids
        ids[response_id] = backend
        ids.move_to_end(response_id)
        if len(ids) > self.max_ids:
            ids.popitem(last=False)

    def holder(self, response_id: str) -> str | None:
        """The backend this instance knows to hold ``response_id`` (None: unknown here)."""
        backend = self._ids.get(response_id)
        if backend is not None:
            self._ids.move_to_end(response_id)
        return backend

    async def lookup(self, response_id: str) -> str | None:
        """``holder``, else (cluster mode) the shared store's answer, kept locally."""
        backend = self.holder(response_id)
        if backend is None and self.shared is not None:
            backend = await self.shared.lookup(response_id)
            if backend is not None:
                self._remember(response_id, backend)
        return backend

    def pinned(self, pool: Pool, backend: str) -> Pool | None:
        """``pool``'s member on ``backend`` as a one-member pool; None when no member of the
        pool is on that backend (the request is then routed as usual)."""
        key = (pool.name, backend)
        try:
            return self._pinned[key]
        except KeyError:
            pass
        member: Member | None = next((m for m in pool.members if m.backend == backend), None)
        one = Pool(pool.name, [member]) if member is not None else None
        self._pinned[key] = one
        return one

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return (
            f"ResponseAffinity({len(self._ids)}/{self.max_ids} ids, pools={sorted(self.pools)}, "
            f"shared={self.shared!r})"
        )
