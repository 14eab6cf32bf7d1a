"""Azure-like per-deployment rate limits: TPM over a sliding minute, RPM over short windows.

Tokens: Azure charges a request at arrival with an *estimate* (prompt tokens + ``max_tokens``
× ``n``/``best_of``) and counts it for the next minute whatever the answer turns out to be
(azure-openai-api.md §8). The simulator does the same with an exact sliding 60-s log.

Requests: Azure does **not** count RPM over a minute. It derives RPM from TPM and evaluates
the request rate over short periods, "1 s or 10 s", so a burst gets 429s well below the
per-minute figure: 600 RPM → more than 10 requests in one second are refused
(azure-openai-api.md §8, apim-policies.md §5). The simulator enforces *both* periods, a
10-s window of RPM/6 and a 1-s window of RPM/60 (rounded up, at least 1): the reference
names both and gives an example of each, and Microsoft Q&A 2156987 (cited in
apim-policies.md §5) shows both at once — 300 RPM, ``x-ratelimit-remaining-requests`` 45 of
50, yet the 6th request of a burst refused (300/60 = 5 per second). A gateway that copes
with both copes with either. ``x-ratelimit-remaining-requests`` reports the **10-s** budget
(300 RPM → starts at 50, apim-policies.md §5), so it can look positive while the 1-s window
refuses, as on Azure. ``x-ratelimit-limit-requests`` stays the deployment's RPM ("the
deployment's limits", azure-openai-api.md §7).

All windows are exact sliding logs (stricter than fixed evaluation periods: a burst cannot
slip through across a period boundary), so the wait reported in ``retry-after-ms`` is the
true time until the window frees enough room, and a client that waits it is admitted.

Pure bookkeeping, no I/O: the caller passes the (monotonic) time. Not thread-safe; the
simulator uses one instance per deployment on its own event loop.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Literal

#: The token (TPM) window: a minute (azure-openai-api.md §8).
WINDOW_SECONDS = 60.0
#: The request (RPM) windows as (seconds, share of the RPM allowed in them): 10 s → RPM/6 and
#: 1 s → RPM/60 (azure-openai-api.md §8, apim-policies.md §5). The first is the one
#: ``x-ratelimit-remaining-requests`` reports.
REQUEST_WINDOWS: tuple[tuple[float, int], ...] = ((10.0, 6), (1.0, 60))
#: Entries expire at ``t + window``; this slack absorbs float rounding so that a client which
#: waits exactly the advertised ``retry-after-ms`` is let in.
_EXPIRY_SLACK = 1e-6
_COMPACT_AT = 4096


class SlidingWindow:
    """Charges (time, cost) and answers "how long until ``cost`` more fits under ``limit``".

    Memory is one entry per admitted request in the last window; lookups are O(log n) by
    keeping cumulative sums. A single request costing more than the whole limit is admitted
    only when the window is empty (otherwise it could never pass).
    """

    __slots__ = ("_base", "_cum", "_head", "_times", "_total", "limit", "window")

    def __init__(self, limit: int, window: float = WINDOW_SECONDS) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.window = window
        self._times: list[float] = []
        self._cum: list[int] = []  # running total of costs, including the entry itself
        self._head = 0  # first live entry
        self._base = 0  # running total before the first stored entry (after compaction)
        self._total = 0

    def _expire(self, now: float) -> None:
        cutoff = now - self.window + _EXPIRY_SLACK
        self._head = bisect_right(self._times, cutoff, lo=self._head)
        if self._head >= _COMPACT_AT and self._head * 2 >= len(self._times):
            self._base = self._cum[self._head - 1]
            del self._times[: self._head]
            del self._cum[: self._head]
            self._head = 0

    def _expired_total(self) -> int:
        return self._cum[self._head - 1] if self._head > 0 else self._base

    def used(self, now: float) -> int:
        """Cost charged within the window ending at ``now``."""
        self._expire(now)
        return self._total - self._expired_total()

    def remaining(self, now: float) -> int:
        return max(0, self.limit - self.used(now))

    def wait_for(self, cost: int, now: float) -> float:
        """Seconds until ``cost`` fits (0.0 if it fits now)."""
        used = self.used(now)
        if used == 0 or used + cost <= self.limit:
            return 0.0
        # A request larger than the limit waits for the whole window to drain.
        need = used if cost > self.limit else used + cost - self.limit
        base = self._expired_total()
        i = bisect_left(self._cum, base + need, lo=self._head)
        return max(0.0, self._times[i] + self.window - now)

    def charge(self, cost: int, now: float) -> None:
        """Record ``cost`` at ``now`` (times must not go backwards)."""
        self._total += cost
        self._times.append(now)
        self._cum.append(self._total)

    def __repr__(self) -> str:
        live = len(self._times) - self._head
        used = self._total - self._expired_total()
        return f"SlidingWindow(limit={self.limit}, used≈{used}, entries={live})"


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of one admission check; ``remaining_*``/``limit_*`` are None when unset."""

    admitted: bool
    retry_after_s: float
    exceeded: Literal["tokens", "requests"] | None
    limit_tokens: int | None
    limit_requests: int | None
    remaining_tokens: int | None
    remaining_requests: int | None


