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

With ``--outage SECONDS`` (cluster targets only) the target's database goes away during the
load: ``--outage-start`` seconds in, the tool sets the database to refuse connections
(``ALTER DATABASE … ALLOW_CONNECTIONS false``) and cuts those open, so that to the gateway
it is down while the server stays up for everything else; ``SECONDS`` later it lets them in
again. The records waiting in memory must then stop at the writer's ``max_pending``, the
rest going to the spill file (its size is printed each second too), and after the load the
tool waits until the spill file is replayed and checks that the ledger holds one record
for every request the upstream answered during the load.

    .venv/bin/python bench/backlog.py [--targets sluicegate-cluster,sluicegate]
        [--seconds 20] [--connections 64] [--kind json]
        [--outage 15 --outage-start 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

import turnabout
from probe import get, upstream_requests
from procs import memory_kib
from targets import PG_SERVER, Context, cluster_database

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


def set_connections(database: str, allowed: bool) -> None:
    """Let ``database`` accept connections again, or refuse new ones and cut those open: to
    the gateway using it, an outage of its database; the server stays up for the others."""
    with psycopg.connect(PG_SERVER + "postgres", autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(database), sql.SQL("true" if allowed else "false")
            )
        )
        if not allowed:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )


def stored_records(database: str) -> int:
    """The usage records in ``database``."""
    return sum(stored_outcomes(database).values())


def stored_outcomes(database: str) -> dict[str, int]:
    """The usage records in ``database``, by outcome."""
    with psycopg.connect(PG_SERVER + database, connect_timeout=5) as conn:
        rows = conn.execute("SELECT outcome, count(*) FROM usage_records GROUP BY 1").fetchall()
    return {str(outcome): int(n) for outcome, n in rows}


@dataclass
class Outage:
    """The target's database refused from ``start`` seconds into the load, for ``seconds``."""

    database: str
    spill: Path
    start: float
    seconds: float


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
    #: With ``--outage``: the spill file's size each second, and whether the ledger was
    #: complete afterwards (None: not checked).
    spill_mib: list[float] = field(default_factory=list)
    complete: bool | None = None

    def growth_per_s(self) -> float:
        """Least-squares slope of the records waiting over the load's second half."""
        half = [(t, p) for t, p in zip(self.seconds, self.pending, strict=True)]
        half = half[len(half) // 2 :]
        if len(half) < 2:
            return 0.0
        return statistics.linear_regression([t for t, _ in half], [p for _, p in half]).slope


def _mib(path: Path) -> float:
    try:
        return path.stat().st_size / 2**20
    except FileNotFoundError:
        return 0.0


def measure(
    args: argparse.Namespace, ctx: Context, run: turnabout.Running, outage: Outage | None = None
) -> Trace:
    pid = run.launched.proc.pid
    rss_before = memory_kib(pid)[0] / 1024
    stored_before = 0
    if outage is not None:
        # The readiness probe's records must be in before the count is taken.
        wait_until(lambda: pending(run.port) == 0, args.drain_timeout)
        stored_before = stored_records(outage.database)
    first = upstream_requests(ctx.upstream_port)
    wrk = turnabout.load(ctx, run, args.kind, connections=args.connections, seconds=args.seconds)
    started = time.monotonic()
    seconds: list[float] = []
    waiting: list[int] = []
    rss: list[float] = []
    spill: list[float] = []
    down = False
    try:
        while wrk.poll() is None:
            time.sleep(1.0)
            seconds.append(time.monotonic() - started)
            if outage is not None:
                in_outage = outage.start <= seconds[-1] < outage.start + outage.seconds
                if in_outage != down:
                    set_connections(outage.database, allowed=down)
                    down = in_outage
                    print(f"  {run.name}: database {'down' if down else 'back'}", flush=True)
                spill.append(_mib(outage.spill))
            waiting.append(pending(run.port))
            rss.append(memory_kib(pid)[0] / 1024)
            print(
                f"  {run.name:<28} {seconds[-1]:5.1f} s  waiting {waiting[-1]:7d}"
                f"  rss {rss[-1]:6.1f} MiB" + (f"  spill {spill[-1]:6.1f} MiB" if spill else ""),
                flush=True,
            )
    finally:
        if down:
            assert outage is not None
            set_connections(outage.database, allowed=True)
    load_s = time.monotonic() - started
    requests = upstream_requests(ctx.upstream_port) - first
    drain_started = time.monotonic()

    def drained() -> bool:
        return pending(run.port) == 0 and (outage is None or not outage.spill.exists())

    drain_s = time.monotonic() - drain_started if wait_until(drained, args.drain_timeout) else None
    complete: bool | None = None
    if outage is not None:
        # Counted again once drained: a request the gateway forwarded after wrk stopped (in
        # flight at the load's end) reaches the upstream after the count above was read.
        answered = upstream_requests(ctx.upstream_port) - first
        stored = stored_records(outage.database) - stored_before
        complete = stored == answered
        print(
            f"  {run.name}: {stored} records stored for {answered} upstream requests"
            f" ({answered - requests} of them after the load's end)"
        )
        if not complete:
            print(f"  {run.name}: records by outcome: {stored_outcomes(outage.database)}")
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
        spill,
        complete,
    )


