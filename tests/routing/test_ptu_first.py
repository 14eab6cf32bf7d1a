"""PTU first, then spill-over by weight, on the headroom the backends report — and fewer 429s
from the backends than when routing waits for the 429 (headroom off)."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from sluicegate.simulator.server import SimulatorThread
from tests.routing.harness import Routed, body, chat_deployment, pool_config, start_sim

REQUESTS = 240
CONCURRENCY = 8
POOL = [
    {"backend": "ptu", "priority": 1},
    {"backend": "paygo-a", "priority": 2, "weight": 3},
    {"backend": "paygo-b", "priority": 2, "weight": 1},
]


@pytest.fixture
def sims() -> Any:
    started = {
        # About 26 requests of ~112 tokens fit in the PTU deployment's minute.
        "ptu": start_sim(chat_deployment(tpm=3_000)),
        "paygo-a": start_sim(chat_deployment()),
        "paygo-b": start_sim(chat_deployment()),
    }
    yield started
    for sim in started.values():
        sim.stop()


def _run(tmp: Path, sims: dict[str, SimulatorThread], headroom: bool) -> tuple[Routed, list[int]]:
    for sim in sims.values():  # a fresh minute and an empty truth log for each run
        httpx.delete(f"{sim.url}/_sim/limits").raise_for_status()
        httpx.delete(f"{sim.url}/_sim/log").raise_for_status()
    config = pool_config(tmp, sims, POOL, kinds={"ptu": "ptu"}, routing={"headroom": headroom})
    routed = Routed(config, sims)
    with httpx.Client(timeout=30) as client:

        def one(_: int) -> int:
            r = client.post(routed.chat_url(), json=body(), headers={"api-key": routed.key})
            return r.status_code

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            statuses = list(pool.map(one, range(REQUESTS)))
    return routed, statuses


def _throttled(routed: Routed, name: str) -> int:
    return sum(1 for e in routed.sim_log(name) if e["status"] == 429)


def test_ptu_first_then_spill_by_weight_with_fewer_429s(
    tmp_path: Path, sims: dict[str, SimulatorThread]
) -> None:
    on, statuses = _run(tmp_path / "on", sims, headroom=True)
    try:
        assert Counter(statuses) == {200: REQUESTS}, "no client sees a 429 while one has room"
        records = [r for r in on.records(REQUESTS) if r.outcome == "ok"]
        assert len(records) == REQUESTS
        order = [r.backend for r in records]  # by arrival
        ptu = order.count("ptu")
        assert 20 <= ptu <= 27, order
        # PTU first: spill-over starts only when the PTU deployment is (nearly) full.
        first_spill = next(i for i, b in enumerate(order) if b != "ptu")
        assert first_spill >= ptu - CONCURRENCY
        assert order[first_spill:].count("ptu") <= CONCURRENCY
        spilled = Counter(order[first_spill:])
        share_a = spilled["paygo-a"] / (spilled["paygo-a"] + spilled["paygo-b"])
        assert share_a == pytest.approx(0.75, abs=0.06), spilled
        assert all(
            r.extra.get("backend_kind") == ("ptu" if r.backend == "ptu" else "paygo")
            for r in records
        )
        assert sum(1 for r in records if r.extra.get("route") == "headroom") >= REQUESTS - ptu - 10
        metrics = httpx.get(f"{on.url}/metrics").text
        assert 'sluicegate_spillover_total{deployment="gpt-4o",from_backend="ptu"' in metrics
        assert 'sluicegate_routing_headroom_tokens{backend="ptu",deployment="gpt-4o"}' in metrics
        throttled_on = _throttled(on, "ptu")
        served_on = ptu
    finally:
        on.stop()

    off, statuses = _run(tmp_path / "off", sims, headroom=False)
    try:
        assert Counter(statuses) == {200: REQUESTS}, "failover hides the 429s from clients"
        records = off.records(REQUESTS)
        throttled_off = _throttled(off, "ptu")
        retried = [r for r in records if r.attempt > 1]
        assert len(retried) == throttled_off  # every backend 429 was retried elsewhere
        assert {r.status for r in records if r.attempt == 1 and r.backend == "ptu"} >= {429}
    finally:
        off.stop()
    print(
        f"\nbackend 429s: headroom routing on = {throttled_on} (PTU served {served_on}), "
        f"off = {throttled_off}"
    )
    assert throttled_on < throttled_off
