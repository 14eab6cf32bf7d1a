"""A private Redis server for tests that stop, restart or break Redis.

Tests that only use Redis share the one on 127.0.0.1:6379 (with unique key prefixes); a test
that takes Redis away starts its own::

    with RedisServer() as server:       # started; stopped and removed on exit
        client = redis.Redis.from_url(server.url)
        server.stop(); server.start()   # same port, empty again (no persistence)

Missing ``redis-server`` fails with the Debian package to install, never a skip.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

from tests.support.pg import free_port


def find_redis_server() -> str:
    """Path of ``redis-server``; raises ``RuntimeError`` naming the package if missing."""
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "'redis-server' not found: install it (Debian: apt-get install redis-server)"
        )
    return found


class RedisServer:
    """A ``redis-server`` child process on 127.0.0.1 and a port of its own, keeping nothing
    on disk (no RDB snapshots, no AOF): a restart starts empty, like a lost cache node.

    ``start()`` waits until it answers PING; ``stop()`` terminates it (SIGTERM, then SIGKILL
    after 5 s) and keeps the port for a later ``start()``. Not thread-safe.
    """

    def __init__(self, *, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.extra_args = extra_args
        self._binary = find_redis_server()
        self._dir = Path(tempfile.mkdtemp(prefix="sluicegate-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_file(self) -> Path:
        return self._dir / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        if self.running:
            return
        argv = [
            self._binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--logfile", str(self.log_file),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                _, err = self._process.communicate()
                raise RuntimeError(
                    f"redis-server exited with {self._process.returncode}: "
                    f"{err.decode(errors='replace')}{self._log_tail()}"
                )
            if self._answers_ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} not ready in {timeout} s")

    def stop(self) -> None:
        """Terminate the server (its data is gone: nothing is persisted)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if process.stderr is not None:
            process.stderr.close()

    def cleanup(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<RedisServer {self.host}:{self.port} {'running' if self.running else 'stopped'}>"

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return "\n" + self.log_file.read_text()[-2000:]
        except OSError:
            return ""


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A started private ``RedisServer`` of the test's own, removed afterwards."""
    with RedisServer() as server:
        yield server
