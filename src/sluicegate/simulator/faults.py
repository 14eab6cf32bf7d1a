"""Faults the simulator can inject: forced per request by a header, or drawn at random.

``x-sim-fault`` values (case-insensitive, optional ``:ARG``):

=============  ==============================================================================
``500``        500 ``InternalServerError`` (nothing charged; answered before admission)
``503``        503 ``ServiceUnavailable``; ``503:S`` adds ``retry-after``/``retry-after-ms`` S s
``429``        429 like a rate limit with ``retry-after`` 1 s; ``429:S`` waits S seconds
``hang``       admitted, then no answer until the client gives up (or ``hang_max_s``)
``cut``        admitted, answer cut after about half (connection closed, no ``[DONE]``)
``slow``       admitted, first byte delayed by the deployment's ``slow_ms``; ``slow:MS``
``filter-prompt``  admitted (charged: rate limits come first), then the content filter
               blocks the prompt: 400 ``content_filter`` / ``ResponsibleAIPolicyViolation``
               with per-category results (azure-openai-api.md §5); ``filter-prompt:CAT``
               picks the category (``jailbreak`` by default, as in the reference's example;
               or hate, self_harm, sexual, violence)
``filter-answer``  admitted, the answer is stopped by the content filter after half its
               tokens: a 200 with ``finish_reason: "content_filter"`` (JSON, and the last
               choice chunk of a stream), the category marked filtered, usage of the tokens
               written still reported (§5, §6); ``filter-answer:CAT`` picks the category
               (``hate`` by default; or self_harm, sexual, violence, protected_material_text,
               protected_material_code). Not for embeddings (they are not filtered).
=============  ==============================================================================

Random faults use the deployment's ``error_rate`` (a 500 after admission, so it is charged like
Azure charges at arrival), ``hang_rate`` and ``cut_rate``, with one draw from the seeded RNG
per admitted request, so a run with the same seed and request order repeats exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from sluicegate.simulator.config import SimDeployment
from sluicegate.simulator.payloads import ANSWER_FILTER_CATEGORIES, PROMPT_FILTER_CATEGORIES

FaultKind = Literal["500", "503", "429", "hang", "cut", "slow", "filter-prompt", "filter-answer"]
FAULT_HEADER = "x-sim-fault"
_KINDS: tuple[FaultKind, ...] = (
    "500",
    "503",
    "429",
    "hang",
    "cut",
    "slow",
    "filter-prompt",
    "filter-answer",
)
_BY_NAME: dict[str, FaultKind] = {k: k for k in _KINDS}
#: Faults answered with an error status before admission (they charge nothing).
STATUS_FAULTS: frozenset[FaultKind] = frozenset({"500", "503", "429"})
#: Content-filter faults: the categories each accepts, the first being the default.
FILTER_CATEGORIES: dict[FaultKind, tuple[str, ...]] = {
    "filter-prompt": ("jailbreak", *(c for c in PROMPT_FILTER_CATEGORIES if c != "jailbreak")),
    "filter-answer": ANSWER_FILTER_CATEGORIES,
}


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    #: ``:ARG`` of the header: seconds for 429/503, milliseconds for slow; None if absent.
    arg: float | None = None
    forced: bool = True
    #: The content-filter category of a ``filter-*`` fault.
    category: str | None = None


def parse_fault(value: str) -> Fault:
    """Parse an ``x-sim-fault`` header value; raises ValueError naming the accepted values."""
    name, _, arg = value.strip().lower().partition(":")
    kind = _BY_NAME.get(name)
    if kind is None:
        raise ValueError(f"x-sim-fault must be one of {', '.join(_KINDS)} (got {value!r})")
    categories = FILTER_CATEGORIES.get(kind)
    if categories is not None:
        category = arg or categories[0]
        if category not in categories:
            raise ValueError(
                f"x-sim-fault {kind} category must be one of {', '.join(categories)} (got {arg!r})"
            )
        return Fault(kind, category=category)
    number: float | None = None
    if arg:
        if kind not in ("429", "503", "slow"):
            raise ValueError(f"x-sim-fault {kind} takes no argument")
        try:
            number = float(arg)
        except ValueError:
            raise ValueError(f"x-sim-fault argument must be a number (got {arg!r})") from None
        if number < 0:
            raise ValueError("x-sim-fault argument must not be negative")
    return Fault(kind, number)


def draw_fault(rng: random.Random, deployment: SimDeployment) -> Fault | None:
    """One draw: a 500, a hang or a cut with the deployment's rates, else None."""
    total = deployment.error_rate + deployment.hang_rate + deployment.cut_rate
    if total <= 0.0:
        return None
    r = rng.random()
    if r < deployment.error_rate:
        return Fault("500", forced=False)
    if r < deployment.error_rate + deployment.hang_rate:
        return Fault("hang", forced=False)
    if r < total:
        return Fault("cut", forced=False)
    return None
