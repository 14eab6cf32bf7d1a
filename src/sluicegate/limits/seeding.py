"""Seeding quota counters from the ledger: a quota survives a gateway restart (embedded mode,
counters in memory) and the loss of Redis's data (cluster mode).

A quota counter created after its period began (the first admission after a restart, or
after Redis lost the key) starts at zero, but the ledger has the period's earlier usage. The
:class:`QuotaSeeder` adds it: for a counter counting from ``since`` (its
:class:`~sluicegate.limits.store.QuotaOrigin`: the arrival of the request that created it,
on the ledger's clock, or in embedded mode the gateway's start), the seed is the ledger's
tokens of the counter's key in ``period start <= ts < since``; every request that arrived
from ``since`` on is in the counter already, the creating one included (its record's ``ts``
is its arrival). Only a request that arrived before the creating one and was admitted after
it is counted twice (cluster mode; a window of milliseconds, docs/limits.md). The store
applies the seed once, atomically (``seed.lua`` in Redis, where several instances may race;
a flag in memory).

The request path is not involved beyond a wake-up: the limiter calls :meth:`notice` when it
builds the counters of a key and period (the first admission of them in this process, not
every request), the store calls :meth:`created` when an admission creates a quota counter
(once per counter and period, again after Redis lost it); each is a set lookup, a dict
insert and an ``asyncio.Event.set``. The work runs in a background task: a short wait for
the ledger (:attr:`settle_s`: records of requests that ended just before are still in their
writers' batches; in embedded mode, until the spill file left by the previous run has been
replayed, at most :attr:`ready_wait_s`), then per counter one store read and one store
write, and one ledger read per batch (below). Until the seed lands (about :attr:`settle_s`,
up to twice that in a batch, longer while the database is down),
requests are admitted against the counter without it: during that window a client can
overshoot its quota by at most what the period used before ``since``.

Seeds due together are batched: grouped by key kind, period start and scope, one usage
read (``UsageSource.batch``: one grouped query per chunk of keys, ``storage/quota_usage.py``)
serves the whole group; the read runs in a daemon thread (``threads.in_daemon_thread``), so
that :meth:`QuotaSeeder.aclose` and the process's exit never wait for a query the database
holds (the query itself is bounded by its statement and lock timeouts).

Which records a counter's seed counts depends on the policies that charge it, which the
limiter tells :meth:`QuotaSeeder.notice` (the policy's ``counter_key``): ``caller:``,
``owner:``, ``product:`` keys count every record of the key (a ``caller:`` seed thus
includes the caller's requests in products without a caller quota: an over-count, the price
of a ledger without a policy column); a ``sub:`` counter counts every record of the
subscription when a ``subscription``, ``owner`` or ``product`` policy charges it, only the
records without a caller when it is only the fallback of a ``caller`` policy (requests with
a key and no token), and is not seeded when it is only the fallback of a ``header`` policy
(the ledger has no header column; nor when no policy was reported for it).

A request quota's counter (``request_quota``) is seeded the same way with the number of
requests the ledger holds for its key in the same range instead of their tokens
(``measure="requests"``: one record per request, of a metered operation, not refused;
``storage/quota_usage.py`` says which records those are): its group is read apart from the
token quotas' of the same key kind and period.

Errors (database, Redis) are retried with a backoff doubling from :attr:`retry_s` to
:attr:`max_retry_s`; they never reach the request path. One warning per outage (with the
number of counters waiting), one line when seeding works again. Keys the ledger cannot
attribute (``ip:``, ``hdr:``) are not seeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sluicegate.limits.limiter import (
    QuotaMeasure,
    parse_quota_counter_name,
    quota_counter_measure,
)
from sluicegate.limits.store import SeedableStore
from sluicegate.threads import in_daemon_thread

log = logging.getLogger("sluicegate.limits")


class UsageSource(Protocol):
    """Where seeds come from (``storage.quota_usage.LedgerUsage``)."""

    def batch(
        self,
        kind: str,
        start_ms: int,
        sinces: Mapping[str, int],
        *,
        without_caller: bool,
        measure: QuotaMeasure = "tokens",
    ) -> tuple[dict[str, int], float | None]:
        """``(tokens by value, raw records purged before (epoch s) or None)``: for each
        value of ``sinces``, the ledger's tokens of key ``{kind}:{value}`` in ``start_ms <=
        ts < sinces[value]`` (``measure="requests"``: its number of admitted requests);
        ``without_caller``: records without a caller only. Blocking (runs in a thread);
        raises on a database error (the message must hold no key or secret)."""
        ...


#: How many counter names are remembered as seen before the set is emptied (each name seen
#: again then costs one store read).
_SEEN_LIMIT = 100_000
#: Policy kinds whose ``sub:`` counter holds every request of the subscription.
_WHOLE_SUBSCRIPTION = frozenset({"subscription", "owner", "product"})
#: How long :meth:`QuotaSeeder.aclose` waits for the task to end once cancelled (a store
#: call in progress); a ledger read is not waited for at all (a daemon thread).
CLOSE_WAIT_S = 2.0


def _parse_quota(name: str) -> tuple[str, str, int, QuotaMeasure] | None:
    """``(key, period, start_ms, measure)`` of a quota counter's name; ``None`` for another."""
    parsed = parse_quota_counter_name(name)
    measure = quota_counter_measure(name)
    if parsed is None or measure is None:
        return None
    return parsed[0], parsed[1], parsed[2], measure


