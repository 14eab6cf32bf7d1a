"""The in-memory view of subscriptions that the request path reads.

The request path never queries the database: it looks a key's digest up in a dict that a
background task rebuilds whenever the subscriptions' version number changes (a cheap query
every ``refresh_seconds``; every instance of a cluster polls the same database, so each sees a
change within a second).

While the database is down the last view keeps serving (a database outage is not a gateway
outage). Two exceptions, where the view refuses every request with a 503 instead: before the
first load (a gateway started while its database was unreachable: ``SubscriptionsLoading``),
and, with ``storage.max_stale_seconds`` set, once the view is older than that
(``SubscriptionViewStale``). The refresher sets and clears the refusal; the request path
only reads one attribute.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from sluicegate.auth.keys import KeyHasher
from sluicegate.auth.subscriptions import KeySlot, Subscription
from sluicegate.proxy.errors import GatewayError

log = logging.getLogger("sluicegate.auth")

#: Seconds between two attempts to load the view while it has never been loaded (the
#: attempts back off from ``_FIRST_LOAD_RETRY[0]`` to ``_FIRST_LOAD_RETRY[1]``), and the
#: ``Retry-After`` its 503s advertise.
_FIRST_LOAD_RETRY = (0.5, 3.0)

#: While the first load keeps failing, one log line per this many seconds (not per attempt).
_WAITING_LOG_SECONDS = 30.0

ViewState = Literal["loading", "loaded", "stale"]


def _loading() -> GatewayError:
    return GatewayError(
        503,
        "SubscriptionsLoading",
        "The gateway is starting and cannot check subscription keys yet: its database is "
        "unreachable. Retry later.",
        retry_after=_FIRST_LOAD_RETRY[1],
    )


def _stale_error(interval: float) -> Callable[[], GatewayError]:
    def make() -> GatewayError:
        return GatewayError(
            503,
            "SubscriptionViewStale",
            "The gateway cannot check subscription keys: its view of the subscriptions is "
            "older than the configured bound (storage.max_stale_seconds) because its database "
            "is unreachable. Retry later.",
            retry_after=max(interval, 1.0),
        )

    return make


# Not frozen: created on every request, and a frozen dataclass's __init__ costs about
# five times as much (object.__setattr__ per field). Treat instances as immutable.
@dataclass(slots=True)
class KeyMatch:
    subscription: Subscription
    slot: KeySlot


class SubscriptionIndex:
    """Key digest → subscription. Replaced whole on refresh, so readers never see a half-built
    view (assignment of the dict is atomic for the event loop)."""

    def __init__(self, hasher: KeyHasher) -> None:
        self._hasher = hasher
        self._by_digest: dict[bytes, KeyMatch] = {}
        self._by_id: dict[str, Subscription] = {}
        self.version = -1
        #: When set, every ``lookup`` and ``get`` raises the ``GatewayError`` it makes (a
        #: new one each time: a raised exception keeps its traceback). Set and cleared by
        #: the ``IndexRefresher``; None (serve the view) otherwise.
        self.refusal: Callable[[], GatewayError] | None = None

    def replace(self, subscriptions: Iterable[Subscription], version: int) -> None:
        by_digest: dict[bytes, KeyMatch] = {}
        by_id: dict[str, Subscription] = {}
        for sub in subscriptions:
            by_id[sub.id] = sub
            by_digest[sub.primary_key_hash] = KeyMatch(sub, "primary")
            by_digest[sub.secondary_key_hash] = KeyMatch(sub, "secondary")
        self._by_digest, self._by_id, self.version = by_digest, by_id, version

    def lookup(self, key: str) -> KeyMatch | None:
        """The subscription a key belongs to, or None. The dict is keyed by the keyed hash, so
        timing reveals nothing about the key itself; the final check is constant-time.
        Raises ``GatewayError`` (503) while the view refuses (see the module docstring)."""
        if self.refusal is not None:
            raise self.refusal()
        digest = self._hasher.digest(key)
        match = self._by_digest.get(digest)
        if match is None:
            return None
        if not hmac.compare_digest(digest, match.subscription.key_hash(match.slot)):
            return None
        return match

    def get(self, subscription_id: str) -> Subscription | None:
        """The subscription with this id, or None; raises as ``lookup`` does."""
        if self.refusal is not None:
            raise self.refusal()
        return self._by_id.get(subscription_id)

    def by_id(self) -> Mapping[str, Subscription]:
        """Every subscription of the current view, by id (the refusal does not apply: for
        background work such as the budgets). The mapping is replaced whole by ``replace``
        and never mutated, so a caller may iterate it while a refresh happens; it must not
        modify it."""
        return self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def __repr__(self) -> str:
        return f"SubscriptionIndex(subscriptions={len(self._by_id)}, version={self.version})"


class IndexRefresher:
    """Keeps a ``SubscriptionIndex`` current by polling a version number.

    ``load_version`` and ``load_all`` are blocking (database) calls; they run in a worker
    thread. A failed refresh keeps the last good view and is retried at the next tick.

    ``prepare`` (blocking, optional) runs once before the first load: the gateway's schema
    check and migration. ``load_first()`` runs both at start; if the database is unreachable
    then, ``defer()`` makes the index refuse requests with 503 and ``start()`` retries them in
    the background with backoff until they succeed (see ``Gateway.start``).

    ``max_stale`` (seconds, None: no bound): when no refresh succeeded for that long, the
    index refuses requests with 503 ``SubscriptionViewStale`` until one does. A timer on the
    event loop, re-armed by every successful refresh: exact even when a refresh hangs.
    """

    def __init__(
        self,
        index: SubscriptionIndex,
        load_version: Callable[[], int],
        load_all: Callable[[], list[Subscription]],
        interval: float,
        *,
        prepare: Callable[[], None] | None = None,
        max_stale: float | None = None,
    ) -> None:
        self._index = index
        self._load_version = load_version
        self._load_all = load_all
        self._interval = interval
        self._prepare = prepare
        self._max_stale = max_stale
        self._task: asyncio.Task[None] | None = None
        self._stale_timer: asyncio.TimerHandle | None = None
        #: Refreshes failed in a row (0: the last one worked). Counted per outage, so that
        #: each outage is logged at once, not when a running total next reaches a multiple.
        self.failures = 0
        #: Whether the first load is still to be done in the background (after ``defer()``).
        self.waiting = False
        #: ``time.monotonic()`` of the last successful refresh (None before the first).
        self.last_success: float | None = None
        self._stale = False

    @property
    def state(self) -> ViewState:
        """``loading`` (never loaded: requests get 503), ``stale`` (older than
        ``max_stale``: requests get 503) or ``loaded`` (requests are served)."""
        if self.waiting:
            return "loading"
        return "stale" if self._stale else "loaded"

    def age(self) -> float | None:
        """Seconds since the last successful refresh (None before the first)."""
        return None if self.last_success is None else time.monotonic() - self.last_success

    def refresh_now(self) -> bool:
        """Blocking refresh; True when the view changed."""
        version = self._load_version()
        if version == self._index.version:
            return False
        subs = self._load_all()
        self._index.replace(subs, version)
        return True

    def load_first(self) -> None:
        """Blocking: ``prepare`` then a first load. Raises what they raise."""
        if self._prepare is not None:
            self._prepare()
        self.refresh_now()
        self.last_success = time.monotonic()

    def defer(self) -> None:
        """The first load failed at start: refuse requests (503 ``SubscriptionsLoading``)
        until ``start()``'s task has done it."""
        self.waiting = True
        self._index.refusal = _loading

    async def _run(self) -> None:
        wait = _FIRST_LOAD_RETRY[0]
        waiting_since = last_said = time.monotonic()
        while True:
            await asyncio.sleep(wait if self.waiting else self._interval)
            first = self.waiting
            try:
                if first:
                    await asyncio.to_thread(self.load_first)
                    changed = True
                else:
                    changed = await asyncio.to_thread(self.refresh_now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the last good view; the database may be down
                self.failures += 1
                if first:
                    wait = min(wait * 2, _FIRST_LOAD_RETRY[1])
                    now = time.monotonic()
                    if now - last_said >= _WAITING_LOG_SECONDS:
                        last_said = now
                        log.warning(
                            "still waiting for the database after %.0f s: requests get 503 "
                            "until the subscriptions are loaded (%s)",
                            now - waiting_since,
                            _problem(exc),
                        )
                elif self.failures == 1 or self.failures % 60 == 0:
                    log.warning(
                        "subscription refresh failed (%d in a row; keys revoked, rotated or "
                        "suspended meanwhile still work until it succeeds): %s",
                        self.failures,
                        type(exc).__name__,
                    )
                continue
            self.last_success = time.monotonic()
            self._arm_stale_timer()
            if first:
                self.waiting = False
                self._index.refusal = None
                log.warning(
                    "the database answers: %d subscriptions loaded after %.0f s, serving",
                    len(self._index),
                    time.monotonic() - waiting_since,
                )
                self.failures = 0
                continue
            if self.failures:
                log.warning("subscription refresh works again after %d failures", self.failures)
                self.failures = 0
            if changed:
                log.info("subscriptions reloaded", extra={"count": len(self._index)})

    def _arm_stale_timer(self) -> None:
        """(Re)start the staleness countdown from now, and lift a staleness refusal."""
        if self._max_stale is None:
            return
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        loop = asyncio.get_running_loop()
        self._stale_timer = loop.call_later(self._max_stale, self._went_stale)
        if self._stale:
            self._stale = False
            self._index.refusal = None
            log.warning("subscription view fresh again: serving requests")

    def _went_stale(self) -> None:
        self._stale_timer = None
        self._stale = True
        self._index.refusal = _stale_error(self._interval)
        log.error(
            "subscription view is older than storage.max_stale_seconds (%.0f s): requests get "
            "503 SubscriptionViewStale until the database answers again",
            self._max_stale or 0.0,
        )

    def start(self) -> None:
        """Start polling (and, after ``defer()``, retrying the first load)."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        if not self.waiting:
            self._arm_stale_timer()

    async def stop(self) -> None:
        if self._stale_timer is not None:
            self._stale_timer.cancel()
            self._stale_timer = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _problem(exc: BaseException) -> str:
    """One line about ``exc`` that holds no SQL, parameters or stored values."""
    from sqlalchemy.exc import SQLAlchemyError

    from sluicegate.storage.engine import database_problem

    if isinstance(exc, SQLAlchemyError):
        return database_problem(exc)
    return type(exc).__name__
