"""A half-open probe's verdict waits for its answer's body, and what a request gets while the
probe is out (a real gateway over a scripted backend, plus the router on a fake clock).

A probe whose head is 200 and whose body then breaks off (a JSON body cut short, a stream
torn before its first whole event) is a failed probe: the breaker opens again at once, for
twice as long, instead of taking the backend back and counting the break as a closed
breaker's first failure. A stream's probe gives its verdict with its first whole event, so a
long stream still does not hold the slot (and a break after it still fails the probe). A
body that breaks off in a closed breaker still counts as one failure. While the probe is
out, a request that nothing else can take gets what it got while the breaker was open: 429
after a throttle, 503 after failures, each with a ``Retry-After``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sluicegate.clock import FakeClock
from sluicegate.routing.breaker import BreakerSettings, BreakerState
from sluicegate.routing.pool import Member
from sluicegate.routing.retry import Outcome
from sluicegate.routing.router import Router, RouterSettings
from tests.routing.harness import Routed, body, one_member_pool, post_chat
from tests.routing.scripted import Answer, ScriptedBackend

KEY = "only/gpt-4o"  # the one member's target: backend/deployment


def _over(
    tmp: Path, backend: ScriptedBackend, breaker: dict[str, Any], started: list[Any]
) -> Routed:
    """A gateway whose deployment gpt-4o is a one-member pool over ``backend``, with no
    wait-and-retry (each request is one attempt) and these breaker settings."""
    routing = {"retry": {"wait_same": False}, "circuit_breaker": breaker}
    return one_member_pool(tmp, backend, routing, started)


def _breaker(routed: Routed) -> str:
    return routed.gw.gateway.router.targets[KEY].breaker.describe(time.time())


def _half_open_after(routed: Routed, status: int) -> None:
    """The first request's answer (``status``, with ``retry-after-ms: 300``) opens the
    breaker, tripping on the first failure; return when it is half-open."""
    r = post_chat(routed)
    assert r.status_code == status, r.text
    time.sleep(0.4)
    assert _breaker(routed) == "half-open"


def _reopened_by_the_probe(routed: Routed, backend: ScriptedBackend) -> None:
    """The breaker is open again after the probe (hit 2) failed, as a failed probe leaves it:
    its second trip, twice trip_seconds (5 s), for the body that broke; a new request is
    refused without reaching the backend."""
    state = routed.states()["only"]
    assert (state["state"], state["trips"], state["open_reason"]) == ("open", 2, "broken"), (
        _breaker(routed)
    )
    assert 9.0 < state["open_until"] - time.time() <= 10.0
    after = post_chat(routed)
    assert after.status_code == 503, after.text
    assert after.json()["error"]["code"] == "BackendUnavailable"
    assert len(backend.hits) == 2, "the backend was taken back after its probe broke off"


_BREAKER = {"failures": 3, "trip_seconds": 5, "max_trip_seconds": 60}


def test_a_probe_whose_json_body_breaks_off_opens_the_breaker_again(
    tmp_path: Path, started: list[Any]
) -> None:
    """The probe's head is 200 and its JSON body stops half-way (the connection closes short
    of its content-length): the probe failed, and the breaker opens again at once."""

    def script(n: int) -> Answer:
        if n == 1:
            return Answer(429, {"retry-after-ms": "300"})
        if n == 2:
            return Answer(torn=True)
        return Answer()

    backend = ScriptedBackend(script)
    routed = _over(tmp_path, backend, _BREAKER, started)
    _half_open_after(routed, 429)
    probe = post_chat(routed)
    assert probe.status_code == 503, probe.text  # nothing reached the client: refused
    _reopened_by_the_probe(routed, backend)


def test_a_probe_stream_torn_before_its_first_event_opens_the_breaker_again(
    tmp_path: Path, started: list[Any]
) -> None:
    """The probe's head is 200 (a stream) and the connection closes in the middle of its
    first event: the client gets the head and the error event, and the breaker opens again
    at once."""

    def script(n: int) -> Answer:
        if n == 1:
            return Answer(429, {"retry-after-ms": "300"})
        if n == 2:
            return Answer(stream=True, torn=True)
        return Answer()

    backend = ScriptedBackend(script)
    routed = _over(tmp_path, backend, _BREAKER, started)
    _half_open_after(routed, 429)
    with httpx.stream(
        "POST", routed.chat_url(), json=body(5, stream=True),
        headers={"api-key": routed.key}, timeout=30,
    ) as probe:  # fmt: skip
        text = probe.read().decode()
    # Whether the tear came with the first read (refused, 503) or after it (relayed, then
    # the error event) is up to the loopback's timing; the breaker's verdict is the same.
    if probe.status_code == 200:
        assert '"code":"StreamInterrupted"' in text, text
    else:
        assert probe.status_code == 503, text
    _reopened_by_the_probe(routed, backend)


def test_a_json_probe_holds_the_slot_until_its_body_is_in(
    tmp_path: Path, started: list[Any]
) -> None:
    """The probe's head comes at once and its body only when the test says: the backend is
    taken back when the body is in, not with the head (a request meanwhile is told to come
    back), and a whole body closes the breaker."""
    body_sent = threading.Event()

    def script(n: int) -> Answer:
        if n == 1:
            return Answer(429, {"retry-after-ms": "300"})
        if n == 2:
            return Answer(hold_body=body_sent)
        return Answer()

    backend = ScriptedBackend(script)
    routed = _over(tmp_path, backend, _BREAKER, started)
    _half_open_after(routed, 429)
    probe: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: probe.append(post_chat(routed)), daemon=True)
    thread.start()
    _wait_for(lambda: len(backend.hits) == 2 and backend.hits[1].answered is not None)
    during = post_chat(routed)
    body_sent.set()
    thread.join(30)
    assert [r.status_code for r in probe] == [200]
    assert during.status_code == 429, during.text
    assert len(backend.hits) == 2
    assert _breaker(routed).startswith("closed")


def test_a_body_that_breaks_off_in_a_closed_breaker_counts_as_one_failure(
    tmp_path: Path, started: list[Any]
) -> None:
    """Unchanged for a closed breaker: a JSON body cut short and a stream torn before its
    first event are one failure each, toward the trip at ``failures``."""

    def script(n: int) -> Answer:
        return Answer(torn=True) if n == 1 else Answer(stream=True, torn=True)

    backend = ScriptedBackend(script)
    routed = _over(tmp_path, backend, {"failures": 3}, started)
    assert post_chat(routed).status_code == 503
    assert _breaker(routed) == "closed (failures=1, throttles=0)"
    with httpx.stream(
        "POST", routed.chat_url(), json=body(5, stream=True),
        headers={"api-key": routed.key}, timeout=30,
    ) as resp:  # fmt: skip
        resp.read()
    assert _breaker(routed) == "closed (failures=2, throttles=0)"
    assert routed.states()["only"]["trips"] == 0


@pytest.mark.parametrize(
    ("tripped_by", "status", "code"), [(429, 429, "429"), (500, 503, "BackendUnavailable")]
)
def test_while_the_probe_is_out_a_request_gets_what_it_got_while_the_breaker_was_open(
    tmp_path: Path, started: list[Any], tripped_by: int, status: int, code: str
) -> None:
    """A one-member pool's breaker is half-open and its probe is out: a request meanwhile is
    refused as it was while the breaker was open (429 after a throttle, 503 after a
    failure), told to come back in a second, and does not reach the backend."""
    answered = threading.Event()

    def script(n: int) -> Answer:
        if n == 1:
            return Answer(tripped_by, {"retry-after-ms": "300"})
        if n == 2:
            return Answer(hold=answered)
        return Answer()

    backend = ScriptedBackend(script)
    routed = _over(tmp_path, backend, {"failures": 1, "trip_seconds": 0.3}, started)
    while_open = post_chat(routed)
    assert (while_open.status_code, while_open.json()["error"]["code"]) == (status, code)
    time.sleep(0.4)
    assert _breaker(routed) == "half-open"
    probe: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: probe.append(post_chat(routed)), daemon=True)
    thread.start()
    _wait_for(lambda: len(backend.hits) == 2)
    during = post_chat(routed)
    answered.set()
    thread.join(30)
    assert [r.status_code for r in probe] == [200]
    assert (during.status_code, during.json()["error"]["code"]) == (status, code), during.text
    assert (during.headers["retry-after"], during.headers["retry-after-ms"]) == ("1", "1000")
    assert len(backend.hits) == 2


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --- the router on a fake clock -------------------------------------------------------------

PTU = Member("ptu", "gpt-4o", priority=1, kind="ptu")
PAYGO = Member("paygo", "gpt-4o", priority=2)


def _router(failures: int = 1) -> tuple[Router, FakeClock]:
    clock = FakeClock()
    breaker = BreakerSettings(failures=failures, throttles=1, trip=5.0, max_trip=60.0)
    router = Router(RouterSettings(breaker=breaker), clock)
    router.add_pool("gpt-4o", [PTU, PAYGO])
    return router, clock


def test_a_probe_head_keeps_the_slot_until_its_body_says() -> None:
    """A 200 head is no verdict: the probe keeps its slot; its end gives the verdict — a
    body that broke off opens the breaker again for twice the trip, a whole one closes it;
    a stream's first whole event closes it at once, until the stream breaks off."""
    router, clock = _router(failures=2)
    ptu = router.targets[PTU.key]
    for _ in range(2):
        router.failed(router.begin(ptu, 1), Outcome(None, "connection"))
    clock.advance(5.0)
    probe = router.begin(ptu, 1)
    router.probe_head(probe, 200)
    assert probe.probe and not ptu.breaker.available(clock.now()), "no verdict yet"
    router.failed(probe, Outcome(None, "broken"))
    assert ptu.breaker.open_until - clock.now() == 10.0 and ptu.breaker.trips == 2
    clock.advance(10.0)
    probe = router.begin(ptu, 1)
    router.probe_head(probe, 200)
    router.succeeded(probe, 200)
    assert ptu.breaker.state(clock.now()) is BreakerState.CLOSED
    for _ in range(2):
        router.failed(router.begin(ptu, 1), Outcome(500))
    clock.advance(5.0)
    probe = router.begin(ptu, 1)
    router.probe_head(probe, 200)
    router.probe_streaming(probe, 200)
    assert not probe.probe and ptu.breaker.state(clock.now()) is BreakerState.CLOSED
    assert ptu.in_flight == 1, "still relaying"
    router.failed(probe, Outcome(None, "broken"))  # the stream broke off later: it failed
    assert ptu.breaker.describe(clock.now()) == "open for 10.0s (broken)"
    assert ptu.in_flight == 0


