"""A stream that the backend breaks off after its first events counts against the backend; one
its client leaves does not (a real gateway over a loopback backend that resets its
connections, plus the router on a fake clock).

* The half-open probe's stream closes the breaker with its first event (so a long stream does
  not keep the backend out meanwhile), but only on probation: if the backend then resets the
  connection, the probe failed after all and the breaker opens again at once, for twice the
  trip, as for any failed probe — in embedded mode and in cluster mode, whose other instances
  learn of the new trip through Redis.
* In a closed breaker, each stream the backend breaks off is one failure toward
  ``failures``: a backend that resets every stream after its first event is failing.
* A client that hangs up mid-stream is no verdict on the backend, probe or not.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from sluicegate.clock import FakeClock
from sluicegate.routing.breaker import BreakerSettings, BreakerState
from sluicegate.routing.pool import Member
from sluicegate.routing.retry import Outcome
from sluicegate.routing.router import Router, RouterSettings
from sluicegate.routing.state import MemoryStateStore
from tests.integration.wire_backend import (
    Request,
    WireBackend,
    chunk,
    content_event,
    head,
    wait_for,
)
from tests.routing.harness import REDIS_URL, Routed, body, one_member_gateway
from tests.support.pg import throwaway_database

KEY = "only/gpt-4o"  # the one member's target: backend/deployment
#: Trips on the first 429 (for its retry-after), else after three failures; a failed probe
#: after that first trip opens it for twice ``trip_seconds``: 10 s.
BREAKER = {"failures": 3, "trip_seconds": 5, "max_trip_seconds": 60}


async def _throttle(writer: asyncio.StreamWriter) -> None:
    """A 429 that asks for 300 ms: the breaker opens for that long."""
    data = b'{"error": {"code": "429", "message": "scripted throttle"}}'
    writer.write(
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
        b"retry-after-ms: 300\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data)
    )
    await writer.drain()


async def _events_then_reset(writer: asyncio.StreamWriter, events: int = 1) -> bool:
    """A 200 stream of ``events`` content events, then (once the gateway has relayed them) a
    connection reset, as a backend that died mid-answer: no usage, no ``[DONE]``."""
    writer.write(head(200, "text/event-stream"))
    for i in range(events):
        writer.write(chunk(content_event(f"w{i} ")))
    await writer.drain()
    await asyncio.sleep(0.3)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # with SO_LINGER 0: an RST, not a FIN
    return False


async def _whole_stream(writer: asyncio.StreamWriter) -> None:
    writer.write(head(200, "text/event-stream"))
    writer.write(chunk(content_event("ok ") + b"data: [DONE]\n\n"))
    writer.write(chunk(b""))
    await writer.drain()


async def _events_until_hung_up(writer: asyncio.StreamWriter) -> bool:
    """A 200 stream that goes on (an event every 50 ms, for at most 10 s) until the gateway
    hangs up."""
    writer.write(head(200, "text/event-stream"))
    for i in range(200):
        writer.write(chunk(content_event(f"w{i} ")))
        await writer.drain()  # raises ConnectionError once the gateway has hung up
        await asyncio.sleep(0.05)
    return False


@pytest.fixture(params=["embedded", "cluster"])
def mode(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The gateway's mode: embedded (breakers in the router alone) or cluster (trips shared
    through Redis, the ledger in PostgreSQL), as extra ``gateway_config`` settings. Ask for
    it before ``started``, so that the gateway stops before its database is dropped."""
    if request.param == "embedded":
        yield {}
        return
    prefix = f"sgtest-{os.urandom(6).hex()}"
    with throwaway_database() as pg_url:
        yield {
            "mode": "cluster",
            "storage_url": pg_url,
            "redis": {"url": REDIS_URL, "prefix": prefix},
        }
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(f"{prefix}:routing:targets")
    client.close()


def _gateway(
    tmp: Path,
    backend: WireBackend,
    started: list[Any],
    breaker: dict[str, Any],
    mode: dict[str, Any] | None = None,
) -> Routed:
    """A gateway whose deployment gpt-4o is a one-member pool over ``backend`` (which must be
    serving), with no wait-and-retry (each request is one attempt); stopped at the end."""
    routing = {"retry": {"wait_same": False}, "circuit_breaker": breaker, "sync_seconds": 0.1}
    return one_member_gateway(tmp, backend.url, routing, started, **(mode or {}))


def _breaker(routed: Routed) -> str:
    return routed.gw.gateway.router.targets[KEY].breaker.describe(time.time())


def _stream(routed: Routed) -> tuple[int, str]:
    """A streamed chat request read to its end: (status, body)."""
    with httpx.stream(
        "POST", routed.chat_url(), json=body(5, stream=True),
        headers={"api-key": routed.key}, timeout=30,
    ) as resp:  # fmt: skip
        return resp.status_code, resp.read().decode()