def request_budget(rpm: int, per_minute: int) -> int:
    """Requests allowed in a window that is ``1/per_minute`` of a minute: RPM/6 for 10 s,
    RPM/60 for 1 s. On Azure RPM is 6 per 1,000 TPM (§8), so RPM/6 is whole; other
    configured values round up (at least 1), so the configured RPM stays reachable when
    requests are spread evenly."""
    return max(1, math.ceil(rpm / per_minute))


class DeploymentLimiter:
    """TPM (one minute) and RPM (10-s and 1-s windows) of one deployment. A request passes
    only if every window has room; then all are charged. When refused, the wait is the
    longest and ``exceeded`` names the dimension that forces it."""

    __slots__ = ("request_windows", "rpm", "tokens")

    def __init__(self, tpm: int | None, rpm: int | None) -> None:
        self.tokens = SlidingWindow(tpm, WINDOW_SECONDS) if tpm else None
        self.rpm = rpm
        self.request_windows: tuple[SlidingWindow, ...] = ()
        if rpm:
            self.request_windows = tuple(
                SlidingWindow(request_budget(rpm, share), seconds)
                for seconds, share in REQUEST_WINDOWS
            )

    def admit(self, estimate: int, now: float) -> Admission:
        """Charge ``estimate`` tokens and one request if all fit; otherwise charge nothing."""
        wait_tokens = self.tokens.wait_for(estimate, now) if self.tokens is not None else 0.0
        wait_requests = max((w.wait_for(1, now) for w in self.request_windows), default=0.0)
        if wait_tokens == 0.0 and wait_requests == 0.0:
            if self.tokens is not None:
                self.tokens.charge(estimate, now)
            for window in self.request_windows:
                window.charge(1, now)
            return self.snapshot(now)
        exceeded: Literal["tokens", "requests"] = (
            "tokens" if wait_tokens >= wait_requests else "requests"
        )
        return self.snapshot(now, refused_for=max(wait_tokens, wait_requests), exceeded=exceeded)

    def snapshot(
        self,
        now: float,
        refused_for: float | None = None,
        exceeded: Literal["tokens", "requests"] | None = None,
    ) -> Admission:
        """The current remaining budget, without charging anything. Requests: the 10-s
        window's remainder, as Azure reports it (apim-policies.md §5)."""
        reported = self.request_windows[0] if self.request_windows else None
        return Admission(
            admitted=refused_for is None,
            retry_after_s=refused_for or 0.0,
            exceeded=exceeded,
            limit_tokens=self.tokens.limit if self.tokens is not None else None,
            limit_requests=self.rpm,
            remaining_tokens=self.tokens.remaining(now) if self.tokens is not None else None,
            remaining_requests=reported.remaining(now) if reported is not None else None,
        )

    def __repr__(self) -> str:
        return (
            f"DeploymentLimiter(tokens={self.tokens!r}, rpm={self.rpm}, "
            f"requests={list(self.request_windows)!r})"
        )


def retry_after_values(wait_s: float) -> tuple[int, int]:
    """(``retry-after`` whole seconds rounded up, ``retry-after-ms`` rounded up), both ≥ 1."""
    ms = max(1, math.ceil(wait_s * 1000.0 - 1e-6))
    return max(1, math.ceil(ms / 1000.0)), ms
