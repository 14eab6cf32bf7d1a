"""The composition root: builds every long-lived part of a gateway from its configuration
and owns their lifecycle (start in the lifespan, stop in order on shutdown)."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily
from sqlalchemy.exc import SQLAlchemyError

from sluicegate.accounting.budgets import Budgets
from sluicegate.accounting.records import UsageRecord
from sluicegate.auth.index import IndexRefresher, SubscriptionIndex
from sluicegate.auth.keys import KeyHasher, load_key_secret
from sluicegate.clock import Clock, SystemClock
from sluicegate.config.model import GatewayConfig
from sluicegate.limits import CounterStore, Limiter, MemoryStore
from sluicegate.limits.seeding import QuotaSeeder
from sluicegate.limits.store import SeedableStore
from sluicegate.logs import AccessLog
from sluicegate.messages.sink import MessageLog
from sluicegate.metrics.registry import GatewayMetrics, RoutingSample
from sluicegate.proxy.admission import LimitsAdmitter
from sluicegate.proxy.network import NetworkPolicy
from sluicegate.proxy.pipeline import Admitter, Pipeline
from sluicegate.routing.build import router_for
from sluicegate.routing.state import BackendStateStore
from sluicegate.runtime import Runtime, compile_runtime
from sluicegate.storage.engine import (
    create_engine_for,
    database_problem,
    database_unreachable,
    describe,
)
from sluicegate.storage.ledger import LedgerStats, LedgerWriter
from sluicegate.storage.migrations import migrate
from sluicegate.storage.quota_usage import COUNTER_KEY_COLUMNS, ledger_usage
from sluicegate.storage.subscriptions import SubscriptionRepository

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from sluicegate.accounting.export import ExportWorker
    from sluicegate.auth.bearer import TokenAuthenticator

log = logging.getLogger("sluicegate")

#: The garbage collector's generation thresholds while serving (CPython's default: 700, 10,
#: 10). A request allocates a few hundred container objects that live as long as the
#: request (tens of milliseconds under load); with a young generation of 700, nearly every
#: one of them is still alive at a collection and is scanned, then scanned again in the
#: middle generation: about 7 % of the event loop's CPU. With 50,000, a collection comes a
#: few times a second and finds most request objects already freed by reference counting.
#: Cyclic garbage waits a little longer (at most 50,000 young objects, a few MiB).
GC_THRESHOLDS = (50_000, 20, 10)


def key_hasher_for(config: GatewayConfig, environ: dict[str, str]) -> KeyHasher:
    """The hasher every tool of one installation shares (gateway, CLI, admin API)."""
    fallback: Path | None = None
    if config.mode == "embedded":
        url = config.storage.url
        base = Path(url.split(":///", 1)[1]).parent if url.startswith("sqlite:///") else Path("var")
        fallback = base / "key-secret"
    return KeyHasher(load_key_secret(config.security.key_secret_env, environ, fallback))


class Gateway:
    """Everything one gateway process runs. Build it, then ``await start()`` inside the event
    loop; ``await stop()`` flushes the ledger and closes connections."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        clock: Clock | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        env = dict(os.environ) if environ is None else environ
        self.config = config
        self.clock = clock or SystemClock()
        self.runtime: Runtime = compile_runtime(config, env, self.clock)
        self.engine = create_engine_for(config.storage.url)
        self.repository = SubscriptionRepository(self.engine)
        self.hasher = key_hasher_for(config, env)
        self.index = SubscriptionIndex(self.hasher)
        self.refresher = IndexRefresher(
            self.index,
            self.repository.version,
            self.repository.load_all,
            config.refresh_seconds,
            prepare=functools.partial(migrate, config.storage.url),
            max_stale=config.storage.max_stale_seconds,
        )
        self.metrics = GatewayMetrics(config.metrics.max_subscription_labels)
        self.metrics.registry.register(_ReadinessCollector(self))
        if config.metrics.enabled:
            for product in self.runtime.products.values():
                if product.content_safety is not None:
                    product.content_safety.observer = self.metrics
                if product.semantic_cache is not None:
                    product.semantic_cache.observer = self.metrics
        spill = Path(config.storage.spill_dir) / "ledger-spill.jsonl"
        self.ledger = LedgerWriter(
            self.engine,
            spill_path=spill,
            batch_size=config.storage.batch_size,
            flush_interval=config.storage.flush_interval_seconds,
            max_pending=config.storage.max_pending,
            clock=self.clock,
        )
        observers: list[Callable[[UsageRecord], None]] = []
        if config.metrics.enabled:
            observers.append(self.metrics.observe)
        if config.logging.access_log:
            observers.append(AccessLog().write)
        self.sinks: list[Callable[[UsageRecord], None]] = [self.ledger.submit, *observers]
        self.limit_store: CounterStore = self._limit_store(config)
        self.limiter = Limiter(self.limit_store, self.clock)
        self.quota_seeder = self._quota_seeder(config)
        policies = {name: p.limits for name, p in self.runtime.products.items()}
        # Always, even when no product has limits: a subscription's overrides can set some
        # (and may be set at any time). Without product limits, a request of a subscription
        # without overrides returns from admit() after two attribute reads.
        self.admitter: Admitter | None = LimitsAdmitter(self.limiter, policies)
        self.routing_store: BackendStateStore | None = self._routing_store(config)
        self.router = router_for(
            self.runtime, self.clock, self.routing_store, _RoutingMetrics(self.metrics)
        )
        self.metrics.watch_routing(self._routing_samples)
        #: Client authentication by Entra ID / OIDC token (None without an ``oidc`` section).
        self.token_auth = _token_authenticator(config, self.clock, self._count_auth_refusal)
        #: Spending budgets: computed by the rollup job (admin.mount), checked per request.
        self.budgets = Budgets(
            config,
            self.engine,
            self.clock,
            # The in-memory view (refreshed every refresh_seconds): no database read for it.
            lambda: self.index.by_id().values(),
            observer=self.metrics if config.metrics.enabled else None,
        )
        self.metrics.watch_budgets(self.budgets.ratios)
        #: Prompt and completion logging (docs/message-log.md): only when a product has it.
        self.messages: MessageLog | None = None
        if any(p.message_log is not None for p in config.products):
            self.messages = MessageLog(config.message_log)
            self.metrics.watch_message_log(self.messages.stats)
        #: Usage exports (Event Hubs, webhooks): a worker thread of their own, None without.
        self.exports = _export_worker(config, self.engine, self.clock, env, self.metrics)
        self.pipeline = Pipeline(
            self.runtime,
            self.index,
            self.clock,
            self.sinks,
            self.admitter,
            observers,
            router=self.router,
            tokens=self.token_auth,
            network=NetworkPolicy.from_config(config),
            budgets=self.budgets,
            messages=self.messages,
        )
        self.started = False

    def _count_auth_refusal(self, reason: str) -> None:
        """Token refusals that are not 401s (401s are counted from their usage record)."""
        if self.config.metrics.enabled:
            self.metrics.auth_failures.labels(reason).inc()

    def _routing_store(self, config: GatewayConfig) -> BackendStateStore | None:
        """Cluster mode shares backend state through Redis; embedded mode keeps it in the
        router alone (one process: there is nobody to share it with)."""
        if config.mode == "cluster" and config.redis is not None:
            from sluicegate.routing.redis_state import RedisStateStore

            return RedisStateStore(
                config.redis.url,
                f"{config.redis.prefix}:routing:",
                interval=config.routing.sync_seconds,
            )
        return None

    def backend_states(self) -> list[dict[str, Any]]:
        """Each backend deployment as routing sees it: state (closed / open / half-open),
        open until (epoch seconds) and why, headroom tokens and requests (None: unknown),
        in-flight attempts, last status and error, and the pools that use it. For the CLI
        and the admin API; safe to call from the event loop (no I/O)."""
        return [view.as_dict() for view in self.router.views()]

    def _routing_samples(self) -> list[RoutingSample]:
        now = self.clock.now()
        return [
            RoutingSample(
                v.backend,
                v.deployment,
                v.state,
                v.headroom_tokens,
                v.headroom_requests,
                None if v.open_until is None else round(max(0.0, v.open_until - now), 3),
            )
            for v in self.router.views()
        ]

    def _limit_store(self, config: GatewayConfig) -> CounterStore:
        if config.mode == "cluster" and config.redis is not None:
            from sluicegate.limits.redis_store import RedisStore

            store = RedisStore(
                config.redis.url,
                f"{config.redis.prefix}:limits:",
                self.clock,
                fail_mode=config.redis.fail_mode,
                time_source=config.redis.clock,
            )
            self.metrics.watch_limit_store(store)
            return store
        # Every admission of this process from now on is in it: quota counters are seeded
        # from the ledger's records before this moment (limits/seeding.py).
        return MemoryStore(counting_since_ms=int(self.clock.now() * 1000))

    def _quota_seeder(self, config: GatewayConfig) -> QuotaSeeder | None:
        """Quota counters created after their period began (after a restart in embedded
        mode, after Redis lost them in cluster mode) get the ledger's earlier usage
        (docs/limits.md, "Quotas survive restarts"). Both stores can be seeded."""
        store = self.limit_store
        if not isinstance(store, SeedableStore):
            return None
        spill = self.ledger.spill_path
        seeder = QuotaSeeder(
            store,
            ledger_usage(self.engine),
            COUNTER_KEY_COLUMNS.keys(),
            # Records of requests that ended just before are in their writers' next batch
            # (every instance flushes at this interval); the previous run's spill file is
            # replayed by this writer's thread at start (ledger_ready).
            settle_s=max(2 * config.storage.flush_interval_seconds, 0.5),
            ledger_ready=lambda: not spill.exists(),
        )
        self.limiter.quota_seen = seeder.notice
        store.quota_created = seeder.created
        return seeder

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.refresher.load_first)  # migrations, then the view
        except SQLAlchemyError as exc:
            if not database_unreachable(exc):
                raise  # a configuration error: the lifespan reports it in one line, and exits
            # Start anyway and answer 503 (Retry-After) until the view is loaded, rather
            # than keep a snapshot of the subscriptions (key hashes) on local disk: an
            # instance restarted during a database outage stays out of rotation (/readyz)
            # while the others serve. The refresher retries migrations and the first load in
            # the background, exactly what this start would have done, logged when it does.
            log.error(
                "database %s unreachable at start (%s): serving 503 until it answers; "
                "migrations and the subscriptions load are retried in the background",
                describe(self.engine),
                database_problem(exc),
            )
            self.refresher.defer()
        self.refresher.start()
        self.ledger.start()
        if self.messages is not None:
            self.messages.start()
        if self.exports is not None:
            self.exports.start()
        if self.quota_seeder is not None:
            self.quota_seeder.start()
        if self.routing_store is not None:
            await self.routing_store.start()
        for backend in self.runtime.backends.values():
            await backend.open()
        for service in self.runtime.content_safety.values():
            await service.open()
        await asyncio.to_thread(self._preload_tokenizers)
        if self.token_auth is not None:
            await self.token_auth.start()  # fetches the IdPs' keys; never fails the start
        # Everything built so far lives as long as the process: move it out of the garbage
        # collector's sight, so that collections on the request path only scan young objects.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        self.started = True
        log.info(
            "gateway started",
            extra={"mode": self.config.mode, "subscriptions": len(self.index)},
        )

    def _preload_tokenizers(self) -> None:
        """Load the encodings the configured deployments' models use, before the first request.

        Always, not only when limits estimate prompts: the ledger's estimate for a stream
        cut short (no usage came back) counts the relayed text with the same tokenizer.
        Building one costs 0.2-0.4 s of CPU with the GIL held (reading and checking the
        file, building the tables) and ~5 MiB; left to first use, the first aborted stream
        froze every other request for that long (the benchmark saw it as a 0.3-0.5 s p99
        with limits off, back when tiktoken's build took as long).
        """
        from sluicegate.tokens.counting import encoding_name_for
        from sluicegate.tokens.encodings import preload

        names = {encoding_name_for(d.model or d.name) for d in self.runtime.deployments.values()}
        preload(tuple(n for n in names if n))

    async def stop(self, ledger_timeout: float = 30.0) -> None:
        await self.refresher.stop()
        if self.exports is not None:
            await asyncio.to_thread(self.exports.stop)  # a cycle in flight ends first
        if self.quota_seeder is not None:
            await self.quota_seeder.aclose()
        if self.token_auth is not None:
            await self.token_auth.aclose()
        for backend in self.runtime.backends.values():
            await backend.close()
        for service in self.runtime.content_safety.values():
            await service.close()
        if self.routing_store is not None:
            await self.routing_store.aclose()
        await asyncio.to_thread(self.ledger.close, ledger_timeout)
        if self.messages is not None:
            await asyncio.to_thread(self.messages.close)
        close = getattr(self.limit_store, "aclose", None)
        if close is not None:
            await close()
        self.engine.dispose()
        self.started = False
        log.info("gateway stopped")

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether this instance can take requests, and why (the ``/readyz`` body).

        Ready: its subscription view is loaded and not stale (else every request gets 503),
        and usage records are durable: written, or appended to the spill file while the
        database is unreachable. The database being down is reported (``database``,
        ``ledger: spilling``), not a reason to be unready: every instance shares it, and
        an unready cluster answers nothing although it could serve. Redis and the backends
        are reported or left out for the same reason, and because both recover through
        traffic (the limit store retries Redis on admissions; a half-open breaker probes
        with a request): an instance taken out of rotation for them would never come back.
        No I/O but a ``statvfs`` of the spill directory while the database is down.
        """
        view = self.refresher.state
        stats = self.ledger.stats()
        database_ok = view != "loading" and self.refresher.failures == 0 and stats.healthy
        spill = (
            None
            if database_ok
            else _spill_problem(self.ledger.spill_path, stats, self.config.storage.max_pending)
        )
        age = self.refresher.age()
        body: dict[str, Any] = {
            "subscriptions": view,
            "subscriptions_age_seconds": None if age is None else round(age, 1),
            "database": "ok" if database_ok else "unreachable",
            "ledger": "ok" if database_ok else ("spilling" if spill is None else "failing"),
        }
        if spill is not None:
            body["ledger_problem"] = spill
        available = getattr(self.limit_store, "available", None)
        if isinstance(available, bool) and self.config.redis is not None:
            mode = self.config.redis.fail_mode
            body["limits"] = "ok" if available else f"redis unreachable (fail_mode {mode})"
        ready = view == "loaded" and spill is None
        return ready, {"status": "ok" if ready else "unavailable", **body}

    def update_ledger_metrics(self) -> None:
        stats = self.ledger.stats()
        self.metrics.ledger_pending.set(stats.pending)
        self.metrics.ledger_written.set(stats.written)
        self.metrics.ledger_failures.set(stats.failures)
        self.metrics.ledger_latency.set(stats.last_write_seconds or 0.0)

    def record(self, record: UsageRecord) -> None:
        for sink in self.sinks:
            sink(record)


class _RoutingMetrics:
    """The router's events as metrics (implements ``routing.RoutingObserver``)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def spilled(self, pool: str, from_backend: str, to_backend: str, reason: str) -> None:
        self.metrics.count_spillover(pool, from_backend, to_backend)

    def tripped(self, backend: str, deployment: str, reason: str) -> None:
        self.metrics.count_trip(backend, reason)