def _half_open_after_a_throttle(routed: Routed) -> None:
    r = httpx.post(routed.chat_url(), json=body(5), headers={"api-key": routed.key}, timeout=30)
    assert r.status_code == 429, r.text
    time.sleep(0.4)
    assert _breaker(routed) == "half-open"


def test_a_probe_stream_that_the_backend_resets_after_its_first_event_opens_the_breaker_again(
    tmp_path: Path, mode: dict[str, Any], started: list[Any]
) -> None:
    """The probe's stream relays its first event (which closed the breaker: the backend was
    taken back), then the backend resets the connection: the client gets the error event,
    and the breaker is open again at once, for twice the trip, as after any failed probe — a
    new request is refused without reaching the backend. In cluster mode the new trip is in
    Redis for the other instances."""

    async def handler(request: Request, writer: asyncio.StreamWriter) -> bool | None:
        n = len(backend.requests)
        if n == 1:
            await _throttle(writer)
            return None
        if n == 2:
            return await _events_then_reset(writer)
        await _whole_stream(writer)
        return None

    backend = WireBackend(handler)
    with backend.running():
        routed = _gateway(tmp_path, backend, started, BREAKER, mode)
        _half_open_after_a_throttle(routed)
        status, text = _stream(routed)
        assert status == 200
        assert "w0 " in text, text
        assert '"code":"StreamInterrupted"' in text, text
        state = routed.states()["only"]
        assert (state["state"], state["trips"], state["open_reason"]) == ("open", 2, "broken"), (
            _breaker(routed)
        )
        until = state["open_until"]
        assert 9.0 < until - time.time() <= 10.0
        after = httpx.post(
            routed.chat_url(), json=body(5), headers={"api-key": routed.key}, timeout=30
        )
        assert after.status_code == 503, after.text
        assert after.json()["error"]["code"] == "BackendUnavailable"
        assert len(backend.requests) == 2, "the backend was taken back after its probe broke"
        if mode:
            _assert_shared_trip(mode["redis"]["prefix"], until)


