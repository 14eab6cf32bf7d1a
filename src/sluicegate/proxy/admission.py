"""The pipeline's side of the limits: build the limit requests of a request, reserve on
arrival, settle (or release) when the response has ended.

Policies come from the subscription's product (one policy or a list of them, each with its own
counter key) with the subscription's overrides applied to the policies counted per
subscription. The merged policies are cached per subscription version, so the request path
does no validation work. A subscription's overrides apply even when its product has no limits
(the gateway always builds the admitter); a subscription without overrides under a product
without limits costs the request path two attribute reads. An invalid override (a wrong type,
an unknown field, an invalid combination: stored data the admin API did not check) is
ignored, with a warning once per subscription version: the product's policy applies as if
the subscription had no override. Failing the requests (the 500 this was) would lock a team
out for an administrator's typo; the product's limits still hold.

The prompt is counted on the event loop for bodies up to :data:`INLINE_COUNT_BYTES` (almost
every request: a chat of a few KB costs well under a millisecond, mostly from caches) and in
the counting thread above it (``tokens/offload.py``), so that a multi-megabyte prompt never
holds the loop. A policy with ``estimate_prompt_tokens: false`` estimates nothing for a request
that does not stream: it reserves 0 tokens and is charged the reported usage at settle.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from sluicegate.accounting.records import Outcome
from sluicegate.auth.subscriptions import Subscription
from sluicegate.limits import (
    Limiter,
    LimitPolicy,
    LimitRequest,
    apply_max_tokens_ceiling,
    merge,
    resolve_counter_key,
    tokens_to_reserve,
)
from sluicegate.limits.policy import REQUEST_KEYED, header_key_value
from sluicegate.proxy.context import RequestContext
from sluicegate.proxy.errors import GatewayError
from sluicegate.tokens.estimate import TokenEstimate, estimate_request_tokens
from sluicegate.tokens.offload import INLINE_COUNT_BYTES, counting_thread

log = logging.getLogger("sluicegate.limits")

#: The estimate of a policy with ``estimate_prompt_tokens: false`` for a request that does
#: not stream: :func:`~sluicegate.limits.tokens_to_reserve` reserves nothing for it (APIM's
#: "use only usage from the response"), so the body is not even walked.
_NOT_COUNTED = TokenEstimate(0, 0, False, "not-counted")


_NAMES: dict[str, bytes] = {}


def _encode(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        raw = _NAMES.get(name)
        if raw is None:  # a handful of names: the limits' and the policies' header names
            raw = _NAMES[name] = name.lower().encode("latin-1")
        out.append((raw, value.encode("latin-1")))
    return out


@dataclass(slots=True)
class _Plan:
    """What the policies of one subscription version ask of each request, worked out once:
    ``policies`` (merged, without those that do nothing), ``ceilings`` (those with a
    ``max_tokens_ceiling``), ``limited`` (those with limits, each with its counter key, or
    ``None`` for a key that depends on the request: the client's address, the caller, a
    header) and ``consumed``
    (the ``tokens_consumed_header`` names of the limited ones, lower case, for the answer)."""

    policies: tuple[LimitPolicy, ...]
    ceilings: tuple[LimitPolicy, ...]
    limited: tuple[tuple[LimitPolicy, str | None], ...]
    consumed: tuple[bytes, ...] = ()


class LimitsAdmitter:
    """Implements the pipeline's ``Admitter`` protocol over a :class:`Limiter`."""

    def __init__(
        self, limiter: Limiter, product_policies: dict[str, tuple[LimitPolicy, ...]]
    ) -> None:
        self.limiter = limiter
        self.product_policies = product_policies
        #: Whether any product has a policy; if none has, only overrides can ask for work.
        self._any_product_policy = any(product_policies.values())
        self._cache: dict[tuple[str, float], _Plan] = {}

    def policies_for(self, sub: Subscription) -> tuple[LimitPolicy, ...]:
        """The subscription's policies: its product's with its overrides merged in."""
        return self._plan(sub).policies

    def _plan(self, sub: Subscription) -> _Plan:
        cache_key = (sub.id, sub.updated_at)
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        base = self.product_policies.get(sub.product, ())
        overrides = sub.overrides.get("limits") if isinstance(sub.overrides, dict) else None
        merged = _merged(base, overrides, sub) if overrides else base
        merged = tuple(p for p in merged if p.has_limits or p.max_tokens_ceiling is not None)
        plan = _Plan(
            merged,
            tuple(p for p in merged if p.max_tokens_ceiling is not None),
            tuple(
                (p, None if p.counter_key in REQUEST_KEYED else _counter_key(p, sub, None))
                for p in merged
                if p.has_limits
            ),
            tuple(
                sorted(
                    {
                        p.tokens_consumed_header.lower().encode("latin-1")
                        for p in merged
                        if p.has_limits and p.tokens_consumed_header
                    }
                )
            ),
        )
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[cache_key] = plan
        return plan

    async def admit(self, ctx: RequestContext) -> None:
        sub = ctx.subscription
        assert sub is not None
        if not self._any_product_policy and not sub.overrides:
            return  # nothing to do, and no allocation (not even the plan's cache key)
        plan = self._plan(sub)
        if not plan.policies:
            return
        body = ctx.json or {}
        operation = ctx.route.operation
        for policy in plan.ceilings:
            decision = apply_max_tokens_ceiling(body, operation, policy)
            if decision.error is not None:
                raise GatewayError(400, "MaxTokensCeilingExceeded", decision.error)
            if decision.changed:
                body = dict(decision.body)
                ctx.json = body
                ctx.body = orjson.dumps(body)
        limited = plan.limited
        if not limited:
            return
        model = ctx.deployment.model if ctx.deployment else None
        stream = ctx.stream
        # Large bodies: every policy's estimate in the counting thread, at once; otherwise
        # each is made inline below (the usual case, as cheap as it can be).
        estimates: list[TokenEstimate] | None = None
        if len(ctx.body) > INLINE_COUNT_BYTES and _counts_prompt(limited, stream):
            estimates = await counting_thread().run(
                lambda: _estimates(body, operation, model, limited, stream)
            )
        requests: list[LimitRequest] = []
        # The prompt as counted, for the answer's usage when the backend reports none (the
        # relay counts it itself when None): the largest count of the policies that counted,
        # never the 0 of one that did not (estimate_prompt_tokens: false).
        prompt: int | None = None
        for index, (policy, key) in enumerate(limited):
            count_prompt = policy.estimate_prompt_tokens or stream
            if not count_prompt:
                # Nothing to reserve (tokens_to_reserve: estimation off charges the
                # reported usage at settle only), so nothing to estimate.
                estimate = _NOT_COUNTED
            elif estimates is None:
                estimate = estimate_request_tokens(
                    body,
                    operation,
                    model,
                    policy.default_completion_tokens,
                    count_prompt=count_prompt,
                )
            else:
                estimate = estimates[index]
            if count_prompt and (prompt is None or estimate.prompt_tokens > prompt):
                prompt = estimate.prompt_tokens
            if key is None:
                key = _counter_key(policy, sub, ctx)
            requests.append(
                LimitRequest(key, policy, tokens_to_reserve(policy, estimate, stream=stream))
            )
        ctx.prompt_estimate = prompt
        # Its arrival (the ledger record's ts): a quota counter created now counts from then.
        admission = await self.limiter.admit(requests, ctx.ts)
        if not admission.allowed:
            ctx.outcome = Outcome.REJECTED
            raise GatewayError(
                admission.status,
                admission.code or "429",
                admission.reason,
                headers=admission.headers(),
            )
        ctx.admission = admission
        ctx.consumed_headers = plan.consumed
        ctx.response_headers.extend(_encode(admission.headers()))

    async def finish(self, ctx: RequestContext) -> None:
        admission = ctx.admission
        if admission is None or admission.reservation is None:
            return
        if ctx.usage is not None:
            tokens = ctx.usage.total_tokens + ctx.side_tokens
            await self.limiter.settle(admission.reservation, tokens)
        elif ctx.outcome in (Outcome.BACKEND_ERROR, Outcome.REJECTED) or ctx.status >= 400:
            if ctx.side_tokens:
                # Released, but for what the gateway spent on the request's behalf.
                await self.limiter.settle(admission.reservation, ctx.side_tokens)
            else:
                await self.limiter.release(admission.reservation)
        # Otherwise (a success without usage, e.g. a backend that reports none) the estimate
        # stays charged: the safe side for a limit.


