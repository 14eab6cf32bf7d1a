"""Routing one request over its deployment's pool: choose a member, attempt, and on a failure
before the first byte reached the client, fail over (or wait and retry the same backend) as
the retry policy says. The decisions are the router's and the policy's (``routing``); this
module carries them out.

Records: every attempt that is followed by another one is written at once as its own usage
record (``attempt`` 1, 2, …, with its backend, the backend's status and outcome
``backend_error``); the last attempt is the request's context, written by the pipeline as
usual. When no attempt is left the gateway answers itself — 429 with the shortest wait if
every member is throttled, 503 otherwise — and the last attempt's record carries that status
with the backend's own in ``extra["upstream_status"]``. An attempt that found no free pooled
connection to its backend in time (outcome ``BUSY``) never reached it: it is abandoned, not a
failure for the breaker, and is followed by another member's attempt, never a wait for the
same one (503 ``BackendBusy`` when every member was busy).

A one-member pool's wait-and-retry goes through the breaker like a new request: it waits at
least until the breaker's end (or gives up when that is beyond ``max_wait``), then retries only
if the breaker lets it through — as the half-open probe, if the slot is free — and otherwise
answers what a new request would get. A half-open probe's verdict is given as soon as its
answer says it: a failure status with its head (``_probe_retryable``), a stream with its first
whole event (``_probe_send``: a long stream does not hold the probe slot), anything else at
the attempt's end, once its body was read whole — a 200 whose body breaks off is a failed
probe, not a closed breaker's first failure. A stream's early verdict is on probation: if it
breaks off later, its end (``_settle``) fails the probe after all, and the breaker opens
again at once.

At the end of a relayed attempt (``_settle``) a body the backend broke off (a stream's
``StreamInterrupted``, any other answer's ``AnswerInterrupted``) is the backend's failure,
counted toward the breaker's ``failures`` like a 5xx; a client that left or stopped reading
(outcome ``aborted``, ``ClientWriteTimeout`` included) is no verdict on the backend.

Responses affinity (``routing/affinity.py``, docs/routing.md): a request that names a stored
response the router knows (``previous_response_id``, ``…/responses/{id}``) is served by the
pool's members on the resource that holds it alone — a smaller pool, so never failed over to
a member that would not know the id; its refusal says why. A Responses creation's 2xx answer (unless
``"store": false``) teaches the router its id (``on_response_id``, per attempt, with the
attempt's backend and the subscription as its owner). A request naming an id another
subscription created gets Azure's answer for an unknown id (``unknown_response``), and no
backend is contacted. A 2xx ``DELETE responses/{id}`` forgets the id (``forget_deleted``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from typing import NoReturn

import orjson

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.clock import Clock
from sluicegate.proxy.asgi import Message, Receive, Scope, Send
from sluicegate.proxy.context import RequestContext
from sluicegate.proxy.errors import GatewayError
from sluicegate.proxy.relay import AttemptFailed, attempt
from sluicegate.routing.affinity import ResponseAffinity
from sluicegate.routing.estimate import request_estimate
from sluicegate.routing.pool import Member, Pool
from sluicegate.routing.retry import Action, RetryPolicy
from sluicegate.routing.retry import Outcome as AttemptOutcome
from sluicegate.routing.router import BUSY, Choice, Router, Ticket
from sluicegate.upstream.backend import Backend
from sluicegate.upstream.identity import BackendAuthError

log = logging.getLogger("sluicegate.failover")

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
    route = ctx.route
    affinity = router.affinity
    learn = False
    held: str | None = None  # the stored response only the pool (pinned) can serve
    owner = ""
    if affinity is not None and (route.operation == "responses" or route.response_id):
        owner = ctx.subscription.id if ctx.subscription is not None else ""
        # A creation with ``"store": false`` is never stored, so never continued: not learned.
        learn = route.operation == "responses" and not (
            ctx.json is not None and ctx.json.get("store") is False
        )
        response_id = _named_response(ctx)
        if response_id is not None:
            found = affinity.holder(response_id)
            if found is None and affinity.shared is not None:
                # Cluster mode, not learned here: a second Redis round trip, for these only
                # (well-formed ids not recently found missing, Redis not failing).
                found = await affinity.lookup(response_id)
            if found is not None:
                if found[1] != owner:
                    raise unknown_response(ctx, response_id)
                pinned = affinity.pinned(pool, found[0])
                if pinned is not None:
                    pool, held = pinned, response_id
    choice = router.choose(pool, estimate, tried)
    if choice is None:
        _refuse(ctx, router, pool, outcomes, held)
    number = 1
    while True:
        member = choice.member
        backend = backends[member.backend]
        ctx.attempt = number
        if held is not None:
            choice = Choice(member, choice.target, "affinity")
        _describe(ctx, choice)
        url, body = upstream(member, backend)
        started = clock.monotonic()
        ticket = router.begin(choice.target, estimate)
        # Only a half-open probe (rare) gets a check and a ``send`` of its own, which give
        # its verdict early; every other attempt keeps the bare membership test and ``send``.
        retryable: Callable[[int], bool] = policy.statuses.__contains__
        relay_send = send
        if ticket.probe:
            retryable = functools.partial(_probe_retryable, router, ticket, policy.statuses)
            relay_send = _probe_send(router, ticket, ctx, send)
        on_response_id: Callable[[str], None] | None = None
        if learn:
            assert affinity is not None
            on_response_id = functools.partial(affinity.learn, backend=member.backend, owner=owner)
        try:
            try:
                auth = await backend.request_auth()
            except BackendAuthError as exc:
                raise _auth_failed(ctx, backend, exc) from None
            await attempt(
                ctx, backend, scope, receive, relay_send, url, body, auth, clock,
                retryable=retryable, on_headers=functools.partial(router.report, ticket),
                on_response_id=on_response_id,
            )  # fmt: skip
        except AttemptFailed as failed:
            outcome = failed.outcome
            # No free connection to the backend in time: nothing about its health (the
            # breaker does not hear of it), and no waiting to try it again (the request
            # waited already): another member, if any, else 503 BackendBusy.
            busy = outcome.error == BUSY
            if busy:
                router.abandoned(ticket)
            else:
                router.failed(ticket, outcome)
            tried.append(member.key)
            outcomes[member.key] = outcome
            duration = clock.monotonic() - started
            elapsed = clock.monotonic() - ctx.started
            single = pool.single and not busy
            out_for = router.out_for(choice.target) if single else 0.0
            decision = policy.decide(outcome, number, single, elapsed, out_for)
            following: Choice | None = None
            if decision.action is Action.NEXT:
                following = router.choose(pool, estimate, tried)
            elif decision.action is Action.WAIT_SAME:
                try:
                    following = await _wait_same(router, policy, choice, decision.wait, elapsed)
                except asyncio.CancelledError:
                    # Cancelled before the next attempt: the one that failed is the last,
                    # and its record is written (the pipeline's would repeat its key).
                    emit(_failed_record(ctx, failed, duration))
                    ctx.finished = True
                    raise
                if following is None:
                    # The wait is over and the breaker keeps the backend out (another
                    # waiting request took the probe slot, or it opened again): the answer a
                    # new request would get now. This request's own outcome is stale: its
                    # wait was just waited.
                    _last_attempt_failed(ctx, failed)
                    _refuse(ctx, router, pool, {}, held)
            if following is None:
                _last_attempt_failed(ctx, failed)
                _refuse(ctx, router, pool, outcomes, held)
            emit(_failed_record(ctx, failed, duration))
            choice = following
            number += 1
            continue
        except BaseException:
            router.abandoned(ticket)
            raise
        _settle(router, ticket, ctx)
        if route.response_id is not None:  # …/deployments/{d}/responses/{id}…: rare
            forget_deleted(ctx, scope, affinity)
        return


def _named_response(ctx: RequestContext) -> str | None:
    """The stored response a request names for Responses affinity: ``responses/{id}`` in
    its path, or a creation's ``previous_response_id``; None when there is none."""
    response_id = ctx.route.response_id
    if response_id is not None:
        return response_id
    # The body was parsed already (``ctx.json``): one dict lookup, no scan of the body.
    previous = ctx.json.get("previous_response_id") if ctx.json is not None else None
    return previous if isinstance(previous, str) and previous else None