def test_refusal_while_a_probe_is_out_follows_the_trip() -> None:
    """A member half-open with its probe out counts as it did while open: throttled after a
    429 (so a pool whose other members are throttled too answers 429), down after a
    failure; its wait is a second."""
    router, clock = _router()
    ptu, paygo = router.targets[PTU.key], router.targets[PAYGO.key]
    router.failed(router.begin(ptu, 1), Outcome(429, retry_after=2.0))
    router.failed(router.begin(paygo, 1), Outcome(429, retry_after=30.0))
    pool = router.pools["gpt-4o"]
    assert (router.refusal(pool, {}).status, router.refusal(pool, {}).retry_after) == (429, 2.0)
    clock.advance(2.0)
    assert router.begin(ptu, 1).probe
    assert router.choose(pool, 1) is None
    refusal = router.refusal(pool, {})
    assert (refusal.status, refusal.code, refusal.retry_after) == (429, "429", 1.0)
    router, clock = _router()
    ptu, paygo = router.targets[PTU.key], router.targets[PAYGO.key]
    router.failed(router.begin(ptu, 1), Outcome(500))
    router.failed(router.begin(paygo, 1), Outcome(429, retry_after=30.0))
    clock.advance(5.0)
    assert router.begin(ptu, 1).probe
    pool = router.pools["gpt-4o"]
    assert router.choose(pool, 1) is None
    refusal = router.refusal(pool, {})
    assert (refusal.status, refusal.code, refusal.retry_after) == (503, "BackendUnavailable", 1.0)
