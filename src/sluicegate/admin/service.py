"""The admin service: every management operation, shared by the CLI, the admin API and the
dashboard (none of them touches the database directly).

Operations are synchronous (they talk to the database); async callers run them in a thread.
A new key's value is returned exactly once, by the call that makes it; only its keyed hash is
stored.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sluicegate.auth.keys import KeyHasher, display_prefix, generate_key
from sluicegate.auth.subscriptions import KeySlot, Subscription, SubscriptionState
from sluicegate.clock import Clock, SystemClock
from sluicegate.config.model import GatewayConfig
from sluicegate.storage.subscriptions import SubscriptionRepository


class AdminError(Exception):
    """A management request that cannot be carried out; ``status`` is the HTTP status the
    admin API answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class IssuedKeys:
    """A subscription with the key values made for it: shown once, never stored."""

    subscription: Subscription
    primary_key: str | None = None
    secondary_key: str | None = None


def subscription_view(sub: Subscription) -> dict[str, Any]:
    """What may be shown of a subscription (no hashes, only key prefixes)."""
    return {
        "id": sub.id,
        "name": sub.name,
        "owner": sub.owner,
        "product": sub.product,
        "state": sub.state.value,
        "primary_key_prefix": sub.primary_key_prefix,
        "secondary_key_prefix": sub.secondary_key_prefix,
        "created_at": sub.created_at,
        "updated_at": sub.updated_at,
        "expires_at": sub.expires_at,
        "overrides": sub.overrides,
    }


class AdminService:
    def __init__(
        self,
        config: GatewayConfig,
        repository: SubscriptionRepository,
        hasher: KeyHasher,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.repository = repository
        self.hasher = hasher
        self.clock = clock or SystemClock()
        self._products = {p.name for p in config.products}

    def products(self) -> list[dict[str, Any]]:
        return [
            {
                "name": p.name,
                "description": p.description,
                "deployments": p.deployments,
                "limits": p.limits,
            }
            for p in self.config.products
        ]

    def create_subscription(
        self,
        *,
        product: str,
        owner: str,
        name: str,
        expires_at: float | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> IssuedKeys:
        if product not in self._products:
            raise AdminError(
                422, f"unknown product {product!r} (known: {', '.join(sorted(self._products))})"
            )
        if not owner.strip() or not name.strip():
            raise AdminError(422, "owner and name must not be empty")
        primary, secondary = generate_key(), generate_key()
        now = self.clock.now()
        sub = Subscription(
            id="sub_" + secrets.token_hex(8),
            name=name.strip(),
            owner=owner.strip(),
            product=product,
            state=SubscriptionState.ACTIVE,
            primary_key_hash=self.hasher.digest(primary),
            secondary_key_hash=self.hasher.digest(secondary),
            primary_key_prefix=display_prefix(primary),
            secondary_key_prefix=display_prefix(secondary),
            created_at=now,
            updated_at=now,
            expires_at=expires_at,
            overrides=dict(overrides or {}),
        )
        self.repository.create(sub)
        return IssuedKeys(sub, primary, secondary)

    def get(self, subscription_id: str) -> Subscription:
        sub = self.repository.get(subscription_id)
        if sub is None:
            raise AdminError(404, f"no subscription {subscription_id!r}")
        return sub

    def list(
        self,
        *,
        offset: int = 0,
        limit: int = 100,
        search: str | None = None,
        product: str | None = None,
        state: str | None = None,
    ) -> tuple[list[Subscription], int]:
        if limit < 1 or limit > 1000 or offset < 0:
            raise AdminError(422, "limit must be 1..1000 and offset >= 0")
        st = None
        if state is not None:
            try:
                st = SubscriptionState(state)
            except ValueError:
                raise AdminError(422, f"unknown state {state!r}") from None
        return self.repository.list(
            offset=offset, limit=limit, search=search, product=product, state=st
        )

    def rotate(self, subscription_id: str, slot: KeySlot) -> IssuedKeys:
        self.get(subscription_id)
        key = generate_key()
        sub = self.repository.set_key(
            subscription_id, slot, self.hasher.digest(key), display_prefix(key)
        )
        if slot == "primary":
            return IssuedKeys(sub, primary_key=key)
        return IssuedKeys(sub, secondary_key=key)

    def set_state(self, subscription_id: str, state: SubscriptionState) -> Subscription:
        current = self.get(subscription_id)
        if (
            current.state is SubscriptionState.CANCELLED
            and state is not SubscriptionState.CANCELLED
        ):
            raise AdminError(409, f"subscription {subscription_id} is cancelled for good")
        return self.repository.set_state(subscription_id, state)

    def suspend(self, subscription_id: str) -> Subscription:
        return self.set_state(subscription_id, SubscriptionState.SUSPENDED)

    def resume(self, subscription_id: str) -> Subscription:
        return self.set_state(subscription_id, SubscriptionState.ACTIVE)

    def cancel(self, subscription_id: str) -> Subscription:
        return self.set_state(subscription_id, SubscriptionState.CANCELLED)


__all__ = ["AdminError", "AdminService", "IssuedKeys", "subscription_view"]
