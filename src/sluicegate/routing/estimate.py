"""The token estimate a request is routed with: what Azure will charge at arrival.

Azure counts prompt tokens (estimated partly from characters) plus the requested maximum
completion (``max_completion_tokens``, ``max_tokens``, Responses ``max_output_tokens``) times
``n``/``best_of``. The router needs a cheap figure, not an exact one: it takes the limiter's
prompt estimate when there is one and a quarter of the body's bytes otherwise (an upper bound
for English text in JSON), so it errs on the side of spilling a little early.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_BUDGET_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def _positive(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def request_estimate(
    body: Mapping[str, Any] | None,
    body_size: int,
    operation: str,
    prompt_estimate: int | None,
    default_completion_tokens: int,
) -> int:
    """Estimated tokens Azure charges for the request (see the module docstring)."""
    prompt = prompt_estimate if prompt_estimate is not None else (body_size + 3) // 4
    if body is None or operation == "embeddings":
        return prompt
    budget: int | None = None
    for name in _BUDGET_FIELDS:
        budget = _positive(body.get(name))
        if budget is not None:
            break
    choices = max(_positive(body.get("n")) or 1, _positive(body.get("best_of")) or 1)
    completion = budget if budget is not None else default_completion_tokens
    return prompt + completion * choices
