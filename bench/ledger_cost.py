"""What writing the ledger costs per usage record: the writer thread's CPU and the database's.

The gateway's request path only queues a record; the ledger writer's thread turns the queue
into rows (``sluicegate.storage.ledger``). Under sustained load that thread shares the
gateway's core (and the GIL) with the event loop, so its CPU per record bounds how many
requests a second one worker can account for without a growing backlog. This measures it
directly, away from any HTTP load:

* ``--records`` realistic records are queued at once, and the writer drains them in full
  batches back to back, as it does under saturation; the main thread meanwhile waits as an
  event loop would, in 0.2 ms sleeps, the two pinned to one CPU (``--cpu``) with the
  gateway's thread switch interval;
* ``writer_cpu_us``: the writer thread's CPU time per record (``/proc/self/task``);
* ``database_cpu_us`` (PostgreSQL): the server backend's CPU per record, from
  ``/proc/<pid>/stat`` of the writer connection's backend (``pg_backend_pid()``), so only
  on a server on this machine;
* ``longest_wait_ms``: the most one of the main thread's sleeps overran: how long the
  writer kept the event loop from running (holding the GIL, or the shared core);
* ``records_per_s``: wall-clock throughput.

With ``--rate N`` it measures light load instead: N records a second are submitted for
``--seconds`` by a thread that otherwise sleeps 0.2 ms at a time (after computing
``--busy-ms``, as a busy event loop does), the writer keeping up and scheduling itself as
in the gateway; it reports how late those sleeps woke (99th and 99.9th percentile, most).
That is where a database burst on the worker's core shows (bench/analysis.md).

Best of ``--repeats`` (fewest writer microseconds), after a warm-up batch. Each database is
a throwaway: a new PostgreSQL database on ``--postgres`` (dropped afterwards) and a SQLite
file in a temporary directory.

    .venv/bin/python bench/ledger_cost.py [--records 50000] [--repeats 3] [--json]
    .venv/bin/python bench/ledger_cost.py --rate 3000 --busy-ms 0.8 [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

import psycopg
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

from sluicegate.accounting.records import Outcome, UsageRecord
from sluicegate.server import SWITCH_INTERVAL_SECONDS
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.ledger import LedgerWriter
from sluicegate.storage.migrations import migrate


def build_records(n: int, start: int) -> list[UsageRecord]:
    """``n`` records shaped like the gateway's (a chat completion, usage reported)."""
    now = time.time()
    return [
        UsageRecord(
            request_id=f"chatcmpl-bench-{start + i:012d}",
            ts=now + i * 1e-4,
            subscription_id=f"sub-{i % 50:04d}",
            owner=f"team-{i % 7}",
            product="standard",
            deployment="gpt-4o-mini",
            backend="eastus-ptu",
            operation="chat/completions",
            status=200,
            outcome=Outcome.OK,
            model="gpt-4o-mini-2024-07-18",
            prompt_tokens=120 + i % 40,
            completion_tokens=48,
            total_tokens=168 + i % 40,
            streamed=i % 4 == 0,
            ttfb_ms=1.25,
            duration_ms=2.5,
        )
        for i in range(n)
    ]


@contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    """A new, migrated database on the server at ``server_url``; dropped afterwards."""
    name = f"bench_ledger_{uuid.uuid4().hex[:12]}"
    admin = make_url(server_url).set(drivername="postgresql")
    libpq = admin.render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = admin.set(database=name).render_as_string(hide_password=False)
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def backend_pid(engine: Engine) -> int | None:
    """The server pid of the writer's connection, if the server runs on this machine.

    Called after the warm-up, when the writer's connection is the pool's only one and idle
    in it, so a checkout gets that connection."""
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    return int(pid) if pid is not None and Path(f"/proc/{pid}/stat").exists() else None


def proc_cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User and system CPU of process ``pid`` (or of its thread ``tid``), in seconds."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain(writer: LedgerWriter, timeout: float) -> float:
    """Wait until nothing is pending, as an event loop would: in 0.2 ms sleeps. Returns the
    longest any sleep overran (seconds): how long the writer kept this thread from running
    (the GIL, or the core when both share one)."""
    deadline = time.monotonic() + timeout
    worst = 0.0
    while writer.stats().pending:
        if time.monotonic() > deadline:
            raise SystemExit(f"the records were not written within {timeout:g} s")
        started = time.perf_counter()
        time.sleep(_PROBE_SLEEP)
        worst = max(worst, time.perf_counter() - started - _PROBE_SLEEP)
    return worst


_PROBE_SLEEP = 0.0002


class Run(TypedDict):
    """One run's costs: its rate, and the writer's and the database's CPU per record."""

    records_per_s: int
    writer_cpu_us: float
    database_cpu_us: float | None  # None: the database is not on this machine
    longest_wait_ms: float


