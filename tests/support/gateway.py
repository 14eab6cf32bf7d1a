"""Running real gateways for tests: in a thread of the test process (real socket, real
uvicorn) or as a separate ``sluicegate serve`` process (for signals and clusters)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import uvicorn
import yaml

from sluicegate.app import create_app
from sluicegate.clock import Clock
from sluicegate.config.loader import parse_config
from sluicegate.config.model import GatewayConfig
from sluicegate.gateway import Gateway
from sluicegate.server import uvicorn_config

BACKEND_KEY = "backend-secret-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_config(
    tmp: Path,
    backends: dict[str, str],
    *,
    deployments: list[dict[str, Any]] | None = None,
    products: list[dict[str, Any]] | None = None,
    storage_url: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A gateway.yaml as a dict: every backend authenticates with ``BACKEND_KEY`` taken from
    the environment variable ``SG_TEST_BACKEND_KEY``."""
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0, "graceful_shutdown_seconds": 5},
        "storage": {
            "url": storage_url or f"sqlite:///{tmp / 'ledger.db'}",
            "spill_dir": str(tmp / "spill"),
            "flush_interval_seconds": 0.05,
        },
        "refresh_seconds": 0.2,
        "backends": [
            {
                "name": name,
                "url": url,
                "auth": {"type": "api-key", "key_env": "SG_TEST_BACKEND_KEY"},
            }
            for name, url in backends.items()
        ],
        "deployments": deployments
        or [
            {"name": "gpt-4o-mini", "backend": next(iter(backends)), "model": "gpt-4o-mini"},
            {"name": "gpt-4o", "backend": next(iter(backends)), "model": "gpt-4o"},
            {
                "name": "text-embedding-3-small",
                "backend": next(iter(backends)),
                "model": "text-embedding-3-small",
            },
        ],
        "products": products
        or (
            [{"name": "starter", "deployments": ["*"]}]
            if deployments
            else [
                {"name": "starter", "deployments": ["*"]},
                {"name": "embeddings-only", "deployments": ["text-embedding-3-small"]},
            ]
        ),
    }
    data.update(extra)
    return data


def gateway_environ() -> dict[str, str]:
    return dict(
        os.environ,
        SG_TEST_BACKEND_KEY=BACKEND_KEY,
        SLUICEGATE_KEY_SECRET="test-key-secret-0123456789abcdef",
    )


class GatewayThread:
    """A real gateway (uvicorn + the app, with the server's own ``uvicorn_config``: header
    limits, TLS when configured, and production's uvloop event loop, whose transports differ
    from asyncio's: a write after a lost connection raises there) on a free loopback port, in
    a background thread."""

    def __init__(self, config: GatewayConfig | dict[str, Any], clock: Clock | None = None) -> None:
        if isinstance(config, dict):
            config = parse_config(config)
        env = gateway_environ()
        self.config = config
        self.gateway = Gateway(config, environ=env, clock=clock)
        self.port = free_port()
        app = create_app(self.gateway, env)
        uv = uvicorn_config(
            app, config, host="127.0.0.1", port=self.port, metrics=self.gateway.metrics
        )
        self.server = uvicorn.Server(uv)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.config.listen.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> GatewayThread:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _prlimit() -> str:
    found = shutil.which("prlimit")
    if found is None:
        raise RuntimeError("prlimit is missing: install util-linux (Debian: util-linux)")
    return found


class GatewayProcess:
    """``sluicegate serve`` in its own process, its stderr (the logs) kept in a file.
    ``open_files``: start it with this (soft, hard) open-file limit (util-linux's
    ``prlimit``), as a system with a low limit would."""

    def __init__(
        self,
        tmp: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        open_files: tuple[int, int] | None = None,
    ) -> None:
        self.port = free_port()
        config = dict(config, listen=dict(config.get("listen", {}), port=self.port))
        self.config_path = tmp / f"gateway-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / f"gateway-{self.port}.log"
        self.env = env or gateway_environ()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._prefix = []
        if open_files is not None:
            self._prefix = [_prlimit(), "--nofile={}:{}".format(*open_files), "--"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> GatewayProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            [
                *self._prefix,
                sys.executable,
                "-m",
                "sluicegate.cli.main",
                "serve",
                "--config",
                str(self.config_path),
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("gateway did not become healthy")

    def create_key(
        self, product: str = "starter", owner: str = "o", name: str = "n"
    ) -> dict[str, Any]:
        """A new subscription made with the real CLI (``keys create --json``)."""
        out = subprocess.run(
            [sys.executable, "-m", "sluicegate.cli.main", "keys", "create", "--config",
             str(self.config_path), "--product", product, "--owner", owner, "--name", name,
             "--json"],
            env=self.env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        made: dict[str, Any] = json.loads(out.stdout)
        return made

    def wait_visible(self, key: str, within: float = 5.0) -> None:
        """Until this gateway knows ``key`` (listing models spends no tokens)."""
        deadline = time.monotonic() + within
        while not self._known(key):
            if time.monotonic() > deadline:
                raise AssertionError("the key did not reach the gateway")
            time.sleep(0.05)

    def _known(self, key: str) -> bool:
        try:
            with urllib.request.urlopen(
                urllib.request.Request(f"{self.url}/openai/v1/models", headers={"api-key": key}),
                timeout=5,
            ) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._close_log()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
