"""Fixtures for the harness's own tests: real processes on loopback ports.

The harness's modules are scripts in bench/, imported by their file names.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the process exited with {proc.returncode}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after 15 s")


Spawn = Callable[[str, list[str]], int]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """``spawn(script, args)`` runs ``bench/<script>`` with ``--port <free port>`` and the
    args, waits until it listens, and returns the port; every one is stopped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(script: str, args: list[str]) -> int:
        port = _free_port()
        argv = [sys.executable, str(BENCH / script), "--port", str(port), *args]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        _wait_listening(proc, port)
        return port

    try:
        yield start
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


@pytest.fixture
def upstream(spawn: Spawn) -> int:
    """bench/upstream.py running on a free port."""
    return spawn("upstream.py", [])


@pytest.fixture
def bare_proxy(spawn: Spawn, upstream: int) -> int:
    """bench/bare_proxy.py in front of the upstream."""
    return spawn("bare_proxy.py", ["--upstream", f"http://127.0.0.1:{upstream}"])
