"""Quota counters created after their period began are seeded from the ledger, once, without
counting anything twice: both stores (memory on SQLite, Redis on PostgreSQL), the background
seeder, racing instances, a database error, purged records, and the config check's warning."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import update
from sqlalchemy.engine import Engine

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.clock import FakeClock
from sluicegate.config.loader import parse_config, retention_warnings
from sluicegate.limits.limiter import (
    Limiter,
    LimitRequest,
    parse_quota_counter_name,
    quota_counter_name,
)
from sluicegate.limits.memory import MemoryStore
from sluicegate.limits.periods import period_bounds
from sluicegate.limits.policy import LimitPolicy
from sluicegate.limits.redis_store import ORIGIN_SUFFIX, RedisStore
from sluicegate.limits.seeding import QuotaSeeder
from sluicegate.limits.store import Counter, CounterStore, SeedableStore
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import migrate
from sluicegate.storage.quota_usage import COUNTER_KEY_COLUMNS, ledger_usage
from sluicegate.storage.rows import record_to_row
from sluicegate.storage.schema import rollup_state, usage_records
from tests.limits.conftest import T0
from tests.storage.conftest import build_record
from tests.support.pg import pg_database_url  # noqa: F401  (fixture)

QUOTA = LimitPolicy(token_quota=1_000_000, token_quota_period="monthly")
START_MS, END_MS = period_bounds("monthly", T0)
NOW_MS = int(T0 * 1000)


def name_of(key: str) -> str:
    return quota_counter_name(key, "monthly", START_MS)


def fixed(name: str, cost: int, limit: int = 1_000_000) -> Counter:
    return Counter(name, "fixed", limit, cost, end_ms=END_MS, reserve=True)


def record(n: int, ts: float, tokens: int, sub: str = "sub-a", **more: Any) -> UsageRecord:
    values: dict[str, Any] = {"owner": "team-x", "product": "gold", **more}
    return build_record(n, ts=ts, subscription_id=sub, total_tokens=tokens, **values)


def insert(engine: Engine, *records: UsageRecord) -> None:
    with engine.begin() as conn:
        conn.execute(usage_records.insert(), [record_to_row(r) for r in records])


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate(url)
    engine = create_engine_for(url)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(pg_database_url: str) -> Iterator[Engine]:  # noqa: F811  (the fixture)
    migrate(pg_database_url)
    engine = create_engine_for(pg_database_url)
    yield engine
    engine.dispose()


def seeder_of(store: SeedableStore, engine: Engine, **options: Any) -> QuotaSeeder:
    options.setdefault("settle_s", 0.05)
    return QuotaSeeder(store, ledger_usage(engine), COUNTER_KEY_COLUMNS.keys(), **options)


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def used(store: CounterStore, name: str, now_ms: int = NOW_MS) -> int:
    """The counter's count, by a zero-cost admission (charges nothing)."""
    result = await store.admit([fixed(name, 0)], now_ms)
    return result.states[0].used


def test_counter_names_parse_back() -> None:
    name = quota_counter_name("owner:team:with:colons", "weekly", 1_700_000_000_000)
    assert parse_quota_counter_name(name) == ("owner:team:with:colons", "weekly", 1_700_000_000_000)
    assert parse_quota_counter_name("sub:a:tpm") is None
    assert parse_quota_counter_name("sub:a:quota:monthly:x") is None


async def test_stores_agree_on_origin_and_apply_a_seed_once(store: CounterStore) -> None:
    """Memory and Redis alike: a quota counter's origin is the admission that created it; a
    seed lands once, only for that origin; the creation is reported once."""
    assert isinstance(store, SeedableStore)
    created: list[str] = []
    store.quota_created = created.append
    name = name_of("sub:a")
    assert await store.quota_origin(name) is None
    assert (await store.admit([fixed(name, 100)], NOW_MS)).allowed
    assert created == [name]
    origin = await store.quota_origin(name)
    assert origin is not None and (origin.since_ms, origin.seeded) == (NOW_MS, False)
    assert not await store.apply_seed(name, NOW_MS - 1, 500)  # not this counter's origin
    assert not await store.apply_seed(name_of("sub:none"), NOW_MS, 500)  # no such counter
    assert await store.apply_seed(name, NOW_MS, 500)
    assert not await store.apply_seed(name, NOW_MS, 500)  # once
    origin = await store.quota_origin(name)
    assert origin is not None and origin.seeded
    assert (await store.admit([fixed(name, 100)], NOW_MS + 1000)).states[0].used == 700
    assert created == [name]  # an existing counter is not created again


