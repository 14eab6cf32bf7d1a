"""A request still running when the shutdown's grace period ends is cancelled; its record
says what the client got, and its reservation is settled, in cluster mode where the
counters outlive the process."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai

from sluicegate.simulator.config import SimDeployment
from sluicegate.simulator.server import SimulatorThread
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.reports import fetch_records
from tests.integration.conftest import Harness, sim_config
from tests.support.gateway import BACKEND_KEY, GatewayThread, gateway_config
from tests.support.pg import throwaway_database
from tests.support.redis_server import RedisServer

TPM = 1_000_000
MAX_TOKENS = 20_000  # reserved at admission: far above what the cut stream generates


def _config(tmp: Path, sim: SimulatorThread, db_url: str, redis_url: str) -> dict[str, object]:
    return gateway_config(
        tmp,
        {"sim": sim.url},
        mode="cluster",
        storage_url=db_url,
        redis={"url": redis_url, "prefix": "sgt-shutdown"},
        listen={"host": "127.0.0.1", "port": 0, "graceful_shutdown_seconds": 1},
        products=[{"name": "starter", "limits": {"tokens_per_minute": TPM}}],
        deployments=[{"name": "gpt-4o-mini", "backend": "sim", "model": "gpt-4o-mini"}],
    )


def test_a_stream_cut_at_shutdown_keeps_its_usage_and_settles_its_reservation(
    tmp_path: Path,
) -> None:
    slow = SimDeployment(
        name="gpt-4o-mini", model="gpt-4o-mini", kind="chat", ttft_ms=50, tokens_per_second=20
    )
    sim = SimulatorThread(sim_config(deployments=[slow], api_keys=[BACKEND_KEY]))
    sim.start()
    redis = RedisServer()
    redis.start()
    try:
        with throwaway_database() as db_url:
            first = GatewayThread(_config(tmp_path, sim, db_url, redis.url)).start()
            harness = Harness(first, sim)
            key = harness.new_key().primary_key
            assert key is not None
            client = openai.AzureOpenAI(
                azure_endpoint=first.url, api_key=key, api_version="2024-10-21", max_retries=0
            )
            events: list[object] = []
            errors: list[BaseException] = []

            def stream() -> None:
                try:
                    for event in client.chat.completions.create(
                        model="gpt-4o-mini",
                        messages=[{"role": "user", "content": "Tell me a long story"}],
                        max_tokens=MAX_TOKENS,
                        stream=True,
                    ):
                        events.append(event)
                except Exception as exc:  # the connection is cut at shutdown
                    errors.append(exc)

            reader = threading.Thread(target=stream)
            reader.start()
            deadline = time.monotonic() + 10
            while len(events) < 10:
                assert time.monotonic() < deadline, "the stream did not start"
                time.sleep(0.02)
            started = time.monotonic()
            first.stop()  # the stream outlives the 1 s grace period: it is cancelled
            reader.join(timeout=10)
            assert time.monotonic() - started < 10
            assert errors, "the stream should have been cut"
            relayed = len(events)

            engine = create_engine_for(db_url)
            try:
                records = fetch_records(engine, limit=100)
            finally:
                engine.dispose()
            # One record (not one from the relay and another from the pipeline), with the
            # text the client got estimated, not zero.
            assert len(records) == 1, records
            record = records[0]
            assert record.outcome == "aborted"
            assert record.usage_estimated
            assert relayed - 3 <= record.completion_tokens <= relayed + 60, (relayed, record)

            # The reservation (prompt + 20,000) was settled to what was used: a gateway
            # started on the same counters sees nearly the whole minute's tokens left.
            second = GatewayThread(_config(tmp_path, sim, db_url, redis.url)).start()
            try:
                resp = httpx.post(
                    second.url
                    + "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21",
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                    headers={"api-key": key},
                    timeout=30,
                )
                assert resp.status_code == 200, resp.text
                remaining = int(resp.headers["x-ratelimit-remaining-tokens"])
                used = TPM - remaining
                assert used < record.total_tokens + 200, (used, record.total_tokens)
            finally:
                second.stop()
    finally:
        redis.stop()
        sim.stop()


def test_a_request_cut_while_it_waits_to_retry_is_recorded_once(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    """The backend answers 429 asking for 5 s; a single-member pool waits to retry, and the
    shutdown cancels the wait. The failed attempt's record is the request's last: the
    pipeline's own would repeat its key, which the ledger drops and the metrics count.
    The client, sent nothing yet, gets 503 with Retry-After (the SDKs retry it)."""
    gw = GatewayThread(
        gateway_config(
            tmp_path,
            {"sim": simulator.url},
            listen={"host": "127.0.0.1", "port": 0, "graceful_shutdown_seconds": 1},
        )
    ).start()
    harness = Harness(gw, simulator)
    key = harness.new_key().primary_key
    assert key is not None
    answers: list[object] = []

    def call() -> None:
        try:
            answers.append(
                httpx.post(
                    gw.url + "/openai/deployments/gpt-4o-mini/chat/completions"
                    "?api-version=2024-10-21",
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                    headers={"api-key": key, "x-sim-fault": "429:5"},
                    timeout=30,
                )
            )
        except httpx.HTTPError as exc:
            answers.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while not harness.sim_log():
        assert time.monotonic() < deadline, "the request did not reach the backend"
        time.sleep(0.02)
    time.sleep(0.2)  # the 429 is in; the gateway waits to retry
    gw.stop()
    caller.join(timeout=10)
    # Nothing had been sent: Azure's answer for a service going away, not uvicorn's 500.
    answer = answers[0]
    assert isinstance(answer, httpx.Response), answers
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["code"] == "ServiceUnavailable"
    assert len(harness.sim_log()) == 1  # no second attempt
    metrics = gw.gateway.metrics.render().decode()
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("sluicegate_requests_total{")
    ]
    assert counted == [1.0], metrics
    engine = create_engine_for(gw.config.storage.url)
    try:
        records = fetch_records(engine, limit=100)
    finally:
        engine.dispose()
    assert [(r.status, r.attempt) for r in records] == [(429, 1)]
