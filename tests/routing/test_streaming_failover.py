"""Streams: a backend failing before the first byte fails over invisibly; one breaking
mid-stream ends with a clean error event and a record; per-backend timeouts are enforced."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sluicegate.simulator.server import SimulatorThread
from tests.routing.harness import Routed, body, chat_deployment, pool_config, start_sim


def _events(resp: httpx.Response) -> list[Any]:
    out: list[Any] = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture
def sims() -> Any:
    started = {
        "broken": start_sim(chat_deployment(error_rate=1.0)),  # 500 after admission
        "hung": start_sim(chat_deployment(hang_rate=1.0, hang_max_s=5)),
        "good": start_sim(chat_deployment(tokens_per_second=200)),
    }
    yield started
    for sim in started.values():
        sim.stop()


def test_failures_before_the_first_byte_fail_over_invisibly(
    tmp_path: Path, sims: dict[str, SimulatorThread]
) -> None:
    pool = [
        {"backend": "broken", "priority": 1},
        {"backend": "hung", "priority": 2},
        {"backend": "good", "priority": 3},
    ]
    routed = Routed(pool_config(tmp_path, sims, pool, timeouts={"hung": {"first_byte": 0.5}}), sims)
    try:
        with httpx.stream(
            "POST", routed.chat_url(), json=body(20, stream=True),
            headers={"api-key": routed.key}, timeout=30,
        ) as resp:  # fmt: skip
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = _events(resp)
        assert events[-1] == "[DONE]"
        assert not any(isinstance(e, dict) and "error" in e for e in events)
        text = "".join(
            e["choices"][0]["delta"].get("content") or ""
            for e in events[:-1]
            if isinstance(e, dict) and e.get("choices")
        )
        assert text
        records = routed.records(3)
        assert [(r.attempt, r.backend, r.status, r.outcome) for r in records] == [
            (1, "broken", 500, "backend_error"),
            (2, "hung", 504, "backend_error"),
            (3, "good", 200, "ok"),
        ]
        assert records[1].error_code == "BackendTimeout"
        assert records[2].completion_tokens == 20 and not records[2].usage_estimated
        assert {r.request_id for r in records} == {records[0].request_id}
        assert [e["status"] for e in routed.sim_log("broken")] == [500]
        assert [e["status"] for e in routed.sim_log("good")] == [200]
    finally:
        routed.stop()


def test_a_stream_cut_mid_way_ends_with_an_error_event_and_a_record(
    tmp_path: Path, sims: dict[str, SimulatorThread]
) -> None:
    routed = Routed(pool_config(tmp_path, sims, [{"backend": "good"}, {"backend": "hung"}]), sims)
    try:
        with httpx.stream(
            "POST", routed.chat_url(), json=body(40, stream=True),
            headers={"api-key": routed.key, "x-sim-fault": "cut"}, timeout=30,
        ) as resp:  # fmt: skip
            assert resp.status_code == 200
            events = _events(resp)
        assert "[DONE]" not in events
        error = events[-1]
        assert error["error"]["code"] == "StreamInterrupted"
        assert "partial" in error["error"]["message"]
        assert len(events) > 2  # part of the answer came first
        records = routed.records(1)
        assert len(records) == 1  # nothing is retried once bytes reached the client
        (record,) = records
        assert (record.backend, record.attempt, record.outcome) == ("good", 1, "backend_error")
        assert record.error_code == "StreamInterrupted"
        assert record.usage_estimated and record.completion_tokens > 0
        assert routed.states()["good"]["last_error"] == "broken"
    finally:
        routed.stop()


def test_timeouts_are_enforced_per_backend(tmp_path: Path) -> None:
    sims = {
        "slow-start": start_sim(chat_deployment(ttft_ms=1500)),
        "trickle": start_sim(chat_deployment(tokens_per_second=2)),
    }
    routed = Routed(
        pool_config(
            tmp_path,
            sims,
            [{"backend": "slow-start"}],
            timeouts={"slow-start": {"first_byte": 0.4}, "trickle": {"between_chunks": 0.3}},
            routing={"retry": {"max_attempts": 1}},
            deployments=[
                {"name": "gpt-4o", "backend": "slow-start", "model": "gpt-4o"},
                {"name": "trickle", "backend": "trickle", "backend_deployment": "gpt-4o"},
            ],
        ),
        sims,
    )
    try:
        started = time.monotonic()
        r = httpx.post(routed.chat_url(), json=body(5), headers={"api-key": routed.key}, timeout=30)
        elapsed = time.monotonic() - started
        assert r.status_code == 503 and "retry-after" in r.headers
        assert elapsed < 1.2, elapsed  # the first-byte limit (0.4 s), not the backend's 1.5 s
        (record,) = routed.records(1)
        assert record.extra["upstream_status"] == "504"
        assert record.extra["upstream_error"] == "BackendTimeout"

        with httpx.stream(
            "POST", routed.chat_url("trickle"), json=body(10, stream=True),
            headers={"api-key": routed.key}, timeout=30,
        ) as resp:  # fmt: skip
            assert resp.status_code == 200
            events = _events(resp)
        assert events[-1]["error"]["code"] == "StreamInterrupted"
        assert "no data for 0.3 s" in events[-1]["error"]["message"]
    finally:
        routed.stop()
        for sim in sims.values():
            sim.stop()
