"""The pipeline's admitter (``proxy/admission.py``): the prompt estimate it leaves for the
relay, and where it counts (inline for ordinary bodies, in the counting thread for large
ones)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from sluicegate.auth.subscriptions import Subscription, SubscriptionState
from sluicegate.clock import FakeClock
from sluicegate.limits import Limiter, LimitPolicy, MemoryStore
from sluicegate.proxy import admission as admission_module
from sluicegate.proxy.admission import LimitsAdmitter
from sluicegate.proxy.context import RequestContext
from sluicegate.proxy.deadlines import Deadlines
from sluicegate.proxy.errors import GatewayError
from sluicegate.proxy.routes import match_route
from sluicegate.tokens.estimate import TokenEstimate, estimate_request_tokens
from sluicegate.tokens.offload import INLINE_COUNT_BYTES, counting_thread

CHAT = "/openai/deployments/gpt-4o/chat/completions"
SMALL = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 5}
# hello world: 3 per message + "user" 1 + "hello world" 2 + 3 to prime the reply.
SMALL_PROMPT = 9


@dataclass(frozen=True)
class _Deployment:
    name: str
    model: str


def _subscription(product: str = "p") -> Subscription:
    return Subscription(
        "sub-1", "s", "team-a", product, SubscriptionState.ACTIVE,
        b"h1", b"h2", "p1", "p2", 0.0, 1.0,
    )  # fmt: skip


def _admitter(*policies: LimitPolicy) -> LimitsAdmitter:
    return LimitsAdmitter(Limiter(MemoryStore(), FakeClock()), {"p": tuple(policies)})


def _context(body: dict[str, Any], stream: bool = False) -> RequestContext:
    route = match_route("POST", CHAT)
    assert route is not None
    ctx = RequestContext("r", 0.0, 0.0, route, Deadlines(), client_ip="127.0.0.1")
    ctx.subscription = _subscription()
    ctx.deployment = _Deployment("gpt-4o", "gpt-4o")  # type: ignore[assignment]
    ctx.json = body
    ctx.body = orjson.dumps(body)
    ctx.stream = stream
    return ctx


async def test_a_prompt_not_counted_leaves_no_estimate_for_the_relay() -> None:
    """With estimate_prompt_tokens: false the prompt is not counted: the estimate left for
    an answer without usage must say "unknown" (None, so the relay counts it), not 0 (which
    gave a usage of no prompt tokens at all)."""
    ctx = _context(SMALL)
    await _admitter(LimitPolicy(tokens_per_minute=10_000, estimate_prompt_tokens=False)).admit(ctx)
    assert ctx.admission is not None and ctx.admission.allowed
    assert ctx.prompt_estimate is None
    streamed = _context(SMALL, stream=True)  # streams always count the prompt
    await _admitter(LimitPolicy(tokens_per_minute=10_000, estimate_prompt_tokens=False)).admit(
        streamed
    )
    assert streamed.prompt_estimate == SMALL_PROMPT


@pytest.mark.parametrize("counting_first", [True, False])
async def test_with_several_policies_the_counted_prompt_is_kept(counting_first: bool) -> None:
    counting = LimitPolicy(tokens_per_minute=10_000)
    not_counting = LimitPolicy(
        tokens_per_minute=10_000, counter_key="owner", estimate_prompt_tokens=False
    )
    policies = (counting, not_counting) if counting_first else (not_counting, counting)
    ctx = _context(SMALL)
    await _admitter(*policies).admit(ctx)
    assert ctx.prompt_estimate == SMALL_PROMPT
    reserved = sorted(charge.amount for charge in ctx.admission.reservation.charges)
    # Each policy reserved what it counts: estimation off reserves nothing, not even the
    # max_tokens the request set (APIM: usage from the response only).
    assert reserved == [0, SMALL_PROMPT + 5]


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the thread of every estimate the admitter makes."""
    threads: list[str] = []

    def estimate(*args: Any, **kwargs: Any) -> TokenEstimate:
        threads.append(threading.current_thread().name)
        return estimate_request_tokens(*args, **kwargs)

    monkeypatch.setattr(admission_module, "estimate_request_tokens", estimate)
    return threads


async def test_an_ordinary_body_is_counted_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = _recording(monkeypatch)
    body = {"messages": [{"role": "user", "content": "hello " * 2000}]}  # 12 KB
    ctx = _context(body)
    assert len(ctx.body) <= INLINE_COUNT_BYTES
    await _admitter(LimitPolicy(tokens_per_minute=10**9)).admit(ctx)
    assert threads == [threading.current_thread().name]


async def test_a_large_body_is_counted_in_the_counting_thread_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counted off the event loop, and once for several policies that count alike."""
    threads = _recording(monkeypatch)
    body = {"messages": [{"role": "user", "content": "hello " * 20_000}]}  # 120 KB
    ctx = _context(body)
    assert len(ctx.body) > INLINE_COUNT_BYTES
    policies = (
        LimitPolicy(tokens_per_minute=10**9),
        LimitPolicy(tokens_per_minute=10**9, counter_key="owner"),
        LimitPolicy(tokens_per_minute=10**9, counter_key="product", estimate_prompt_tokens=False),
    )
    await _admitter(*policies).admit(ctx)
    assert threads == [counting_thread().name]  # counted once; not at all for the third
    prompt = estimate_request_tokens(body, "chat.completions", "gpt-4o", 0).prompt_tokens
    assert ctx.prompt_estimate == prompt > 20_000
    reserved = sorted(charge.amount for charge in ctx.admission.reservation.charges)
    assert reserved == [0, prompt + 1024, prompt + 1024]


async def test_a_large_body_not_counted_stays_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a prompt to count nothing is estimated (0 is reserved): no hop, no walk."""
    threads = _recording(monkeypatch)
    ctx = _context({"messages": [{"role": "user", "content": "hello " * 20_000}]})
    await _admitter(LimitPolicy(tokens_per_minute=10**9, estimate_prompt_tokens=False)).admit(ctx)
    assert threads == []
    assert ctx.admission is not None and ctx.admission.reservation is not None
    assert [charge.amount for charge in ctx.admission.reservation.charges] == [0]
    assert ctx.prompt_estimate is None


