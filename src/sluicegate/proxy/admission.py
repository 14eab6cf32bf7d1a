"""The pipeline's side of the limits: build the limit requests of a request, reserve on
arrival, settle (or release) when the response has ended.

Policies come from the subscription's product (one policy or a list of them, each with its own
counter key) with the subscription's overrides applied to the policies counted per
subscription. The merged policies are cached per subscription version, so the request path
does no validation work.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import orjson

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
from sluicegate.proxy.context import RequestContext
from sluicegate.proxy.errors import GatewayError
from sluicegate.tokens.estimate import estimate_request_tokens

log = logging.getLogger("sluicegate.limits")


_NAMES: dict[str, bytes] = {}


def _encode(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        raw = _NAMES.get(name)
        if raw is None:  # a handful of names: the limits' and the policies' header names
            raw = _NAMES[name] = name.lower().encode("latin-1")
        out.append((raw, value.encode("latin-1")))
    return out


class LimitsAdmitter:
    """Implements the pipeline's ``Admitter`` protocol over a :class:`Limiter`."""

    def __init__(
        self, limiter: Limiter, product_policies: dict[str, tuple[LimitPolicy, ...]]
    ) -> None:
        self.limiter = limiter
        self.product_policies = product_policies
        self._cache: dict[tuple[str, float], tuple[LimitPolicy, ...]] = {}

    def policies_for(self, sub: Subscription) -> tuple[LimitPolicy, ...]:
        cache_key = (sub.id, sub.updated_at)
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        base = self.product_policies.get(sub.product, ())
        overrides = sub.overrides.get("limits") if isinstance(sub.overrides, dict) else None
        if overrides:
            per_sub = [p for p in base if p.counter_key == "subscription"]
            if per_sub:
                merged = tuple(merge(p, overrides) if p is per_sub[0] else p for p in base)
            else:
                merged = (*base, merge(None, overrides))
        else:
            merged = base
        merged = tuple(p for p in merged if p.has_limits or p.max_tokens_ceiling is not None)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[cache_key] = merged
        return merged

    async def admit(self, ctx: RequestContext) -> None:
        sub = ctx.subscription
        assert sub is not None
        policies = self.policies_for(sub)
        if not policies:
            return
        body = ctx.json or {}
        operation = ctx.route.operation
        for policy in policies:
            if policy.max_tokens_ceiling is None:
                continue
            decision = apply_max_tokens_ceiling(body, operation, policy)
            if decision.error is not None:
                raise GatewayError(400, "MaxTokensCeilingExceeded", decision.error)
            if decision.changed:
                body = dict(decision.body)
                ctx.json = body
                ctx.body = orjson.dumps(body)
        model = ctx.deployment.model if ctx.deployment else None
        requests: list[LimitRequest] = []
        for policy in policies:
            if not policy.has_limits:
                continue
            estimate = estimate_request_tokens(
                body,
                operation,
                model,
                policy.default_completion_tokens,
                count_prompt=policy.estimate_prompt_tokens or ctx.stream,
            )
            ctx.prompt_estimate = estimate.prompt_tokens
            key = resolve_counter_key(
                policy,
                subscription_id=sub.id,
                owner=sub.owner,
                product=sub.product,
                client_ip=ctx.client_ip,
            )
            requests.append(
                LimitRequest(key, policy, tokens_to_reserve(policy, estimate, stream=ctx.stream))
            )
        if not requests:
            return
        admission = await self.limiter.admit(requests)
        if not admission.allowed:
            ctx.outcome = Outcome.REJECTED
            raise GatewayError(
                admission.status,
                admission.code or "429",
                admission.reason,
                headers=admission.headers(),
            )
        ctx.admission = admission
        ctx.response_headers.extend(_encode(admission.headers()))

    async def finish(self, ctx: RequestContext) -> None:
        admission = ctx.admission
        if admission is None or admission.reservation is None:
            return
        if ctx.usage is not None:
            await self.limiter.settle(admission.reservation, ctx.usage.total_tokens)
        elif ctx.outcome in (Outcome.BACKEND_ERROR, Outcome.REJECTED) or ctx.status >= 400:
            await self.limiter.release(admission.reservation)
        # Otherwise (a success without usage, e.g. a backend that reports none) the estimate
        # stays charged: the safe side for a limit.
