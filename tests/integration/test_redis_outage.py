"""Redis stopped for 15 seconds under load: a fail-open gateway keeps serving (its limits held
per instance meanwhile), a fail-closed one answers 503 with Retry-After, both recover by
themselves, and no usage record is lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from sluicegate.simulator.server import SimulatorThread
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.reports import fetch_records
from tests.integration.conftest import sim_config
from tests.integration.test_lifecycle import BODY, CHAT
from tests.support.gateway import GatewayProcess, gateway_config
from tests.support.pg import throwaway_database
from tests.support.redis_server import RedisServer


def test_redis_down_for_15_seconds(tmp_path: Path) -> None:
    sim = SimulatorThread(sim_config())
    sim.start()
    redis = RedisServer()
    redis.start()
    gws: dict[str, GatewayProcess] = {}
    timeline: dict[str, list[tuple[float, int, str | None]]] = {"open": [], "closed": []}
    with throwaway_database() as db_url:
        try:
            for mode in ("open", "closed"):
                cfg = gateway_config(
                    tmp_path,
                    {"sim": sim.url},
                    mode="cluster",
                    storage_url=db_url,
                    redis={"url": redis.url, "prefix": f"sgt-{mode}", "fail_mode": mode},
                    products=[
                        {
                            "name": "starter",
                            "limits": {
                                "tokens_per_minute": 10_000_000,
                                "requests_per_minute": 1_000_000,
                            },
                        }
                    ],
                    deployments=[{"name": "gpt-4o-mini", "backend": "sim", "model": "gpt-4o-mini"}],
                )
                gws[mode] = GatewayProcess(tmp_path, cfg).start()
            key = gws["open"].create_key("starter", "o", "n")["primary_key"]
            for gw in gws.values():
                gw.wait_visible(key)
            stop = threading.Event()

            def client(mode: str) -> None:
                with httpx.Client(base_url=gws[mode].url, timeout=10) as c:
                    while not stop.is_set():
                        r = c.post(CHAT, json=BODY, headers={"api-key": key})
                        timeline[mode].append(
                            (time.monotonic(), r.status_code, r.headers.get("retry-after"))
                        )
                        time.sleep(0.02)

            threads = [
                threading.Thread(target=client, args=(m,))
                for m in ("open", "closed")
                for _ in range(2)
            ]
            for t in threads:
                t.start()
            time.sleep(3)
            redis.stop()
            down = time.monotonic()
            time.sleep(15)
            back = time.monotonic()  # from here Redis may answer again
            redis.start()
            up = time.monotonic()
            time.sleep(8)  # the stores retry Redis every few seconds
            stop.set()
            for t in threads:
                t.join(timeout=30)
            for gw in gws.values():
                assert gw.terminate() == 0
        finally:
            for gw in gws.values():
                gw.kill()
            log = httpx.get(f"{sim.url}/_sim/log").json()
            sim.stop()
            redis.cleanup()
        engine = create_engine_for(db_url)
        records = fetch_records(engine, limit=1_000_000)
        engine.dispose()

    def during(mode: str) -> list[int]:
        return [s for t, s, _ in timeline[mode] if down + 1 < t < back]

    def after(mode: str) -> list[int]:
        return [s for t, s, _ in timeline[mode] if t > up + 6]

    # Fail-open: served all along.
    assert {s for _, s, _ in timeline["open"]} == {200}
    assert len(during("open")) > 50
    # Fail-closed: 503 with Retry-After while Redis was away, then 200 again.
    closed_during = during("closed")
    assert closed_during and set(closed_during) == {503}
    assert all(ra for t, s, ra in timeline["closed"] if s == 503)
    assert after("closed") and set(after("closed")) == {200}
    # No record lost: every request the gateways answered is in the ledger, once.
    ids = [r.request_id for r in records]
    assert len(ids) == len(set(ids))
    answered = sum(len(v) for v in timeline.values())
    assert len([r for r in records if r.operation != "models"]) == answered
    forwarded = {e["headers"].get("x-ms-client-request-id") for e in log}
    assert forwarded <= set(ids)
    refused = [r for r in records if r.status == 503]
    assert len(refused) == sum(1 for _, s, _ in timeline["closed"] if s == 503)
