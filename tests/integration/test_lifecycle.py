"""Keys made and changed with the CLI reach a running gateway within a second; SIGTERM under
load loses no usage record."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sluicegate.simulator.config import SimDeployment
from sluicegate.simulator.server import SimulatorThread
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.reports import fetch_records
from tests.integration.conftest import sim_config
from tests.support.gateway import GatewayProcess, gateway_config, gateway_environ

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
BODY = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


def cli(config: Path, *args: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "sluicegate.cli.main", *args, "--config", str(config)],
        env=gateway_environ(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def wait_status(url: str, key: str, status: int, within: float = 1.0) -> float:
    """Seconds until a request with ``key`` gets ``status``; fails after ``within`` s."""
    started = time.monotonic()
    while True:
        got = httpx.post(url + CHAT, json=BODY, headers={"api-key": key}).status_code
        elapsed = time.monotonic() - started
        if got == status:
            return elapsed
        assert elapsed < within, f"still {got} after {elapsed:.2f} s, wanted {status}"
        time.sleep(0.02)


@pytest.fixture
def sim():  # type: ignore[no-untyped-def]
    s = SimulatorThread(sim_config())
    s.start()
    yield s
    s.stop()


def test_cli_changes_reach_the_running_gateway_within_a_second(tmp_path: Path, sim) -> None:  # type: ignore[no-untyped-def]
    gw = GatewayProcess(tmp_path, gateway_config(tmp_path, {"sim": sim.url}, refresh_seconds=0.5))
    try:
        gw.start()
        made = gw.create_key("starter", "team-x", "ci")
        sub_id, primary, secondary = made["id"], made["primary_key"], made["secondary_key"]
        wait_status(gw.url, primary, 200)
        assert (
            httpx.post(gw.url + CHAT, json=BODY, headers={"api-key": secondary}).status_code == 200
        )
        listed = json.loads(cli(gw.config_path, "keys", "list", "--json"))
        assert listed["total"] == 1
        assert primary not in json.dumps(listed)
        shown = json.loads(cli(gw.config_path, "keys", "show", sub_id, "--json"))
        assert shown["owner"] == "team-x"
        cli(gw.config_path, "keys", "suspend", sub_id)
        wait_status(gw.url, primary, 403)
        cli(gw.config_path, "keys", "resume", sub_id)
        wait_status(gw.url, primary, 200)
        rotated = json.loads(
            cli(gw.config_path, "keys", "rotate", sub_id, "--key", "primary", "--json")
        )
        new_primary = rotated["primary_key"]
        wait_status(gw.url, primary, 401)
        wait_status(gw.url, new_primary, 200)
        assert (
            httpx.post(gw.url + CHAT, json=BODY, headers={"api-key": secondary}).status_code == 200
        )
        cli(gw.config_path, "keys", "cancel", sub_id)
        wait_status(gw.url, secondary, 403)
        report = json.loads(
            cli(gw.config_path, "usage", "report", "--by", "owner", "--format", "json")
        )
        assert report["rows"][0]["key"] == "team-x"
        assert report["rows"][0]["requests"] >= 4
        csv_out = cli(gw.config_path, "usage", "report", "--by", "subscription", "--format", "csv")
        assert csv_out.splitlines()[0].startswith("key,")
    finally:
        gw.kill()


def test_sigterm_under_load_loses_no_record(tmp_path: Path) -> None:
    slowish = SimDeployment(
        name="gpt-4o-mini", model="gpt-4o-mini", kind="chat", ttft_ms=20, tokens_per_second=200
    )
    sim = SimulatorThread(sim_config(deployments=[slowish]))
    sim.start()
    cfg = gateway_config(
        tmp_path, {"sim": sim.url}, deployments=[{"name": "gpt-4o-mini", "backend": "sim"}]
    )
    gw = GatewayProcess(tmp_path, cfg)
    try:
        gw.start()
        made = gw.create_key("starter", "o", "n")
        key = made["primary_key"]
        wait_status(gw.url, key, 200, within=2)
        stop = threading.Event()
        answered = []

        def client(i: int) -> None:
            with httpx.Client(base_url=gw.url, timeout=30) as c:
                while not stop.is_set():
                    try:
                        r = c.post(
                            CHAT,
                            json={**BODY, "stream": i % 2 == 0, "max_tokens": 20},
                            headers={"api-key": key},
                        )
                        answered.append(r.status_code)
                    except httpx.HTTPError:
                        if gw.proc and gw.proc.poll() is not None:
                            return
                        time.sleep(0.01)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        assert gw.terminate() == 0
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        gw.kill()
        log = httpx.get(f"{sim.url}/_sim/log").json()
        sim.stop()
    entries = log["entries"] if isinstance(log, dict) else log
    forwarded = {
        e["headers"]["x-ms-client-request-id"]
        for e in entries
        if "x-ms-client-request-id" in e["headers"]
    }
    engine = create_engine_for(str(cfg["storage"]["url"]))
    records = fetch_records(engine, limit=1_000_000)
    engine.dispose()
    ids = [r.request_id for r in records]
    assert len(ids) == len(set(ids))  # exactly once
    assert forwarded <= set(ids)  # every request that reached the backend is in the ledger
    assert len([s for s in answered if s == 200]) <= len([r for r in records if r.status == 200])
    assert len(records) > 50


def _open_file_limit(pid: int) -> tuple[int, int]:
    """The (soft, hard) open-file limit of a running process, from ``/proc``."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


def test_serve_raises_its_open_file_limit_or_says_why_it_cannot(tmp_path: Path, sim) -> None:  # type: ignore[no-untyped-def]
    """Started with 512 descriptors (many systems start a process with 1,024), the gateway
    raises its soft limit to what ``listen.max_connections`` and the backends' pools need
    (here 1,000 + 256 + 256 reserved); where the hard limit is lower, it serves all the same
    and its log says what to change."""
    cfg = gateway_config(tmp_path, {"sim": sim.url}, listen={"max_connections": 1000})
    needed = 1000 + 256 + 256
    roomy = GatewayProcess(tmp_path, cfg, open_files=(512, 2048))
    tight = GatewayProcess(tmp_path, cfg, open_files=(512, 512))
    try:
        roomy.start()
        assert roomy.proc is not None
        assert _open_file_limit(roomy.proc.pid) == (needed, 2048)
        assert "open-file limit" not in roomy.log_path.read_text()

        tight.start()
        assert tight.proc is not None
        assert _open_file_limit(tight.proc.pid) == (512, 512)
        key = tight.create_key()["primary_key"]
        wait_status(tight.url, key, 200, within=2)
        log = tight.log_path.read_text()
        assert f"the open-file limit is 512, below the {needed}" in log
        assert "listen.max_connections (1000)" in log
    finally:
        roomy.kill()
        tight.kill()
