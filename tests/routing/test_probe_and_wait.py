"""The breaker on the request path, end to end (a real gateway over a scripted backend or the
simulator): a half-open stream probe's verdict comes with its first event, not after its
relay (test_probe_body.py: other answers' verdicts, bodies that break off); a one-member
pool's wait-and-retry goes through the breaker; only the probe or a request sent after the
trip closes or re-opens a half-open breaker; the wait a client is told is capped; a relayed
429's retry-after sets the trip; a passthrough without a token tells the client nothing of
the identity's reasons."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.routing.harness import (
    Routed,
    body,
    one_member_pool,
    pool_config,
    post_chat,
    start_sim,
)
from tests.routing.scripted import Answer, ScriptedBackend
from tests.support.identity_endpoint import IdentityEndpoint

KEY = "only/gpt-4o"  # the one member's target: backend/deployment


def _over(
    tmp: Path, backend: ScriptedBackend, routing: dict[str, Any], started: list[Any]
) -> Routed:
    """A gateway whose deployment gpt-4o is a one-member pool over ``backend``."""
    return one_member_pool(tmp, backend, routing, started)


def _events(resp: httpx.Response) -> list[Any]:
    return [
        line[6:] if line == "data: [DONE]" else json.loads(line[6:])
        for line in resp.iter_lines()
        if line.startswith("data: ")
    ]


def _breaker(routed: Routed) -> str:
    return routed.gw.gateway.router.targets[KEY].breaker.describe(time.time())


class _Stream(threading.Thread):
    """A streaming request in the background; ``head`` is set once its status line came."""

    def __init__(self, routed: Routed) -> None:
        super().__init__(daemon=True)
        self.routed = routed
        self.head = threading.Event()
        self.status = 0
        self.events: list[Any] = []

    def run(self) -> None:
        routed = self.routed
        with httpx.stream(
            "POST", routed.chat_url(), json=body(5, stream=True),
            headers={"api-key": routed.key}, timeout=30,
        ) as resp:  # fmt: skip
            self.status = resp.status_code
            self.head.set()
            self.events = _events(resp)


def _trip_with_a_short_429(routed: Routed) -> None:
    """The first request's 429 (retry-after 0.3 s) opens the breaker; return when it is
    half-open."""
    r = post_chat(routed)
    assert r.status_code == 429, r.text
    time.sleep(0.4)
    assert _breaker(routed) == "half-open"


def test_a_streaming_probe_frees_the_backend_once_its_head_passed(
    tmp_path: Path, started: list[Any]
) -> None:
    """The probe after a trip is a long stream: the backend is taken back when the stream's
    first event went through (right after its head), not when its relay ends, so a
    one-member pool serves others meanwhile."""

    def script(n: int) -> Answer:
        if n == 1:
            return Answer(429, {"retry-after-ms": "300", "retry-after": "1"})
        if n == 2:
            return Answer(chunks=6, chunk_delay=0.3)  # about 1.8 s
        return Answer()

    backend = ScriptedBackend(script)
    routed = _over(tmp_path, backend, {"retry": {"wait_same": False}}, started)
    _trip_with_a_short_429(routed)
    probe = _Stream(routed)
    probe.start()
    assert probe.head.wait(10)
    during = [post_chat(routed) for _ in range(2)]
    still_streaming = probe.is_alive()
    states = routed.states()["only"]
    probe.join(30)
    assert still_streaming, "the probe's stream outlasted the other requests"
    assert [r.status_code for r in during] == [200, 200], [r.text for r in during]
    assert states["state"] == "closed"
    assert probe.status == 200 and probe.events[-1] == "[DONE]"
    assert [status for _, status in backend.arrivals()] == [429, 200, 200, 200]


def test_a_probe_stream_that_breaks_later_fails_the_probe_without_holding_the_slot(
    tmp_path: Path, started: list[Any]
) -> None:
    """The probe's first event closed the breaker; the stream then breaks off mid-way: the client
    gets the error event, the break fails the probe (the breaker opens again at once), and
    the backend served another request while the probe still streamed."""

    def script(n: int) -> Answer:
        if n == 1:
            return Answer(429, {"retry-after-ms": "300"})
        if n == 2:
            return Answer(chunks=4, chunk_delay=0.3, cut=True)
        return Answer()

    backend = ScriptedBackend(script)
    routed = _over(tmp_path, backend, {"retry": {"wait_same": False}}, started)
    _trip_with_a_short_429(routed)
    probe = _Stream(routed)
    probe.start()
    assert probe.head.wait(10)
    during = post_chat(routed)
    probe.join(30)
    assert during.status_code == 200, during.text
    assert probe.status == 200
    error = probe.events[-1]
    assert isinstance(error, dict) and error["error"]["code"] == "StreamInterrupted"
    state = routed.states()["only"]
    assert (state["state"], state["open_reason"], state["trips"]) == ("open", "broken", 2)


def test_answers_to_requests_sent_before_the_trip_leave_a_half_open_breaker_to_its_probe(
    tmp_path: Path, started: list[Any]
) -> None:
    """A stream begun before the trip ends well while the probe is out: that says nothing
    about the backend now, so it does not close the breaker, and the probe's failure opens
    it again (rather than counting as a closed breaker's first failure of three)."""

    def script(n: int) -> Answer:
        if n == 1:
            return Answer(chunks=5, chunk_delay=0.3)  # sent before the trip, ends in 1.5 s
        if n in (2, 3, 4):
            return Answer(500)
        if n == 5:
            return Answer(500, delay=1.5)  # the probe, answered after the stream ended
        return Answer()

    backend = ScriptedBackend(script)
    routing = {
        "retry": {"max_attempts": 1},
        "circuit_breaker": {"failures": 3, "trip_seconds": 0.5, "max_trip_seconds": 5},
    }
    routed = _over(tmp_path, backend, routing, started)
    early = _Stream(routed)
    early.start()
    assert early.head.wait(10)
    assert [post_chat(routed).status_code for _ in range(3)] == [503, 503, 503]
    assert _breaker(routed).startswith("open")
    time.sleep(0.6)
    probe = post_chat(routed)
    early.join(30)
    assert early.events[-1] == "[DONE]"
    stream, sent = backend.hits[0], backend.hits[4]
    assert stream.ended is not None and sent.answered is not None
    assert sent.arrived < stream.ended < sent.answered, "the stream ended during the probe"
    assert probe.status_code == 503
    state = routed.states()["only"]
    assert (state["state"], state["trips"]) == ("open", 2), _breaker(routed)


def _concurrently(routed: Routed, n: int) -> list[httpx.Response]:
    out: list[httpx.Response] = []
    lock = threading.Lock()

    def one() -> None:
        r = post_chat(routed)
        with lock:
            out.append(r)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def _after_the_throttles(backend: ScriptedBackend, throttles: int) -> list[float]:
    """Arrival times of the requests after the first ``throttles`` (429s), relative to the
    first 429's answer."""
    first_end = backend.hits[0].answered
    assert first_end is not None
    arrivals = backend.arrivals()
    assert [s for _, s in arrivals[:throttles]] == [429] * throttles
    return [t - first_end for t, _ in arrivals[throttles:]]


def test_waiting_requests_retry_after_the_trip_and_only_one_probes(
    tmp_path: Path, started: list[Any]
) -> None:
    """Five requests to a one-member pool get 429s without a retry-after: the breaker opens
    for trip_seconds. They wait for its end (not 0.5 s into it), then one of them is the
    probe and the others get what a new request would get (429 and a second's wait, as while
    the breaker was open after the throttles); the probe closes the breaker."""

    def script(n: int) -> Answer:
        return Answer(429, together=5) if n <= 5 else Answer(delay=0.3)

    backend = ScriptedBackend(script)
    routing = {"circuit_breaker": {"trip_seconds": 1.0}, "retry": {"max_wait_seconds": 3}}
    routed = _over(tmp_path, backend, routing, started)
    answers = _concurrently(routed, 5)
    later = _after_the_throttles(backend, 5)
    assert len(later) == 1 and later[0] >= 0.95, later
    assert Counter(r.status_code for r in answers) == {200: 1, 429: 4}
    refused = [r for r in answers if r.status_code == 429]
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert routed.states()["only"]["state"] == "closed"


def test_waiting_requests_told_a_retry_after_send_one_probe_not_all(
    tmp_path: Path, started: list[Any]
) -> None:
    """The same with ``retry-after: 1``: the waiting requests wake together when the breaker
    turns half-open; only one of them reaches the backend."""

    def script(n: int) -> Answer:
        return Answer(429, {"retry-after": "1"}, together=5) if n <= 5 else Answer(delay=0.3)

    backend = ScriptedBackend(script)
    routed = _over(tmp_path, backend, {}, started)
    answers = _concurrently(routed, 5)
    later = _after_the_throttles(backend, 5)
    assert len(later) == 1 and later[0] >= 0.95, later
    assert Counter(r.status_code for r in answers) == {200: 1, 429: 4}
    assert routed.states()["only"]["state"] == "closed"


def test_no_wait_into_a_breaker_open_longer_than_max_wait(
    tmp_path: Path, started: list[Any]
) -> None:
    """A 429 without a retry-after opens the breaker for 5 s, longer than the 2 s a request
    may wait: the client is told at once, and the backend is not asked again meanwhile."""
    backend = ScriptedBackend(lambda n: Answer(429))
    routing = {"circuit_breaker": {"trip_seconds": 5}, "retry": {"max_wait_seconds": 2}}
    routed = _over(tmp_path, backend, routing, started)
    began = time.monotonic()
    r = post_chat(routed)
    assert time.monotonic() - began < 1.0
    assert r.status_code == 429 and r.headers["retry-after"] == "5", r.headers
    time.sleep(0.6)
    assert len(backend.hits) == 1


def test_a_relayed_429_opens_the_breaker_for_its_retry_after(
    tmp_path: Path, started: list[Any]
) -> None:
    """429 is not retried here, so the backend's 429 reaches the client as it is; the breaker
    still stays out as long as that 429's retry-after said (7 s), not trip_seconds (2 s)."""
    sims = {"only": start_sim()}
    started.extend(sims.values())
    routing = {
        "retry": {"statuses": [500, 502, 503, 504]},
        "circuit_breaker": {"trip_seconds": 2, "max_trip_seconds": 60},
    }
    routed = Routed(pool_config(tmp_path, sims, [{"backend": "only"}], routing=routing), sims)
    started.insert(0, routed)
    r = httpx.post(
        routed.chat_url(),
        json=body(5),
        headers={"api-key": routed.key, "x-sim-fault": "429:7"},
        timeout=30,
    )
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    state = routed.states()["only"]
    assert state["state"] == "open" and state["open_reason"] == "429"
    assert 6.0 <= state["open_until"] - time.time() <= 7.0


def test_a_refusal_never_passes_on_more_than_the_longest_trip(
    tmp_path: Path, started: list[Any]
) -> None:
    """The backend asks for a day (a 429 that did not open the breaker, throttles: 2): the
    client is told no more than max_trip_seconds, by which the backend is taken back."""
    sims = {"only": start_sim()}
    started.extend(sims.values())
    routing = {"circuit_breaker": {"throttles": 2, "max_trip_seconds": 60}}
    routed = Routed(pool_config(tmp_path, sims, [{"backend": "only"}], routing=routing), sims)
    started.insert(0, routed)
    r = httpx.post(
        routed.chat_url(),
        json=body(5),
        headers={"api-key": routed.key, "x-sim-fault": "429:86400"},
        timeout=30,
    )
    assert r.status_code == 429, r.text
    assert (r.headers["retry-after"], r.headers["retry-after-ms"]) == ("60", "60000")
    assert "Retry after 60 seconds" in r.json()["error"]["message"]
    assert routed.states()["only"]["state"] == "closed"


_AZURE_VARS = (
    "MSI_ENDPOINT", "MSI_SECRET", "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT",
    "AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
)  # fmt: skip


def test_a_passthrough_without_a_token_keeps_the_identity_details_in_the_log(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    started: list[Any],
) -> None:
    """The identity endpoint refuses the gateway: a path the gateway passes through gets a
    502 that names the backend and points to the log; azure-identity's reason (its
    credential, the endpoint's answer, ids) is in the log, with the request id, not in the
    answer."""
    caplog.set_level(logging.WARNING, logger="sluicegate.failover")
    with IdentityEndpoint(lifetime=3600) as endpoint:
        for name in _AZURE_VARS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint.url)
        monkeypatch.setenv("IDENTITY_HEADER", "not-" + endpoint.secret)
        sims = {"mi": start_sim(api_keys=["not-the-gateway-key"])}
        started.extend(sims.values())
        config = pool_config(tmp_path, sims, [{"backend": "mi"}])
        config["backends"][0]["auth"] = {
            "type": "managed-identity",
            "client_id": "11111111-2222-3333-4444-555555555555",
        }
        routed = Routed(config, sims)
        started.insert(0, routed)
        r = httpx.get(
            f"{routed.url}/openai/files?api-version=2024-10-21",
            headers={"api-key": routed.key},
            timeout=30,
        )
        routed.stop()  # while the endpoint still answers (test_identity.py says why)
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "BackendAuthUnavailable"
    assert error["message"] == (
        "The gateway could not get a token for backend mi; see the gateway's log. Retry later."
    )
    request_id = r.headers["x-sluicegate-request-id"]
    logged = [
        rec.getMessage()
        for rec in caplog.records
        if rec.name == "sluicegate.failover" and request_id in rec.getMessage()
    ]
    assert len(logged) == 1 and "backend mi" in logged[0], caplog.text
    detail = logged[0].split("backend mi: ", 1)[1]
    assert detail and detail not in r.text
