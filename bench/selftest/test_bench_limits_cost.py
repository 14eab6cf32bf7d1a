"""``limits_cost.py`` times the limits' real request path: the admission adds the limit
headers, reserves, and the finish settles the reservation to the reported usage."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import limits_cost
from targets import LIMIT

SRC = Path(limits_cost.__file__).resolve().parent.parent / "src"


def test_each_timed_request_is_admitted_charged_and_settled() -> None:
    async def two() -> tuple[Any, Any]:
        one, _clock = limits_cost._harness()
        return await one(), await one()

    first, second = asyncio.run(two())
    for ctx in (first, second):
        headers = dict(ctx.response_headers)
        assert headers[b"x-ratelimit-limit-tokens"] == str(LIMIT).encode()
        assert ctx.admission.allowed and ctx.admission.reservation.done  # settled
        assert ctx.prompt_estimate > 0  # the prompt was counted
    # The second request sees the first one's settled usage (87 tokens) and its own estimate.
    remaining = int(dict(second.response_headers)[b"x-ratelimit-remaining-tokens"])
    estimate = second.admission.reservation.tokens
    assert remaining == LIMIT - 87 - estimate


def test_measure_times_this_checkout() -> None:
    result = limits_cost.measure(SRC, requests=300, repeats=1, cpu=None, instructions=False)
    assert 0 < result["us"] < 10_000


def test_instructions_are_counted_per_request() -> None:
    assert shutil.which("valgrind"), "valgrind is missing: apt-get install valgrind"
    counted = limits_cost._instructions(SRC, 200)
    assert 20_000 < counted < 2_000_000
