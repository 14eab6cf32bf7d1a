"""Per-request state carried through the pipeline."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.auth.subscriptions import Subscription
from sluicegate.messages.capture import MessageCapture
from sluicegate.proxy.deadlines import Deadlines
from sluicegate.proxy.routes import Route
from sluicegate.runtime import Deployment, Product
from sluicegate.tokens.usage import Usage


def new_request_id() -> str:
    """32 hex digits: the epoch millisecond (12) then 80 random bits (20). Unique without
    coordination between instances, and increasing over time, so the ledger's unique index
    on request ids grows at its right edge instead of at random places (cheaper inserts at
    thousands of records per second); readers also see roughly when a request came.

    The random part comes from ``random`` (seeded from the OS at start and again in a forked
    child), not ``os.urandom``: an id must be unique, not secret, and a system call per
    request showed in profiles."""
    return f"{time.time_ns() // 1_000_000:012x}{random.getrandbits(80):020x}"


@dataclass(slots=True)
class RequestContext:
    request_id: str
    ts: float
    started: float  # monotonic
    route: Route
    #: The pipeline's deadlines (timeouts of the waits on the client and the backend).
    deadlines: Deadlines
    client_ip: str | None = None
    #: The request's ASGI headers (lower-case names), for limits keyed by a header.
    headers: Sequence[tuple[bytes, bytes]] = ()
    subscription: Subscription | None = None
    #: Who called, when authenticated by token (the token's oid, else azp/appid).
    caller: str | None = None
    product: Product | None = None
    deployment: Deployment | None = None
    backend_name: str | None = None
    body: bytes = b""
    json: dict[str, Any] | None = None
    stream: bool = False
    #: The gateway added stream_options.include_usage for a client that did not ask for it.
    injected_usage: bool = False
    status: int = 0
    outcome: Outcome = Outcome.OK
    usage: Usage | None = None
    usage_estimated: bool = False
    model: str | None = None
    ttfb: float | None = None  # monotonic time of the first byte to the client
    error_code: str | None = None
    prompt_estimate: int | None = None
    #: Headers the gateway adds to the client's response (limits, request id).
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: Opaque state of the limiter for this request (a reservation to settle).
    admission: Any = None
    #: Header names (lower case) that carry the tokens the backend reported, once it has
    #: (``tokens_consumed_header`` of the limits that admitted the request).
    consumed_headers: tuple[bytes, ...] = ()
    #: The reservation has been settled (or its settling began: never twice).
    settled: bool = False
    #: The record has been written.
    finished: bool = False
    #: Tokens the gateway spent for this request besides its answer (the semantic cache's
    #: embeddings call, recorded on its own): charged to its limits when they are settled.
    side_tokens: int = 0
    #: The upstream attempt this context describes now (1, 2, … as the request fails over).
    attempt: int = 1
    #: Routing details for the record (backend deployment and kind, the upstream's status
    #: when the gateway answered for it, why the request spilled). Read-only and shared
    #: between requests routed alike: replaced, never changed in place.
    extra: Mapping[str, str] = field(default_factory=dict)
    #: What the message log keeps of this request (None: its product logs no messages).
    messages: MessageCapture | None = None

    def record(self, now_mono: float) -> UsageRecord:
        usage = self.usage
        return UsageRecord(
            request_id=self.request_id,
            ts=self.ts,
            subscription_id=self.subscription.id if self.subscription else None,
            owner=self.subscription.owner if self.subscription else None,
            product=self.product.name if self.product else None,
            deployment=self.deployment.name if self.deployment else None,
            backend=self.backend_name,
            operation=self.route.operation or "unknown",
            status=self.status,
            outcome=self.outcome,
            model=self.model,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            total_tokens=usage.total_tokens if usage else 0,
            cached_tokens=usage.cached_tokens if usage else 0,
            reasoning_tokens=usage.reasoning_tokens if usage else 0,
            streamed=self.stream,
            usage_estimated=self.usage_estimated,
            ttfb_ms=None if self.ttfb is None else round((self.ttfb - self.started) * 1000, 3),
            duration_ms=round((now_mono - self.started) * 1000, 3),
            attempt=self.attempt,
            caller=self.caller,
            error_code=self.error_code,
            extra=self.extra,
        )
