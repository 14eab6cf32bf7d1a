"""Pools: priority groups and smooth weighted round-robin."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sluicegate.routing.pool import Member, Pool

PTU = Member("ptu", "gpt-4o", priority=1, weight=1, kind="ptu")
A = Member("paygo-a", "gpt-4o", priority=2, weight=3)
B = Member("paygo-b", "gpt-4o", priority=2, weight=1)


def test_lower_priority_first_and_groups_in_order() -> None:
    pool = Pool("gpt-4o", [A, B, PTU])
    assert pool.groups == ((PTU,), (A, B))
    assert pool.top_priority == 1
    assert all(pool.pick(lambda m: True) is PTU for _ in range(10))
    assert "priority 1" in repr(pool)


def test_weights_exact_over_every_cycle() -> None:
    pool = Pool("gpt-4o", [PTU, A, B])
    picks = [pool.pick(lambda m: m is not PTU) for _ in range(400)]
    counts = Counter(p.backend for p in picks if p is not None)
    assert counts == {"paygo-a": 300, "paygo-b": 100}
    # Smooth: every window of four picks holds three of A and one of B.
    for i in range(0, 400, 4):
        assert Counter(p.backend for p in picks[i : i + 4] if p) == {"paygo-a": 3, "paygo-b": 1}


def test_weights_hold_statistically_when_members_come_and_go() -> None:
    rng = random.Random(4)
    pool = Pool("p", [A, B])
    counts: Counter[str] = Counter()
    for _ in range(8000):
        a_out = rng.random() < 0.1  # A sits out a tenth of the picks
        chosen = pool.pick(lambda m, a_out=a_out: not (a_out and m is A))  # type: ignore[misc]
        assert chosen is not None
        counts[chosen.backend] += 1
    share_a = counts["paygo-a"] / sum(counts.values())
    # Without A 10 % of the time the expected share is 0.9 × 0.75 = 0.675.
    assert share_a == pytest.approx(0.675, abs=0.02)


def test_no_eligible_member() -> None:
    pool = Pool("p", [A, B])
    assert pool.pick(lambda m: False) is None
    assert not pool.single
    assert Pool("q", [PTU]).single


def test_duplicate_or_empty_pools_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        Pool("p", [A, A])
    with pytest.raises(ValueError, match="no members"):
        Pool("p", [])
