"""What the cluster mode's limiter costs per request: the gateway's CPU and Redis's own.

Runs the limiter's store calls a request makes (an admission of a TPM and an RPM counter,
then the settle of the TPM estimate) against a real Redis, ``--requests`` times, in batches
of ``--concurrency`` concurrent requests (the batcher sends each batch as one command), and
reports per request:

* ``gateway_cpu_us``: this process's CPU time (``time.process_time``), the work the gateway's
  event loop does for the limiter;
* ``redis_cpu_us``: Redis's own time in the scripts, from ``INFO commandstats`` (``usec`` of
  EVALSHA, reset before each measurement); the figure that bounds how many requests a
  second one Redis core serves for a whole cluster of gateways;
* ``memory_cpu_us``: the in-memory store (embedded mode) doing the same, the baseline of the
  same run.

The counters start with a full minute of buckets, as under steady load (a sliding window of
61 one-second buckets). Best of ``--repeats``. Needs Redis (``--redis``, default the
machine's 127.0.0.1:6379); its keys go under a throwaway prefix, deleted afterwards.

    .venv/bin/python bench/redis_cost.py [--concurrency 16] [--requests 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import redis
import redis.asyncio as aioredis
import uvloop

from sluicegate.clock import SystemClock
from sluicegate.limits.memory import MemoryStore
from sluicegate.limits.redis_store import RedisStore
from sluicegate.limits.store import Adjustment, Counter, CounterStore

LIMIT = 1_000_000_000
WINDOW_MS, BUCKET_MS = 61_000, 1000


def _counters() -> list[Counter]:
    return [
        Counter("bench:tpm", "sliding", LIMIT, 88, window_ms=WINDOW_MS, bucket_ms=BUCKET_MS),
        Counter("bench:rpm", "sliding", LIMIT, 1, window_ms=WINDOW_MS, bucket_ms=BUCKET_MS),
    ]


async def _requests(store: CounterStore, count: int, concurrency: int) -> None:
    counters = _counters()
    for _ in range(count // concurrency):
        now_ms = int(time.time() * 1000)
        results = await asyncio.gather(*(store.admit(counters, now_ms) for _ in range(concurrency)))
        await asyncio.gather(
            *(
                store.adjust([Adjustment("bench:tpm", "sliding", r.states[0].slot, -20)], r.origin)
                for r in results
            )
        )


def _fill(client: redis.Redis, prefix: str) -> None:
    """A full minute of buckets, as a counter under steady load has."""
    current = int(time.time())
    for name in ("bench:tpm", "bench:rpm"):
        key = prefix + name
        client.delete(key)
        client.hset(key, mapping={current - age: 5 for age in range(1, 60)})
        client.pexpire(key, WINDOW_MS + BUCKET_MS)


def _evalsha_usec(client: redis.Redis) -> float:
    stats: dict[str, Any] = client.info("commandstats")
    return float(stats.get("cmdstat_evalsha", {}).get("usec", 0))


async def measure(url: str, requests: int, concurrency: int, repeats: int) -> dict[str, Any]:
    prefix = f"sgbench-cost-{os.getpid()}:"
    sync = redis.Redis.from_url(url)
    client = aioredis.Redis.from_url(url)
    store = RedisStore(client, prefix, SystemClock(), fail_mode="closed")
    memory = MemoryStore()
    best: dict[str, float] = {}
    try:
        await _requests(store, 2 * concurrency, concurrency)  # scripts loaded, connections up
        for _ in range(repeats):
            _fill(sync, prefix)
            await _requests(store, concurrency, concurrency)  # the sum counted once
            sync.config_resetstat()
            cpu0 = time.process_time()
            await _requests(store, requests, concurrency)
            gateway = (time.process_time() - cpu0) / requests * 1e6
            redis_side = _evalsha_usec(sync) / requests
            cpu0 = time.process_time()
            await _requests(memory, requests, concurrency)
            baseline = (time.process_time() - cpu0) / requests * 1e6
            for key, value in (
                ("gateway_cpu_us", gateway),
                ("redis_cpu_us", redis_side),
                ("memory_cpu_us", baseline),
            ):
                best[key] = min(best.get(key, value), value)
    finally:
        await store.aclose()
        await client.aclose()
        keys = list(sync.scan_iter(match=prefix + "*"))
        if keys:
            sync.delete(*keys)
        sync.close()
    return {
        "requests": requests,
        "concurrency": concurrency,
        "repeats": repeats,
        **{key: round(value, 1) for key, value in best.items()},
        "requests_per_redis_core": round(1e6 / best["redis_cpu_us"])
        if best["redis_cpu_us"]
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    result = uvloop.run(measure(args.redis, args.requests, args.concurrency, args.repeats))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