async def held_backend(
    ctx: RequestContext, affinity: ResponseAffinity | None, backends: Mapping[str, Backend]
) -> Backend | None:
    """Responses affinity for a passthrough path (``/openai/v1/responses/{id}…``): the
    backend that holds the response, or None (no id in the path, unknown, no longer
    configured, or not one the caller's product could reach otherwise: defence in depth):
    the path then goes to ``passthrough_backend`` as usual. Raises ``GatewayError`` (Azure's
    404 for an unknown id, no backend contacted) when another subscription created it.
    Passthrough paths have no breaker: the holder answers for itself."""
    response_id = ctx.route.response_id
    if affinity is None or response_id is None:
        return None
    found = affinity.holder(response_id)
    if found is None and affinity.shared is not None:
        found = await affinity.lookup(response_id)
    if found is None:
        return None
    holder, owner = found
    if ctx.subscription is None or owner != ctx.subscription.id:
        raise unknown_response(ctx, response_id)
    product = ctx.product
    if product is None or not affinity.reaches(product.allowed, holder):
        return None
    return backends.get(holder)


def forget_deleted(ctx: RequestContext, scope: Scope, affinity: ResponseAffinity | None) -> None:
    """Responses affinity: after a relayed answer to a request whose path names a stored
    response, a 2xx ``DELETE …/responses/{id}`` (the response itself, not a path under it)
    deleted it at its holder, so the id is forgotten (``ResponseAffinity.forget``: here and
    in Redis). Any other answer leaves it: a 404 or a 5xx deleted nothing, or nothing the
    gateway could tell."""
    response_id = ctx.route.response_id
    if (
        affinity is not None
        and response_id is not None
        and scope["method"] == "DELETE"
        and 200 <= ctx.status < 300
        and ctx.route.upstream_suffix.rstrip("/").endswith(_RESPONSES_PATH + response_id)
    ):
        affinity.forget(response_id)