def _token_authenticator(
    config: GatewayConfig, clock: Clock, on_refused: Callable[[str], None]
) -> TokenAuthenticator | None:
    """Client authentication by token, when the configuration has an ``oidc`` section.
    Imported here: PyJWT and cryptography (~10 MiB per worker) load only when needed."""
    if config.oidc is None:
        return None
    from sluicegate.auth.bearer import TokenAuthenticator

    return TokenAuthenticator.from_config(config, clock, on_refused=on_refused)


def _export_worker(
    config: GatewayConfig,
    engine: Engine,
    clock: Clock,
    environ: dict[str, str],
    metrics: GatewayMetrics,
) -> ExportWorker | None:
    """The usage exports' worker, when the configuration has ``exports``. Imported here:
    aiohttp loads only when an export needs it."""
    if not config.exports:
        return None
    from sluicegate.accounting.export import export_worker

    observer = metrics if config.metrics.enabled else None
    return export_worker(config.exports, engine, clock, environ, observer)


#: While the database is down, the spill file must be able to take records: less free space
#: than this in its directory makes the instance unready (records would soon be lost).
SPILL_MIN_FREE_BYTES = 64 * 1024 * 1024


def _spill_problem(path: Path, stats: LedgerStats, max_pending: int) -> str | None:
    """Why the spill file at ``path`` cannot take records now, or None. The spill file has
    no size cap of its own; what stops it is the disk. A failed append keeps its records in
    memory (``LedgerWriter._spill_group``), so far more than ``max_pending`` waiting there
    means appends fail, whatever the cause."""
    if stats.pending > 2 * max_pending:
        return f"{stats.pending} records wait in memory: the spill file cannot be written"
    directory = path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent  # created at the first append
    if not directory.is_dir():
        return f"spill directory: {directory} is not a directory"
    if not os.access(directory, os.W_OK):
        return f"spill directory {directory} is not writable"
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        return f"spill directory {directory}: {exc.strerror}"
    free = st.f_bavail * st.f_frsize
    if free < SPILL_MIN_FREE_BYTES:
        return f"spill directory {directory} has {free // (1024 * 1024)} MiB free"
    return None


class _ReadinessCollector:
    """``/readyz``'s verdict at every scrape: ``sluicegate_ready`` (1/0),
    ``sluicegate_database_reachable`` (1/0) and ``sluicegate_subscriptions_age_seconds``
    (since the last successful refresh of the subscription view)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ready, body = self._gateway.readiness()
        yield GaugeMetricFamily(
            "sluicegate_ready", "1 when this instance can take requests (/readyz 200).", ready
        )
        yield GaugeMetricFamily(
            "sluicegate_database_reachable",
            "1 when the database answers (records are written, not spilled).",
            body["database"] == "ok",
        )
        age = body["subscriptions_age_seconds"]
        if age is not None:
            yield GaugeMetricFamily(
                "sluicegate_subscriptions_age_seconds",
                "Seconds since the subscription view was last refreshed from the database.",
                age,
            )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
