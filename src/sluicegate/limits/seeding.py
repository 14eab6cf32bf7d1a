"""Seeding quota counters from the ledger: a quota survives a gateway restart (embedded mode,
counters in memory) and the loss of Redis's data (cluster mode).

A quota counter created after its period began (the first admission after a restart, or
after Redis lost the key) starts at zero, but the ledger has the period's earlier usage. The
:class:`QuotaSeeder` adds it: for a counter created at ``since`` (its
:class:`~sluicegate.limits.store.QuotaOrigin`), the seed is the ledger's tokens of the
counter's key in ``period start <= ts < since``; everything admitted from ``since`` on is in
the counter already, so nothing is counted twice. The store applies it once, atomically
(``seed.lua`` in Redis, where several instances may race; a flag in memory).

The request path is not involved beyond a wake-up: the limiter calls :meth:`notice` when it
builds the counters of a key and period (the first admission of them in this process, not
every request), the store calls :meth:`created` when an admission creates a quota counter
(once per counter and period, again after Redis lost it); each is a set lookup, a dict
insert and an ``asyncio.Event.set``. The work runs in a background task: a short wait for
the ledger (:attr:`settle_s`: records of requests that ended just before are still in their
writers' batches; in embedded mode, until the spill file left by the previous run has been
replayed, at most :attr:`ready_wait_s`), one store read, one query in a thread, one store
write. Until the seed lands (about :attr:`settle_s`, longer while the database is down),
requests are admitted against the counter without it: during that window a client can
overshoot its quota by at most what the period used before ``since``.

Errors (database, Redis) are logged as warnings and retried with a backoff doubling from
:attr:`retry_s` to :attr:`max_retry_s`; they never reach the request path. Keys the ledger
cannot attribute (``ip:``) are not seeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime

from sluicegate.limits.limiter import parse_quota_counter_name
from sluicegate.limits.store import SeedableStore

log = logging.getLogger("sluicegate.limits")

#: ``usage(key, start_ms, before_ms)`` -> ``(tokens, raw records purged before (epoch s) or
#: None)``, or None when the key cannot be seeded. Blocking (runs in a thread); raises on a
#: database error (the message must hold no key or secret).
UsageSource = Callable[[str, int, int], tuple[int, float | None] | None]

#: How many counter names are remembered as seen before the set is emptied (each name seen
#: again then costs one store read).
_SEEN_LIMIT = 100_000


class QuotaSeeder:
    """Seeds the quota counters of ``store`` from ``usage`` (see the module docstring).

    ``kinds``: the counter key kinds (prefix before the first ``:``) the ledger can tell;
    counters of other keys are ignored. ``ledger_ready``: False while records of an earlier
    run are still being replayed into the ledger (the seed waits, up to ``ready_wait_s``
    after :meth:`start`). Call :meth:`notice` and :meth:`created` from the event loop.
    """

    def __init__(
        self,
        store: SeedableStore,
        usage: UsageSource,
        kinds: Collection[str],
        *,
        settle_s: float = 1.0,
        ledger_ready: Callable[[], bool] | None = None,
        ready_wait_s: float = 300.0,
        retry_s: float = 1.0,
        max_retry_s: float = 60.0,
    ) -> None:
        self.store = store
        self.settle_s = settle_s
        self.ready_wait_s = ready_wait_s
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self._usage = usage
        self._kinds = frozenset(kinds)
        self._ledger_ready = ledger_ready
        self._seen: set[str] = set()
        #: Counter name -> when to try it (time.monotonic()).
        self._due: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready_deadline = 0.0
        self._warned_purge = False
        self._warned_replay = False
        #: Seeds applied by this process, and their tokens (for tests and metrics).
        self.applied = 0
        self.applied_tokens = 0

    def __repr__(self) -> str:
        return f"QuotaSeeder(due={len(self._due)}, applied={self.applied})"

    # -- wake-ups (event loop, cheap) -----------------------------------------------------

    def notice(self, name: str) -> None:
        """The limiter built counter ``name`` (first sight in this process): seed it if its
        store has it unseeded (a counter another instance created and could not seed)."""
        if name in self._seen:
            return
        self._remember(name)

    def created(self, name: str) -> None:
        """The store created quota counter ``name`` now: seed it."""
        self._remember(name)

    def _remember(self, name: str) -> None:
        if len(self._seen) >= _SEEN_LIMIT:
            self._seen.clear()
        self._seen.add(name)
        if name.partition(":")[0] not in self._kinds or name in self._due:
            return
        self._due[name] = time.monotonic() + self.settle_s
        self._wake.set()

    @property
    def pending(self) -> int:
        """Counters waiting for their seed."""
        return len(self._due)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background task (in the running event loop)."""
        if self._task is None:
            self._ready_deadline = time.monotonic() + self.ready_wait_s
            self._task = asyncio.get_running_loop().create_task(self._run(), name="quota-seeder")

    async def aclose(self) -> None:
        """Stop the task; seeds not applied yet are dropped (the next start seeds anew)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        while True:
            if not self._due:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            due = [name for name, at in self._due.items() if at <= now]
            if not due:
                self._wake.clear()
                wait = min(self._due.values()) - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            if not self._ready():
                for name in due:
                    self._due[name] = now + self.settle_s
                continue
            for name in due:
                await self._seed(name)

    def _ready(self) -> bool:
        if self._ledger_ready is None or self._ledger_ready():
            return True
        if time.monotonic() < self._ready_deadline:
            return False
        if not self._warned_replay:
            self._warned_replay = True
            log.warning(
                "quota seeding: the ledger's spill file is still being replayed after %.0f s; "
                "seeding quotas from the records written so far",
                self.ready_wait_s,
            )
        return True

    async def seed_now(self, name: str) -> bool:
        """Seed ``name`` at once (no wait, no retry); whether a seed was applied. Raises what
        the store or the ledger raise. For tests and tools; the gateway uses the task."""
        return await self._apply(name)

    async def _seed(self, name: str) -> None:
        try:
            await self._apply(name)
        except Exception as exc:  # any failure: logged and retried, never raised
            failures = self._failures.get(name, 0) + 1
            self._failures[name] = failures
            delay = min(self.retry_s * 2 ** (failures - 1), self.max_retry_s)
            self._due[name] = time.monotonic() + delay
            log.warning(
                "quota seeding failed (%s: %s); retrying in %.0f s",
                type(exc).__name__,
                str(exc).strip().split("\n", 1)[0],
                delay,
            )
            return
        self._due.pop(name, None)
        self._failures.pop(name, None)

    async def _apply(self, name: str) -> bool:
        parsed = parse_quota_counter_name(name)
        if parsed is None:
            return False
        key, _period, start_ms = parsed
        origin = await self.store.quota_origin(name)
        if origin is None or origin.seeded:
            return False  # gone (or from a version without origins), or seeded already
        tokens = 0
        if origin.since_ms > start_ms:  # else nothing of the period came before it
            found = await asyncio.to_thread(self._usage, key, start_ms, origin.since_ms)
            if found is None:
                return False
            tokens, purged_before = found
            if purged_before is not None and purged_before * 1000 > start_ms:
                self._warn_purged(purged_before)
        applied = await self.store.apply_seed(name, origin.since_ms, tokens)
        if applied:
            self.applied += 1
            self.applied_tokens += tokens
            log.debug("quota counter seeded with %d token(s) from the ledger", tokens)
        return applied

    def _warn_purged(self, purged_before: float) -> None:
        if self._warned_purge:
            return
        self._warned_purge = True
        horizon = datetime.fromtimestamp(purged_before, UTC).isoformat(timespec="seconds")
        log.warning(
            "quota seeding: raw usage records before %s have been purged "
            "(retention.raw_records_days); quotas whose period began earlier are seeded from "
            "the records kept only, and may allow more than their limit this period",
            horizon,
        )
