"""Multi-backend routing: pools by priority and weight, retries and failover, circuit
breakers, routing on the headroom backends report, and state shared between instances.

Decisions are pure and synchronous (``pool``, ``breaker``, ``retry``, ``headroom``,
``retry_after``, ``estimate``, ``router``); the request path (``proxy``) carries them out.
See docs/routing.md.
"""

from sluicegate.routing.breaker import BreakerSettings, BreakerState, CircuitBreaker
from sluicegate.routing.estimate import request_estimate
from sluicegate.routing.headroom import Headroom, Report, report_from_headers
from sluicegate.routing.pool import Member, Pool, target_key
from sluicegate.routing.retry import Action, Decision, Outcome, RetryPolicy, is_backend_failure
from sluicegate.routing.retry_after import (
    parse_retry_after,
    parse_retry_after_ms,
    retry_after_from_body,
    retry_after_from_headers,
)
from sluicegate.routing.router import (
    Choice,
    Refusal,
    Router,
    RouterSettings,
    RoutingObserver,
    Target,
    TargetView,
    Ticket,
)
from sluicegate.routing.state import (
    BackendStateStore,
    MemoryStateStore,
    SharedHeadroom,
    SharedTrip,
    SharedUpdate,
)

__all__ = [
    "Action",
    "BackendStateStore",
    "BreakerSettings",
    "BreakerState",
    "Choice",
    "CircuitBreaker",
    "Decision",
    "Headroom",
    "Member",
    "MemoryStateStore",
    "Outcome",
    "Pool",
    "Refusal",
    "Report",
    "RetryPolicy",
    "Router",
    "RouterSettings",
    "RoutingObserver",
    "SharedHeadroom",
    "SharedTrip",
    "SharedUpdate",
    "Target",
    "TargetView",
    "Ticket",
    "is_backend_failure",
    "parse_retry_after",
    "parse_retry_after_ms",
    "report_from_headers",
    "request_estimate",
    "retry_after_from_body",
    "retry_after_from_headers",
    "target_key",
]
