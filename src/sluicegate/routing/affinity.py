"""Responses affinity: stateful Responses API calls go to the backend that holds the response.

Azure stores a Responses API answer in the resource that served it (30 days). A continuation
(``previous_response_id``) and the calls on a stored response (``GET``/``DELETE
responses/{id}``, ``…/cancel``, ``…/input_items``, a background stream resumed with
``?stream=true``) only work there: anywhere else the id is unknown. So the gateway learns,
from each Responses creation with a 2xx status and ``store`` not false, ``response id →
(backend, subscription)``: the backend's configured name and the subscription that created
it. A request that names an id is routed to that backend — for that subscription only.

Isolation: Azure isolates stored responses per resource only; tenants of the gateway that
share a resource are isolated by subscription. A request naming an id another subscription
created gets Azure's answer for an unknown id, and no backend is contacted (the caller
learns nothing it could not learn by guessing). Ids the gateway does not know (created
around it, forgotten by the LRU or expired from Redis) are routed as usual: a passthrough
path to ``passthrough_backend`` alone. They are not searched for across the backends (each
tried in turn until one does not answer 404): that would give every tenant, on every
resource its product reaches, the stored responses of other tenants whose ids the gateway
forgot, and cost a request per backend for every guess.

Learning: ``learn(id, backend, owner)`` (synchronous: a dict insert, and for cluster mode a
queued write that a background task sends to Redis). Forgetting: ``forget(id)`` after a 2xx
``DELETE responses/{id}`` (the same: a dict pop and a queued ``DEL``). Routing:
``holder(id)`` (synchronous, the local map) and, in cluster mode on a local miss only,
``lookup(id)`` (at most one Redis ``GET``; only for ids shaped like Azure's, ``valid_id``;
misses and failures are remembered briefly by the shared store so that repeats cost
nothing). ``pinned(pool, backend)``: the
pool's members on that backend as a pool (cached), so that the request is served by them
alone: when they are out (breakers open) the client gets their refusal (429/503 with a
wait), never another member's 404. ``reaches(allowed, backend)``: whether a product with
these allowed deployments can reach ``backend`` at all (passthrough paths never go to a
holder the product could not otherwise reach).

The local map is an LRU bounded by ``max_ids`` (default 100,000: about 25 MB). Used from one
event loop.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from sluicegate.routing.pool import Member, Pool

log = logging.getLogger("sluicegate.routing")

#: Azure's response ids: ``resp_`` and up to 128 URL-safe characters. Anything else is
#: unknown without a lookup (an id is a Redis key: a multi-MB id must not become one).
_VALID_ID = re.compile(r"resp_[A-Za-z0-9_-]{1,128}")

#: Who holds a stored response: (backend name, owning subscription id).
Held = tuple[str, str]


def valid_id(response_id: str) -> bool:
    """Whether ``response_id`` is shaped like an id Azure gives (``resp_…``)."""
    return len(response_id) <= 133 and _VALID_ID.fullmatch(response_id) is not None


class SharedResponseIds(Protocol):
    """Where instances share what they learned (cluster mode: Redis)."""

    def remember(self, response_id: str, held: Held) -> None:
        """Queue the write (never waits; errors are the store's to log and count)."""

    async def lookup(self, response_id: str) -> Held | None:
        """Who holds ``response_id``; None when unknown or unreachable."""

    def forget(self, response_id: str) -> None:
        """Queue the removal of ``response_id`` (never waits; after any ``remember`` of it
        queued before)."""


@runtime_checkable
class ResponseIdSource(Protocol):
    """A backend state store that can share response ids too (``RedisStateStore``)."""

    def response_ids(self, ttl: int) -> SharedResponseIds:
        """The shared response-id store (kept ``ttl`` seconds)."""


class ResponseAffinity:
    """See the module docstring. ``pool_backends``: each pool's backends (for ``reaches``);
    ``passthrough``: the name of ``passthrough_backend``."""

    __slots__ = (
        "_ids",
        "_pinned",
        "_reach",
        "learned",
        "max_ids",
        "passthrough",
        "pool_backends",
        "shared",
    )

    def __init__(
        self,
        max_ids: int,
        shared: SharedResponseIds | None = None,
        *,
        pool_backends: Mapping[str, frozenset[str]] | None = None,
        passthrough: str | None = None,
    ) -> None:
        self.max_ids = max_ids
        self.shared = shared
        self.pool_backends: Mapping[str, frozenset[str]] = pool_backends or {}
        self.passthrough = passthrough
        self._ids: OrderedDict[str, Held] = OrderedDict()
        self._pinned: dict[tuple[str, str], Pool | None] = {}
        self._reach: dict[frozenset[str] | None, frozenset[str]] = {}
        #: Ids learned by this instance from answers (for the tests and the log).
        self.learned = 0

    def learn(self, response_id: str, backend: str, owner: str) -> None:
        """``backend`` answered subscription ``owner`` with ``response_id`` (ids not shaped
        like Azure's are not learned: they could never be looked up)."""
        if not valid_id(response_id):
            return
        held = (backend, owner)
        self._remember(response_id, held)
        self.learned += 1
        if self.shared is not None:
            self.shared.remember(response_id, held)

    def _remember(self, response_id: str, held: Held) -> None:
        ids = self._ids
        ids[response_id] = held
        ids.move_to_end(response_id)
        if len(ids) > self.max_ids:
            ids.popitem(last=False)

    def forget(self, response_id: str) -> None:
        """``response_id`` was deleted (a 2xx ``DELETE responses/{id}``): dropped here and,
        in cluster mode, from the shared store. Another instance that looked it up before
        keeps it in its local map until its LRU drops it; a request routed by that entry
        reaches the holder, whose answer for a deleted id is the right one (404)."""
        self._ids.pop(response_id, None)
        if self.shared is not None and valid_id(response_id):
            self.shared.forget(response_id)

    def holder(self, response_id: str) -> Held | None:
        """Who this instance knows to hold ``response_id`` (None: unknown here)."""
        held = self._ids.get(response_id)
        if held is not None:
            self._ids.move_to_end(response_id)
        return held

    async def lookup(self, response_id: str) -> Held | None:
        """``holder``, else (cluster mode, a valid id) the shared store's answer, kept
        locally."""
        held = self.holder(response_id)
        if held is None and self.shared is not None and valid_id(response_id):
            held = await self.shared.lookup(response_id)
            if held is not None:
                self._remember(response_id, held)
        return held

    def pinned(self, pool: Pool, backend: str) -> Pool | None:
        """``pool``'s members on ``backend`` (each deployment there sees the resource's
        stored responses) as a pool; None when no member of the pool is on that backend (the
        request is then routed as usual)."""
        key = (pool.name, backend)
        try:
            return self._pinned[key]
        except KeyError:
            pass
        members: list[Member] = [m for m in pool.members if m.backend == backend]
        there = Pool(pool.name, members) if members else None
        self._pinned[key] = there
        return there

    def reaches(self, allowed: frozenset[str] | None, backend: str) -> bool:
        """Whether a product whose allowed deployments are ``allowed`` (None: all) can reach
        ``backend``: it is ``passthrough_backend`` or hosts a member of one of them."""
        if backend == self.passthrough:
            return True
        try:
            reach = self._reach[allowed]
        except KeyError:
            reach = frozenset(
                b
                for pool, backends in self.pool_backends.items()
                if allowed is None or pool in allowed
                for b in backends
            )
            self._reach[allowed] = reach  # one entry per product's set: bounded by the config
        return backend in reach

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"ResponseAffinity({len(self._ids)}/{self.max_ids} ids, shared={self.shared!r})"