@dataclass(frozen=True, slots=True)
class _Group:
    """Seeds read together: one key kind, period start, scope and measure."""

    kind: str
    start_ms: int
    without_caller: bool
    measure: QuotaMeasure = "tokens"


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
        #: ``sub:`` counter name -> the ``counter_key`` of the policies charging it.
        self._sub_policies: dict[str, set[str]] = {}
        #: Counter name -> when to try it (time.monotonic()).
        self._due: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        #: Since when (time.monotonic()) seeds fail; None while they work.
        self._failing_since: float | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready_deadline = 0.0
        self._warned_purge = False
        self._warned_replay = False
        #: Seeds applied by this process, and their tokens (token quotas) and requests
        #: (request quotas) (for tests and metrics).
        self.applied = 0
        self.applied_tokens = 0
        self.applied_requests = 0

    def __repr__(self) -> str:
        return f"QuotaSeeder(due={len(self._due)}, applied={self.applied})"

    # -- wake-ups (event loop, cheap) -----------------------------------------------------

    def notice(self, name: str, counter_key: str = "subscription") -> None:
        """The limiter built counter ``name`` for a policy with this ``counter_key`` (first
        sight in this process): seed it if its store has it unseeded (a counter another
        instance created and could not seed)."""
        if name.startswith("sub:"):
            policies = self._sub_policies.get(name)
            if policies is None:
                if len(self._sub_policies) >= _SEEN_LIMIT:
                    del self._sub_policies[next(iter(self._sub_policies))]  # the oldest
                policies = self._sub_policies[name] = set()
            policies.add(counter_key)
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
        """Stop the task; seeds not applied yet are dropped (the next start seeds anew).
        Waits at most :data:`CLOSE_WAIT_S` (a store call in progress), never for a ledger
        read (left to finish in its daemon thread, its result dropped)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), CLOSE_WAIT_S)

    async def _run(self) -> None:
        while True:
            if not self._due:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            # Batch: the counters due within a settle time of the first one wait for the
            # last of them (the first waits at most twice its settle time, none less), so
            # that counters noticed one after the other go into one read, not many.
            horizon = min(self._due.values()) + self.settle_s
            last = max([at for at in self._due.values() if at <= horizon])
            due = [name for name, at in self._due.items() if at <= now]
            if last > now:
                self._wake.clear()
                wait = last - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            if not self._ready():
                for name in due:
                    self._due[name] = now + self.settle_s
                continue
            await self._seed_batch(due)

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
        groups = await self._collect([name], strict=True)
        applied = False
        for group, sinces in groups.items():
            found = await self._read(group, sinces)
            applied = await self._land(group, sinces, found) > 0 or applied
        return applied

    # -- the work -------------------------------------------------------------------------

    def _sub_group(self, name: str, start_ms: int, measure: QuotaMeasure) -> _Group | None:
        """How ``sub:`` counter ``name`` is seeded (the policies charging it), or None when
        it is not (module docstring)."""
        policies = self._sub_policies.get(name)
        if policies is None:
            return None  # no policy reported: whose fallback it is is unknown
        if policies & _WHOLE_SUBSCRIPTION:
            return _Group("sub", start_ms, False, measure)
        if "caller" in policies:
            return _Group("sub", start_ms, True, measure)  # requests without a token only
        return None  # a header policy's fallback only: the ledger cannot tell

    async def _collect(
        self, names: list[str], *, strict: bool = False
    ) -> dict[_Group, dict[str, tuple[str, int]]]:
        """Group the names that need a seed: group -> value -> (name, since_ms). Names that
        need none are done (removed from the due ones); a store error marks the name failed
        (raised when ``strict``). Counters created when their period began get their empty
        seed at once."""
        groups: dict[_Group, dict[str, tuple[str, int]]] = {}
        for name in names:
            parsed = _parse_quota(name)
            group = None
            if parsed is not None:
                key, _period, start_ms, measure = parsed
                kind = key.partition(":")[0]
                group = (
                    self._sub_group(name, start_ms, measure)
                    if kind == "sub"
                    else _Group(kind, start_ms, False, measure)
                )
            if parsed is None or group is None:
                self._done(name)
                continue
            try:
                origin = await self.store.quota_origin(name)
                if origin is None or origin.seeded:
                    self._done(name)  # gone (or from a version without origins), or seeded
                    continue
                if origin.since_ms <= group.start_ms:  # nothing of the period before it
                    await self._apply(name, origin.since_ms, 0)
                    self._done(name)
                    continue
            except Exception as exc:
                if strict:
                    raise
                self._failed([name], exc)
                continue
            value = parsed[0].partition(":")[2]
            groups.setdefault(group, {})[value] = (name, origin.since_ms)
        return groups

    async def _read(
        self, group: _Group, members: Mapping[str, tuple[str, int]]
    ) -> tuple[dict[str, int], float | None]:
        """The ledger's usage of a group's members, in a daemon thread."""
        sinces = {value: since for value, (_name, since) in members.items()}
        usage = self._usage

        def read() -> tuple[dict[str, int], float | None]:
            if group.measure == "tokens":  # as before the request quota: any usage source
                return usage.batch(
                    group.kind, group.start_ms, sinces, without_caller=group.without_caller
                )
            return usage.batch(
                group.kind,
                group.start_ms,
                sinces,
                without_caller=group.without_caller,
                measure=group.measure,
            )

        return await in_daemon_thread("quota-seed", read)

    async def _land(
        self,
        group: _Group,
        members: Mapping[str, tuple[str, int]],
        found: tuple[dict[str, int], float | None],
        *,
        strict: bool = True,
    ) -> int:
        """Apply each member's seed; how many were applied."""
        tokens_by_value, purged_before = found
        if purged_before is not None and purged_before * 1000 > group.start_ms:
            self._warn_purged(purged_before)
        count = 0
        for value, (name, since) in members.items():
            try:
                count += await self._apply(name, since, tokens_by_value.get(value, 0))
            except Exception as exc:
                if strict:
                    raise
                self._failed([name], exc)
                continue
            self._done(name)
        return count

    async def _seed_batch(self, names: list[str]) -> None:
        groups = await self._collect(names)
        for group, members in groups.items():
            try:
                found = await self._read(group, members)
            except Exception as exc:  # any failure: retried, never raised
                self._failed([name for name, _since in members.values()], exc)
                continue
            self._recovered()
            await self._land(group, members, found, strict=False)

    async def _apply(self, name: str, since_ms: int, amount: int) -> bool:
        applied = await self.store.apply_seed(name, since_ms, amount)
        if applied:
            self.applied += 1
            if quota_counter_measure(name) == "requests":
                self.applied_requests += amount
                log.debug("request quota counter seeded with %d request(s) from the ledger", amount)
            else:
                self.applied_tokens += amount
                log.debug("quota counter seeded with %d token(s) from the ledger", amount)
        return applied

    def _done(self, name: str) -> None:
        self._due.pop(name, None)
        self._failures.pop(name, None)

    def _recovered(self) -> None:
        """A ledger read worked: the end of an outage, if one was going on (one line)."""
        if self._failing_since is not None:
            waited = time.monotonic() - self._failing_since
            self._failing_since = None
            log.warning(
                "quota seeding works again after %.0f s of failures; %d quota counter(s) "
                "still wait for their seed",
                waited,
                len(self._due),
            )

    def _failed(self, names: list[str], exc: Exception) -> None:
        """Retry ``names`` with a backoff; one warning per outage, not per key or retry."""
        now = time.monotonic()
        for name in names:
            failures = self._failures.get(name, 0) + 1
            self._failures[name] = failures
            self._due[name] = now + min(self.retry_s * 2 ** (failures - 1), self.max_retry_s)
        if self._failing_since is not None:
            return
        self._failing_since = now
        log.warning(
            "quota seeding failed (%s: %s); %d quota counter(s) wait for their seed, retried "
            "with a backoff up to %g s (logged again when seeding works)",
            type(exc).__name__,
            str(exc).strip().split("\n", 1)[0],
            len(self._due),
            self.max_retry_s,
        )

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
