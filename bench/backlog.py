"""Does the ledger keep up with a saturated worker? Records waiting and memory, second by second.

A worker at full load gives its ledger writer only what the event loop leaves of the core.
If the writer writes fewer records a second than the worker answers requests, the records
waiting (held in memory) grow for as long as the load lasts, and with them the process's
resident memory. `make bench` measures throughput and memory after the runs, not this.

Each target is started once (on CPU 1, the fake upstream and wrk on CPU 0, as in
`make bench`) and loaded with ``--kind`` requests at ``--connections`` for ``--seconds``.
Every second the tool reads the target's ``sluicegate_ledger_pending_records`` (its
``/metrics``), its resident memory and the requests the upstream has answered; after the
load it waits until nothing is pending. It prints, per target: requests a second, the
records waiting at the end of the load, their growth a second over the load's second half
(a least-squares slope: ~0 when the writer keeps up), the most that waited, how long the
queue took to drain, and the resident memory before the load, at its end and after the
drain.

    .venv/bin/python bench/backlog.py [--targets sluicegate-cluster,sluicegate]
        [--seconds 20] [--connections 64] [--kind json]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from dataclasses import dataclass

import turnabout
from probe import get, upstream_requests
from procs import memory_kib
from targets import Context

_PENDING = re.compile(rb"^sluicegate_ledger_pending_records\s+([0-9.e+]+)\s*$", re.M)
DEFAULT_TARGETS = "sluicegate-cluster-nolimits,sluicegate-cluster,sluicegate-nolimits,sluicegate"


def parse_pending(metrics: bytes) -> int | None:
    """``sluicegate_ledger_pending_records`` from a Prometheus text exposition, if there."""
    found = _PENDING.search(metrics)
    return None if found is None else int(float(found.group(1)))


def pending(port: int) -> int:
    """The target's records waiting to be written, from its ``/metrics``."""
    status, body = get(port, "/metrics")
    waiting = parse_pending(body) if status == 200 else None
    if waiting is None:
        raise SystemExit(f"backlog: no sluicegate_ledger_pending_records on :{port}/metrics")
    return waiting


@dataclass
class Trace:
    target: str
    seconds: list[float]
    pending: list[int]
    rss_mib: list[float]
    requests: int
    load_s: float
    drain_s: float | None
    rss_before: float
    rss_drained: float

    def growth_per_s(self) -> float:
        """Least-squares slope of the records waiting over the load's second half."""
        half = [(t, p) for t, p in zip(self.seconds, self.pending, strict=True)]
        half = half[len(half) // 2 :]
        if len(half) < 2:
            return 0.0
        return statistics.linear_regression([t for t, _ in half], [p for _, p in half]).slope


def measure(args: argparse.Namespace, ctx: Context, run: turnabout.Running) -> Trace:
    pid = run.launched.proc.pid
    rss_before = memory_kib(pid)[0] / 1024
    first = upstream_requests(ctx.upstream_port)
    wrk = turnabout.load(ctx, run, args.kind, connections=args.connections, seconds=args.seconds)
    started = time.monotonic()
    seconds: list[float] = []
    waiting: list[int] = []
    rss: list[float] = []
    while wrk.poll() is None:
        time.sleep(1.0)
        seconds.append(time.monotonic() - started)
        waiting.append(pending(run.port))
        rss.append(memory_kib(pid)[0] / 1024)
        print(
            f"  {run.name:<28} {seconds[-1]:5.1f} s  waiting {waiting[-1]:7d}"
            f"  rss {rss[-1]:6.1f} MiB",
            flush=True,
        )
    load_s = time.monotonic() - started
    requests = upstream_requests(ctx.upstream_port) - first
    drain_started = time.monotonic()
    drain_s: float | None = None
    while time.monotonic() - drain_started < args.drain_timeout:
        if pending(run.port) == 0:
            drain_s = time.monotonic() - drain_started
            break
        time.sleep(0.1)
    return Trace(
        run.name,
        seconds,
        waiting,
        rss,
        requests,
        load_s,
        drain_s,
        rss_before,
        memory_kib(pid)[0] / 1024,
    )


def summary(traces: list[Trace]) -> list[str]:
    lines = [
        f"{'target':<28} {'req/s':>7} {'waiting':>8} {'growth/s':>9} {'max':>7} {'drain s':>8}"
        f" {'rss MiB: before':>16} {'end':>6} {'drained':>8}"
    ]
    for t in traces:
        drain = "-" if t.drain_s is None else f"{t.drain_s:.1f}"
        lines.append(
            f"{t.target:<28} {t.requests / t.load_s:7.0f} {t.pending[-1]:8d}"
            f" {t.growth_per_s():9.0f} {max(t.pending):7d} {drain:>8}"
            f" {t.rss_before:16.1f} {t.rss_mib[-1]:6.1f} {t.rss_drained:8.1f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    turnabout.add_arguments(parser, pairs=1, seconds=20.0, connections=64, top=0, port_base=9401)
    parser.set_defaults(targets=DEFAULT_TARGETS)
    parser.add_argument("--kind", choices=("json", "stream"), default="json")
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    chosen = turnabout.chosen_targets(args, "backlog")
    if chosen is None:
        return 2
    ctx = turnabout.context("backlog", args.port_base)
    traces: list[Trace] = []
    with turnabout.upstream(ctx), turnabout.started(chosen, ctx, ready_timeout=60) as running:
        for _pair, run, _kind in turnabout.turns(running, [args.kind], args.pairs):
            traces.append(measure(args, ctx, run))
    print("\n".join(summary(traces)))
    return 0 if all(t.drain_s is not None for t in traces) else 1


if __name__ == "__main__":
    sys.exit(main())
