"""The composition root: builds every long-lived part of a gateway from its configuration
and owns their lifecycle (start in the lifespan, stop in order on shutdown)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sluicegate.accounting.records import UsageRecord
from sluicegate.auth.index import IndexRefresher, SubscriptionIndex
from sluicegate.auth.keys import KeyHasher, load_key_secret
from sluicegate.clock import Clock, SystemClock
from sluicegate.config.model import GatewayConfig
from sluicegate.limits import CounterStore, Limiter, MemoryStore
from sluicegate.logs import AccessLog
from sluicegate.metrics.registry import GatewayMetrics, RoutingSample
from sluicegate.proxy.admission import LimitsAdmitter
from sluicegate.proxy.network import NetworkPolicy
from sluicegate.proxy.pipeline import Admitter, Pipeline
from sluicegate.routing.build import router_for
from sluicegate.routing.state import BackendStateStore
from sluicegate.runtime import Runtime, compile_runtime
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.ledger import LedgerWriter
from sluicegate.storage.migrations import migrate
from sluicegate.storage.subscriptions import SubscriptionRepository

if TYPE_CHECKING:
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
            self.index, self.repository.version, self.repository.load_all, config.refresh_seconds
        )
        self.metrics = GatewayMetrics(config.metrics.max_subscription_labels)
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

            return RedisStore(
                config.redis.url,
                f"{config.redis.prefix}:limits:",
                self.clock,
                fail_mode=config.redis.fail_mode,
            )
        return MemoryStore()

    async def start(self) -> None:
        await asyncio.to_thread(migrate, self.config.storage.url)
        await asyncio.to_thread(self.refresher.refresh_now)
        self.refresher.start()
        self.ledger.start()
        if self.routing_store is not None:
            await self.routing_store.start()
        for backend in self.runtime.backends.values():
            await backend.open()
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
        if self.token_auth is not None:
            await self.token_auth.aclose()
        for backend in self.runtime.backends.values():
            await backend.close()
        if self.routing_store is not None:
            await self.routing_store.aclose()
        await asyncio.to_thread(self.ledger.close, ledger_timeout)
        close = getattr(self.limit_store, "aclose", None)
        if close is not None:
            await close()
        self.engine.dispose()
        self.started = False
        log.info("gateway stopped")

    def ready(self) -> bool:
        from sluicegate.storage.engine import ping

        return ping(self.engine)

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