def measure(url: str, records: int, repeats: int, spill_dir: Path) -> dict[str, Any]:
    """Write ``records`` records ``repeats`` times through one writer; the best run's costs."""
    engine = create_engine_for(url)
    # All the records queued at once stay in memory, written in full batches: past the
    # gateway's ``max_pending`` (20,000) the writer would shed the rest to its spill file,
    # another path (an outage's, measured by bench/backlog.py --outage).
    writer = LedgerWriter(
        engine,
        spill_path=spill_dir / "spill.jsonl",
        flush_interval=0.05,
        max_pending=max(records, 20_000),
    )
    try:
        writer.start()
        for record in build_records(1_000, start=0):  # warm-up: connection, statements
            writer.submit(record)
        if not writer.flush(60):
            raise SystemExit("the warm-up records were not written within 60 s")
        # The writer's thread, by the name it runs under, for its own CPU in /proc.
        tids = [t.native_id for t in threading.enumerate() if t.name == "ledger-writer"]
        if len(tids) != 1 or tids[0] is None:
            raise SystemExit(f"expected one running ledger-writer thread, found {len(tids)}")
        me, tid = os.getpid(), tids[0]
        pid = backend_pid(engine) if engine.dialect.name == "postgresql" else None
        runs: list[Run] = []
        for run in range(repeats):
            batch = build_records(records, start=(run + 1) * 10_000_000)
            db_before = proc_cpu_seconds(pid) if pid else 0.0
            cpu_before, wall_before = proc_cpu_seconds(me, tid), time.perf_counter()
            for record in batch:
                writer.submit(record)
            longest_wait = drain(writer, 600)
            wall = time.perf_counter() - wall_before
            cpu = proc_cpu_seconds(me, tid) - cpu_before
            db = proc_cpu_seconds(pid) - db_before if pid else None
            runs.append(
                {
                    "records_per_s": round(records / wall),
                    "writer_cpu_us": round(cpu / records * 1e6, 2),
                    "database_cpu_us": None if db is None else round(db / records * 1e6, 2),
                    "longest_wait_ms": round(longest_wait * 1e3, 2),
                }
            )
        stats = writer.stats()
        if stats.failures or stats.rejected or stats.spilled:
            raise SystemExit(f"the writer did not write cleanly: {stats}")
        best = min(runs, key=lambda r: r["writer_cpu_us"])
        return {**best, "runs": runs}
    finally:
        writer.close(60)
        engine.dispose()


def paced(
    url: str, rate: float, seconds: float, spill_dir: Path, busy: float = 0.0
) -> dict[str, Any]:
    """Submit ``rate`` records a second for ``seconds`` from a thread that otherwise waits in
    0.2 ms sleeps, as a lightly loaded event loop does; the writer keeps up and schedules
    itself as in the gateway (``sluicegate.threads``). Returns how late the sleeps woke."""
    engine = create_engine_for(url)
    writer = LedgerWriter(engine, spill_path=spill_dir / "spill.jsonl")
    try:
        writer.start()
        for record in build_records(1_000, start=0):
            writer.submit(record)
        if not writer.flush(60):
            raise SystemExit("the warm-up records were not written within 60 s")
        records = build_records(int(rate * seconds) + 1, start=50_000_000)
        late: list[float] = []
        sent = 0
        started = time.perf_counter()
        while (now := time.perf_counter()) - started < seconds:
            due = int((now - started) * rate)
            while sent < due:
                writer.submit(records[sent])
                sent += 1
            busy_until = time.perf_counter() + busy
            while time.perf_counter() < busy_until:  # the event loop's own work
                pass
            before = time.perf_counter()
            time.sleep(_PROBE_SLEEP)
            late.append(time.perf_counter() - before - _PROBE_SLEEP)
        if not writer.flush(60):
            raise SystemExit("the paced records were not written within 60 s")
        late.sort()

        def at(q: float) -> float:
            return round(late[min(len(late) - 1, int(q * len(late)))] * 1e3, 3)

        return {
            "records": sent,
            "late_p99_ms": at(0.99),
            "late_p999_ms": at(0.999),
            "late_max_ms": round(late[-1] * 1e3, 3),
        }
    finally:
        writer.close(60)
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a server where a throwaway database may be created (default: %(default)s)",
    )
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument(
        "--cpu",
        type=int,
        default=1,
        help="the CPU this process (writer and probe) is pinned to, as a worker would be; "
        "-1: not pinned (default: %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="instead: submit this many records a second for --seconds, and report how late "
        "the submitting thread's sleeps woke (the event loop's wait at light load)",
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--busy-ms",
        type=float,
        default=0.0,
        help="with --rate: the submitting thread also computes this long between sleeps, "
        "as a busy event loop does",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    # As the gateway serves (sluicegate.server): the GIL is handed over after 0.1 ms.
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    results: dict[str, Any] = {}

    def run(url: str, spill_dir: Path) -> dict[str, Any]:
        if args.rate > 0:
            return paced(url, args.rate, args.seconds, spill_dir, args.busy_ms / 1e3)
        return measure(url, args.records, args.repeats, spill_dir)

    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        for database in args.databases.split(","):
            spill_dir = Path(tmp) / database
            spill_dir.mkdir()
            if database == "sqlite":
                url = f"sqlite:///{Path(tmp) / 'ledger.db'}"
                migrate(url)
                results[database] = run(url, spill_dir)
            elif database == "postgresql":
                with postgres_database(args.postgres) as url:
                    results[database] = run(url, spill_dir)
            else:
                parser.error(f"unknown database {database!r} (sqlite, postgresql)")
    if args.json or args.rate > 0:
        print(json.dumps(results, indent=2))
        return
    print(
        f"{'database':<11} {'records/s':>10} {'writer µs/record':>17}"
        f" {'database µs/record':>19} {'longest wait ms':>16}"
    )
    for database, r in results.items():
        db = "-" if r["database_cpu_us"] is None else f"{r['database_cpu_us']:.2f}"
        print(
            f"{database:<11} {r['records_per_s']:>10,} {r['writer_cpu_us']:>17.2f} {db:>19}"
            f" {r['longest_wait_ms']:>16.2f}"
        )


if __name__ == "__main__":
    main()
