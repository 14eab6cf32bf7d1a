"""The simulator's embeddings (a hashed bag of words, ``simulator/tokens.py``) stay cheap: an
input of thousands of distinct words (a document, random text in a load test) must neither
hold the simulator's event loop for seconds nor leave hundreds of MiB behind in caches, and
the vectors keep the properties the semantic cache's tests rely on."""

from __future__ import annotations

import math
import random
import tracemalloc

from sluicegate.simulator.tokens import embedding_vector


def _cosine(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_a_long_input_of_distinct_words_leaves_little_behind() -> None:
    rng = random.Random(17)
    text = " ".join(f"w{rng.getrandbits(48):x}" for _ in range(4_000))
    tracemalloc.start()
    try:
        vector = embedding_vector(text, 1536)
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-6)
    # The vector itself, cached, is ~50 KiB; a direction kept per word would be ~50 KiB each.
    assert kept < 5_000_000


def test_the_bag_of_words_keeps_near_wordings_near_and_others_far() -> None:
    question = embedding_vector("user: What is the capital of France?", 1536)
    reworded = embedding_vector("user: What is the capital city of France?", 1536)
    unrelated = embedding_vector("user: How do I bake sourdough bread at home?", 1536)
    assert 0.04 < 1 - _cosine(question, reworded) < 0.12
    assert 1 - _cosine(question, unrelated) > 0.5
    # Repeated words weigh as often as they occur.
    assert embedding_vector("a a b", 64) != embedding_vector("a b", 64)
    assert embedding_vector("A, b!", 64) == embedding_vector("a b", 64)
