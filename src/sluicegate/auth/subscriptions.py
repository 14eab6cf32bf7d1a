"""Subscriptions: who may call, under which product, with which pair of keys."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

KeySlot = Literal["primary", "secondary"]


class SubscriptionState(enum.StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Subscription:
    """A team's (or user's) subscription to one product.

    Keys are never held here, only their keyed hashes (see ``auth.keys``) and a short prefix
    of each for display. ``expires_at`` and timestamps are epoch seconds (UTC).
    ``overrides`` carries per-subscription policy overrides (limits) as plain JSON.
    """

    id: str
    name: str
    owner: str
    product: str
    state: SubscriptionState
    primary_key_hash: bytes
    secondary_key_hash: bytes
    primary_key_prefix: str
    secondary_key_prefix: str
    created_at: float
    updated_at: float
    expires_at: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def key_hash(self, slot: KeySlot) -> bytes:
        return self.primary_key_hash if slot == "primary" else self.secondary_key_hash