async def test_redis_quota_key_lost_and_created_again_has_a_new_origin(
    redis_client: aioredis.Redis, redis_prefix: str, clock: FakeClock
) -> None:
    store = RedisStore(redis_client, redis_prefix, clock, fail_mode="closed")
    created: list[str] = []
    store.quota_created = created.append
    name = name_of("sub:a")
    try:
        assert (await store.admit([fixed(name, 100)], NOW_MS)).allowed
        assert await store.apply_seed(name, NOW_MS, 50)
        quota_ttl = await redis_client.pttl(redis_prefix + name)
        origin_ttl = await redis_client.pttl(redis_prefix + name + ORIGIN_SUFFIX)
        assert abs(quota_ttl - origin_ttl) < 1000  # they expire together
        await redis_client.delete(redis_prefix + name)  # evicted (its origin kept)
        assert (await store.admit([fixed(name, 7)], NOW_MS + 5000)).states[0].used == 7
        assert created == [name, name]
        origin = await store.quota_origin(name)
        assert origin is not None and (origin.since_ms, origin.seeded) == (NOW_MS + 5000, False)
        assert not await store.apply_seed(name, NOW_MS, 50)  # the old counter's seed
        assert await store.apply_seed(name, NOW_MS + 5000, 50)
        assert await used(store, name) == 57
    finally:
        await store.aclose()


async def test_memory_restart_seeds_the_period_without_counting_twice(
    sqlite_engine: Engine,
) -> None:
    """Embedded mode after a restart at ``T0 - 5``: the ledger's records of the period before
    it are added, once. Not again: requests this process admitted (one that arrived before
    the counter was created and was admitted after it, one after), a failed attempt's record
    beside its retry, other keys, the month before."""
    period_start = START_MS / 1000
    insert(
        sqlite_engine,
        record(1, period_start + 10, 1000),  # this period, before the restart: counted
        record(2, period_start - 10, 5000),  # last month
        record(3, period_start + 20, 7000, sub="sub-b"),  # another key
        # A request retried after a failed attempt: the failed one carries no tokens.
        record(4, period_start + 30, 0, attempt=1, outcome=Outcome.BACKEND_ERROR, status=503),
        record(4, period_start + 30, 300, attempt=2),
    )
    clock = FakeClock(start=T0)
    store = MemoryStore(counting_since_ms=NOW_MS - 5000)  # the process started at T0 - 5
    limiter = Limiter(store, clock)
    seeder = seeder_of(store, sqlite_engine)
    limiter.quota_seen = seeder.notice
    store.quota_created = seeder.created
    seeder.start()
    try:
        # Arrived at T0 - 2 (its prompt counted meanwhile), admitted at T0: the counter's
        # creation. Then one more at T0 + 1. Both are in the counter and in the ledger.
        first = await limiter.admit([LimitRequest("sub:sub-a", QUOTA, 60)])
        await limiter.settle(first.reservation, 50)
        clock.advance(1)
        second = await limiter.admit([LimitRequest("sub:sub-a", QUOTA, 70)])
        await limiter.settle(second.reservation, 70)
        insert(sqlite_engine, record(5, T0 - 2, 50), record(6, T0 + 1, 70))
        assert seeder.pending == 1
        await wait_for(lambda: seeder.applied == 1)
        assert seeder.applied_tokens == 1300
        name = name_of("sub:sub-a")
        assert await used(store, name, NOW_MS + 2000) == 1300 + 50 + 70
        assert not await seeder.seed_now(name)  # once
        assert seeder.pending == 0
    finally:
        await seeder.aclose()


async def test_redis_loss_seeds_from_postgresql_and_racing_instances_seed_once(
    pg_engine: Engine, redis_client: aioredis.Redis, redis_prefix: str, clock: FakeClock
) -> None:
    """Cluster mode: two instances share the Redis counters. Both try to seed at once: one
    seed lands. Redis loses every key: the next admission creates the counter again and it is
    seeded with the ledger's records before that moment, the requests since the first seed
    included."""
    period_start = START_MS / 1000
    insert(pg_engine, record(1, period_start + 10, 4000), record(2, period_start + 20, 900))
    store_a = RedisStore(redis_client, redis_prefix, clock, fail_mode="closed")
    store_b = RedisStore(redis_client, redis_prefix, clock, fail_mode="closed")
    limiter_a, limiter_b = Limiter(store_a, clock), Limiter(store_b, clock)
    seeder_a, seeder_b = seeder_of(store_a, pg_engine), seeder_of(store_b, pg_engine)
    for limiter, store, seeder in ((limiter_a, store_a, seeder_a), (limiter_b, store_b, seeder_b)):
        limiter.quota_seen = seeder.notice
        store.quota_created = seeder.created
    name = name_of("sub:sub-a")
    try:
        admitted = await limiter_a.admit([LimitRequest("sub:sub-a", QUOTA, 100)])
        await limiter_a.settle(admitted.reservation, 100)
        insert(pg_engine, record(3, T0, 100))
        applied = await asyncio.gather(seeder_a.seed_now(name), seeder_b.seed_now(name))
        assert sorted(applied) == [False, True]
        assert await used(store_a, name) == 4900 + 100

        # Redis loses its data (a restart without persistence, a FLUSH): our keys are gone.
        keys = [key async for key in redis_client.scan_iter(match=redis_prefix + "*")]
        await redis_client.delete(*keys)
        clock.advance(2)
        seeder_b.start()
        later = await limiter_b.admit([LimitRequest("sub:sub-a", QUOTA, 10)])
        assert later.allowed
        insert(pg_engine, record(4, T0 + 2, 10))  # in the ledger before the seed: not in it
        assert seeder_b.pending == 1  # the store reported the creation
        await limiter_b.settle(later.reservation, 10)
        await wait_for(lambda: seeder_b.applied == 1)
        assert seeder_b.applied_tokens == 5000
        assert await used(store_b, name, NOW_MS + 2000) == 5000 + 10
        assert not await seeder_a.seed_now(name)  # the other instance finds it seeded
    finally:
        await seeder_b.aclose()
        await store_a.aclose()
        await store_b.aclose()


