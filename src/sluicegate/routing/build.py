"""Building the router of a gateway from its compiled configuration."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sluicegate.clock import Clock
from sluicegate.config.model import RoutingConfig
from sluicegate.routing.affinity import ResponseAffinity, ResponseIdSource
from sluicegate.routing.breaker import BreakerSettings
from sluicegate.routing.retry import RetryPolicy
from sluicegate.routing.router import Router, RouterSettings, RoutingObserver
from sluicegate.routing.state import BackendStateStore

if TYPE_CHECKING:
    from sluicegate.runtime import Runtime


def router_settings(config: RoutingConfig) -> RouterSettings:
    b, r, h = config.circuit_breaker, config.retry, config.headroom
    return RouterSettings(
        headroom=h.enabled,
        stale_after=h.stale_seconds,
        default_completion_tokens=h.default_completion_tokens,
        breaker=BreakerSettings(
            failures=b.failures,
            throttles=b.throttles,
            interval=b.interval_seconds,
            trip=b.trip_seconds,
            max_trip=b.max_trip_seconds,
            honour_retry_after=b.honour_retry_after,
        ),
        retry=RetryPolicy(
            max_attempts=r.max_attempts,
            statuses=r.statuses,
            wait_same=r.wait_same,
            max_wait=r.max_wait_seconds,
            budget=r.budget_seconds,
        ),
    )


def response_affinity(runtime: Runtime, store: BackendStateStore | None) -> ResponseAffinity | None:
    """Responses affinity for the pools where a Responses call could reach another backend
    than the one holding its response: more than one member, or a member on another backend
    than ``passthrough_backend`` (where ``GET /openai/v1/responses/{id}`` goes). None when
    turned off or no pool needs it. Shares ids through ``store`` when it can (Redis)."""
    config = runtime.config.routing.response_affinity
    if not config.enabled:
        return None
    passthrough = runtime.passthrough.name
    pools = frozenset(
        d.name
        for d in runtime.deployments.values()
        if len(d.members) > 1 or any(m.backend != passthrough for m in d.members)
    )
    if not pools:
        return None
    shared = store.response_ids() if isinstance(store, ResponseIdSource) else None
    return ResponseAffinity(config.max_ids, pools, shared)


def router_for(
    runtime: Runtime,
    clock: Clock,
    store: BackendStateStore | None = None,
    observer: RoutingObserver | None = None,
) -> Router:
    """A router with one pool per deployment; each backend's ``status_source`` is pointed at
    it (the admin view and the backend metrics read state and headroom from there)."""
    router = Router(router_settings(runtime.config.routing), clock, store, observer)
    for deployment in runtime.deployments.values():
        router.add_pool(deployment.name, deployment.members)
    router.affinity = response_affinity(runtime, store)
    for backend in runtime.backends.values():
        name = backend.name
        backend.status_source = lambda name=name: router.backend_state(name)
    return router