def wait_until(done: Callable[[], bool], timeout: float) -> bool:
    """Poll ``done`` every 0.1 s; False if it did not come true within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def summary(traces: list[Trace]) -> list[str]:
    outage = any(t.complete is not None for t in traces)
    lines = [
        f"{'target':<28} {'req/s':>7} {'waiting':>8} {'growth/s':>9} {'max':>7} {'drain s':>8}"
        f" {'rss MiB: before':>16} {'end':>6} {'drained':>8}"
        + (f" {'max':>6} {'spill MiB':>10} {'ledger':>9}" if outage else "")
    ]
    for t in traces:
        drain = "-" if t.drain_s is None else f"{t.drain_s:.1f}"
        line = (
            f"{t.target:<28} {t.requests / t.load_s:7.0f} {t.pending[-1]:8d}"
            f" {t.growth_per_s():9.0f} {max(t.pending):7d} {drain:>8}"
            f" {t.rss_before:16.1f} {t.rss_mib[-1]:6.1f} {t.rss_drained:8.1f}"
        )
        if outage:
            ledger = {True: "complete", False: "MISSING", None: "-"}[t.complete]
            line += f" {max(t.rss_mib):6.1f} {max(t.spill_mib, default=0.0):10.1f} {ledger:>9}"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    turnabout.add_arguments(parser, pairs=1, seconds=20.0, connections=64, top=0, port_base=9401)
    parser.set_defaults(targets=DEFAULT_TARGETS)
    parser.add_argument("--kind", choices=("json", "stream"), default="json")
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument(
        "--outage", type=float, metavar="SECONDS", help="the database down this long (cluster)"
    )
    parser.add_argument("--outage-start", type=float, default=3.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    chosen = turnabout.chosen_targets(args, "backlog")
    if chosen is None:
        return 2
    if args.outage is not None:
        others = [name for name, t in chosen.items() if "postgresql" not in t.needs]
        if others:
            parser.error(f"--outage needs cluster targets, not {', '.join(others)}")
        if args.outage_start + args.outage >= args.seconds:
            parser.error("the outage must end before the load does (--seconds)")
    ctx = turnabout.context("backlog", args.port_base)
    traces: list[Trace] = []
    with turnabout.upstream(ctx), turnabout.started(chosen, ctx, ready_timeout=60) as running:
        for _pair, run, _kind in turnabout.turns(running, [args.kind], args.pairs):
            outage = None
            if args.outage is not None:
                outage = Outage(
                    cluster_database(ctx, run.name),
                    ctx.out / run.name / "spill" / "ledger-spill.jsonl",
                    args.outage_start,
                    args.outage,
                )
            traces.append(measure(args, ctx, run, outage))
    print("\n".join(summary(traces)))
    drained = all(t.drain_s is not None for t in traces)
    return 0 if drained and all(t.complete is not False for t in traces) else 1


if __name__ == "__main__":
    sys.exit(main())
