"""Estimates of bodies whose part types are not strings, and the approximate count.

A content part's ``type`` was looked up in a set of media kinds as it came: a list or an
object there (valid JSON, any client may send it) raised ``TypeError``, a 500 from admission
and from the relay's estimate of an answer without usage, instead of an estimate.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from sluicegate.tokens.estimate import estimate_request_tokens

_ODD = [
    ("chat.completions", {"messages": [{"role": "user", "content": [{"type": []}]}]}),
    ("chat.completions", {"messages": [{"role": "user", "content": [{"type": {"a": 1}}]}]}),
    ("responses", {"input": [{"type": []}]}),
    ("responses", {"input": [{"type": "computer_call_output", "output": {"type": {}}}]}),
]


@pytest.mark.parametrize(("operation", "body"), _ODD)
@pytest.mark.parametrize("model", ["gpt-4o", "unknown-model"])
def test_a_part_type_that_is_not_a_string_is_counted_not_raised(
    operation: str, body: dict[str, Any], model: str
) -> None:
    estimate = estimate_request_tokens(body, operation, model, 16)
    assert estimate.prompt_tokens >= 0
    assert estimate.completion_tokens == 16


def test_an_approximate_estimate_counts_four_characters_a_token() -> None:
    """``approximate``: the rule for an unknown tokenizer, whatever the model (an estimate
    that cannot wait for the counting thread)."""
    text = "abcdefghij" * 1000
    body = {"messages": [{"role": "user", "content": text}]}
    exact = estimate_request_tokens(body, "chat.completions", "gpt-4o", 0)
    rough = estimate_request_tokens(body, "chat.completions", "gpt-4o", 0, approximate=True)
    unknown = estimate_request_tokens(body, "chat.completions", "unknown-model", 0)
    assert exact.exact_tokenizer and not rough.exact_tokenizer
    assert rough == unknown
    assert rough.prompt_tokens - math.ceil((len(text) + len("user")) / 4) in range(0, 10)
