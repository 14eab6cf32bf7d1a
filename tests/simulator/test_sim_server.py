"""Running the simulator: thread, in-loop handle, and the ``simulate`` command's process."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from sluicegate.simulator import SimulatorThread, default_sim_config, start_simulator
from sluicegate.simulator.cli import simulate
from sluicegate.simulator.config import DEFAULT_SIM_API_KEY


def test_thread_starts_listening_and_stops() -> None:
    sim = SimulatorThread(default_sim_config())
    with pytest.raises(RuntimeError, match="not running"):
        _ = sim.url
    sim.start()
    try:
        assert sim.port > 0
        assert sim.url == f"http://127.0.0.1:{sim.port}"
        assert httpx.get(f"{sim.url}/_sim/health").status_code == 200
        resp = httpx.post(
            f"{sim.url}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21",
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers={"api-key": DEFAULT_SIM_API_KEY},
        )
        assert resp.status_code == 200
    finally:
        sim.stop()
    sim.stop()  # idempotent
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{sim.url}/_sim/health")
    assert not any(t.name == "sluicegate-simulator" for t in threading.enumerate())


def test_thread_start_reports_a_bind_failure() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="in use"):
            SimulatorThread(default_sim_config(), port=port).start()


async def test_handle_closes_while_a_request_hangs() -> None:
    handle = await start_simulator(default_sim_config())
    async with httpx.AsyncClient(
        base_url=handle.url, headers={"api-key": DEFAULT_SIM_API_KEY}
    ) as c:
        pending = asyncio.create_task(
            c.post(
                "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                json={"messages": [{"role": "user", "content": "hi"}]},
                headers={"x-sim-fault": "hang"},
                timeout=30,
            )
        )
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await handle.close()
        assert loop.time() - started < 3
        with pytest.raises(httpx.HTTPError):
            await pending
    await handle.close()  # idempotent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_simulate_command_serves_until_signalled(signum: int) -> None:
    port = _free_port()
    code = (
        "import sys; from sluicegate.simulator.cli import simulate; "
        f"sys.exit(simulate(None, '127.0.0.1', {port}))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert f"listening on http://127.0.0.1:{port}" in first
        assert httpx.get(f"http://127.0.0.1:{port}/_sim/health").status_code == 200
        proc.send_signal(signum)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


def test_simulate_reports_bad_config_and_busy_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "sim.yaml"
    bad.write_text("deployments: [{name: a}]")
    assert simulate(bad, "127.0.0.1", 0) == 2
    assert "deployments.0.model" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert simulate(None, "127.0.0.1", port) == 1
    assert "cannot listen" in capsys.readouterr().err
