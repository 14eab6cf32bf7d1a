"""The client address behind trusted proxies, product allow-lists and the body deadline."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sluicegate.proxy.asgi import Message
from sluicegate.proxy.deadlines import TICK, Deadlines
from sluicegate.proxy.errors import GatewayError
from sluicegate.proxy.network import NetworkPolicy


def _scope(peer: str | None, *xff: str) -> dict[str, Any]:
    return {
        "client": None if peer is None else (peer, 50000),
        "headers": [(b"x-forwarded-for", v.encode()) for v in xff],
    }


def test_forwarded_for_from_untrusted_peers_is_ignored() -> None:
    policy = NetworkPolicy()
    assert policy.client_ip(_scope("198.51.100.1", "203.0.113.9")) == "198.51.100.1"
    policy = NetworkPolicy(["10.0.0.0/8"])
    assert policy.client_ip(_scope("198.51.100.1", "203.0.113.9")) == "198.51.100.1"
    assert policy.client_ip(_scope(None, "203.0.113.9")) is None


def test_rightmost_untrusted_hop_is_the_client() -> None:
    policy = NetworkPolicy(["10.0.0.0/8", "2001:db8::/32"])
    assert policy.client_ip(_scope("10.0.0.1", "203.0.113.9")) == "203.0.113.9"
    # several headers are one list, in order
    assert policy.client_ip(_scope("10.0.0.1", "1.1.1.1, 203.0.113.9", "10.2.2.2")) == (
        "203.0.113.9"
    )
    # the client prepended a fake hop: ignored, the proxy's appended address wins
    assert policy.client_ip(_scope("10.0.0.1", "10.9.9.9, 198.51.100.7")) == "198.51.100.7"
    # only proxies in the chain: the leftmost is as far as we can see
    assert policy.client_ip(_scope("10.0.0.1", "10.3.3.3, 10.4.4.4")) == "10.3.3.3"
    # IPv6, bracketed with a port, v4 with a port, v4-mapped v6
    assert policy.client_ip(_scope("2001:db8::1", "[2001:db9::5]:443")) == "2001:db9::5"
    assert policy.client_ip(_scope("10.0.0.1", "203.0.113.9:5555")) == "203.0.113.9"
    assert policy.client_ip(_scope("::ffff:10.0.0.1", "203.0.113.9")) == "203.0.113.9"
    # garbage stops the walk at the last hop we could trust
    assert policy.client_ip(_scope("10.0.0.1", "203.0.113.9, not-an-ip")) == "10.0.0.1"
    assert policy.client_ip(_scope("10.0.0.1", "not-an-ip, 198.51.100.2")) == "198.51.100.2"
    assert policy.client_ip(_scope("10.0.0.1", "")) == "10.0.0.1"
    assert policy.client_ip(_scope("10.0.0.1")) == "10.0.0.1"


def test_product_allow_lists() -> None:
    policy = NetworkPolicy(allowed_ips={"private": ["10.0.0.0/8", "2001:db8::/32"], "open": None})
    policy.check_product("private", "10.1.2.3")
    policy.check_product("private", "2001:db8::7")
    policy.check_product("open", "203.0.113.1")
    policy.check_product("unknown-product", "203.0.113.1")
    for outside in ("203.0.113.1", "2001:db9::1", None, "garbage"):
        with pytest.raises(GatewayError) as info:
            policy.check_product("private", outside)
        assert (info.value.status, info.value.code) == (403, "IpForbidden")


async def test_body_deadline_passes_a_prompt_body_through() -> None:
    messages: list[Message] = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"c", "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        return messages.pop(0)

    guarded = NetworkPolicy(body_timeout=5).body_deadline(receive, Deadlines())
    assert (await guarded())["body"] == b"ab"
    assert (await guarded())["body"] == b"c"
    assert (await guarded())["type"] == "http.disconnect"


async def test_body_deadline_applies_to_the_body_only() -> None:
    stalled = asyncio.Event()

    async def never() -> Message:
        await stalled.wait()
        raise AssertionError("unreachable")

    guarded = NetworkPolicy(body_timeout=0.01).body_deadline(never, Deadlines())
    with pytest.raises(GatewayError) as info:
        await guarded()
    assert (info.value.status, info.value.code) == (408, "RequestTimeout")
    assert ("connection", "close") in info.value.headers

    # once the body is complete, later receives (disconnect watching) wait as long as needed
    queue: asyncio.Queue[Message] = asyncio.Queue()
    await queue.put({"type": "http.request", "body": b"", "more_body": False})
    guarded = NetworkPolicy(body_timeout=0.01).body_deadline(queue.get, Deadlines())
    await guarded()
    later = asyncio.ensure_future(guarded())
    await asyncio.sleep(0.01 + 3 * TICK)  # well past the deadline and its sweep
    assert not later.done()
    await queue.put({"type": "http.disconnect"})
    assert (await later)["type"] == "http.disconnect"
