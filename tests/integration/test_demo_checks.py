"""The demo's parts that a whole run cannot show on demand: its health check trusts only the
child it started (a port taken between the demo's check and the child's start), its admin
token outlives a run, and ``make demo`` passes PORT and SIM_PORT on."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from sluicegate.cli.context import CommandFailed
from sluicegate.cli.demo import _wait_healthy
from tests.support.gateway import free_port

REPO = Path(__file__).resolve().parents[2]

linux_only = pytest.mark.skipif(
    not Path("/proc/net/tcp").exists(), reason="who holds a port is read from /proc (Linux)"
)


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def other_healthy_server() -> Iterator[int]:
    """An HTTP server in this process that answers 200 to everything: an older demo's
    gateway, as far as a health check can tell."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@contextmanager
def child(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@linux_only
def test_an_answer_from_another_process_is_not_the_child_being_healthy() -> None:
    with other_healthy_server() as port, child("-c", "import time; time.sleep(120)") as proc:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        with pytest.raises(RuntimeError, match=r"another process answers at .* not the gateway"):
            _wait_healthy(f"http://127.0.0.1:{port}/healthz", proc, "the gateway", timeout=2)


@linux_only
def test_an_answer_from_the_child_is_healthy() -> None:
    port = free_port()
    with child("-m", "http.server", str(port), "--bind", "127.0.0.1") as proc:
        _wait_healthy(f"http://127.0.0.1:{port}/", proc, "the server", timeout=60)


def test_the_admin_token_is_made_once_and_kept_private(tmp_path: Path) -> None:
    from sluicegate.cli.demo import admin_token

    workdir = tmp_path / "demo"
    token = admin_token(workdir)
    assert len(token) >= 32
    assert admin_token(workdir) == token
    path = workdir / "admin-token"
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("short\n")
    with pytest.raises(CommandFailed, match="fewer than 16 characters"):
        admin_token(workdir)


def test_make_demo_passes_the_ports_on() -> None:
    dry = subprocess.run(
        ["make", "--dry-run", "demo", "PORT=18123", "SIM_PORT=18124"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert ".venv/bin/sluicegate demo --port 18123 --sim-port 18124\n" in dry.stdout
