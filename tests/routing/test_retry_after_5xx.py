"""A 5xx that says when to come back (a 503 "service busy" with ``retry-after``) is honoured as
a 429's wait is: it trips the breaker for that long (capped at ``max_trip_seconds``), a
one-member pool waits for it within ``max_wait_seconds``, and a refusal passes it on instead
of "retry after 1 s". End to end: a real gateway over the simulator (``x-sim-fault: 503:S``)
or scripted backends, the openai SDK as the client."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from sluicegate.clock import FakeClock
from sluicegate.routing.breaker import BreakerSettings, CircuitBreaker
from tests.integration.wire_backend import wait_for
from tests.routing.harness import Routed, pool_config, start_sim
from tests.routing.scripted import Answer, ScriptedBackend
from tests.support.gateway import gateway_config


def _client(routed: Routed, headers: dict[str, str] | None = None) -> openai.AzureOpenAI:
    # No SDK retries: the test reads the wait the gateway tells the client.
    return openai.AzureOpenAI(
        azure_endpoint=routed.url,
        api_key=routed.key,
        api_version="2024-10-21",
        max_retries=0,
        default_headers=headers or {},
    )


def _ask(client: openai.AzureOpenAI) -> Any:
    return client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )


def _scripted(tmp: Path, backends: dict[str, ScriptedBackend], started: list[Any]) -> Routed:
    """A gateway whose deployment gpt-4o pools ``backends`` (in order, one priority each)."""
    for backend in backends.values():
        backend.start()
        started.append(backend)
    pool = [{"backend": name, "priority": i + 1} for i, name in enumerate(backends)]
    data = gateway_config(
        tmp,
        {name: b.url for name, b in backends.items()},
        deployments=[{"name": "gpt-4o", "pool": pool, "model": "gpt-4o"}],
    )
    routed = Routed(data, {})
    started.insert(0, routed)
    return routed


def test_a_503_asking_for_longer_than_max_wait_is_passed_on_and_trips_the_breaker(
    tmp_path: Path, started: list[Any]
) -> None:
    """One-member pool, the backend's 503 asks for 30 s (more than max_wait_seconds, 10): the
    gateway gives up at once, and the client is told 30 s, not 1 s; the breaker keeps the
    backend out that long, so a second request does not reach it either."""
    sims = {"only": start_sim()}
    started.extend(sims.values())
    routed = Routed(pool_config(tmp_path, sims, [{"backend": "only"}]), sims)
    started.insert(0, routed)
    client = _client(routed, {"x-sim-fault": "503:30"})
    with pytest.raises(openai.InternalServerError) as refused:
        _ask(client)
    err = refused.value
    assert (err.status_code, err.code) == (503, "BackendUnavailable"), err.body
    assert err.response.headers["retry-after"] == "30"
    assert 29_000 < int(err.response.headers["retry-after-ms"]) <= 30_000
    state = routed.states()["only"]
    assert (state["state"], state["open_reason"], state["trips"]) == ("open", "503", 1)
    assert 29.0 <= state["open_until"] - time.time() <= 30.0
    assert len(routed.sim_log("only")) == 1  # one attempt: the wait was beyond max_wait

    with pytest.raises(openai.InternalServerError) as again:
        _ask(_client(routed))  # no fault asked: it would succeed, were it sent
    assert again.value.response.headers["retry-after"] in ("29", "30")
    assert len(routed.sim_log("only")) == 1, "nothing is sent into the open breaker"


def test_a_503_asking_for_a_short_wait_is_waited_for_and_retried(
    tmp_path: Path, started: list[Any]
) -> None:
    """One-member pool, a 503 with retry-after 2 (within max_wait): the request waits and is
    retried as the breaker's probe, which succeeds and closes it. Meanwhile the breaker is
    open, so another request is refused with the remaining wait instead of being sent to a
    backend that asked to be left alone."""
    backend = ScriptedBackend(lambda n: Answer(503, {"retry-after": "2"}) if n == 1 else Answer())
    routed = _scripted(tmp_path, {"only": backend}, started)
    first: dict[str, Any] = {}

    def ask_first() -> None:
        first["reply"] = _ask(_client(routed))

    waiting = threading.Thread(target=ask_first, daemon=True)
    waiting.start()
    wait_for(lambda: routed.states()["only"]["state"] == "open", within=10, what="the trip")
    with pytest.raises(openai.InternalServerError) as refused:
        _ask(_client(routed))
    assert refused.value.code == "BackendUnavailable"
    assert refused.value.response.headers["retry-after"] in ("1", "2")
    waiting.join(30)
    assert first["reply"].choices[0].message.content == "hi"
    arrivals = backend.arrivals()
    assert [status for _, status in arrivals] == [503, 200]
    assert arrivals[1][0] - arrivals[0][0] >= 1.9  # the retry waited the backend's 2 s
    state = routed.states()["only"]
    assert (state["state"], state["trips"]) == ("closed", 1)


def test_a_503_with_retry_after_parks_that_member_for_as_long_and_fails_over(
    tmp_path: Path, started: list[Any]
) -> None:
    """Two members: the first answers 503 with retry-after 20; the request goes to the
    second, the first is out for 20 s (not trip_seconds, not after three failures), and the
    next request goes straight to the second."""
    first = ScriptedBackend(lambda n: Answer(503, {"retry-after": "20"}))
    second = ScriptedBackend(lambda n: Answer())
    routed = _scripted(tmp_path, {"first": first, "second": second}, started)
    client = _client(routed)
    assert _ask(client).choices[0].message.content == "hi"
    state = routed.states()["first"]
    assert (state["state"], state["open_reason"], state["trips"]) == ("open", "503", 1)
    assert 19.0 <= state["open_until"] - time.time() <= 20.0
    assert _ask(client).choices[0].message.content == "hi"
    assert [s for _, s in first.arrivals()] == [503]
    assert [s for _, s in second.arrivals()] == [200, 200]


def test_a_refusal_passes_on_a_5xx_wait_capped_even_when_the_breaker_ignores_it(
    tmp_path: Path, started: list[Any]
) -> None:
    """With honour_retry_after off the 503's wait does not trip the breaker (one failure of
    three), yet the refusal tells the client what the backend asked — capped at
    max_trip_seconds, as for a 429 — rather than 1 s."""
    sims = {"only": start_sim()}
    started.extend(sims.values())
    routing = {"circuit_breaker": {"honour_retry_after": False, "max_trip_seconds": 60}}
    routed = Routed(pool_config(tmp_path, sims, [{"backend": "only"}], routing=routing), sims)
    started.insert(0, routed)
    with pytest.raises(openai.InternalServerError) as refused:
        _ask(_client(routed, {"x-sim-fault": "503:86400"}))
    assert refused.value.code == "BackendUnavailable"
    headers = refused.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("60", "60000")
    assert routed.states()["only"]["state"] == "closed"


def test_the_breaker_takes_a_failures_retry_after_as_a_429s() -> None:
    """Unit: a failure with retry-after trips at once for that long (capped) and a late one
    pushes an open breaker's end out; without it, or with honour_retry_after off, failures
    add up to ``failures`` and trip for ``trip``, as before."""
    clock = FakeClock()
    settings = BreakerSettings(failures=3, trip=5.0, max_trip=60.0)
    b = CircuitBreaker(settings)
    assert not b.failure(clock.now(), "500", throttle=False, retry_after=None, probe=False)
    assert b.failure(clock.now(), "503", throttle=False, retry_after=86400.0, probe=False)
    assert b.open_until - clock.now() == 60.0 and not b.throttled and b.reason == "503"
    clock.advance(50)
    assert not b.failure(clock.now(), "503", throttle=False, retry_after=30.0, probe=False)
    assert b.open_until - clock.now() == 30.0  # pushed out, never pulled in
    assert not b.failure(clock.now(), "503", throttle=False, retry_after=1.0, probe=False)
    assert b.open_until - clock.now() == 30.0

    ignoring = CircuitBreaker(BreakerSettings(failures=2, trip=5.0, honour_retry_after=False))
    assert not ignoring.failure(clock.now(), "503", throttle=False, retry_after=30, probe=False)
    assert ignoring.failure(clock.now(), "503", throttle=False, retry_after=30, probe=False)
    assert ignoring.open_until - clock.now() == 5.0
