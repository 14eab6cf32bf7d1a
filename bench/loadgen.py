"""One load run: wrk pinned to the load CPU, with the proxy's and upstream's CPU measured.

wrk gets its POST body and headers from ``wrk/chat.lua`` (through the environment) and
prints one JSON line from its ``done()`` callback; everything here is parsed from that line,
never from wrk's human-readable summary. CPU is read from ``/proc`` right before and after
the run for the proxy's process tree and the upstream, and wrk's own CPU from the rusage of
reaped children, so each run says how much of a core every party used.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from procs import BenchError, cpu_seconds, pin

LUA = Path(__file__).resolve().parent / "wrk" / "chat.lua"


@dataclass(frozen=True)
class Run:
    """What one wrk run measured. Latencies in milliseconds, CPU in cores (seconds/second)."""

    requests: int
    duration_s: float
    rps: float
    errors: dict[str, int]
    latency_ms: dict[str, float]
    proxy_cores: float
    upstream_cores: float
    loadgen_cores: float

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rps_per_core(self) -> float | None:
        # Below 1 % of a core the ratio is noise (or the proxy did not see the traffic).
        return self.rps / self.proxy_cores if self.proxy_cores >= 0.01 else None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rps_per_core"] = self.rps_per_core
        out["error_count"] = self.error_count
        return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk_command(
    url: str,
    *,
    body_file: Path,
    headers: Mapping[str, str],
    connections: int,
    duration: float,
    cpu: int | None,
    mix_file: Path | None = None,
    timeout_s: int = 10,
) -> tuple[list[str], dict[str, str]]:
    """argv and environment for one wrk run (one thread, ``connections`` keep-alive ones)."""
    env = {
        **os.environ,
        "BENCH_BODY_FILE": str(body_file),
        "BENCH_HEADERS": "|".join(f"{k}: {v}" for k, v in headers.items()),
        "BENCH_MIX_FILE": str(mix_file or ""),
    }
    wrk = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s"]
    return pin(cpu, [*wrk, f"--timeout={timeout_s}s", "-s", str(LUA), url]), env


def parse_wrk(url: str, returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    """The JSON line ``chat.lua``'s ``done()`` printed, or BenchError."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if returncode != 0 or line is None:
        raise BenchError(f"wrk failed (exit {returncode}) against {url}:\n{stdout}\n{stderr}")
    data: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    return data


def run_wrk(
    url: str,
    *,
    body_file: Path,
    headers: Mapping[str, str],
    connections: int,
    duration: float,
    proxy_pid: int,
    upstream_pid: int,
    cpu: int | None,
) -> Run:
    """Run wrk for ``duration`` seconds and account the CPU every party used meanwhile."""
    argv, env = wrk_command(
        url,
        body_file=body_file,
        headers=headers,
        connections=connections,
        duration=duration,
        cpu=cpu,
    )
    proxy0, upstream0, wrk0 = cpu_seconds(proxy_pid), cpu_seconds(upstream_pid), _children_cpu()
    t0 = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - t0
    proxy1, upstream1, wrk1 = cpu_seconds(proxy_pid), cpu_seconds(upstream_pid), _children_cpu()
    data = parse_wrk(url, done.returncode, done.stdout, done.stderr)
    seconds = data["duration_us"] / 1e6
    # The CPU window is the whole subprocess call, a few ms longer than wrk's own timer.
    return Run(
        requests=data["requests"],
        duration_s=round(seconds, 3),
        rps=data["requests"] / seconds if seconds else 0.0,
        errors=data["errors"],
        latency_ms={k: v / 1000.0 for k, v in data["latency_us"].items()},
        proxy_cores=(proxy1 - proxy0) / wall,
        upstream_cores=(upstream1 - upstream0) / wall,
        loadgen_cores=(wrk1 - wrk0) / wall,
    )
