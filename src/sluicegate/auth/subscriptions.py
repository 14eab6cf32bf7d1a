"""Subscriptions: who may call, under which product, with which pair of keys."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

KeySlot = Literal["primary", "secondary"]


class SubscriptionState(enum.StrEnum):
    """APIM's six subscription states. Only ``active`` keys work; every other state is
    refused on the request path with the same answer (403 ``SubscriptionInactive``, or
    ``SubscriptionExpired`` past ``expires_at``).

    ``expired`` is never stored: a subscription *reads* as expired once its ``expires_at``
    has passed (``Subscription.effective_state``), unless it was rejected or cancelled
    first. The other five are stored as they are set (docs/subscriptions.md, "States").
    """

    SUBMITTED = "submitted"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


#: States a final decision put the subscription in: they are not turned into ``expired``.
FINAL_STATES = frozenset({SubscriptionState.REJECTED, SubscriptionState.CANCELLED})

#: States that are stored (``expired`` is computed).
STORED_STATES = frozenset(SubscriptionState) - {SubscriptionState.EXPIRED}

#: The longest ``state_comment`` kept (characters).
STATE_COMMENT_MAX = 1000


@dataclass(frozen=True, slots=True)
class Transition:
    """An admin action: the state it sets and the (effective) states it may start from.
    Every action may be repeated (its own target is among its sources): a retried request
    answers as the first one did instead of a 409."""

    action: str
    target: SubscriptionState
    sources: frozenset[SubscriptionState]


def _t(action: str, target: SubscriptionState, *sources: SubscriptionState) -> Transition:
    return Transition(action, target, frozenset({target, *sources}))


_S = SubscriptionState

#: The transition table (docs/subscriptions.md). Anything else is refused with a 409:
#: a rejected subscription is not approved later (create a new one), a suspended one is
#: resumed rather than approved, an expired one can only be cancelled (its keys never work
#: again), and nothing leaves ``cancelled``.
TRANSITIONS: dict[str, Transition] = {
    t.action: t
    for t in (
        _t("approve", _S.ACTIVE, _S.SUBMITTED),
        _t("reject", _S.REJECTED, _S.SUBMITTED),
        _t("suspend", _S.SUSPENDED, _S.ACTIVE),
        _t("resume", _S.ACTIVE, _S.SUSPENDED),
        _t(
            "cancel",
            _S.CANCELLED,
            _S.SUBMITTED,
            _S.ACTIVE,
            _S.SUSPENDED,
            _S.REJECTED,
            _S.EXPIRED,
        ),
    )
}


@dataclass(frozen=True, slots=True)
class Subscription:
    """A team's (or user's) subscription to one product.

    Keys are never held here, only their keyed hashes (see ``auth.keys``) and a short prefix
    of each for display. ``expires_at`` and timestamps are epoch seconds (UTC).
    ``overrides`` carries per-subscription policy overrides (limits) as plain JSON.
    ``state`` is the stored state (never ``expired``: see ``effective_state``);
    ``state_comment`` is the comment given with the last state change (APIM's
    ``stateComment``), None without one.
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
    state_comment: str | None = None

    def effective_state(self, now: float) -> SubscriptionState:
        """The state as the admin API shows it at ``now``: the stored one, or ``expired``
        once ``expires_at`` has passed (a rejected or cancelled subscription stays so).
        Same rule as the request path's expiry check (``expires_at <= now``)."""
        if (
            self.expires_at is not None
            and self.expires_at <= now
            and self.state not in FINAL_STATES
        ):
            return SubscriptionState.EXPIRED
        return self.state

    def key_hash(self, slot: KeySlot) -> bytes:
        return self.primary_key_hash if slot == "primary" else self.secondary_key_hash
