"""Building the router of a gateway from its compiled configuration."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sluicegate.clock import Clock
from sluicegate.config.model import BackendConfig, CircuitBreakerConfig, RoutingConfig
from sluicegate.routing.affinity import ResponseAffinity, ResponseIdSource
from sluicegate.routing.breaker import BreakerSettings
from sluicegate.routing.retry import RetryPolicy
from sluicegate.routing.router import Router, RouterSettings, RoutingObserver
from sluicegate.routing.state import BackendStateStore

if TYPE_CHECKING:
    from sluicegate.runtime import Runtime


def breaker_settings(b: CircuitBreakerConfig) -> BreakerSettings:
    return BreakerSettings(
        enabled=b.enabled,
        failures=b.failures,
        throttles=b.throttles,
        interval=b.interval_seconds,
        trip=b.trip_seconds,
        max_trip=b.max_trip_seconds,
        honour_retry_after=b.honour_retry_after,
    )


def router_settings(
    config: RoutingConfig, backends: Sequence[BackendConfig] = ()
) -> RouterSettings:
    """The router's settings: ``config``'s, with the breaker rule of each of ``backends``
    that has its own (merged over ``routing.circuit_breaker``) resolved here, once, so that
    a target carries its rule and no request looks one up."""
    b, r, h = config.circuit_breaker, config.retry, config.headroom
    return RouterSettings(
        headroom=h.enabled,
        stale_after=h.stale_seconds,
        default_completion_tokens=h.default_completion_tokens,
        breaker=breaker_settings(b),
        breakers={
            backend.name: breaker_settings(backend.breaker(b))
            for backend in backends
            if backend.circuit_breaker is not None
        },
        retry=RetryPolicy(
            max_attempts=r.max_attempts,
            statuses=r.statuses,
            wait_same=r.wait_same,
            max_wait=r.max_wait_seconds,
            budget=r.budget_seconds,
        ),
    )


def response_affinity(runtime: Runtime, store: BackendStateStore | None) -> ResponseAffinity | None:
    """Responses affinity (None when turned off). Every pool learns, even a one-member pool on
    ``passthrough_backend`` that routing alone would not need it for: the owner it records is
    what keeps one subscription out of another's stored responses (docs/routing.md), and
    learning costs a dict insert. Shares ids through ``store`` when it can (Redis)."""
    config = runtime.config.routing.response_affinity
    if not config.enabled:
        return None
    shared = store.response_ids(config.ttl_seconds) if isinstance(store, ResponseIdSource) else None
    pool_backends = {
        d.name: frozenset(m.backend for m in d.members) for d in runtime.deployments.values()
    }
    return ResponseAffinity(
        config.max_ids, shared, pool_backends=pool_backends, passthrough=runtime.passthrough.name
    )


def router_for(
    runtime: Runtime,
    clock: Clock,
    store: BackendStateStore | None = None,
    observer: RoutingObserver | None = None,
) -> Router:
    """A router with one pool per deployment; each backend's ``status_source`` is pointed at
    it (the admin view and the backend metrics read state and headroom from there)."""
    config = runtime.config
    router = Router(router_settings(config.routing, config.backends), clock, store, observer)
    for deployment in runtime.deployments.values():
        router.add_pool(deployment.name, deployment.members)
    router.affinity = response_affinity(runtime, store)
    for backend in runtime.backends.values():
        name = backend.name
        backend.status_source = lambda name=name: router.backend_state(name)
    return router
