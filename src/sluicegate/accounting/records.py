"""The usage record: one per request (and one per upstream attempt), the unit of charge-back."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Outcome(enum.StrEnum):
    """How a request ended, from the gateway's point of view."""

    OK = "ok"
    CLIENT_ERROR = "client_error"  # the backend answered 4xx (bad request, content filter, ...)
    BACKEND_ERROR = "backend_error"  # the backend answered 5xx/429 or could not be reached
    ABORTED = "aborted"  # the client went away before the response ended
    REJECTED = "rejected"  # the gateway refused it (auth, limits, bad input) without a backend


@dataclass(slots=True)
class UsageRecord:
    """What one request used. Written to the ledger exactly once.

    Token counts are those the backend reported. Where the backend reported none (a client hung
    up mid-stream, a backend that does not send usage) ``usage_estimated`` is true and the counts
    are the gateway's own estimate.  ``ts`` is the request's arrival time (epoch seconds, UTC).
    No key, token or prompt text is ever stored here.

    ``extra`` is read-only: records of requests routed alike share one mapping (up to
    ``max_pending`` records wait in memory for the ledger, so each byte counts there).
    """

    request_id: str
    ts: float
    subscription_id: str | None
    owner: str | None
    product: str | None
    deployment: str | None
    backend: str | None
    operation: str  # chat/completions, embeddings, responses, passthrough, ...
    status: int
    outcome: Outcome
    model: str | None = None  # as the backend reported it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    streamed: bool = False
    usage_estimated: bool = False
    ttfb_ms: float | None = None
    duration_ms: float = 0.0
    attempt: int = 1  # 1 for the first upstream attempt; retries count up
    caller: str | None = None  # the identity behind a token (oid/appid), if any
    error_code: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