def _assert_shared_trip(prefix: str, until: float) -> None:
    """The trip ending at ``until`` reaches the cluster's hash within a few sync rounds."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        deadline = time.monotonic() + 5
        while True:
            raw = client.hget(f"{prefix}:routing:targets", f"trip:{KEY}")
            shared = orjson.loads(raw) if raw else {}
            if shared.get("until") == until or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert shared == {"until": until, "reason": "broken", "t": False}
    finally:
        client.close()


def test_streams_the_backend_resets_count_toward_the_trip_of_a_closed_breaker(
    tmp_path: Path, started: list[Any]
) -> None:
    """A backend that resets every stream after its first event is failing: each such stream
    is one failure, and the third trips the breaker (``failures: 3``); the next request is
    refused without reaching the backend."""

    async def handler(request: Request, writer: asyncio.StreamWriter) -> bool:
        return await _events_then_reset(writer)

    backend = WireBackend(handler)
    with backend.running():
        routed = _gateway(tmp_path, backend, started, BREAKER)
        for failures in (1, 2):
            status, text = _stream(routed)
            assert status == 200 and '"code":"StreamInterrupted"' in text, text
            assert _breaker(routed) == f"closed (failures={failures}, throttles=0)"
        status, text = _stream(routed)
        assert status == 200 and '"code":"StreamInterrupted"' in text, text
        state = routed.states()["only"]
        assert (state["state"], state["trips"], state["open_reason"]) == ("open", 1, "broken")
        status, text = _stream(routed)
        assert status == 503, text
        assert len(backend.requests) == 3


def _hang_up_after_one_chunk(routed: Routed) -> None:
    """The real SDK streams a chat completion, takes one chunk and closes the stream (its
    connection goes with it)."""
    client = openai.AzureOpenAI(
        azure_endpoint=routed.url, api_key=routed.key, api_version="2024-10-21", max_retries=0
    )
    with client:
        stream = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        first = next(iter(stream))
        assert first.choices[0].delta.content == "w0 "
        stream.close()


@pytest.mark.parametrize("probe", [False, True], ids=["closed", "probe"])
def test_a_client_that_hangs_up_mid_stream_does_not_count_against_the_backend(
    tmp_path: Path, started: list[Any], probe: bool
) -> None:
    """The client leaves after the first chunk of a stream that goes on: the backend's
    connection is closed, and the breaker hears nothing against the backend — a closed one
    (tripping on the first failure) stays closed with no failure counted, and one whose probe
    it was stays closed (the probe's first event closed it); the next request reaches the
    backend."""

    async def handler(request: Request, writer: asyncio.StreamWriter) -> bool | None:
        n = len(backend.requests)
        if probe and n == 1:
            await _throttle(writer)
            return None
        if n == (2 if probe else 1):
            return await _events_until_hung_up(writer)
        await _whole_stream(writer)
        return None

    backend = WireBackend(handler)
    with backend.running():
        breaker = {**BREAKER, "failures": 1}
        routed = _gateway(tmp_path, backend, started, breaker)
        if probe:
            _half_open_after_a_throttle(routed)
        _hang_up_after_one_chunk(routed)
        wait_for(lambda: backend.hangups == 1, 10, "the gateway hangs up on the backend")
        wait_for(lambda: routed.gw.gateway.router.targets[KEY].in_flight == 0, 10)
        assert _breaker(routed) == "closed (failures=0, throttles=0)"
        assert routed.states()["only"]["trips"] == (1 if probe else 0)
        status, text = _stream(routed)
        assert status == 200 and "[DONE]" in text, text
        assert len(backend.requests) == (3 if probe else 2)


# --- the router on a fake clock -------------------------------------------------------------

PTU = Member("ptu", "gpt-4o", priority=1, kind="ptu")
PAYGO = Member("paygo", "gpt-4o", priority=2)


def _router(store: MemoryStateStore | None = None) -> tuple[Router, FakeClock]:
    clock = FakeClock()
    breaker = BreakerSettings(failures=2, throttles=1, trip=5.0, max_trip=60.0)
    router = Router(RouterSettings(breaker=breaker), clock, store)
    router.add_pool("gpt-4o", [PTU, PAYGO])
    if store is not None:
        store.subscribe(router.apply)
    return router, clock


def test_a_probe_stream_that_breaks_later_re_opens_the_breaker_for_twice_the_trip() -> None:
    """The probe's stream closes the breaker with its first event; while it goes on, requests
    flow; when it breaks off, the breaker opens again at once for twice the trip (and the
    doubling goes on from there), and a peer sharing the store is told. A probe stream that
    ends whole, or whose client leaves, leaves the breaker closed, and resets the doubling."""
    store = MemoryStateStore()
    router, clock = _router(store)
    peer, _ = _router(store)
    peer.clock = clock
    ptu = router.targets[PTU.key]
    for _ in range(2):
        router.failed(router.begin(ptu, 1), Outcome(500))
    assert ptu.breaker.open_until - clock.now() == 5.0
    clock.advance(5.0)
    probe = router.begin(ptu, 1)
    router.probe_streaming(probe, 200)
    assert ptu.breaker.state(clock.now()) is BreakerState.CLOSED
    other = router.begin(ptu, 1)  # taken back: traffic flows meanwhile
    router.succeeded(other, 200)
    clock.advance(1.0)
    router.failed(probe, Outcome(None, "broken"))
    assert ptu.breaker.open_until - clock.now() == 10.0 and ptu.breaker.trips == 2
    assert peer.targets[PTU.key].breaker.open_until == ptu.breaker.open_until
    clock.advance(10.0)
    probe = router.begin(ptu, 1)
    router.probe_streaming(probe, 200)
    router.failed(probe, Outcome(None, "broken"))
    assert ptu.breaker.open_until - clock.now() == 20.0, "a third failed probe in a row"
    for end in ("whole", "abandoned"):
        clock.advance(ptu.breaker.out_for(clock.now()))
        probe = router.begin(ptu, 1)
        router.probe_streaming(probe, 200)
        if end == "whole":
            router.succeeded(probe, 200)
        else:
            router.abandoned(probe)
        assert ptu.breaker.describe(clock.now()) == "closed (failures=0, throttles=0)"
        for _ in range(2):
            router.failed(router.begin(ptu, 1), Outcome(500))
        assert ptu.breaker.open_until - clock.now() == 5.0, "the doubling starts over"


def test_a_probe_stream_that_breaks_after_another_trip_is_a_stale_verdict() -> None:
    """Once something else opened the breaker after the probe's stream closed it (failures
    of requests meanwhile, or a peer's trip), the probe's later break is no probe's failure:
    it neither pushes the trip out nor re-opens a breaker that a newer probe closed."""
    router, clock = _router()
    ptu = router.targets[PTU.key]
    for _ in range(2):
        router.failed(router.begin(ptu, 1), Outcome(500))
    clock.advance(5.0)
    probe = router.begin(ptu, 1)
    router.probe_streaming(probe, 200)
    for _ in range(2):
        router.failed(router.begin(ptu, 1), Outcome(500))
    until = ptu.breaker.open_until
    assert until - clock.now() == 5.0
    router.failed(probe, Outcome(None, "broken"))
    assert ptu.breaker.open_until == until and ptu.breaker.trips == 2
    clock.advance(5.0)
    newer = router.begin(ptu, 1)
    router.probe_streaming(newer, 200)
    ptu.breaker.force_open(clock.now() + 3.0, "500", False, clock.now())  # a peer's trip
    clock.advance(3.0)
    third = router.begin(ptu, 1)
    router.succeeded(third, 200)  # a probe that answered whole
    router.failed(newer, Outcome(None, "broken"))
    assert ptu.breaker.describe(clock.now()) == "closed (failures=1, throttles=0)"
