"""Routing one request over its deployment's pool: choose a member, attempt, and on a failure
before the first byte reached the client, fail over (or wait and retry the same backend) as
the retry policy says. The decisions are the router's and the policy's (``routing``); this
module carries them out.

Records: every attempt that is followed by another one is written at once as its own usage
record (``attempt`` 1, 2, …, with its backend, the backend's status and outcome
``backend_error``); the last attempt is the request's context, written by the pipeline as
usual. When no attempt is left the gateway answers itself — 429 with the shortest wait if
every member is throttled, 503 otherwise — and the last attempt's record carries that status
with the backend's own in ``extra["upstream_status"]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import NoReturn

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.clock import Clock
from sluicegate.proxy.asgi import Receive, Scope, Send
from sluicegate.proxy.context import RequestContext
from sluicegate.proxy.errors import GatewayError
from sluicegate.proxy.relay import AttemptFailed, attempt
from sluicegate.routing.estimate import request_estimate
from sluicegate.routing.pool import Member, Pool
from sluicegate.routing.retry import Action
from sluicegate.routing.retry import Outcome as AttemptOutcome
from sluicegate.routing.router import Choice, Router, Ticket
from sluicegate.upstream.backend import Backend
from sluicegate.upstream.identity import BackendAuthError

#: (url, body) of an attempt on one member.
Upstream = Callable[[Member, Backend], tuple[str, bytes]]


async def forward_routed(
    ctx: RequestContext,
    router: Router,
    pool: Pool,
    backends: dict[str, Backend],
    upstream: Upstream,
    scope: Scope,
    receive: Receive,
    send: Send,
    clock: Clock,
    emit: Callable[[UsageRecord], None],
) -> None:
    """Serve the request from ``pool`` (module docstring). Raises ``GatewayError`` only
    before anything was sent to the client."""
    settings = router.settings
    policy = settings.retry
    estimate = request_estimate(
        ctx.json,
        len(ctx.body),
        ctx.route.operation,
        ctx.prompt_estimate,
        settings.default_completion_tokens,
    )
    tried: list[str] = []
    outcomes: dict[str, AttemptOutcome] = {}
    choice = router.choose(pool, estimate, tried)
    if choice is None:
        _refuse(ctx, router, pool, outcomes)
    number = 1
    while True:
        member = choice.member
        backend = backends[member.backend]
        ctx.attempt = number
        _describe(ctx, choice)
        url, body = upstream(member, backend)
        started = clock.monotonic()
        ticket = router.begin(choice.target, estimate)
        try:
            try:
                auth = await backend.request_auth()
            except BackendAuthError as exc:
                raise _auth_failed(backend, exc) from None
            await attempt(
                ctx, backend, scope, receive, send, url, body, auth, clock,
                retryable=policy.statuses.__contains__,
                on_headers=functools.partial(router.report, ticket),
            )  # fmt: skip
        except AttemptFailed as failed:
            outcome = failed.outcome
            router.failed(ticket, outcome)
            tried.append(member.key)
            outcomes[member.key] = outcome
            elapsed = clock.monotonic() - ctx.started
            decision = policy.decide(outcome, number, pool.single, elapsed)
            following: Choice | None = None
            if decision.action is Action.NEXT:
                following = router.choose(pool, estimate, tried)
            elif decision.action is Action.WAIT_SAME:
                following = choice
            if following is None:
                _last_attempt_failed(ctx, failed)
                _refuse(ctx, router, pool, outcomes)
            emit(_failed_record(ctx, failed, clock.monotonic() - started))
            if decision.action is Action.WAIT_SAME:
                try:
                    await asyncio.sleep(decision.wait)
                except asyncio.CancelledError:
                    # Cancelled before the next attempt: the one that failed is the last,
                    # and its record is written (the pipeline's would repeat its key).
                    ctx.finished = True
                    raise
            choice = following
            number += 1
            continue
        except BaseException:
            router.abandoned(ticket)
            raise
        _settle(router, ticket, ctx)
        return


# The ``extra`` of records routed alike, one mapping per (deployment, kind, reason): a
# record waiting for the ledger then holds a reference instead of its own ~180-byte dict.
# Bounded by the configuration (deployments × kinds × the router's few reasons); the cache's
# bound only matters if reloads ever pile up more than that.
@functools.lru_cache(maxsize=4096)
def _routed_extra(deployment: str, kind: str, reason: str) -> Mapping[str, str]:
    extra = {"backend_deployment": deployment, "backend_kind": kind}
    if reason != "preferred":
        extra["route"] = reason
    return extra


def _describe(ctx: RequestContext, choice: Choice) -> None:
    member = choice.member
    ctx.backend_name = member.backend
    ctx.extra = _routed_extra(member.deployment, member.kind, choice.reason)


def _settle(router: Router, ticket: Ticket, ctx: RequestContext) -> None:
    """Tell the router how a relayed attempt went."""
    if ctx.outcome is Outcome.ABORTED:
        router.abandoned(ticket)
    elif ctx.error_code == "StreamInterrupted":
        router.failed(ticket, AttemptOutcome(None, "broken"))
    elif ctx.status >= 500 or ctx.status == 429:
        router.failed(ticket, AttemptOutcome(ctx.status))
    else:
        router.succeeded(ticket, ctx.status)


def _last_attempt_failed(ctx: RequestContext, failed: AttemptFailed) -> None:
    ctx.outcome = Outcome.BACKEND_ERROR
    # A copy: ``ctx.extra`` is shared with other requests' records.
    ctx.extra = {
        **ctx.extra,
        "upstream_status": str(failed.status),
        "upstream_error": failed.code,
    }


def _refuse(
    ctx: RequestContext, router: Router, pool: Pool, outcomes: dict[str, AttemptOutcome]
) -> NoReturn:
    refusal = router.refusal(pool, outcomes)
    ctx.outcome = Outcome.BACKEND_ERROR
    raise GatewayError(
        refusal.status, refusal.code, refusal.message, retry_after=refusal.retry_after
    )


def _failed_record(ctx: RequestContext, failed: AttemptFailed, duration: float) -> UsageRecord:
    """The record of an attempt that was followed by another one."""
    record = ctx.record(ctx.started)
    extra = {**ctx.extra, "upstream_error": failed.code}
    return dataclasses.replace(
        record,
        status=failed.status,
        outcome=Outcome.BACKEND_ERROR,
        model=None,
        prompt_tokens=0,
        completion_tokens=0,
        total_tokens=0,
        cached_tokens=0,
        reasoning_tokens=0,
        usage_estimated=False,
        ttfb_ms=None,
        duration_ms=round(duration * 1000, 3),
        error_code=failed.code,
        extra=extra,
    )


async def forward_single(
    ctx: RequestContext,
    backend: Backend,
    scope: Scope,
    receive: Receive,
    send: Send,
    url: str,
    clock: Clock,
) -> None:
    """One attempt on one backend with no routing (paths the gateway passes through): every
    answer is relayed; only an attempt that failed before the first byte becomes a 502/504."""
    try:
        try:
            auth = await backend.request_auth()
        except BackendAuthError as exc:
            raise _auth_failed(backend, exc) from None
        await attempt(
            ctx, backend, scope, receive, send, url, ctx.body, auth, clock,
            retryable=lambda status: False, on_headers=lambda headers: None,
        )  # fmt: skip
    except AttemptFailed as failed:
        ctx.outcome = Outcome.BACKEND_ERROR
        raise GatewayError(
            failed.status, failed.code, failed.message + " Retry later.", retry_after=1
        ) from None


def _auth_failed(backend: Backend, exc: BackendAuthError) -> AttemptFailed:
    """A backend without a token for this attempt: a failed attempt (outcome ``auth``), so
    that the router may try another backend. (Raised by the callers, whose hot path keeps
    its one ``await``.)"""
    return AttemptFailed(
        AttemptOutcome(None, "auth"),
        502,
        "BackendAuthUnavailable",
        f"No Entra ID token for backend {backend.name} ({exc}).",
    )
