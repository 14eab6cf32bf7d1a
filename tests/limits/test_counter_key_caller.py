"""Limits per end user: ``counter_key: header`` (a request header such as ``x-user-id``,
scoped within the subscription) and ``counter_key: caller`` (the Entra ID caller's ``oid``).

A real gateway (embedded, and in cluster mode over real Redis and PostgreSQL for the header
key) in front of the simulator, called with the real ``openai`` SDK; Entra ID tokens come from
the test identity provider (tests/support/idp.py).
"""

from __future__ import annotations

import contextlib
import secrets
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam
from pydantic import ValidationError

from sluicegate.limits.policy import LimitPolicy, header_key_value, resolve_counter_key
from sluicegate.simulator.server import SimulatorThread
from tests.auth.harness import API_VERSION, EntraHarness, entra_gateway
from tests.support.idp import TestIdentityProvider
from tests.support.pg import throwaway_database

REDIS_URL = "redis://127.0.0.1:6379/0"
APP_A = str(uuid.uuid4())
APP_B = str(uuid.uuid4())

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def idp() -> Iterator[TestIdentityProvider]:
    with TestIdentityProvider() as provider:
        yield provider


def _keyed(h: EntraHarness, name: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=h.url, api_key=h.keys[name], api_version=API_VERSION, max_retries=0
    )


def _status(client: openai.AzureOpenAI, user: str | None, max_tokens: int = 2) -> int:
    """The status of one chat completion, sent with ``x-user-id: user`` (none when None)."""
    headers = {"x-user-id": user} if user is not None else {}
    try:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=max_tokens, extra_headers=headers
        )
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


@contextlib.contextmanager
def _gateway(
    tmp: Path, sim: SimulatorThread, store: str, products: list[dict[str, Any]]
) -> Iterator[tuple[EntraHarness, Callable[[], set[str]] | None]]:
    """The gateway with subscriptions ``team-a`` and ``team-b`` of ``starter``; with the
    ``redis`` store (cluster mode), also a function listing the names of its counters in
    Redis (its keys are deleted afterwards)."""
    subs = {"team-a": "starter", "team-b": "starter"}
    if store == "memory":
        with entra_gateway(tmp, sim, None, subscriptions=subs, products=products) as h:
            yield h, None
        return
    prefix = f"sgt{secrets.token_hex(4)}:"
    client = redis.Redis.from_url(REDIS_URL)

    def counter_names() -> set[str]:
        # The limiter's keys are "<redis prefix>:limits:<counter name>".
        return {
            key.decode().split(":limits:", 1)[1]
            for key in client.scan_iter(match=f"{prefix}*:limits:*", count=500)
        }

    try:
        with (
            throwaway_database() as db_url,
            entra_gateway(
                tmp,
                sim,
                None,
                subscriptions=subs,
                products=products,
                mode="cluster",
                storage_url=db_url,
                redis={"url": REDIS_URL, "prefix": prefix},
            ) as h,
        ):
            yield h, counter_names
    finally:
        keys = list(client.scan_iter(match=prefix + "*", count=500))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_header_counter_key_limits_each_user_within_the_subscription(
    tmp_path: Path, simulator: SimulatorThread, store: str
) -> None:
    """RPM 2 keyed by ``x-user-id``: alice's third request is refused, bob (same key) still
    has his two; alice of another subscription is another counter; a request without the
    header (or with an empty one) spends the subscription's own counter; a long value is
    hashed into a bounded key name, distinct from its prefix."""
    products = [
        {
            "name": "starter",
            "deployments": ["*"],
            "limits": {
                "requests_per_minute": 2,
                "counter_key": "header",
                "counter_header": "X-User-Id",  # any letter case: names are lower-cased
            },
        }
    ]
    with _gateway(tmp_path, simulator, store, products) as (h, counter_names):
        a, b = _keyed(h, "team-a"), _keyed(h, "team-b")
        assert [_status(a, "alice") for _ in range(3)] == [200, 200, 429]
        assert [_status(a, "bob") for _ in range(3)] == [200, 200, 429]
        # The same value under another subscription: its own counter.
        assert [_status(b, "alice") for _ in range(3)] == [200, 200, 429]
        # No header, or an empty one: the subscription's counter, not alice's nor bob's.
        assert [_status(a, None), _status(a, ""), _status(a, None)] == [200, 200, 429]
        # A value beyond 128 characters is hashed: its own counter, not its prefix's.
        long_value = "u" * 300
        assert [_status(a, long_value) for _ in range(3)] == [200, 200, 429]
        assert [_status(a, long_value[:128]) for _ in range(3)] == [200, 200, 429]
        records = h.records(expect=18)
        names = counter_names() if counter_names is not None else None
    assert sorted(r.status for r in records) == [200] * 12 + [429] * 6
    if names is not None:  # the same counters, by name, in Redis
        sub_a, sub_b = h.subs["team-a"], h.subs["team-b"]
        counters = {name for name in names if name.endswith(":rpm")}
        assert counters == {
            f"hdr:{sub_a}:x-user-id:alice:rpm",
            f"hdr:{sub_a}:x-user-id:bob:rpm",
            f"hdr:{sub_b}:x-user-id:alice:rpm",
            f"sub:{sub_a}:rpm",
            f"hdr:{sub_a}:x-user-id:{'u' * 128}:rpm",
            next(n for n in counters if ":sha256:" in n),
        }
        assert max(len(n) for n in counters) < 200