_RESPONSES_PATH = "responses/"


class _UnknownResponse(GatewayError):
    """Azure's own answer for a response id its resource does not hold (type and param
    included, as the SDKs parse them)."""

    def __init__(self, status: int, code: str, message: str, param: str | None) -> None:
        super().__init__(status, code, message)
        self.param = param

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": "invalid_request_error",
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


def unknown_response(ctx: RequestContext, response_id: str) -> GatewayError:
    """What Azure answers for ``response_id`` when its resource does not hold it: 404
    ``not_found`` on a ``responses/{id}`` path, 400 ``previous_response_not_found`` for a
    continuation. Given to a subscription naming another's response."""
    if ctx.route.response_id is not None:
        return _UnknownResponse(
            404, "not_found", f"Response with id '{response_id}' not found.", None
        )
    return _UnknownResponse(
        400,
        "previous_response_not_found",
        f"Previous response with id '{response_id}' not found.",
        "previous_response_id",
    )


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


def _probe_retryable(router: Router, ticket: Ticket, statuses: frozenset[int], status: int) -> bool:
    """The retry check of a half-open probe's answer: an answer that will be relayed with a
    failure status gives the probe's verdict now (``router.probe_head``), not when the relay
    ends; any other waits for its body."""
    if status in statuses:
        return True
    router.probe_head(ticket, status)
    return False


def _probe_send(router: Router, ticket: Ticket, ctx: RequestContext, send: Send) -> Send:
    """``send`` for a half-open probe's attempt. The relay sends a body with ``more_body``
    only for an answer still arriving (a stream: only whole events): the first such body
    gives the probe's verdict (``router.probe_streaming``) before it goes out. A metered JSON
    answer (sent in one piece, after its body was read whole) or any answer that came whole
    leaves the verdict to the attempt's end, where a body that broke off is the probe's
    failure."""

    async def probe_send(message: Message) -> None:
        if ticket.probe and message.get("more_body") and message.get("body"):
            router.probe_streaming(ticket, ctx.status)
        await send(message)

    return probe_send


