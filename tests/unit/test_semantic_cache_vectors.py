"""The semantic cache's memory (``cache/vectors.py``): unit vectors, the search, LRU and expiry.
Pure code: times are passed in."""

from __future__ import annotations

import math
import random
import tracemalloc
from array import array

import pytest

from sluicegate.cache.vectors import (
    EXACT_CHECKS,
    Vector,
    VectorStore,
    float32_vector,
    nearest,
    unit_vector,
)

DIMENSIONS = 256


def _random(rng: random.Random) -> Vector:
    return unit_vector([rng.gauss(0.0, 1.0) for _ in range(DIMENSIONS)])


def _near(vector: Vector, distance: float, rng: random.Random) -> Vector:
    """A unit vector at about ``distance`` (1 - cosine) from ``vector``."""
    noise = unit_vector([rng.gauss(0.0, 1.0) for _ in range(DIMENSIONS)])
    # cos = a / sqrt(a² + b²) with b = 1 and noise nearly orthogonal to vector.
    cosine = 1.0 - distance
    a = cosine / math.sqrt(1.0 - cosine * cosine)
    return unit_vector([a * x + y for x, y in zip(vector.values, noise.values, strict=True)])


def test_vectors_are_normalised_once_and_carry_their_signs() -> None:
    vector = unit_vector([3.0, -4.0, 0.0, -0.5])
    assert math.isclose(sum(v * v for v in vector.values), 1.0, rel_tol=1e-6)
    assert vector.values[0] == pytest.approx(3.0 / math.sqrt(25.25))
    assert vector.signs == 0b0101  # components 1 and 3 are negative (bits from the left)
    assert float32_vector(array("f", [3.0, -4.0, 0.0, -0.5]).tobytes()) == vector
    for bad in ([], [0.0, 0.0], [math.inf, 1.0]):
        with pytest.raises(ValueError, match="vector"):
            unit_vector(bad)
    with pytest.raises(ValueError, match="float32"):
        float32_vector(b"\x00\x00\x80")  # not whole float32s


def test_the_nearest_entry_within_the_threshold_is_found_among_many() -> None:
    rng = random.Random(7)
    store = VectorStore(10_000)
    others = [_random(rng) for _ in range(3_000)]
    for vector in others:
        store.put(b"p", vector, b"other", None, 100.0, 0.0)
    target = _random(rng)
    store.put(b"p", target, b"target", "m", 100.0, 0.0)
    query = _near(target, 0.04, rng)
    found = nearest(store.candidates(b"p", 1.0), query, 0.05, 1.0)
    assert found is not None and found[0].body == b"target"
    assert found[1] == pytest.approx(1.0 - target.cosine(query))
    assert nearest(store.candidates(b"p", 1.0), query, 0.03, 1.0) is None  # too far for it
    assert nearest(store.candidates(b"p", 1.0), _random(rng), 0.05, 1.0) is None  # unrelated
    assert nearest(store.candidates(b"q", 1.0), query, 0.05, 1.0) is None  # another partition


def test_the_nearest_of_several_within_reach_wins_and_exact_matches_pass_threshold_zero() -> None:
    rng = random.Random(11)
    target = _random(rng)
    store = VectorStore(100)
    store.put(b"p", _near(target, 0.04, rng), b"far", None, 100.0, 0.0)
    store.put(b"p", _near(target, 0.01, rng), b"near", None, 100.0, 0.0)
    for _ in range(EXACT_CHECKS * 2):
        store.put(b"p", _random(rng), b"noise", None, 100.0, 0.0)
    found = nearest(store.candidates(b"p", 0.0), target, 0.05, 0.0)
    assert found is not None and found[0].body == b"near"
    store.put(b"p", target, b"same", None, 100.0, 0.0)
    exact = nearest(store.candidates(b"p", 0.0), target, 0.0, 0.0)
    assert exact is not None and exact[0].body == b"same"


def test_entries_expire_and_the_least_recently_used_are_evicted() -> None:
    rng = random.Random(3)
    store = VectorStore(2)
    a, b, c = (_random(rng) for _ in range(3))
    entry_a = store.put(b"p", a, b"a", None, 10.0, 0.0)
    store.put(b"p", b, b"b", None, 20.0, 0.0)
    store.used(entry_a)  # a hit: b is now the least recently used
    store.put(b"p", c, b"c", None, 30.0, 1.0)
    assert sorted(e.body for e in store.candidates(b"p", 1.0)) == [b"a", b"c"]
    assert len(store) == 2
    # Expired: gone from the search even before it is pruned, and pruned as time passes.
    assert nearest(store.candidates(b"p", 5.0), a, 0.01, 10.0) is None
    assert [e.body for e in store.candidates(b"p", 10.0)] == [b"c"]
    assert store.candidates(b"p", 30.0) == []
    assert len(store) == 0
    assert "entries=0" in repr(store)


def test_an_evicted_entry_lets_go_of_its_answer_and_matches_nothing() -> None:
    rng = random.Random(5)
    store = VectorStore(1)
    first = _random(rng)
    entry = store.put(b"p", first, b"x" * 1000, None, 100.0, 0.0)
    held = store.candidates(b"p", 0.0)  # a search's copy, taken before the eviction
    store.put(b"p", _random(rng), b"y", None, 100.0, 0.0)
    assert entry.body == b"" and len(entry.vector.values) == 0
    assert nearest(held, first, 1.0, 0.0) is None


def test_evicted_entries_do_not_pile_up_until_they_expire() -> None:
    """Memory is bounded by ``max_entries``, not by how many answers were stored within
    ``ttl_seconds``: with a long ttl and a busy product, the evicted entries' places in the
    expiry order must not accumulate (30 days of stores would hold gigabytes)."""
    store = VectorStore(10)
    vector = _random(random.Random(7))
    for i in range(20_000):
        store.put(b"p", vector, b"answer", None, 30 * 86_400.0, i * 0.001)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000, 60_000):
            store.put(b"p", vector, b"answer", None, 30 * 86_400.0, i * 0.001)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(store) == 10
    assert grown < 200_000  # 40,000 more stores: each evicted entry kept would be ~150 bytes


def test_the_stored_bytes_are_bounded_as_well_as_the_entries() -> None:
    """``max_entries`` counts answers, whatever their size: the store also keeps at most
    ``max_bytes`` of answers and vectors, dropping the least recently used past it."""
    rng = random.Random(11)
    store = VectorStore(1_000, max_bytes=50_000)
    vectors = [_random(rng) for _ in range(40)]
    for vector in vectors:
        store.put(b"p", vector, bytes(4_000), None, 100.0, 0.0)
        assert store.size <= 50_000
    per_entry = 4_000 + 4 * DIMENSIONS
    assert len(store) == 50_000 // per_entry
    # The newest stay; the oldest went (the least recently used).
    assert nearest(store.candidates(b"p", 0.0), vectors[-1], 0.0, 0.0) is not None
    assert nearest(store.candidates(b"p", 0.0), vectors[0], 0.0, 0.0) is None
    assert store.candidates(b"p", 200.0) == [] and store.size == 0
