"""Failover: a backend stopped under load costs no client request and is taken back (after a
half-open probe) when it returns; every backend throttled gives the client a 429 with the
shortest wait, which the openai SDK honours and then succeeds."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai

from tests.routing.harness import (
    Routed,
    ShiftedClock,
    body,
    chat_deployment,
    pool_config,
    start_sim,
)
from tests.support.gateway import BACKEND_KEY


def test_backend_stopped_mid_load_then_taken_back(tmp_path: Path) -> None:
    sims = {"a": start_sim(), "b": start_sim()}
    port_a = sims["a"].port
    routing = {"circuit_breaker": {"failures": 2, "trip_seconds": 0.3, "max_trip_seconds": 0.6}}
    routed = Routed(
        pool_config(tmp_path, sims, [{"backend": "a"}, {"backend": "b"}], routing=routing), sims
    )
    statuses: list[int] = []
    stop = threading.Event()
    lock = threading.Lock()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                r = client.post(routed.chat_url(), json=body(5), headers={"api-key": routed.key})
                with lock:
                    statuses.append(r.status_code)

    workers = [threading.Thread(target=load) for _ in range(4)]
    try:
        for w in workers:
            w.start()
        time.sleep(0.8)
        sims["a"].stop()  # the process is gone: connections are refused
        stopped_at = time.time()
        time.sleep(1.2)
        assert routed.states()["a"]["state"] in ("open", "half-open")
        sims["a"] = start_sim(port=port_a)  # back on the same address
        back_at = time.time()
        time.sleep(1.5)
        stop.set()
        for w in workers:
            w.join()
        assert statuses and Counter(statuses) == {200: len(statuses)}, Counter(statuses)
        # A client can read its answer an instant before the gateway hands the request's
        # record to the ledger, and the failed attempts' records count towards ``expect``:
        # wait for the successes themselves.
        deadline = time.monotonic() + 5
        while True:
            records = routed.records(len(statuses))
            ok = [r for r in records if r.outcome == "ok"]
            if len(ok) >= len(statuses) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(ok) == len(statuses)
        served = Counter(r.backend for r in ok if r.ts > back_at + 1.0)
        assert served["a"] > 0 and served["b"] > 0, served  # taken back
        failed = [r for r in records if r.outcome == "backend_error"]
        assert failed and all(r.backend == "a" for r in failed)
        assert all(stopped_at - 0.5 <= r.ts <= back_at + 1.0 for r in failed)
        assert all(r.status == 502 and r.error_code == "BackendUnavailable" for r in failed)
        assert routed.states()["a"]["state"] == "closed"
        assert routed.states()["a"]["last_error"] in ("connection", "broken")
    finally:
        stop.set()
        routed.stop()
        for sim in sims.values():
            sim.stop()


def test_every_backend_throttled_shortest_wait_then_the_sdk_succeeds(tmp_path: Path) -> None:
    clocks = {"a": ShiftedClock(), "b": ShiftedClock()}
    # One request per minute each (20 TPM: room for one estimate of 14, as RPM counts over
    # 10-s windows like Azure's); the simulators' minutes are moved on by the test.
    sims = {n: start_sim(chat_deployment(tpm=20), clock=clocks[n]) for n in clocks}
    routing = {"circuit_breaker": {"max_trip_seconds": 120, "trip_seconds": 5}}
    routed = Routed(
        pool_config(
            tmp_path, sims, [{"backend": "a"}, {"backend": "b", "priority": 2}], routing=routing
        ),
        sims,
    )
    try:
        for sim in sims.values():  # use up each backend's minute, directly
            url = f"{sim.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
            r = httpx.post(url, json=body(5), headers={"api-key": BACKEND_KEY})
            assert r.status_code == 200
        clocks["a"].shift(57.0)  # a's minute ends in about 3 s, b's in about 5 s
        clocks["b"].shift(55.0)
        r = httpx.post(routed.chat_url(), json=body(5), headers={"api-key": routed.key})
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "429"
        assert r.headers["retry-after"] == "3"
        assert 2_000 <= int(r.headers["retry-after-ms"]) <= 3_000
        logs = {n: routed.sim_log(n) for n in sims}
        assert [e["status"] for e in logs["a"]] == [200, 429]
        assert [e["status"] for e in logs["b"]] == [200, 429]
        records = routed.records(2)
        assert [(x.attempt, x.backend, x.status) for x in records] == [(1, "a", 429), (2, "b", 429)]
        assert records[1].extra["upstream_status"] == "429"

        client = openai.AzureOpenAI(
            azure_endpoint=routed.url, api_key=routed.key, api_version="2024-10-21"
        )
        started = time.monotonic()
        reply = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        waited = time.monotonic() - started
        assert reply.choices[0].message.content
        assert waited >= 1.5  # the SDK waited as told (about 3 s less the time since)
        # The probe's success is recorded just after its response reached the client.
        deadline = time.monotonic() + 2
        while routed.states()["a"]["state"] != "closed" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert routed.states()["a"]["state"] == "closed"
    finally:
        routed.stop()
        for sim in sims.values():
            sim.stop()


def test_single_backend_waits_for_its_retry_after_within_the_ceiling(tmp_path: Path) -> None:
    clock = ShiftedClock()
    # One request per minute (20 TPM: room for one estimate of 14; RPM is per 10 s).
    sims = {"only": start_sim(chat_deployment(tpm=20), clock=clock)}
    routing = {"retry": {"max_wait_seconds": 3}}
    routed = Routed(pool_config(tmp_path, sims, [{"backend": "only"}], routing=routing), sims)
    try:
        url = (
            f"{sims['only'].url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        )
        assert httpx.post(url, json=body(5), headers={"api-key": BACKEND_KEY}).status_code == 200
        clock.shift(59.0)  # the minute ends in about a second
        started = time.monotonic()
        r = httpx.post(routed.chat_url(), json=body(5), headers={"api-key": routed.key}, timeout=30)
        assert r.status_code == 200
        assert time.monotonic() - started >= 0.5  # it waited for the backend, not the client
        records = routed.records(2)
        assert [(x.attempt, x.backend, x.status) for x in records] == [
            (1, "only", 429),
            (2, "only", 200),
        ]
        # Asked to wait longer than the ceiling (the minute was just used again): the client
        # gets the 429 and the wait.
        r = httpx.post(routed.chat_url(), json=body(5), headers={"api-key": routed.key}, timeout=30)
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 3
    finally:
        routed.stop()
        for sim in sims.values():
            sim.stop()


def test_client_errors_are_relayed_not_retried(tmp_path: Path) -> None:
    sims = {"a": start_sim(), "b": start_sim()}
    routed = Routed(pool_config(tmp_path, sims, [{"backend": "a"}, {"backend": "b"}]), sims)
    try:
        for _ in range(4):
            r = httpx.post(
                routed.chat_url(),
                json={**body(5), "max_tokens": 0},
                headers={"api-key": routed.key},
            )
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        records = routed.records(4)
        assert all((x.attempt, x.status, x.outcome) == (1, 400, "client_error") for x in records)
        assert len(routed.sim_log("a")) + len(routed.sim_log("b")) == 4  # never sent twice
        assert {s["state"] for s in routed.states().values()} == {"closed"}
    finally:
        routed.stop()
        for sim in sims.values():
            sim.stop()
