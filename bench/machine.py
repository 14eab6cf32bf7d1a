"""The machine and the versions a run measured, for the record and the report's header."""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from targets import BENCH, REPO, Target


def _run(argv: Sequence[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, cwd=cwd, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


# A fixed piece of pure-Python work: what the interpreter does most in a gateway (calls,
# attribute reads, small dicts and strings), with no I/O. Its time says how fast the host
# runs Python right now: a VM's speed moves with its neighbours, sometimes by half within
# an hour, and the c=1 latency targets are absolute milliseconds.
_PROBE = """
import time
def work():
    total = 0
    for i in range(200_000):
        d = {"k": i, "s": str(i)}
        total += len(d["s"]) + d["k"] % 7
    return total
best = float("inf")
for _ in range(5):
    t = time.perf_counter()
    work()
    best = min(best, time.perf_counter() - t)
print(round(best * 1000, 1))
"""


def cpu_ticks(stat: str | None = None) -> tuple[int, int] | None:
    """(ticks stolen by the hypervisor, all ticks) of all CPUs so far, from the ``cpu`` line
    of ``/proc/stat`` (or ``stat``, its text); None where there is none.

    Why: on a virtual machine the hypervisor runs other guests on "our" cores, and the
    time they take shows up here as ``steal``; the speed probe sees a slow host only at the
    moments it runs, this covers a target's whole measurement."""
    if stat is None:
        try:
            stat = Path("/proc/stat").read_text()
        except OSError:
            return None
    for line in stat.splitlines():
        fields = line.split()
        # cpu  user nice system idle iowait irq softirq steal guest guest_nice
        if fields and fields[0] == "cpu" and len(fields) >= 9:
            # guest time is already counted in user (and guest_nice in nice): not added twice
            values = [int(v) for v in fields[1:9]]
            return values[7], sum(values)
    return None


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of all CPU time stolen between two ``cpu_ticks`` readings (None if unknown)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 4)


def speed_probe(cpu: int | None) -> float | None:
    """Milliseconds the probe's work took at best of 5 (on ``cpu`` when given); lower is
    faster. None if it could not run."""
    argv = [REPO / ".venv/bin/python", "-c", _PROBE]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    out = _run([str(a) for a in argv])
    try:
        return float(out.splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def _pkg_versions(python: Path, names: Sequence[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        f"for n in {list(names)!r}:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "out['python'] = sys.version.split()[0]\n"
        "print(json.dumps(out))\n"
    )
    text = _run([str(python), "-c", code])
    try:
        import json

        data: dict[str, str] = json.loads(text.splitlines()[-1])
        return data
    except (ValueError, IndexError):
        return {}


def _git_revision() -> str:
    rev = _run(["git", "rev-parse", "--short", "HEAD"], REPO)
    if not re.fullmatch(r"[0-9a-f]{4,40}", rev):
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], REPO)
    return rev + ("+dirty" if dirty else "")


def describe(
    args: argparse.Namespace, targets: Sequence[Target], load_cpu: int | None, proxy_cpu: int | None
) -> dict[str, Any]:
    """Everything a reader needs to judge and repeat the run."""
    names = {t.name for t in targets}
    versions: dict[str, Any] = {
        "sluicegate": _pkg_versions(
            REPO / ".venv/bin/python", ["sluicegate", "uvicorn", "uvloop", "httptools", "aiohttp"]
        ),
        "wrk": (_run(["wrk", "-v"]).splitlines() or [""])[0].split(" Copyright")[0],
        "nginx": _run(["nginx", "-v"]).removeprefix("nginx version: nginx/"),
        "sluicegate_git": _git_revision(),
    }
    if "litellm" in names:
        versions["litellm"] = _pkg_versions(BENCH / ".venv-litellm/bin/python", ["litellm"])
    if "sluicegate-cluster" in names:
        found = re.search(r"v=(\S+)", _run(["redis-server", "--version"]))
        versions["redis"] = found.group(1) if found else "unknown"
        versions["postgresql"] = _run(["postgres", "--version"]) or _run(["psql", "--version"])
    load1, load5, _ = os.getloadavg()
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "epoch": time.time(),
        "command": args.command or "bash bench/run.sh",
        "quick": bool(args.quick),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "stream_writes": getattr(args, "stream_writes", "event"),
        "cpus": len(os.sched_getaffinity(0)),
        "load_cpu": load_cpu,
        "proxy_cpu": proxy_cpu,
        "loadavg_at_start": [round(load1, 2), round(load5, 2)],
        "speed_probe_ms": {"start": speed_probe(proxy_cpu)},
        "machine": {
            "cpu": _cpu_model(),
            "memory_gib": _mem_gib(),
            "kernel": platform.release(),
            "os": _os_name(),
        },
        "versions": versions,
    }