def _merged(
    base: tuple[LimitPolicy, ...], overrides: object, sub: Subscription
) -> tuple[LimitPolicy, ...]:
    """The product's policies with the subscription's limits override merged into its first
    policy counted per subscription (added as a policy of its own when it has none); the
    product's policies unchanged, with a warning, when the override is invalid."""
    try:
        if not isinstance(overrides, dict):
            raise TypeError(f"a JSON object is expected, not {type(overrides).__name__}")
        per_sub = [p for p in base if p.counter_key == "subscription"]
        if per_sub:
            return tuple(merge(p, overrides) if p is per_sub[0] else p for p in base)
        return (*base, merge(None, overrides))
    except (ValidationError, TypeError) as exc:
        # Once per subscription version: the plan is cached under it. Field names and
        # pydantic's messages only, never the values (nor, of course, any key).
        problems = (
            "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'limits'}: {error['msg']}"
                for error in exc.errors(include_url=False, include_input=False)
            )
            if isinstance(exc, ValidationError)
            else str(exc)
        )
        log.warning(
            "subscription %s (product %s): its limits override is invalid and ignored, the "
            "product's limits apply (%s)",
            sub.id,
            sub.product,
            problems,
        )
        return base


def _counter_key(policy: LimitPolicy, sub: Subscription, ctx: RequestContext | None) -> str:
    """The policy's counter key; ``ctx`` None (when the plan is built) for the kinds that do
    not depend on the request. Per request: a few attribute reads, and for ``header`` one
    scan of the request's headers."""
    header_value: str | None = None
    if ctx is not None and policy.counter_key == "header" and policy.counter_header:
        raw = _header(ctx.headers, policy.counter_header)
        header_value = header_key_value(raw) if raw is not None else None
    return resolve_counter_key(
        policy,
        subscription_id=sub.id,
        owner=sub.owner,
        product=sub.product,
        client_ip=ctx.client_ip if ctx is not None else None,
        caller=ctx.caller if ctx is not None else None,
        header_value=header_value,
    )


