"""The soak: steady load for a long time, resident memory sampled every 10 seconds.

The load is 64 connections of mixed traffic (every fourth request a stream, the others
JSON) for the whole duration. Memory is judged flat when the median resident size of the
last minute exceeds the median of the second minute (after the warm-up settled) by no more
than ``FLAT_MIB``; the least-squares slope over the samples is reported beside it.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

from loadgen import parse_wrk, wrk_command
from probe import probe, upstream_requests
from procs import BenchError, cpu_seconds, memory_kib, start

if TYPE_CHECKING:
    from harness import Bench
    from targets import Target

SAMPLE_EVERY = 10.0
FLAT_MIB = 5.0
MIN_SECONDS = 600


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def judge(samples: list[dict[str, float]]) -> dict[str, Any]:
    """Growth between the second minute and the last minute, and the slope (MiB per hour)."""
    if not samples:
        return {"flat": None, "reason": "no samples"}
    end_t = samples[-1]["t"]
    early = _median([s["rss_mib"] for s in samples if 60 <= s["t"] < 120])
    late = _median([s["rss_mib"] for s in samples if s["t"] >= end_t - 60])
    settled = [s for s in samples if s["t"] >= 60]
    slope = None
    if len(settled) >= 3:
        xs = [s["t"] for s in settled]
        ys = [s["rss_mib"] for s in settled]
        slope = statistics.linear_regression(xs, ys).slope * 3600
    if early is None or late is None or end_t < 180:
        return {"flat": None, "reason": "too short to judge (needs 3 minutes)", "slope": slope}
    growth = late - early
    return {
        "flat": growth <= FLAT_MIB,
        "rss_mib_minute_2": round(early, 1),
        "rss_mib_last_minute": round(late, 1),
        "growth_mib": round(growth, 1),
        "slope_mib_per_hour": None if slope is None else round(slope, 2),
        "criterion": f"growth from minute 2 to the last minute <= {FLAT_MIB} MiB",
    }


def soak_target(bench: Bench, target: Target, seconds: int) -> dict[str, Any]:
    """Soak one target; returns its samples, wrk summary and verdict."""
    if seconds < MIN_SECONDS:
        print(f"  note: {seconds} s is shorter than the {MIN_SECONDS} s a soak verdict needs")
    args = bench.args
    forwarded_before = upstream_requests(args.port_base)
    launched = bench.launch(target)
    record: dict[str, Any] = {"target": target.name, "label": target.label, "seconds": seconds}
    try:
        record["probe"] = probe(
            target, bench.port(target), launched.headers, upstream_port=args.port_base
        )
        bench.load(target, launched, "json", 64, max(args.warmup, 5))
        url = bench.url(target)
        argv, env = wrk_command(
            url,
            body_file=bench.body_files["json"],
            headers=launched.headers,
            connections=64,
            duration=seconds,
            cpu=bench.load_cpu,
            mix_file=bench.body_files["stream"],
        )
        pid = launched.proc.pid
        before = upstream_requests(args.port_base)
        samples: list[dict[str, float]] = []
        t0 = time.monotonic()
        cpu0 = cpu_seconds(pid)
        # In its own process group and in the pid file, so that run.sh's trap stops it even if
        # the harness itself is killed.
        wrk = start("wrk-soak", argv, log_dir=args.out, pid_file=bench.pid_file, env=env)
        try:
            next_at = t0 + SAMPLE_EVERY
            while wrk.alive():
                time.sleep(max(0.0, min(1.0, next_at - time.monotonic())))
                if time.monotonic() >= next_at and wrk.alive():
                    rss, _, _ = memory_kib(pid)
                    cpu1 = cpu_seconds(pid)
                    sample = {
                        "t": round(next_at - t0, 1),
                        "rss_mib": round(rss / 1024, 2),
                        "proxy_cores": round((cpu1 - cpu0) / SAMPLE_EVERY, 3),
                    }
                    samples.append(sample)
                    cpu0 = cpu1
                    print(
                        f"  t={sample['t']:>6.0f}s rss {sample['rss_mib']:.1f} MiB "
                        f"proxy {sample['proxy_cores']:.2f} cores",
                        flush=True,
                    )
                    next_at += SAMPLE_EVERY
                if not launched.proc.alive():
                    raise BenchError(
                        f"{target.name} died during the soak:\n{launched.proc.log_tail()}"
                    )
        finally:
            code = wrk.stop(grace=2)
        data = parse_wrk(url, code or 0, wrk.log_path.read_text(), "")
        secs = data["duration_us"] / 1e6
        errors = sum(data["errors"].values())
        record.update(
            requests=data["requests"],
            rps=round(data["requests"] / secs, 1) if secs else 0.0,
            errors=data["errors"],
            error_count=errors,
            latency_ms={k: v / 1000.0 for k, v in data["latency_us"].items()},
            upstream_requests=upstream_requests(args.port_base) - before,
            samples=samples,
            verdict=judge(samples),
        )
        rss, hwm, nproc = memory_kib(pid)
        record["memory"] = {
            "rss_mib": round(rss / 1024, 1),
            "hwm_mib": round(hwm / 1024, 1),
            "processes": nproc,
            "workers": launched.workers,
        }
        bench.finish(launched, record, forwarded_before)
    finally:
        bench.discard(launched)
    return record
