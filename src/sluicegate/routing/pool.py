"""A pool: the backend deployments behind one client-facing deployment, by priority and weight.

Lower priority numbers are used first; a priority group is left only when none of its members
is eligible. Within a group, traffic is shared by weight with *smooth weighted round-robin*
(nginx's algorithm): over any run of ``sum(weights)`` picks among the same eligible members,
each member is picked exactly ``weight`` times, spread out rather than in bursts. Members that
are not eligible for one pick (open breaker, no headroom, already tried) simply sit it out.

Pure and synchronous; a pool's round-robin state changes on every pick, so use it from one
event loop (as the router does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import groupby


@dataclass(frozen=True, slots=True)
class Member:
    """One backend deployment in a pool. ``key`` names the target (``backend/deployment``),
    which pools that share a backend deployment also share (one breaker, one headroom)."""

    backend: str
    deployment: str
    priority: int = 1
    weight: int = 1
    kind: str = "paygo"
    key: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", target_key(self.backend, self.deployment))


def target_key(backend: str, deployment: str) -> str:
    return f"{backend}/{deployment}"


class Pool:
    """Members grouped by priority, with the round-robin state of each group."""

    __slots__ = ("_current", "groups", "members", "name")

    def __init__(self, name: str, members: Sequence[Member]) -> None:
        if not members:
            raise ValueError(f"pool {name!r} has no members")
        keys = [m.key for m in members]
        if len(set(keys)) != len(keys):
            raise ValueError(f"pool {name!r} lists a backend deployment twice")
        self.name = name
        ordered = sorted(members, key=lambda m: m.priority)  # stable: config order within
        self.members: tuple[Member, ...] = tuple(ordered)
        self.groups: tuple[tuple[Member, ...], ...] = tuple(
            tuple(group) for _, group in groupby(ordered, key=lambda m: m.priority)
        )
        self._current: dict[str, int] = {m.key: 0 for m in ordered}

    @property
    def single(self) -> bool:
        return len(self.members) == 1

    @property
    def top_priority(self) -> int:
        return self.members[0].priority

    def pick(self, eligible: Callable[[Member], bool]) -> Member | None:
        """The next member of the best priority group that has an eligible member, or None."""
        for group in self.groups:
            candidates = [m for m in group if eligible(m)]
            if candidates:
                return self._round_robin(candidates)
        return None

    def _round_robin(self, candidates: list[Member]) -> Member:
        if len(candidates) == 1:
            return candidates[0]
        current = self._current
        total = 0
        best: Member | None = None
        for member in candidates:
            current[member.key] += member.weight
            total += member.weight
            if best is None or current[member.key] > current[best.key]:
                best = member
        assert best is not None
        current[best.key] -= total
        return best

    def __repr__(self) -> str:
        groups = "; ".join(
            ", ".join(f"{m.key} w={m.weight}" for m in group) + f" (priority {group[0].priority})"
            for group in self.groups
        )
        return f"Pool({self.name!r}: {groups})"