async def _wait_same(
    router: Router, policy: RetryPolicy, choice: Choice, wait: float, elapsed: float
) -> Choice | None:
    """Sleep ``wait`` seconds, then ``choice`` again if its breaker lets the request through
    now (``router.retry_same``; when half-open, ``begin`` then takes the probe slot). None
    when it does not: the probe slot is taken, or the breaker is open for longer than the
    request may still wait (``max_wait`` in all, and within the budget; ``elapsed``: the
    request's age when the wait began)."""
    limit = min(policy.max_wait, policy.budget - elapsed)
    waited = 0.0
    while True:
        await asyncio.sleep(wait)
        waited += wait
        again = router.retry_same(choice)
        if again is not None:
            return again
        # Still open: woken an instant early (the sleep's clock is not the breaker's), or
        # a late 429 pushed the end out. 0 when half-open with the probe slot taken.
        wait = router.out_for(choice.target)
        if wait <= 0.0 or waited + wait > limit:
            return None


def _describe(ctx: RequestContext, choice: Choice) -> None:
    member = choice.member
    ctx.backend_name = member.backend
    ctx.extra = _routed_extra(member.deployment, member.kind, choice.reason)


#: Error codes of relayed answers whose body broke off after part of it went out: a stream's
#: (the client got an error event) and any other answer's (its connection closed short).
_BROKEN_BODIES = frozenset({"StreamInterrupted", "AnswerInterrupted"})


def _settle(router: Router, ticket: Ticket, ctx: RequestContext) -> None:
    """Tell the router how a relayed attempt went (module docstring): a client that left is
    checked first, so that a body cut off because the client went is never the backend's
    failure; a body the backend broke off is, also after a probe's stream closed the
    breaker (the router then opens it again)."""
    if ctx.outcome is Outcome.ABORTED:
        router.abandoned(ticket)
    elif ctx.error_code in _BROKEN_BODIES:
        router.failed(ticket, AttemptOutcome(None, "broken"))
    elif ctx.status >= 500 or ctx.status == 429:
        # Relayed because its status is not retried: the breaker still honours the wait its
        # headers asked for (read here, off the success path).
        router.relayed_failure(ticket, ctx.status)
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
    ctx: RequestContext,
    router: Router,
    pool: Pool,
    outcomes: dict[str, AttemptOutcome],
    held: str | None = None,
) -> NoReturn:
    """Answer the router's refusal. ``held``: the stored response the request names, which
    only ``pool``'s (pinned) member holds: the refusal is that member's, and says why the
    request was not sent to another (it would not know the id)."""
    refusal = router.refusal(pool, outcomes)
    ctx.outcome = Outcome.BACKEND_ERROR
    message = refusal.message
    if held is not None:
        message += (
            f" The request names stored response {held!r}, which only the backend that "
            "served it holds: it is not sent to another backend."
        )
    raise GatewayError(refusal.status, refusal.code, message, retry_after=refusal.retry_after)


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
            raise _auth_failed(ctx, backend, exc) from None
        await attempt(
            ctx, backend, scope, receive, send, url, ctx.body, auth, clock,
            retryable=lambda status: False, on_headers=lambda headers: None,
        )  # fmt: skip
    except AttemptFailed as failed:
        ctx.outcome = Outcome.BACKEND_ERROR
        raise GatewayError(
            failed.status, failed.code, failed.message + " Retry later.", retry_after=1
        ) from None


def _auth_failed(ctx: RequestContext, backend: Backend, exc: BackendAuthError) -> AttemptFailed:
    """A backend without a token for this attempt: a failed attempt (outcome ``auth``), so
    that the router may try another backend. (Raised by the callers, whose hot path keeps
    its one ``await``.) The reason goes to the log; the message, which a client may get
    (``forward_single``), only names the backend."""
    # azure-identity's reasons carry tenant and application ids, AADSTS codes and endpoint
    # details: the operators' business, not the client's.
    log.warning(
        "request %s: no Entra ID token for backend %s: %s", ctx.request_id, backend.name, exc
    )
    return AttemptFailed(
        AttemptOutcome(None, "auth"),
        502,
        "BackendAuthUnavailable",
        f"The gateway could not get a token for backend {backend.name}; see the gateway's log.",
    )
