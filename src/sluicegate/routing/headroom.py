"""What a backend deployment still accepts, from the ``x-ratelimit-remaining-tokens`` and
``x-ratelimit-remaining-requests`` it sends with every response.

Azure charges a request at arrival, so the remaining figures in a response are the budget
right after that request was admitted. Requests the gateway sent *after* that one are not in
it yet: the tracker keeps a running total of estimated tokens (and requests) dispatched to
each target and subtracts what went out since the reported request was dispatched.

Requests travel on many connections, so one dispatched *before* the reported request may
reach the backend after it and be missing from the report too. The tracker therefore also
subtracts every request dispatched earlier that had not been answered when the report came
(it may or may not be in the report; counting it twice costs a little spill-over, missing it
costs a 429 that opens the breaker). The headroom of a target is ``reported − dispatched
since − earlier ones still in flight``: conservative, and exact when answers keep their order.

A report is trusted for ``stale_after`` seconds; after that (or with no report at all) the
target counts as having room, so that traffic goes there and brings a fresh report. Pure
state with the time passed in; not thread-safe (one event loop).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

_REMAINING_TOKENS = b"x-ratelimit-remaining-tokens"
_REMAINING_REQUESTS = b"x-ratelimit-remaining-requests"
_LIMIT_TOKENS = b"x-ratelimit-limit-tokens"
_LIMIT_REQUESTS = b"x-ratelimit-limit-requests"


# Not frozen: created on every request, and a frozen dataclass's __init__ costs about
# five times as much (object.__setattr__ per field). Treat instances as immutable.
@dataclass(slots=True)
class Report:
    """One backend response's rate-limit headers (None: not sent)."""

    remaining_tokens: int | None
    remaining_requests: int | None
    limit_tokens: int | None = None
    limit_requests: int | None = None

    @property
    def empty(self) -> bool:
        return self.remaining_tokens is None and self.remaining_requests is None


def _int(value: bytes) -> int | None:
    try:
        return max(0, int(value.strip()))
    except ValueError:
        try:
            return max(0, int(float(value.strip())))
        except ValueError:
            return None


def report_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> Report:
    """Read the rate-limit headers (names in any case) of one response."""
    rt = rr = lt = lr = None
    for raw_name, value in headers:
        name = raw_name.lower()
        if not name.startswith(b"x-ratelimit-"):
            continue
        if name == _REMAINING_TOKENS:
            rt = _int(value)
        elif name == _REMAINING_REQUESTS:
            rr = _int(value)
        elif name == _LIMIT_TOKENS:
            lt = _int(value)
        elif name == _LIMIT_REQUESTS:
            lr = _int(value)
    return Report(rt, rr, lt, lr)


@dataclass(slots=True)
class Headroom:
    """One target's last report and what was dispatched since (see the module docstring)."""

    report: Report | None = None
    #: Epoch seconds of the report (when the response arrived).
    reported_at: float = 0.0
    #: Running totals of dispatched estimates and requests (never decrease).
    sent_tokens: int = 0
    sent_requests: int = 0
    #: The running totals the report is taken to include: those when the reported request
    #: was dispatched, less the earlier requests then still in flight.
    base_tokens: int = 0
    base_requests: int = 0
    #: The request mark (``marks[1]``) of the request whose answer made the report.
    reported_mark: int = 0
    #: Requests in flight, request mark → estimate, in dispatch order (marks only grow).
    pending: dict[int, int] = field(default_factory=dict)

    def dispatch(self, tokens: int) -> tuple[int, int]:
        """Count a request going out; returns the marks to pass to ``observe`` later."""
        self.sent_tokens += tokens
        self.sent_requests += 1
        self.pending[self.sent_requests] = tokens
        return self.sent_tokens, self.sent_requests

    def settle(self, marks: tuple[int, int]) -> None:
        """The request dispatched with ``marks`` ended (answered, failed or abandoned)."""
        self.pending.pop(marks[1], None)

    def observe(self, report: Report, marks: tuple[int, int], now: float) -> bool:
        """Take a response's report. ``marks`` are those ``dispatch`` returned for the request
        it answers. An answer to an older request than the current report is ignored (it
        would report a budget from before newer charges). Returns True if taken."""
        if report.empty:
            return False
        mark = marks[1]
        if self.report is not None and mark < self.reported_mark:
            return False
        # Earlier requests still in flight may have reached the backend after this one: count
        # them as not in the report. Dispatch order is mark order, so stop at the first later one.
        earlier_tokens = earlier_requests = 0
        for pending_mark, tokens in self.pending.items():
            if pending_mark >= mark:
                break
            earlier_tokens += tokens
            earlier_requests += 1
        self.report = report
        self.reported_at = now
        self.reported_mark = mark
        self.base_tokens = marks[0] - earlier_tokens
        self.base_requests = mark - earlier_requests
        return True

    def adopt(self, report: Report, reported_at: float) -> bool:
        """Take a report another instance made (cluster mode) if it is newer than ours."""
        if report.empty or reported_at <= self.reported_at:
            return False
        self.report = report
        self.reported_at = reported_at
        self.reported_mark = self.sent_requests
        # Ours still in flight may not have reached the backend when the other instance's
        # request did: count them as not in the report, as ``observe`` does.
        self.base_tokens = self.sent_tokens - sum(self.pending.values())
        self.base_requests = self.sent_requests - len(self.pending)
        return True

    def forget(self) -> None:
        """Drop the report (after a trip: when the backend is probed again, it said when)."""
        self.report = None
        self.reported_at = 0.0

    def current(self, now: float, stale_after: float) -> Report | None:
        """Remaining tokens and requests now, or None when unknown (no or a stale report)."""
        report = self.report
        if report is None or now - self.reported_at > stale_after:
            return None
        tokens = report.remaining_tokens
        requests = report.remaining_requests
        if tokens is not None:
            tokens = max(0, tokens - (self.sent_tokens - self.base_tokens))
        if requests is not None:
            requests = max(0, requests - (self.sent_requests - self.base_requests))
        return Report(tokens, requests, report.limit_tokens, report.limit_requests)

    def fits(self, estimate: int, now: float, stale_after: float) -> bool:
        """Would a request of ``estimate`` tokens be admitted, as far as we know?"""
        current = self.current(now, stale_after)
        if current is None:
            return True
        if current.remaining_requests is not None and current.remaining_requests < 1:
            return False
        return current.remaining_tokens is None or current.remaining_tokens >= estimate

    def __repr__(self) -> str:
        r = self.report
        if r is None:
            return "Headroom(unknown)"
        return (
            f"Headroom(tokens={r.remaining_tokens}, requests={r.remaining_requests}, "
            f"sent_since={self.sent_tokens - self.base_tokens})"
        )
