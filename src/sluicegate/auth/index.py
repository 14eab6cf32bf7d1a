"""The in-memory view of subscriptions that the request path reads.

The request path never queries the database: it looks a key's digest up in a dict that a
background task rebuilds whenever the subscriptions' version number changes (a cheap query
every ``refresh_seconds``; every instance of a cluster polls the same database, so each sees a
change within a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sluicegate.auth.keys import KeyHasher
from sluicegate.auth.subscriptions import KeySlot, Subscription

log = logging.getLogger("sluicegate.auth")


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
        timing reveals nothing about the key itself; the final check is constant-time."""
        digest = self._hasher.digest(key)
        match = self._by_digest.get(digest)
        if match is None:
            return None
        if not hmac.compare_digest(digest, match.subscription.key_hash(match.slot)):
            return None
        return match

    def get(self, subscription_id: str) -> Subscription | None:
        return self._by_id.get(subscription_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __repr__(self) -> str:
        return f"SubscriptionIndex(subscriptions={len(self._by_id)}, version={self.version})"


class IndexRefresher:
    """Keeps a ``SubscriptionIndex`` current by polling a version number.

    ``load_version`` and ``load_all`` are blocking (database) calls; they run in a worker
    thread. A failed refresh keeps the last good view and is retried at the next tick.
    """

    def __init__(
        self,
        index: SubscriptionIndex,
        load_version: Callable[[], int],
        load_all: Callable[[], list[Subscription]],
        interval: float,
    ) -> None:
        self._index = index
        self._load_version = load_version
        self._load_all = load_all
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        #: Refreshes failed in a row (0: the last one worked). Counted per outage, so that
        #: each outage is logged at once, not when a running total next reaches a multiple.
        self.failures = 0

    def refresh_now(self) -> bool:
        """Blocking refresh; True when the view changed."""
        version = self._load_version()
        if version == self._index.version:
            return False
        subs = self._load_all()
        self._index.replace(subs, version)
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                changed = await asyncio.to_thread(self.refresh_now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the last good view; the database may be down
                self.failures += 1
                if self.failures == 1 or self.failures % 60 == 0:
                    log.warning(
                        "subscription refresh failed (%d in a row; keys revoked, rotated or "
                        "suspended meanwhile still work until it succeeds): %s",
                        self.failures,
                        type(exc).__name__,
                    )
                continue
            if self.failures:
                log.warning("subscription refresh works again after %d failures", self.failures)
                self.failures = 0
            if changed:
                log.info("subscriptions reloaded", extra={"count": len(self._index)})

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
