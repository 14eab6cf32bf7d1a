"""SubscriptionRepository conformance, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.engine import Engine

from sluicegate.auth.subscriptions import SubscriptionState
from sluicegate.clock import FakeClock
from sluicegate.storage.subscriptions import (
    SubscriptionConflict,
    SubscriptionNotFound,
    SubscriptionRepository,
)
from tests.storage.conftest import SubscriptionFactory


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_800_000_000.0)


@pytest.fixture
def repo(engine: Engine, clock: FakeClock) -> SubscriptionRepository:
    return SubscriptionRepository(engine, clock=clock)


def test_create_then_get_round_trips_every_field(
    repo: SubscriptionRepository, make_subscription: SubscriptionFactory
) -> None:
    sub = make_subscription(
        1,
        name="Ünïcode team ✓",
        expires_at=1_900_000_000.5,
        overrides={"tpm": 5000, "nested": {"models": ["a", "b"], "on": True}, "x": None},
        primary_key_hash=bytes(range(32)),
        secondary_key_hash=bytes(range(32, 64)),
        state=SubscriptionState.SUSPENDED,
    )
    assert repo.create(sub) == sub
    assert repo.get("sub-1") == sub
    assert repo.get("nope") is None


def test_duplicate_id_or_key_hash_is_a_conflict(
    repo: SubscriptionRepository, make_subscription: SubscriptionFactory
) -> None:
    first = make_subscription(1)
    repo.create(first)
    with pytest.raises(SubscriptionConflict) as by_id:
        repo.create(make_subscription(1, primary_key_hash=b"other-1", secondary_key_hash=b"o-2"))
    assert by_id.value.field == "id"
    with pytest.raises(SubscriptionConflict) as by_key:
        repo.create(make_subscription(2, secondary_key_hash=first.primary_key_hash))
    assert by_key.value.field == "key"
    assert repo.load_all() == [first]


def test_every_change_bumps_the_version_once(
    repo: SubscriptionRepository, make_subscription: SubscriptionFactory, clock: FakeClock
) -> None:
    assert repo.version() == 0
    repo.create(make_subscription(1))
    assert repo.version() == 1

    clock.advance(10)
    suspended = repo.set_state("sub-1", SubscriptionState.SUSPENDED)
    assert suspended.state is SubscriptionState.SUSPENDED
    assert suspended.updated_at == clock.now()
    assert repo.version() == 2

    rotated = repo.set_key("sub-1", "secondary", b"new-secondary-hash", "sg-new")
    assert (rotated.secondary_key_hash, rotated.secondary_key_prefix) == (
        b"new-secondary-hash",
        "sg-new",
    )
    assert rotated.primary_key_hash == make_subscription(1).primary_key_hash
    assert repo.version() == 3

    changed = repo.set_overrides("sub-1", {"tpm": 100, "quota": {"period": "month"}})
    assert changed.overrides == {"tpm": 100, "quota": {"period": "month"}}
    assert repo.version() == 4
    assert repo.get("sub-1") == changed


def test_failed_changes_do_not_bump_the_version(
    repo: SubscriptionRepository, make_subscription: SubscriptionFactory
) -> None:
    repo.create(make_subscription(1))
    repo.create(make_subscription(2))
    version = repo.version()
    with pytest.raises(SubscriptionNotFound) as missing:
        repo.set_state("ghost", SubscriptionState.CANCELLED)
    assert isinstance(missing.value, KeyError)
    assert "ghost" in str(missing.value)
    with pytest.raises(SubscriptionNotFound):
        repo.set_key("ghost", "primary", b"h", "p")
    with pytest.raises(SubscriptionNotFound):
        repo.set_overrides("ghost", {})
    with pytest.raises(SubscriptionConflict):  # sub-2's key given to sub-1
        repo.set_key("sub-1", "primary", make_subscription(2).primary_key_hash, "x")
    with pytest.raises(SubscriptionConflict):
        repo.create(make_subscription(1))
    assert repo.version() == version
    assert repo.get("sub-1") == make_subscription(1)


def test_a_cancelled_subscription_stays_cancelled_whoever_read_it_before(
    engine: Engine, make_subscription: SubscriptionFactory, clock: FakeClock
) -> None:
    """Two admins: one reads the subscription (active) and resumes it, while the other's
    cancel commits in between. Cancelling is for good: the resume is refused by the
    database's UPDATE itself, not by a state its caller read earlier, and changes nothing."""
    first, second = (SubscriptionRepository(engine, clock=clock) for _ in range(2))
    first.create(make_subscription(1, state=SubscriptionState.SUSPENDED))
    read_before = first.get("sub-1")
    assert read_before is not None and read_before.state is SubscriptionState.SUSPENDED
    second.set_state("sub-1", SubscriptionState.CANCELLED)
    version = first.version()
    for state in (SubscriptionState.ACTIVE, SubscriptionState.SUSPENDED):
        with pytest.raises(SubscriptionConflict, match="cancelled") as refused:
            first.set_state("sub-1", state)
        assert refused.value.field == "state"
    again = first.set_state("sub-1", SubscriptionState.CANCELLED)  # idempotent
    assert again.state is SubscriptionState.CANCELLED
    assert first.version() == version + 1
    with pytest.raises(SubscriptionNotFound):
        first.set_state("ghost", SubscriptionState.ACTIVE)