def test_caller_counter_key_limits_each_entra_id_caller(
    tmp_path: Path, simulator: SimulatorThread, idp: TestIdentityProvider
) -> None:
    """TPM keyed by the caller: two Entra ID users (different ``oid``) of one subscription
    are limited separately; one user calling through two subscriptions spends one counter
    (shared wherever the key is used); a key client without a token spends the
    subscription's counter."""
    products = [
        {
            "name": "starter",
            "deployments": ["*"],
            "limits": {"tokens_per_minute": 150, "counter_key": "caller"},
        }
    ]

    def rules(ids: dict[str, str]) -> list[dict[str, Any]]:
        return [
            {"app_ids": [APP_A], "subscription": ids["team-a"]},
            {"app_ids": [APP_B], "subscription": ids["team-b"]},
        ]

    subs = {"team-a": "starter", "team-b": "starter"}
    with entra_gateway(
        tmp_path, simulator, idp, subscriptions=subs, rules=rules, products=products
    ) as h:
        user_1, user_2 = str(uuid.uuid4()), str(uuid.uuid4())
        one = h.azure(idp.issue(azp=APP_A, oid=user_1))
        two = h.azure(idp.issue(azp=APP_A, oid=user_2))
        # Each request reserves its prompt and 100 completion tokens, and is charged about
        # as much: the second of one caller does not fit in 150.
        assert [_status(one, None, 100), _status(one, None, 100)] == [200, 429]
        assert [_status(two, None, 100), _status(two, None, 100)] == [200, 429]
        # user_1 through team-b's application: the same caller counter, already spent.
        assert _status(h.azure(idp.issue(azp=APP_B, oid=user_1)), None, 100) == 429
        # A subscription key (no token): team-a's subscription counter.
        keyed = _keyed(h, "team-a")
        assert [_status(keyed, None, 100), _status(keyed, None, 100)] == [200, 429]
        records = h.records(expect=7)
    assert sorted((r.caller or "", r.status) for r in records) == sorted(
        [
            ("", 200),
            ("", 429),
            (user_1, 200),
            (user_1, 429),
            (user_1, 429),
            (user_2, 200),
            (user_2, 429),
        ]
    )


def test_header_key_configuration_and_bounds() -> None:
    """``counter_header`` goes with ``counter_key: header`` and only with it; the header's
    name is lower-cased; a value is kept when short and visible ASCII, hashed otherwise,
    and an empty one is no value (the subscription counter)."""
    with pytest.raises(ValidationError, match="counter_header must be set"):
        LimitPolicy(requests_per_minute=1, counter_key="header")
    with pytest.raises(ValidationError, match="counter_header must be set"):
        LimitPolicy(requests_per_minute=1, counter_header="x-user-id")
    with pytest.raises(ValidationError, match="not a valid HTTP header name"):
        LimitPolicy(requests_per_minute=1, counter_key="header", counter_header="x user")
    policy = LimitPolicy(requests_per_minute=1, counter_key="header", counter_header="X-User")
    assert policy.counter_header == "x-user"
    assert header_key_value(b"  alice@example.com ") == "alice@example.com"
    assert header_key_value(b" \t") is None
    assert header_key_value(b"a" * 128) == "a" * 128
    hashed = {header_key_value(v) for v in (b"a" * 129, b"a" * 130, "zoë".encode("latin-1"))}
    assert len(hashed) == 3
    assert all(h is not None and h.startswith("sha256:") and len(h) == 39 for h in hashed)
    key = resolve_counter_key(policy, subscription_id="sub_1", header_value="alice")
    assert key == "hdr:sub_1:x-user:alice"
    assert resolve_counter_key(policy, subscription_id="sub_1") == "sub:sub_1"
    caller = LimitPolicy(requests_per_minute=1, counter_key="caller")
    assert resolve_counter_key(caller, subscription_id="sub_1", caller="oid-1") == "caller:oid-1"
    assert resolve_counter_key(caller, subscription_id="sub_1") == "sub:sub_1"
