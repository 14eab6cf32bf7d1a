"""Faults the simulator can inject: forced per request by a header, or drawn at random.

``x-sim-fault`` values (case-insensitive, optional ``:ARG``):

=============  ==============================================================================
``500``        500 ``InternalServerError`` (nothing charged; answered before admission)
``503``        503 ``ServiceUnavailable``; ``503:S`` adds ``retry-after``/``retry-after-ms`` S s
``429``        429 like a rate limit with ``retry-after`` 1 s; ``429:S`` waits S seconds
``hang``       admitted, then no answer until the client gives up (or ``hang_max_s``)
``cut``        admitted, answer cut after about half (connection closed, no ``[DONE]``)
``slow``       admitted, first byte delayed by the deployment's ``slow_ms``; ``slow:MS``
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

FaultKind = Literal["500", "503", "429", "hang", "cut", "slow"]
FAULT_HEADER = "x-sim-fault"
_KINDS: tuple[FaultKind, ...] = ("500", "503", "429", "hang", "cut", "slow")
_BY_NAME: dict[str, FaultKind] = {k: k for k in _KINDS}
#: Faults answered with an error status before admission (they charge nothing).
STATUS_FAULTS: frozenset[FaultKind] = frozenset({"500", "503", "429"})


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    #: ``:ARG`` of the header: seconds for 429/503, milliseconds for slow; None if absent.
    arg: float | None = None
    forced: bool = True


def parse_fault(value: str) -> Fault:
    """Parse an ``x-sim-fault`` header value; raises ValueError naming the accepted values."""
    name, _, arg = value.strip().lower().partition(":")
    kind = _BY_NAME.get(name)
    if kind is None:
        raise ValueError(f"x-sim-fault must be one of {', '.join(_KINDS)} (got {value!r})")
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
