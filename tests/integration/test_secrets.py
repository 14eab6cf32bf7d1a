"""The backend's key never reaches a client, a log line or the ledger."""

from __future__ import annotations

from pathlib import Path

import httpx

from sluicegate.simulator.server import SimulatorThread
from tests.integration.conftest import sim_config
from tests.integration.test_lifecycle import wait_status
from tests.support.gateway import BACKEND_KEY, GatewayProcess, gateway_config


def test_backend_key_never_leaks(tmp_path: Path) -> None:
    sim = SimulatorThread(sim_config())
    sim.start()
    gw = GatewayProcess(
        tmp_path, gateway_config(tmp_path, {"sim": sim.url}, logging={"level": "debug"})
    )
    try:
        gw.start()
        out = httpx.post(f"{gw.url}/admin-not-there")  # unauthenticated noise
        seen: list[str] = [out.text, str(out.headers)]
        key = gw.create_key("starter", "o", "n2")["primary_key"]
        wait_status(gw.url, key, 200)
        chat = f"{gw.url}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        with httpx.Client(timeout=10) as c:
            for headers in (
                {"api-key": key},
                {"api-key": key, "x-sim-fault": "500"},
                {"api-key": key, "x-sim-fault": "cut"},
                {"api-key": "sg-wrong"},
                {"authorization": f"Bearer {key}"},
            ):
                for stream in (False, True):
                    r = c.post(chat, json={**body, "stream": stream}, headers=headers)
                    seen += [r.text, str(r.headers)]
            r = c.get(f"{gw.url}/openai/v1/models", headers={"api-key": key})
            seen += [r.text, str(r.headers)]
            r = c.get(f"{gw.url}/openai/v1/files", headers={"api-key": key})
            seen += [r.text, str(r.headers)]
            r = c.get(f"{gw.url}/metrics")
            seen += [r.text]
        assert gw.terminate() == 0
        for text in seen:
            assert BACKEND_KEY not in text
        logs = gw.log_path.read_text()
        assert '"request"' in logs  # the access log was written, so there was something to search
        assert BACKEND_KEY not in logs
        assert key not in logs
        for db_file in tmp_path.glob("ledger.db*"):
            data = db_file.read_bytes()
            assert BACKEND_KEY.encode() not in data
            assert key.encode() not in data
    finally:
        gw.kill()
        sim.stop()