async def test_the_counting_thread_hands_back_errors_and_survives_them() -> None:
    def fail() -> int:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await counting_thread().run(fail)
    assert await counting_thread().run(lambda: 6 * 7) == 42
    thread = next(t for t in threading.enumerate() if t.name == counting_thread().name)
    assert thread.daemon


async def test_ceilings_clamp_or_refuse_before_the_limits_count() -> None:
    """A ceiling-only policy (no limits) clamps the body and reserves nothing; with limits
    beside it, the clamped budget is what is reserved; a rejecting ceiling answers 400."""
    clamp = LimitPolicy(max_tokens_ceiling=8, max_tokens_action="clamp")
    ctx = _context({**SMALL, "max_tokens": 500})
    await _admitter(clamp).admit(ctx)
    assert ctx.json == {**SMALL, "max_tokens": 8}
    assert orjson.loads(ctx.body) == ctx.json
    assert ctx.admission is None and ctx.prompt_estimate is None
    ctx = _context({**SMALL, "max_tokens": 500})
    await _admitter(clamp, LimitPolicy(tokens_per_minute=1000, counter_key="owner")).admit(ctx)
    assert [c.amount for c in ctx.admission.reservation.charges] == [SMALL_PROMPT + 8]
    with pytest.raises(GatewayError) as refused:
        await _admitter(LimitPolicy(max_tokens_ceiling=8)).admit(
            _context({**SMALL, "max_tokens": 500})
        )
    assert (refused.value.status, refused.value.code) == (400, "MaxTokensCeilingExceeded")


async def test_a_refusal_raises_with_the_limits_headers() -> None:
    admitter = _admitter(LimitPolicy(tokens_per_minute=20))
    await admitter.admit(_context(SMALL))
    ctx = _context(SMALL)
    with pytest.raises(GatewayError) as refused:
        await admitter.admit(ctx)
    assert refused.value.status == 429
    assert dict(refused.value.headers)["retry-after-ms"] == "5000"  # the first is in flight


def _with_overrides(overrides: dict[str, Any], updated_at: float = 1.0) -> Subscription:
    sub = _subscription()
    return Subscription(
        sub.id, sub.name, sub.owner, sub.product, sub.state,
        sub.primary_key_hash, sub.secondary_key_hash, sub.primary_key_prefix,
        sub.secondary_key_prefix, sub.created_at, updated_at, overrides=overrides,
    )  # fmt: skip


async def test_without_product_limits_only_overrides_ask_for_work() -> None:
    """A gateway whose products have no limits still admits through the admitter (the
    overrides of any subscription may set some). A subscription without overrides costs
    nothing: no plan is worked out (the cache stays empty) and nothing is reserved."""
    admitter = LimitsAdmitter(Limiter(MemoryStore(), FakeClock()), {"p": ()})
    ctx = _context(SMALL)
    await admitter.admit(ctx)
    assert ctx.admission is None and admitter._cache == {}
    ctx = _context(SMALL)
    ctx.subscription = _with_overrides({"limits": {"tokens_per_minute": 20}})
    await admitter.admit(ctx)
    assert ctx.admission is not None
    assert dict(ctx.admission.headers())["x-ratelimit-limit-tokens"] == "20"
    with pytest.raises(GatewayError) as refused:
        await admitter.admit(ctx)
    assert (refused.value.status, refused.value.code) == (429, "TokenRateLimitExceeded")


async def test_an_invalid_override_falls_back_to_the_products_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Once per subscription version: the plan is cached under it."""
    product = LimitPolicy(tokens_per_minute=1000)
    admitter = _admitter(product)
    typo = _with_overrides({"limits": {"tokens_per_minute": "lots"}})
    assert admitter.policies_for(typo) == (product,)
    assert admitter.policies_for(typo) == (product,)
    assert len(caplog.records) == 1
    assert caplog.records[0].levelno == logging.WARNING
    assert "tokens_per_minute: Input should be a valid integer" in caplog.records[0].getMessage()
    changed = _with_overrides({"limits": {"tokens_per_minute": "lots"}}, updated_at=2.0)
    assert admitter.policies_for(changed) == (product,)
    assert len(caplog.records) == 2
    fixed = _with_overrides({"limits": {"tokens_per_minute": 50}}, updated_at=3.0)
    assert admitter.policies_for(fixed) == (LimitPolicy(tokens_per_minute=50),)
    assert len(caplog.records) == 2


async def test_a_quota_counter_counts_from_the_creating_requests_arrival() -> None:
    """The admitter passes the request's arrival (``ctx.ts``, its ledger record's ``ts``) to
    the limiter: the quota counter it creates has that ``since``, not the admission's time,
    so that the ledger's seed (records before ``since``) never holds this request too."""
    store = MemoryStore()
    created: list[str] = []
    store.quota_created = created.append
    clock = FakeClock(start=1_700_000_000.25)
    policy = LimitPolicy(token_quota=10_000, token_quota_period="monthly")
    admitter = LimitsAdmitter(Limiter(store, clock), {"p": (policy,)})
    ctx = _context(SMALL)
    ctx.ts = clock.now() - 0.05  # arrived 50 ms before its admission
    await admitter.admit(ctx)
    assert len(created) == 1
    origin = await store.quota_origin(created[0])
    assert origin is not None and origin.since_ms == 1_700_000_000_200
