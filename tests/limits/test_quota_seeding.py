"""Quota counters created after their period began are seeded from the ledger, once, without
counting anything twice: both stores (memory on SQLite, Redis on PostgreSQL), the background
seeder, racing instances, a database error, purged records, and the config check's warning."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import event, text, update
from sqlalchemy.engine import Engine

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.clock import FakeClock
from sluicegate.config.loader import (
    ConfigError,
    header_quota_warnings,
    parse_config,
    retention_warnings,
)
from sluicegate.limits.limiter import (
    Limiter,
    LimitRequest,
    parse_quota_counter_name,
    quota_counter_measure,
    quota_counter_name,
    request_quota_counter_name,
)
from sluicegate.limits.memory import MemoryStore
from sluicegate.limits.periods import period_bounds
from sluicegate.limits.policy import LimitPolicy
from sluicegate.limits.redis_store import ORIGIN_SUFFIX, RedisStore, TimeSource
from sluicegate.limits.seeding import QuotaSeeder
from sluicegate.limits.store import Counter, CounterStore, SeedableStore
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import migrate
from sluicegate.storage.quota_usage import (
    COUNTER_KEY_COLUMNS,
    LedgerUsage,
    QuotaUsageError,
    ledger_usage,
    quota_usages,
)
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


async def test_stores_agree_that_a_quota_counts_from_the_creating_requests_arrival(
    store: CounterStore,
) -> None:
    """Memory and Redis alike: ``arrived_ms`` (the request's arrival, before its admission)
    is the origin's ``since`` of a quota counter the admission creates; a later admission's
    arrival changes nothing."""
    assert isinstance(store, SeedableStore)
    name = name_of("sub:a")
    assert (await store.admit([fixed(name, 100)], NOW_MS, NOW_MS - 50)).allowed
    assert (await store.admit([fixed(name, 100)], NOW_MS + 10, NOW_MS - 80)).allowed
    origin = await store.quota_origin(name)
    assert origin is not None and origin.since_ms == NOW_MS - 50
    assert await store.apply_seed(name, NOW_MS - 50, 1)


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
        seeder_b.notice(name, "subscription")  # B's limiter has the same policy
        applied = await asyncio.gather(seeder_a.seed_now(name), seeder_b.seed_now(name))
        assert sorted(applied) == [False, True]
        assert await used(store_a, name) == 4900 + 100

        # Redis loses its data (a restart without persistence, a FLUSH): our keys are gone.
        keys = [key async for key in redis_client.scan_iter(match=redis_prefix + "*")]
        await redis_client.delete(*keys)
        clock.advance(2)
        seeder_b.start()
        won, won_tokens = seeder_b.applied, seeder_b.applied_tokens  # B may have won the race
        later = await limiter_b.admit([LimitRequest("sub:sub-a", QUOTA, 10)])
        assert later.allowed
        insert(pg_engine, record(4, T0 + 2, 10))  # in the ledger before the seed: not in it
        assert seeder_b.pending == 1  # the store reported the creation
        await limiter_b.settle(later.reservation, 10)
        await wait_for(lambda: seeder_b.applied == won + 1)
        assert seeder_b.applied_tokens - won_tokens == 5000
        assert await used(store_b, name, NOW_MS + 2000) == 5000 + 10
        assert not await seeder_a.seed_now(name)  # the other instance finds it seeded
    finally:
        await seeder_b.aclose()
        await store_a.aclose()
        await store_b.aclose()


@pytest.mark.parametrize("time_source", ["gateway", "redis"])
@pytest.mark.parametrize(
    "arrived",
    [
        T0 + 0.25,
        # Just below a whole ms, where int(ts * 1000) / 1000 rounds above ts.
        math.nextafter(1_700_000_040.051, -math.inf),
    ],
)
async def test_the_request_creating_a_redis_quota_key_is_not_seeded_again(
    pg_engine: Engine,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    time_source: TimeSource,
    arrived: float,
) -> None:
    """A request arrives at T (its record's ts), is admitted at T + 50 ms creating the quota
    key (a new period, a key Redis lost), settles at 300 tokens and its record is written
    before the seeder runs: the counter holds it, so the seed (the ledger's records before
    the origin's ``since``) must not, whichever clock the windows run on."""
    period_start = START_MS / 1000
    insert(pg_engine, record(1, period_start + 10, 4000))  # before the key: the seed
    clock = FakeClock(start=arrived)
    store = RedisStore(
        redis_client, redis_prefix, clock, fail_mode="closed", time_source=time_source
    )
    limiter = Limiter(store, clock)
    seeder = seeder_of(store, pg_engine)  # not started: seeded below, once the record is in
    limiter.quota_seen = seeder.notice
    store.quota_created = seeder.created
    name = name_of("sub:sub-a")
    try:
        clock.advance(0.05)  # the prompt counted, the admission's turn came
        admission = await limiter.admit([LimitRequest("sub:sub-a", QUOTA, 1000)], arrived)
        assert admission.allowed and seeder.pending == 1  # it created the key
        await limiter.settle(admission.reservation, 300)
        insert(pg_engine, record(2, arrived, 300))  # the ledger's ts: the arrival
        assert await seeder.seed_now(name)
        assert await used(store, name) == 4000 + 300  # not 4600
        assert seeder.applied_tokens == 4000
        origin = await store.quota_origin(name)  # on the ledger's clock, not Redis's
        assert origin is not None and int(arrived * 1000) - 1 <= origin.since_ms
        assert origin.since_ms / 1000 <= arrived
    finally:
        await seeder.aclose()
        await store.aclose()


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
            seeder.notice(name_of(key), "subscription")  # as the limiter tells it
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


# -- which records a seed counts, batching, timeouts, one warning per outage ------------------


def wire(store: MemoryStore, engine: Engine, clock: FakeClock, **options: Any) -> Any:
    """A limiter and a started seeder on ``store``, wired as the gateway wires them."""
    limiter = Limiter(store, clock)
    seeder = seeder_of(store, engine, **options)
    limiter.quota_seen = seeder.notice
    store.quota_created = seeder.created
    seeder.start()
    return limiter, seeder


async def test_a_caller_policys_subscription_fallback_is_seeded_with_tokenless_requests_only(
    sqlite_engine: Engine,
) -> None:
    """``counter_key: caller``: a request with a key and no token charges ``sub:<id>``. Its
    seed is the subscription's records without a caller, not the token requests that went
    to ``caller:`` counters; a header policy's fallback is not seeded (no header column);
    a ``sub:`` counter that a subscription policy charges too holds every request."""
    base = START_MS / 1000
    insert(
        sqlite_engine,
        record(1, base + 10, 5000, caller="oid-1"),  # token requests: caller:oid-1
        record(2, base + 11, 300),  # key only: the fallback
        record(3, base + 12, 4000, sub="sub-b", caller="oid-2"),
        record(4, base + 13, 20, sub="sub-b"),
        record(5, base + 14, 7000, sub="sub-c", caller="oid-3"),
        record(6, base + 15, 1, sub="sub-c"),
    )
    by_caller = LimitPolicy(token_quota=20_000, token_quota_period="monthly", counter_key="caller")
    by_header = LimitPolicy(
        token_quota=20_000,
        token_quota_period="monthly",
        counter_key="header",
        counter_header="x-user-id",
    )
    clock = FakeClock(start=T0)
    store = MemoryStore(counting_since_ms=NOW_MS - 5000)
    limiter, seeder = wire(store, sqlite_engine, clock)
    try:
        for requests in (
            [LimitRequest("sub:sub-a", by_caller, 1)],
            [LimitRequest("caller:oid-1", by_caller, 1)],
            [LimitRequest("sub:sub-b", by_header, 1)],
            [LimitRequest("sub:sub-c", by_caller, 1), LimitRequest("sub:sub-c", QUOTA, 1)],
        ):
            assert (await limiter.admit(requests)).allowed
        await wait_for(lambda: seeder.pending == 0)
        assert await used(store, name_of("sub:sub-a")) == 300 + 1
        assert await used(store, name_of("caller:oid-1")) == 5000 + 1
        assert await used(store, name_of("sub:sub-b")) == 1  # not seeded
        assert await used(store, name_of("sub:sub-c")) == 7001 + 1
        assert seeder.applied == 3
    finally:
        await seeder.aclose()


class StatementCounter:
    """Counts the SQL statements run on an engine (an SQLAlchemy event listener)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.count = 0

    def __enter__(self) -> StatementCounter:
        event.listen(self.engine, "before_cursor_execute", self._count)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._count)

    def _count(self, *args: Any) -> None:
        self.count += 1


async def test_many_counters_with_one_since_are_seeded_with_a_few_grouped_queries(
    sqlite_engine: Engine,
) -> None:
    """Embedded mode after a restart: 1,200 caller counters share the gateway's start as
    their ``since``: one grouped query per 500 keys (and one read of the purge horizon),
    not two statements per key; each seed equals the key's own sum."""
    base = START_MS / 1000
    n = 1200
    insert(
        sqlite_engine,
        *(record(i, base + i, 10 + i % 7, caller=f"oid-{i % n}") for i in range(2 * n)),
        record(9999, NOW_MS / 1000 - 1, 1_000_000, caller="oid-0"),  # after since: not in
    )
    usage = ledger_usage(sqlite_engine)
    since = NOW_MS - 5000
    expected = {f"oid-{i}": usage(f"caller:oid-{i}", START_MS, since) for i in range(n)}
    policy = LimitPolicy(token_quota=10**9, token_quota_period="monthly", counter_key="caller")
    clock = FakeClock(start=T0)
    store = MemoryStore(counting_since_ms=since)
    limiter, seeder = wire(store, sqlite_engine, clock, settle_s=1.5)
    try:
        with StatementCounter(sqlite_engine) as statements:
            for i in range(n):
                assert (await limiter.admit([LimitRequest(f"caller:oid-{i}", policy, 0)])).allowed
            await wait_for(lambda: seeder.applied == n, timeout=20)
        assert statements.count <= 3 + 1  # ceil(1200 / 500) grouped queries, the horizon
        for i in range(n):
            tokens, _ = expected[f"oid-{i}"] or (None, None)
            assert await used(store, name_of(f"caller:oid-{i}")) == tokens
    finally:
        await seeder.aclose()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_batched_usage_with_different_sinces_equals_the_per_key_sums(
    request: pytest.FixtureRequest, database: str
) -> None:
    """Cluster mode: counters created at different moments. One grouped query up to the
    earliest ``since``, a short tail query for each later one; the same sums as one query
    per key; a counter created when its period began has nothing to add."""
    engine: Engine = request.getfixturevalue(
        "sqlite_engine" if database == "sqlite" else "pg_engine"
    )
    base = START_MS / 1000
    insert(engine, *(record(i, base + i, 100 + i, sub=f"s{i % 5}") for i in range(50)))
    sinces = {f"s{k}": START_MS + (10 + 5 * k) * 1000 for k in range(5)} | {"s9": START_MS}
    with StatementCounter(engine) as statements:
        tokens, purged = quota_usages(engine, "sub", START_MS, sinces)
    timeouts = 2 if database == "postgresql" else 0  # SET LOCAL statement_, lock_timeout
    assert statements.count == timeouts + 1 + 4 + 1  # grouped, 4 tails, the horizon
    usage = ledger_usage(engine)
    for value, since in sinces.items():
        assert (tokens[value], purged) == usage(f"sub:{value}", START_MS, since)
    assert tokens["s9"] == 0


@pytest.fixture
def locked_ledger(pg_engine: Engine) -> Iterator[threading.Event]:
    """``LOCK TABLE usage_records`` held by another session until the event is set (or
    20 s)."""
    release, locked = threading.Event(), threading.Event()

    def hold() -> None:
        with pg_engine.connect() as conn, conn.begin():
            conn.execute(text("LOCK TABLE usage_records"))
            locked.set()
            release.wait(20)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert locked.wait(5)
    yield release
    release.set()
    thread.join(25)


def test_a_seed_query_gives_up_on_a_locked_ledger(
    pg_engine: Engine, locked_ledger: threading.Event
) -> None:
    started = time.monotonic()
    with pytest.raises(QuotaUsageError):
        quota_usages(pg_engine, "owner", START_MS, {"team-x": NOW_MS}, lock_timeout_s=0.5)
    assert time.monotonic() - started < 3  # not until the lock is released (20 s)


def test_stopping_never_waits_for_a_seed_query_the_database_holds(
    pg_engine: Engine, locked_ledger: threading.Event
) -> None:
    """The seed's query waits for the lock (a long lock timeout here): the seeder's close
    and the event loop's end do not wait for it (a daemon thread, not the loop's executor,
    whose threads ``asyncio.run`` joins)."""

    async def scenario() -> None:
        store = MemoryStore(counting_since_ms=NOW_MS - 5000)
        usage = LedgerUsage(pg_engine, lock_timeout_s=30)
        seeder = QuotaSeeder(store, usage, COUNTER_KEY_COLUMNS.keys(), settle_s=0.0)
        store.quota_created = seeder.created
        seeder.start()
        await store.admit([fixed(name_of("owner:team-x"), 1)], NOW_MS)
        await wait_for(lambda: waiting_for_a_lock(pg_engine), timeout=5)
        await seeder.aclose()

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 5
    locked_ledger.set()  # the query left behind ends, its connection back in the pool
    for thread in threading.enumerate():
        if thread.name == "quota-seed":
            thread.join(10)


def waiting_for_a_lock(engine: Engine) -> bool:
    with engine.connect() as conn:
        query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        return bool(conn.execute(text(query)).scalar_one())


async def test_a_database_outage_is_one_warning_for_every_key_and_retry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hundreds of counters wait through an outage (here: a ledger not migrated yet): one
    warning with their count, not one per key and retry; one line when seeding resumes."""
    url = f"sqlite:///{tmp_path / 'later.db'}"
    engine = create_engine_for(url)
    clock = FakeClock(start=T0)
    store = MemoryStore(counting_since_ms=NOW_MS - 5000)
    limiter, seeder = wire(store, engine, clock, retry_s=0.01, max_retry_s=0.02)
    try:
        with caplog.at_level(logging.WARNING, logger="sluicegate.limits"):
            for i in range(300):
                await limiter.admit([LimitRequest(f"owner:team-{i}", QUOTA.model_copy(), 1)])
            await wait_for(lambda: "quota seeding failed" in caplog.text)
            await asyncio.sleep(0.3)  # many retries of every key
            migrate(url)
            await wait_for(lambda: seeder.applied == 300)
        assert caplog.text.count("quota seeding failed") == 1
        assert "300 quota counter(s) wait" in caplog.text
        assert caplog.text.count("quota seeding works again") == 1
    finally:
        await seeder.aclose()
        engine.dispose()


def minimal_config(**more: Any) -> dict[str, Any]:
    return {
        "backends": [{"name": "b", "url": "https://b.example.com"}],
        "deployments": [{"name": "d", "backend": "b"}],
        "products": [{"name": "gold", "deployments": ["d"]}],
        **more,
    }


def test_max_stale_seconds_below_two_refreshes_is_refused() -> None:
    """With refresh every 3 s, a view bound of 1 s refuses requests 1-3 s of every 3 s with
    a healthy database: refused; 2 x refresh + 1 is accepted."""
    with pytest.raises(ConfigError, match=r"max_stale_seconds \(1\) must be at least .* = 7"):
        parse_config(minimal_config(refresh_seconds=3, storage={"max_stale_seconds": 1}))
    parse_config(minimal_config(refresh_seconds=3, storage={"max_stale_seconds": 7}))
    parse_config(minimal_config(storage={"max_stale_seconds": 2}))  # refresh 0.5 s
    parse_config(minimal_config(refresh_seconds=5))  # unset: no bound


def test_config_check_warns_about_a_header_keyed_quota() -> None:
    header = {"counter_key": "header", "counter_header": "x-user-id"}
    quota = {"token_quota": 5000, "token_quota_period": "monthly"}
    config = minimal_config(
        products=[
            {"name": "gold", "deployments": ["d"], "limits": [{**header, **quota}]},
            {
                "name": "silver",
                "deployments": ["d"],
                "limits": [{**header, "tokens_per_minute": 9}],
            },
            {"name": "bronze", "deployments": ["d"], "limits": [quota]},
        ]
    )
    [warning] = header_quota_warnings(parse_config(config))
    assert warning.startswith("products['gold']: a monthly token_quota with counter_key: header")
    assert "1,500 bytes" in warning and "tokens_per_minute" in warning


REQUEST_QUOTA = LimitPolicy(
    request_quota=100,
    request_quota_period="monthly",
    token_quota=1_000_000,
    token_quota_period="monthly",
)


def request_name_of(key: str) -> str:
    return request_quota_counter_name(key, "monthly", START_MS)


def test_request_quota_counter_names_parse_back_apart_from_token_quotas() -> None:
    name = request_quota_counter_name("owner:team:quota:x", "daily", 1_700_000_000_000)
    assert name == "owner:team:quota:x:request-quota:daily:1700000000000"
    assert parse_quota_counter_name(name) == ("owner:team:quota:x", "daily", 1_700_000_000_000)
    assert quota_counter_measure(name) == "requests"
    tokens = quota_counter_name("owner:a:request-quota:b", "daily", 1_700_000_000_000)
    assert parse_quota_counter_name(tokens) == (
        "owner:a:request-quota:b",
        "daily",
        1_700_000_000_000,
    )
    assert quota_counter_measure(tokens) == "tokens"
    assert quota_counter_measure("sub:a:rpm") is None


def _ledger_of_the_period(engine: Engine) -> None:
    """This period's records before the restart: 3 requests admitted (one of them failed
    over: two attempts, counted once), plus what a request quota does not count."""
    period_start = START_MS / 1000
    insert(
        engine,
        record(1, period_start + 10, 1000),
        record(2, period_start + 20, 0, outcome=Outcome.BACKEND_ERROR, status=502),
        record(3, period_start + 30, 0, attempt=1, outcome=Outcome.BACKEND_ERROR, status=503),
        record(3, period_start + 30, 300, attempt=2),  # the same request's retry
        # Refused (by the limits, or before them): never admitted.
        record(4, period_start + 40, 0, outcome=Outcome.REJECTED, status=429),
        record(5, period_start + 50, 0, outcome=Outcome.REJECTED, status=400),
        record(6, period_start + 60, 0, operation="passthrough"),  # unmetered: not admitted
        record(7, period_start - 10, 500),  # last month
        record(8, period_start + 70, 700, sub="sub-b"),  # another key
    )


async def test_memory_restart_seeds_the_request_quota_with_the_periods_admitted_requests(
    sqlite_engine: Engine,
) -> None:
    """Embedded mode after a restart: the request quota's counter is seeded with the number
    of requests of the period before the restart (one per request, admitted ones only),
    beside the token quota's seed of their tokens; the requests since are not counted
    twice."""
    _ledger_of_the_period(sqlite_engine)
    clock = FakeClock(start=T0)
    store = MemoryStore(counting_since_ms=NOW_MS - 5000)
    limiter = Limiter(store, clock)
    seeder = seeder_of(store, sqlite_engine)
    limiter.quota_seen = seeder.notice
    store.quota_created = seeder.created
    seeder.start()
    try:
        admission = await limiter.admit([LimitRequest("sub:sub-a", REQUEST_QUOTA, 60)])
        assert admission.allowed
        await limiter.settle(admission.reservation, 40)
        insert(sqlite_engine, record(9, T0 - 1, 40))  # arrived after the start: in the counter
        assert seeder.pending == 2  # the token quota's counter and the request quota's
        await wait_for(lambda: seeder.applied == 2)
        assert (seeder.applied_requests, seeder.applied_tokens) == (3, 1300)
        after = await limiter.admit([LimitRequest("sub:sub-a", REQUEST_QUOTA, 0)])
        used_by = {status.kind: status.used for status in after.limits}
        assert used_by == {"quota": 1300 + 40, "request_quota": 3 + 2}
        assert not await seeder.seed_now(request_name_of("sub:sub-a"))  # once
    finally:
        await seeder.aclose()


async def test_redis_loss_seeds_the_request_quota_from_postgresql_and_it_refuses_at_its_limit(
    pg_engine: Engine, redis_client: aioredis.Redis, redis_prefix: str, clock: FakeClock
) -> None:
    """Cluster mode: Redis lost the request quota's key; the next admission creates it and
    the seeder adds the ledger's admitted requests of the period before it, so the quota
    refuses where it would have without the loss."""
    _ledger_of_the_period(pg_engine)
    policy = LimitPolicy(request_quota=5, request_quota_period="monthly")
    store = RedisStore(redis_client, redis_prefix, clock, fail_mode="closed")
    limiter = Limiter(store, clock)
    seeder = seeder_of(store, pg_engine)
    limiter.quota_seen = seeder.notice
    store.quota_created = seeder.created
    name = request_name_of("sub:sub-a")
    try:
        first = await limiter.admit([LimitRequest("sub:sub-a", policy, 10)])
        assert first.allowed and seeder.pending == 1
        insert(pg_engine, record(9, T0, 10))  # the creating request: in the counter already
        assert await seeder.seed_now(name)
        assert seeder.applied_requests == 3
        origin = await store.quota_origin(name)
        assert origin is not None and origin.seeded
        assert (await limiter.admit([LimitRequest("sub:sub-a", policy, 10)])).allowed  # 5th
        refused = await limiter.admit([LimitRequest("sub:sub-a", policy, 10)])
        assert (refused.status, refused.code) == (403, "RequestQuotaExceeded")
    finally:
        await seeder.aclose()
        await store.aclose()


def test_config_check_warns_about_a_request_quota_as_about_a_token_quota() -> None:
    """Seeded from the raw records too (their count): retention shorter than its period is
    warned about; a header-keyed one keeps a counter per header value."""
    header = {"counter_key": "header", "counter_header": "x-user-id"}
    quota = {"request_quota": 10, "request_quota_period": "monthly"}
    config = minimal_config(
        products=[
            {"name": "gold", "deployments": ["d"], "limits": [quota]},
            {"name": "silver", "deployments": ["d"], "limits": [{**header, **quota}]},
        ],
        retention={"raw_records_days": 7},
    )
    parsed = parse_config(config)
    [warning] = retention_warnings(parsed)
    assert "than the monthly request quota of product 'gold'" in warning
    [warning] = header_quota_warnings(parsed)
    assert warning.startswith(
        "products['silver']: a monthly request_quota with counter_key: header"
    )


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_request_quota_seed_counts_exactly_the_requests_the_counter_admitted(
    request: pytest.FixtureRequest, database: str
) -> None:
    """The ledger's records of a period, as the gateway writes them, against what the lost
    counter held (1 per admitted request): a request the semantic cache answered or
    embedded for is one request, not two (its embeddings call, ``extra.semantic_cache =
    "embedding"``, and that call's failed first attempt, are not requests of the client's);
    a client gone while sending its body was never admitted (no deployment resolved yet);
    one refused by content safety after its admission was counted, and one gone during
    the check too; one refused by the limits or a budget was not."""
    engine: Engine = request.getfixturevalue(
        "sqlite_engine" if database == "sqlite" else "pg_engine"
    )
    base = START_MS / 1000
    routed = {"backend_deployment": "emb", "backend_kind": "standard"}
    embedding = {**routed, "semantic_cache": "embedding"}
    insert(
        engine,
        # Admitted, each one request of the counter (6).
        record(1, base + 1, 100),
        record(2, base + 2, 0, extra={"semantic_cache": "hit"}),  # answered from the cache
        record(3, base + 3, 30, operation="embeddings", deployment="emb"),  # the client's own
        record(  # refused by content safety after admission (403 content_filter)
            4, base + 4, 0, status=403, outcome=Outcome.REJECTED, error_code="content_filter",
            backend=None, extra={"content_safety": "hate"},
        ),
        record(  # the content safety service down, the product failing closed
            5, base + 5, 0, status=503, outcome=Outcome.REJECTED,
            error_code="ContentSafetyUnavailable", backend=None,
        ),
        record(6, base + 6, 0, status=499, outcome=Outcome.ABORTED, backend=None),  # gone in it
        # The semantic cache's embeddings calls for requests 1 and 2: not the client's.
        record(
            7, base + 1, 8, operation="embeddings", deployment="emb",
            extra={**embedding, "for_request": "req-000001"},
        ),
        record(  # a call that failed over: its first attempt's record has no marker
            8, base + 2, 0, operation="embeddings", deployment="emb", attempt=1,
            outcome=Outcome.BACKEND_ERROR, status=429, error_code="429", extra=routed,
        ),
        record(
            8, base + 2, 8, operation="embeddings", deployment="emb", attempt=2,
            extra={**embedding, "for_request": "req-000002"},
        ),
        # Never admitted.
        record(  # the client left while sending its body
            9, base + 9, 0, status=499, outcome=Outcome.ABORTED, deployment=None, backend=None,
            model=None,
        ),
        record(
            10, base + 10, 0, status=429, outcome=Outcome.REJECTED,
            error_code="RequestRateLimitExceeded", backend=None,
        ),
        record(
            11, base + 11, 0, status=403, outcome=Outcome.REJECTED, error_code="BudgetExceeded",
            backend=None, deployment=None,
        ),
    )  # fmt: skip
    counted, _ = quota_usages(engine, "sub", START_MS, {"sub-a": NOW_MS}, measure="requests")
    assert counted == {"sub-a": 6}


def test_config_check_counts_both_quotas_of_a_header_keyed_policy() -> None:
    """A header-keyed policy with both quotas keeps two counters per header value, the
    request quota's until its own (here longer) period ends: the warning names both."""
    policy = {
        "counter_key": "header",
        "counter_header": "x-user-id",
        "token_quota": 1000,
        "token_quota_period": "daily",
        "request_quota": 10,
        "request_quota_period": "yearly",
    }
    config = minimal_config(products=[{"name": "gold", "deployments": ["d"], "limits": [policy]}])
    [warning] = header_quota_warnings(parse_config(config))
    assert warning.startswith(
        "products['gold']: a daily token_quota and a yearly request_quota with counter_key: "
        "header (x-user-id) keeps two quota counters per distinct header value, each until "
        "its period ends"
    )


async def test_two_instances_seeding_a_lost_request_quota_at_once_count_it_once(
    pg_engine: Engine, redis_client: aioredis.Redis, redis_prefix: str, clock: FakeClock
) -> None:
    """Cluster mode, a request quota keyed by an owner whose name holds colons (and the
    counter's own mark): the key is created mid-period (as after Redis lost it) with the
    owner's request of the period in the ledger; both instances compute the seed at once
    and one lands, so the counter holds that request once beside the two admitted since."""
    _ledger_of_the_period(pg_engine)
    insert(pg_engine, record(20, START_MS / 1000 + 80, 5, owner="team:request-quota:x"))
    policy = LimitPolicy(request_quota=5, request_quota_period="monthly", counter_key="owner")
    key = "owner:team:request-quota:x"
    stores = [RedisStore(redis_client, redis_prefix, clock, fail_mode="closed") for _ in "ab"]
    limiters = [Limiter(store, clock) for store in stores]
    seeders = [seeder_of(store, pg_engine) for store in stores]
    for limiter, store, seeder in zip(limiters, stores, seeders, strict=True):
        limiter.quota_seen = seeder.notice
        store.quota_created = seeder.created
    name = request_name_of(key)
    try:
        assert (await limiters[0].admit([LimitRequest(key, policy, 10)])).allowed
        assert (await limiters[1].admit([LimitRequest(key, policy, 10)])).allowed
        applied = await asyncio.gather(*(seeder.seed_now(name) for seeder in seeders))
        assert sorted(applied) == [False, True]
        assert sum(seeder.applied_requests for seeder in seeders) == 1  # team:request-quota:x
        used_now = (await limiters[1].admit([LimitRequest(key, policy, 10)])).limits[0].used
        assert used_now == 1 + 2 + 1  # the seed, the two admissions, this one
    finally:
        for store in stores:
            await store.aclose()
