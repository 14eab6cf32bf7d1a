"""The composition root: builds every long-lived part of a gateway from its configuration
and owns their lifecycle (start in the lifespan, stop in order on shutdown)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Callable
from pathlib import Path

from sluicegate.accounting.records import UsageRecord
from sluicegate.auth.index import IndexRefresher, SubscriptionIndex
from sluicegate.auth.keys import KeyHasher, load_key_secret
from sluicegate.clock import Clock, SystemClock
from sluicegate.config.model import GatewayConfig
from sluicegate.limits import CounterStore, Limiter, MemoryStore
from sluicegate.logs import AccessLog
from sluicegate.metrics.registry import GatewayMetrics
from sluicegate.proxy.admission import LimitsAdmitter
from sluicegate.proxy.pipeline import Admitter, Pipeline
from sluicegate.runtime import Runtime, compile_runtime
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.ledger import LedgerWriter
from sluicegate.storage.migrations import migrate
from sluicegate.storage.subscriptions import SubscriptionRepository

log = logging.getLogger("sluicegate")


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
        self.runtime: Runtime = compile_runtime(config, env)
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
        self.admitter: Admitter | None = (
            LimitsAdmitter(self.limiter, policies) if any(policies.values()) else None
        )
        self.pipeline = Pipeline(
            self.runtime, self.index, self.clock, self.sinks, self.admitter, observers
        )
        self.started = False

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
        for backend in self.runtime.backends.values():
            await backend.open()
        await asyncio.to_thread(self._preload_tokenizers)
        # Everything built so far lives as long as the process: move it out of the garbage
        # collector's sight, so that collections on the request path only scan young objects.
        gc.collect()
        gc.freeze()
        self.started = True
        log.info(
            "gateway started",
            extra={"mode": self.config.mode, "subscriptions": len(self.index)},
        )

    def _preload_tokenizers(self) -> None:
        """Load the encodings the configured deployments need before the first request."""
        if self.admitter is None:
            return
        from sluicegate.tokens.counting import encoding_name_for
        from sluicegate.tokens.encodings import preload

        names = {encoding_name_for(d.model or d.name) for d in self.runtime.deployments.values()}
        preload(tuple(n for n in names if n))

    async def stop(self, ledger_timeout: float = 30.0) -> None:
        await self.refresher.stop()
        for backend in self.runtime.backends.values():
            await backend.close()
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