async def test_ip_keys_are_not_seeded(sqlite_engine: Engine) -> None:
    store = MemoryStore()
    seeder = seeder_of(store, sqlite_engine)
    seeder.notice(name_of("ip:203.0.113.7"))
    seeder.created(name_of("ip:203.0.113.7"))
    assert seeder.pending == 0
    seeder.notice(name_of("owner:team-x"))
    assert seeder.pending == 1


async def test_a_database_error_is_retried_and_never_blocks_admissions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ledger cannot be read (here: not migrated yet): a warning, admissions go on, and
    a retry seeds the counter once the database answers."""
    url = f"sqlite:///{tmp_path / 'later.db'}"
    engine = create_engine_for(url)
    clock = FakeClock(start=T0)
    store = MemoryStore(counting_since_ms=NOW_MS)
    limiter = Limiter(store, clock)
    seeder = seeder_of(store, engine, retry_s=0.05, max_retry_s=0.1)
    limiter.quota_seen = seeder.notice
    store.quota_created = seeder.created
    seeder.start()
    try:
        with caplog.at_level(logging.WARNING, logger="sluicegate.limits"):
            assert (await limiter.admit([LimitRequest("sub:sub-a", QUOTA, 10)])).allowed
            await wait_for(lambda: "quota seeding failed" in caplog.text)
            assert (await limiter.admit([LimitRequest("sub:sub-a", QUOTA, 10)])).allowed
            assert seeder.applied == 0
            migrate(url)
            insert(engine, record(1, START_MS / 1000 + 5, 250))
            await wait_for(lambda: seeder.applied == 1)
        assert await used(store, name_of("sub:sub-a")) == 250 + 20
        assert "sub-a" not in caplog.text  # the warning names no key
    finally:
        await seeder.aclose()
        engine.dispose()


async def test_purged_records_are_warned_about_once(
    sqlite_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with sqlite_engine.begin() as conn:
        conn.execute(update(rollup_state).values(raw_purged_before=START_MS / 1000 + 3600))
    insert(sqlite_engine, record(1, START_MS / 1000 + 7200, 40))
    store = MemoryStore(counting_since_ms=NOW_MS)
    seeder = seeder_of(store, sqlite_engine)
    with caplog.at_level(logging.WARNING, logger="sluicegate.limits"):
        for key in ("sub:sub-a", "owner:team-x"):
            await store.admit([fixed(name_of(key), 1)], NOW_MS)
            assert await seeder.seed_now(name_of(key))
    assert caplog.text.count("have been purged") == 1
    assert await used(store, name_of("owner:team-x")) == 41  # what is left is seeded


def test_config_check_warns_when_raw_records_go_before_a_quota_period() -> None:
    def config(days: float | None, period: str) -> Any:
        return parse_config(
            {
                "backends": [{"name": "b", "url": "https://b.example.com"}],
                "deployments": [{"name": "d", "backend": "b"}],
                "products": [
                    {
                        "name": "gold",
                        "deployments": ["d"],
                        "limits": [
                            {"tokens_per_minute": 10},
                            {"token_quota": 5, "token_quota_period": period},
                        ],
                    }
                ],
                "retention": {"raw_records_days": days},
            }
        )

    [warning] = retention_warnings(config(30, "monthly"))
    assert warning.startswith("retention.raw_records_days: 30 day(s) is shorter than the monthly")
    assert retention_warnings(config(31, "monthly")) == []
    assert retention_warnings(config(None, "yearly")) == []
    assert retention_warnings(config(2, "daily")) == []


def test_each_seedable_key_kind_matches_its_ledger_column(sqlite_engine: Engine) -> None:
    base = START_MS / 1000
    insert(
        sqlite_engine,
        record(1, base + 1, 10),
        record(2, base + 2, 20, sub="sub-b", caller="oid-1"),
        record(3, base + 3, 40, sub="sub-c", owner="team-y", product="silver", caller="oid-1"),
    )
    usage = ledger_usage(sqlite_engine)
    before = NOW_MS
    assert usage("sub:sub-b", START_MS, before) == (20, None)
    assert usage("owner:team-x", START_MS, before) == (30, None)
    assert usage("product:silver", START_MS, before) == (40, None)
    assert usage("caller:oid-1", START_MS, before) == (60, None)
    assert usage("sub:sub-a", START_MS, int((base + 1) * 1000)) == (0, None)  # ts < before
    assert usage("ip:203.0.113.7", START_MS, before) is None
    assert usage("hdr:sub-a:x-user:u1", START_MS, before) is None
