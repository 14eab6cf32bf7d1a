"""The ``max_tokens`` ceiling of a policy: reject (400) or clamp what a request asks for.

Applied before estimation, so that the reservation uses the clamped budget. Only fields the
client set are checked: a request without a completion budget is forwarded unchanged (and
reserves ``default_completion_tokens``), because which field a deployment accepts
(``max_tokens`` or ``max_completion_tokens``) depends on the model and API version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sluicegate.limits.policy import LimitPolicy
from sluicegate.tokens.estimate import CHAT, COMPLETIONS, RESPONSES, normalise_operation

_FIELDS: dict[str, tuple[str, ...]] = {
    CHAT: ("max_completion_tokens", "max_tokens"),
    COMPLETIONS: ("max_tokens",),
    RESPONSES: ("max_output_tokens",),
}

CODE_CEILING = "MaxTokensCeilingExceeded"


@dataclass(frozen=True, slots=True)
class CeilingDecision:
    """``body`` is what to forward (a new dict when clamped, else the original);
    ``error`` is set when the request must be refused with 400 (code :data:`CODE_CEILING`)."""

    body: Mapping[str, Any]
    changed: bool = False
    error: str | None = None


def apply_max_tokens_ceiling(
    body: Mapping[str, Any], operation: str, policy: LimitPolicy
) -> CeilingDecision:
    """Check the request's completion budget against ``policy.max_tokens_ceiling``."""
    ceiling = policy.max_tokens_ceiling
    fields = _FIELDS.get(normalise_operation(operation), ())
    if ceiling is None or not fields:
        return CeilingDecision(body)
    over = [
        name
        for name in fields
        if isinstance(body.get(name), int)
        and not isinstance(body.get(name), bool)
        and body[name] > ceiling
    ]
    if not over:
        return CeilingDecision(body)
    if policy.max_tokens_action == "reject":
        name = over[0]
        return CeilingDecision(
            body,
            error=(
                f"{name} is {body[name]}, above this subscription's ceiling of {ceiling}; "
                f"ask for at most {ceiling} tokens."
            ),
        )
    clamped = dict(body)
    for name in over:
        clamped[name] = ceiling
    return CeilingDecision(clamped, changed=True)
