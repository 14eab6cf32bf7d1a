"""What an admission decided, as the pipeline needs it: status, message, headers, reservation.

Pure data and pure functions; no I/O. :func:`decide` turns a store's answer into an
:class:`Admission`:

* all counters had room → allowed, with a :class:`Reservation` to settle or release;
* a token quota is exhausted → **403** ``TokenQuotaExceeded`` (quota wins over rate limits,
  since waiting a minute would not help), ``Retry-After`` until the period renews and
  ``x-should-retry: false``; a request quota (``request_quota``, APIM's ``quota-by-key
  calls``) likewise → **403** ``RequestQuotaExceeded``, its message naming the request
  quota (of the exhausted quotas, the one that renews last binds);
* a token quota is full only because of reservations of requests still in progress (the
  usage settled so far leaves room for this request) → **429** ``TokenQuotaInFlight`` with
  ``Retry-After`` :data:`IN_FLIGHT_RETRY_MS`: those requests settle to their real usage
  within seconds, usually far below their estimates. It binds like a rate refusal (a
  longer rate wait wins); an exhausted quota still wins over everything;
* a TPM or RPM window is full → **429** ``TokenRateLimitExceeded`` /
  ``RequestRateLimitExceeded`` with ``Retry-After`` (whole seconds, rounded up) and
  ``retry-after-ms``: when the oldest buckets free enough room for *this* request, at most
  :data:`MAX_RETRY_AFTER_MS`, or :data:`IN_FLIGHT_RETRY_MS` when reservations of requests in
  progress could free it (``limits/limiter.py``, ``_advertise``);
* a request larger than a whole limit → 429 (or 403 for a quota) ``TokenRequestTooLarge``
  with ``x-should-retry: false`` and no ``Retry-After``: no wait would let it through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from sluicegate.limits.periods import PERIOD_NOUNS, zone
from sluicegate.limits.store import NEVER, CounterKind

if TYPE_CHECKING:
    from sluicegate.limits.limiter import LimitRequest

LimitKind = Literal["tokens", "requests", "quota", "request_quota"]

LIMIT_TOKENS_HEADER = "x-ratelimit-limit-tokens"
REMAINING_TOKENS_HEADER = "x-ratelimit-remaining-tokens"
LIMIT_REQUESTS_HEADER = "x-ratelimit-limit-requests"
REMAINING_REQUESTS_HEADER = "x-ratelimit-remaining-requests"
RETRY_AFTER_MS_HEADER = "retry-after-ms"
SHOULD_RETRY_HEADER = "x-should-retry"

CODE_TOKENS = "TokenRateLimitExceeded"
CODE_REQUESTS = "RequestRateLimitExceeded"
CODE_QUOTA = "TokenQuotaExceeded"
#: A request quota exhausted (403 until its period renews), as TokenQuotaExceeded for tokens.
CODE_REQUEST_QUOTA = "RequestQuotaExceeded"
#: A quota held by reservations of requests in progress (429): not the rate limits' codes,
#: so that logs and the ledger tell it from a TPM refusal, and not TokenQuotaExceeded, which
#: means "until the period renews" to a client.
CODE_QUOTA_IN_FLIGHT = "TokenQuotaInFlight"
CODE_TOO_LARGE = "TokenRequestTooLarge"
CODE_UNAVAILABLE = "LimitStoreUnavailable"

MAX_RETRY_AFTER_MS = 60_000
"""The longest wait a rate refusal advertises. openai-python (1.x) obeys ``retry-after-ms`` /
``Retry-After`` only up to 60 s and falls back to its own backoff of a second or so above
that, burning its retries; a 61-bucket window can ask for up to 61 s."""

IN_FLIGHT_RETRY_MS = 5_000
"""The wait a TPM (or quota) refusal advertises when the shortfall is held by reservations of
requests still in progress, which settle to their real usage when they end. 5 s: a non-streamed
completion of a few hundred tokens takes seconds, so with openai-python's default of two
retries a client keeps trying for 10 s, long enough for typical requests in flight to end;
a shorter wait spends the client's retries before they can, a longer one goes back towards
the minute this replaces. A retry that comes too early costs one more refusal (no backend
call) and is told again."""


# Not frozen: created on every request, and a frozen dataclass's __init__ costs about
# five times as much (object.__setattr__ per field). Treat instances as immutable.
@dataclass(slots=True)
class LimitStatus:
    """One limit of one :class:`LimitRequest` as the admission found (or left) it."""

    kind: LimitKind
    request: LimitRequest
    limit: int
    used: int
    cost: int
    retry_after_ms: int
    period_end_ms: int = 0
    #: On a refusal whose wait is short because of reservations in flight: how many tokens
    #: requests in progress hold in the window or quota (else 0). A quota refusal with it is
    #: a 429 (:data:`CODE_QUOTA_IN_FLIGHT`), not a 403.
    in_flight: int = 0

    @property
    def remaining(self) -> int:
        return max(self.limit - self.used, 0)

    @property
    def refused(self) -> bool:
        return self.retry_after_ms != 0


# Not frozen: created on every request, and a frozen dataclass's __init__ costs about
# five times as much (object.__setattr__ per field). Treat instances as immutable.
@dataclass(slots=True)
class Charge:
    """Tokens an admission put into one window (``slot``) of one counter."""

    name: str
    kind: CounterKind
    slot: int
    amount: int


@dataclass(slots=True, eq=False)
class Reservation:
    """Handle for :meth:`Limiter.settle` / :meth:`Limiter.release`; the first of them wins."""

    charges: tuple[Charge, ...]
    origin: str
    tokens: int
    done: bool = False
    #: The store's :attr:`~sluicegate.limits.store.StoreResult.admitted_ms` (0: unknown).
    admitted_ms: int = 0


def _ceil_s(ms: int) -> str:
    return str(max(math.ceil(ms / 1000), 1))


def _duration(ms: int) -> str:
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(math.ceil(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{days} d" if days else "", f"{hours} h" if hours else ""]
    parts += [f"{minutes} min" if minutes else "", f"{sec} s" if sec and not days else ""]
    return " ".join(part for part in parts if part)


def _label(request: LimitRequest) -> str:
    return request.label or request.key


# Not frozen: created on every request, and a frozen dataclass's __init__ costs about
# five times as much (object.__setattr__ per field). Treat instances as immutable.
@dataclass(slots=True)
class Admission:
    """The limiter's decision for one request.

    ``status`` is 200 when allowed, else 429 (rate, or a quota held by requests in
    progress), 403 (quota exhausted) or 503 (store unavailable, fail-closed). ``code`` and
    ``reason`` are for the error body; ``headers()`` lists the headers to add to the
    response (also when allowed). ``reservation`` is set when allowed.
    """

    allowed: bool
    status: int
    code: str | None
    reason: str
    retry_after_s: float
    reservation: Reservation | None
    limits: tuple[LimitStatus, ...] = ()
    should_retry: bool = True
    retry_after_headers: tuple[str, ...] = ("Retry-After",)

    def headers(self) -> list[tuple[str, str]]:
        """``x-ratelimit-*`` for the tightest TPM and RPM limit, the policies' configured
        remaining-tokens/-quota/-requests-quota headers, and on refusal the retry headers."""
        # One pass, no intermediate lists: this runs on every admitted request.
        tokens: tuple[int, int] | None = None  # (limit, remaining) of the tightest TPM
        requests: tuple[int, int] | None = None
        configured: dict[str, int] | None = None
        for status in self.limits:
            kind = status.kind
            remaining = status.limit - status.used
            if remaining < 0:
                remaining = 0
            if kind == "tokens":
                if tokens is None or remaining < tokens[1]:
                    tokens = (status.limit, remaining)
                name = status.request.policy.remaining_tokens_header
            elif kind == "requests":
                if requests is None or remaining < requests[1]:
                    requests = (status.limit, remaining)
                continue
            elif kind == "quota":
                name = status.request.policy.remaining_quota_header
            else:
                name = status.request.policy.remaining_requests_quota_header
            if name is not None:
                if configured is None:
                    configured = {}
                known = configured.get(name)
                configured[name] = remaining if known is None or remaining < known else known
        out: list[tuple[str, str]] = []
        if tokens is not None:
            out.append((LIMIT_TOKENS_HEADER, str(tokens[0])))
            out.append((REMAINING_TOKENS_HEADER, str(tokens[1])))
        if requests is not None:
            out.append((LIMIT_REQUESTS_HEADER, str(requests[0])))
            out.append((REMAINING_REQUESTS_HEADER, str(requests[1])))
        if configured:
            out += [(name, str(value)) for name, value in configured.items()]
        if not self.allowed:
            if self.code != CODE_TOO_LARGE:
                ms = max(math.ceil(self.retry_after_s * 1000), 1)
                names = {name.lower(): name for name in self.retry_after_headers}
                out += [(name, _ceil_s(ms)) for name in names.values()]
                if RETRY_AFTER_MS_HEADER not in names:
                    out.append((RETRY_AFTER_MS_HEADER, str(ms)))
            if not self.should_retry:
                out.append((SHOULD_RETRY_HEADER, "false"))
        return out


ALLOWED_UNLIMITED = Admission(True, 200, None, "", 0.0, None)


def unavailable(retry_after_s: float, requests: Sequence[LimitRequest]) -> Admission:
    """The admission when the shared store is down and the store fails closed (503)."""
    names = tuple({request.policy.retry_after_header for request in requests}) or ("Retry-After",)
    return Admission(
        allowed=False,
        status=503,
        code=CODE_UNAVAILABLE,
        reason=(
            "The gateway's rate-limit store is unavailable, so requests cannot be admitted; "
            f"retry after {math.ceil(retry_after_s)} s."
        ),
        retry_after_s=retry_after_s,
        reservation=None,
        retry_after_headers=names,
    )


def _refusal(status: LimitStatus, now_ms: int) -> tuple[int, str, str, bool]:
    """``(http status, code, reason, should_retry)`` for the limit that binds."""
    label = _label(status.request)
    policy = status.request.policy
    if status.kind == "request_quota":
        # Never too large (a request costs 1, a quota is at least 1), never held in flight
        # (nothing is reserved): exhausted until the period renews.
        noun = PERIOD_NOUNS[policy.request_quota_period or "daily"]
        renews = datetime.fromtimestamp(
            status.period_end_ms / 1000, zone(policy.quota_timezone)
        ).isoformat()
        reason = (
            f"Request quota of {status.limit} requests per {noun} is exhausted for {label}; "
            f"it renews at {renews} (in {_duration(status.period_end_ms - now_ms)})."
        )
        return 403, CODE_REQUEST_QUOTA, reason, False
    if status.kind == "quota":
        noun = PERIOD_NOUNS[policy.token_quota_period or "daily"]
        renews = datetime.fromtimestamp(
            status.period_end_ms / 1000, zone(policy.quota_timezone)
        ).isoformat()
        if status.retry_after_ms == NEVER:
            reason = (
                f"This request needs an estimated {status.cost} tokens, more than the whole "
                f"token quota of {status.limit} tokens per {noun} for {label}; lower max_tokens "
                "(or max_completion_tokens) or ask for a larger quota."
            )
            return 403, CODE_TOO_LARGE, reason, False
        if status.in_flight:
            reason = (
                f"Token quota of {status.limit} tokens per {noun} for {label} is held by "
                f"requests still in progress ({status.in_flight} tokens reserved until they "
                "end); the usage settled so far leaves room for this request: retry after "
                f"{_duration(status.retry_after_ms)}."
            )
            return 429, CODE_QUOTA_IN_FLIGHT, reason, True
        reason = (
            f"Token quota of {status.limit} tokens per {noun} is exhausted for {label}; "
            f"it renews at {renews} (in {_duration(status.period_end_ms - now_ms)})."
        )
        return 403, CODE_QUOTA, reason, False
    what = "Token" if status.kind == "tokens" else "Request"
    unit = "tokens" if status.kind == "tokens" else "requests"
    if status.retry_after_ms == NEVER:
        reason = (
            f"This request needs an estimated {status.cost} tokens, more than the whole limit "
            f"of {status.limit} tokens per minute for {label}; lower max_tokens "
            "(or max_completion_tokens) or ask for a higher limit."
        )
        return 429, CODE_TOO_LARGE, reason, False
    held = (
        f" ({status.in_flight} of them reserved by requests still in progress)"
        if status.in_flight
        else ""
    )
    reason = (
        f"{what} limit of {status.limit} {unit} per minute exceeded for {label}{held}; "
        f"retry after {_duration(status.retry_after_ms)}."
    )
    return 429, CODE_TOKENS if status.kind == "tokens" else CODE_REQUESTS, reason, True


def decide(
    allowed: bool,
    statuses: tuple[LimitStatus, ...],
    reservation: Reservation | None,
    now_ms: int,
) -> Admission:
    """Build the :class:`Admission` for a store's answer (see the module docstring)."""
    if allowed:
        return Admission(True, 200, None, "", 0.0, reservation, statuses)
    refused = [status for status in statuses if status.refused]
    # An exhausted quota wins; one held by requests in progress competes with the rates.
    quotas = [
        status
        for status in refused
        if (status.kind == "quota" or status.kind == "request_quota") and not status.in_flight
    ]
    candidates = quotas or refused
    never = [status for status in candidates if status.retry_after_ms == NEVER]
    # Among equal waits the lowest limit: a counter shared by two policies of one key is
    # refused under the lower one, which the message must name.
    binding = (
        never[0]
        if never
        else max(candidates, key=lambda status: (status.retry_after_ms, -status.limit))
    )
    http_status, code, reason, should_retry = _refusal(binding, now_ms)
    retry_ms = 0 if never else binding.retry_after_ms
    names = tuple(dict.fromkeys(status.request.policy.retry_after_header for status in refused))
    return Admission(
        allowed=False,
        status=http_status,
        code=code,
        reason=reason,
        retry_after_s=retry_ms / 1000,
        reservation=None,
        limits=statuses,
        should_retry=should_retry,
        retry_after_headers=names,
    )
