"""``sluicegate demo``: the simulator and a gateway in front of it, a demo key, and examples
that work as printed. Ctrl-C stops both."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from sluicegate.cli.context import open_admin
from sluicegate.config.loader import parse_config

_DEPLOYMENTS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback only
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not become healthy at {url} within {timeout:g} s")


def demo_files(workdir: Path, port: int, sim_port: int, backend_key: str) -> Path:
    """Write the simulator's and the gateway's configuration; return the gateway's path."""
    workdir.mkdir(parents=True, exist_ok=True)
    sim = {
        "api_keys": [backend_key],
        "deployments": [
            {
                "name": "gpt-4o-mini",
                "model": "gpt-4o-mini-2024-07-18",
                "kind": "chat",
                "tpm": 1_000_000,
                "rpm": 6_000,
                "ttft_ms": 50,
                "tokens_per_second": 200,
            },
            {
                "name": "gpt-4o",
                "model": "gpt-4o-2024-08-06",
                "kind": "chat",
                "tpm": 1_000_000,
                "rpm": 6_000,
                "ttft_ms": 80,
                "tokens_per_second": 100,
            },
            {
                "name": "text-embedding-3-small",
                "model": "text-embedding-3-small",
                "kind": "embeddings",
                "tpm": 1_000_000,
                "rpm": 6_000,
            },
        ],
    }
    (workdir / "simulator.yaml").write_text(yaml.safe_dump(sim, sort_keys=False))
    gateway = {
        "mode": "embedded",
        "listen": {"host": "127.0.0.1", "port": port},
        "storage": {
            "url": f"sqlite:///{workdir / 'ledger.db'}",
            "spill_dir": str(workdir / "spill"),
        },
        "backends": [
            {
                "name": "simulator",
                "url": f"http://127.0.0.1:{sim_port}",
                "auth": {"type": "api-key", "key_env": "SLUICEGATE_DEMO_BACKEND_KEY"},
            }
        ],
        "deployments": [{"name": d, "backend": "simulator", "model": d} for d in _DEPLOYMENTS],
        "products": [
            {
                "name": "starter",
                "description": "Demo product: every deployment",
                "deployments": ["*"],
            }
        ],
    }
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(gateway, sort_keys=False))
    return path


def examples(gateway_url: str, key: str) -> str:
    return f"""
sluicegate is running at {gateway_url} (in front of the built-in simulator).

A demo subscription was created. Its key: {key}

curl:

  curl -s "{gateway_url}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21" \\
    -H "api-key: {key}" -H "content-type: application/json" \\
    -d '{{"messages": [{{"role": "user", "content": "Say hello"}}]}}'

Python (pip install openai):

  from openai import AzureOpenAI
  client = AzureOpenAI(azure_endpoint="{gateway_url}", api_key="{key}", api_version="2024-10-21")
  reply = client.chat.completions.create(
      model="gpt-4o-mini", messages=[{{"role": "user", "content": "Say hello"}}]
  )
  print(reply.choices[0].message.content, reply.usage)

Usage so far:  .venv/bin/sluicegate usage report -c {{config}}
Press Ctrl-C to stop.
"""


def run_demo(*, port: int, sim_port: int, workdir: Path) -> int:
    backend_key = secrets.token_urlsafe(24)
    config_path = demo_files(workdir, port, sim_port, backend_key)
    env = dict(os.environ, SLUICEGATE_DEMO_BACKEND_KEY=backend_key, PYTHONUNBUFFERED="1")
    exe = [sys.executable, "-m", "sluicegate.cli.main"]
    sim = subprocess.Popen(
        [*exe, "simulate", "--config", str(workdir / "simulator.yaml"), "--port", str(sim_port)],
        env=env,
    )
    gw: subprocess.Popen[bytes] | None = None
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        _wait_healthy(f"http://127.0.0.1:{sim_port}/_sim/health", sim, "the simulator")
        config = parse_config(yaml.safe_load(config_path.read_text()), str(config_path))
        issued = open_admin(config).create_subscription(
            product="starter", owner="demo-team", name="demo key"
        )
        gw = subprocess.Popen(
            [*exe, "serve", "--config", str(config_path)],
            env=env,
            stderr=open(workdir / "gateway.log", "ab"),  # noqa: SIM115 - lives as long as gw
        )
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(f"{url}/healthz", gw, "the gateway")
        print(
            examples(url, issued.primary_key or "").replace("{config}", str(config_path)),
            flush=True,
        )
        while not stopping and sim.poll() is None and gw.poll() is None:
            time.sleep(0.2)
    except RuntimeError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in (gw, sim):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (gw, sim):
            if proc is not None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        print("demo stopped", flush=True)
    return 0