_HEADER_NAMES: dict[str, bytes] = {}


def _header(headers: Sequence[tuple[bytes, bytes]], name: str) -> bytes | None:
    """The first value of header ``name`` (ASGI names are lower case; so is ``name``)."""
    raw = _HEADER_NAMES.get(name)
    if raw is None:  # the counter_header names of the configuration: a handful
        raw = _HEADER_NAMES[name] = name.encode("latin-1")
    for key, value in headers:
        if key == raw:
            return value
    return None


def _counts_prompt(limited: Sequence[tuple[LimitPolicy, str | None]], stream: bool) -> bool:
    """Whether any policy has the prompt counted (else nothing is estimated at all: no
    thread needed)."""
    return stream or any(policy.estimate_prompt_tokens for policy, _ in limited)


def _estimates(
    body: dict[str, Any],
    operation: str,
    model: str | None,
    limited: Sequence[tuple[LimitPolicy, str | None]],
    stream: bool,
) -> list[TokenEstimate]:
    """Each policy's estimate, in order.

    Policies that would estimate alike (the same completion default) share one estimate:
    with several policies a body is counted once, not once each (what matters when it is
    large). Policies that do not count the prompt get :data:`_NOT_COUNTED`.
    """
    out: list[TokenEstimate] = []
    done: dict[int, TokenEstimate] = {}
    for policy, _ in limited:
        if not (policy.estimate_prompt_tokens or stream):
            out.append(_NOT_COUNTED)  # nothing reserved: see admit()
            continue
        estimate = done.get(policy.default_completion_tokens)
        if estimate is None:
            estimate = done[policy.default_completion_tokens] = estimate_request_tokens(
                body, operation, model, policy.default_completion_tokens
            )
        out.append(estimate)
    return out