def test_list_filters_searches_and_pages(
    repo: SubscriptionRepository, make_subscription: SubscriptionFactory
) -> None:
    for n in range(12):
        repo.create(
            make_subscription(
                n,
                name=f"Team {'Alpha' if n < 4 else 'Beta'} {n}",
                owner="ops@example.com" if n == 7 else f"team-{n % 2}",
                product="premium" if n % 3 == 0 else "standard",
                state=SubscriptionState.SUSPENDED if n == 5 else SubscriptionState.ACTIVE,
            )
        )
    page, total = repo.list(limit=5)
    assert total == 12
    assert [s.id for s in page] == ["sub-0", "sub-1", "sub-2", "sub-3", "sub-4"]
    page, total = repo.list(offset=10, limit=5)
    assert ([s.id for s in page], total) == (["sub-10", "sub-11"], 12)

    page, total = repo.list(search="alPHA")  # case-insensitive, over the name
    assert ([s.id for s in page], total) == (["sub-0", "sub-1", "sub-2", "sub-3"], 4)
    page, total = repo.list(search="OPS@")  # over the owner
    assert [s.id for s in page] == ["sub-7"]
    page, total = repo.list(search="sub-1")  # over the id
    assert [s.id for s in page] == ["sub-1", "sub-10", "sub-11"]
    assert repo.list(search="%") == ([], 0)  # wildcards are literal
    assert repo.list(search="_") == ([], 0)

    page, total = repo.list(product="premium")
    assert ([s.id for s in page], total) == (["sub-0", "sub-3", "sub-6", "sub-9"], 4)
    page, total = repo.list(state=SubscriptionState.SUSPENDED)
    assert [s.id for s in page] == ["sub-5"]
    page, total = repo.list(product="premium", search="beta", limit=1)
    assert ([s.id for s in page], total) == (["sub-6"], 2)


def test_list_rejects_negative_paging(repo: SubscriptionRepository) -> None:
    with pytest.raises(ValueError, match="negative"):
        repo.list(offset=-1)


def test_load_all_versioned_never_reports_a_newer_version_than_its_data(
    engine: Engine, make_subscription: SubscriptionFactory
) -> None:
    repo = SubscriptionRepository(engine)
    repo.create(make_subscription(0))
    stop = threading.Event()

    def churn() -> None:
        n = 1
        while not stop.is_set() and n < 200:
            repo.create(make_subscription(n))
            n += 1

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for _ in range(30):
            version, subs = repo.load_all_versioned()
            # One creation per version step: the data holds at least `version` creations.
            assert len(subs) >= version
    finally:
        stop.set()
        writer.join(30)


def test_two_repositories_see_each_others_changes(
    engine: Engine, make_subscription: SubscriptionFactory
) -> None:
    a, b = SubscriptionRepository(engine), SubscriptionRepository(engine)
    a.create(make_subscription(1))
    assert b.version() == 1
    b.set_state("sub-1", SubscriptionState.CANCELLED)
    assert a.version() == 2
    assert [s.state for s in a.load_all()] == [SubscriptionState.CANCELLED]


def test_a_key_hash_identifies_one_subscription_across_slots(
    repo: SubscriptionRepository, make_subscription: SubscriptionFactory
) -> None:
    one, two = make_subscription(1), make_subscription(2)
    repo.create(one)
    repo.create(two)
    version = repo.version()
    with pytest.raises(SubscriptionConflict):  # equal keys within one subscription
        repo.create(make_subscription(3, secondary_key_hash=make_subscription(3).primary_key_hash))
    with pytest.raises(SubscriptionConflict):  # another's primary as this one's secondary
        repo.create(make_subscription(3, secondary_key_hash=one.primary_key_hash))
    with pytest.raises(SubscriptionConflict):  # own other slot
        repo.set_key("sub-1", "primary", one.secondary_key_hash, "x")
    with pytest.raises(SubscriptionConflict):  # another's secondary as primary
        repo.set_key("sub-1", "primary", two.secondary_key_hash, "x")
    assert repo.version() == version
    assert repo.load_all() == [one, two]
    # Setting a slot to the hash it already has is not a conflict.
    same = repo.set_key("sub-1", "primary", one.primary_key_hash, "renamed")
    assert same.primary_key_prefix == "renamed"
