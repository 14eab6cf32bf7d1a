"""What writing the ledger costs per usage record: the writer thread's CPU and the database's.

The gateway's request path only queues a record; the ledger writer's thread turns the queue
into rows (``sluicegate.storage.ledger``). Under sustained load that thread shares the
gateway's core (and the GIL) with the event loop, so its CPU per record bounds how many
requests a second one worker can account for without a growing backlog. This measures it
directly, away from any HTTP load:

* ``--records`` realistic records are queued first, then the writer is started and
  ``flush()`` waits until every one is durable (the writer drains full batches back to
  back, as it does under saturation);
* ``writer_cpu_us``: this process's CPU time per record (``time.process_time``; the main
  thread only waits, so it is the writer thread's);
* ``database_cpu_us`` (PostgreSQL): the server backend's CPU per record, from
  ``/proc/<pid>/stat`` of the writer connection's backend (``pg_stat_activity``), so only
  on a server on this machine;
* ``records_per_s``: wall-clock throughput.

Best of ``--repeats`` (fewest writer microseconds), after a warm-up batch. Each database is
a throwaway: a new PostgreSQL database on ``--postgres`` (dropped afterwards) and a SQLite
file in a temporary directory.

    .venv/bin/python bench/ledger_cost.py [--records 50000] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

from sluicegate.accounting.records import Outcome, UsageRecord
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


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, records: int, repeats: int, spill_dir: Path) -> dict[str, Any]:
    """Write ``records`` records ``repeats`` times through one writer; the best run's costs."""
    engine = create_engine_for(url)
    writer = LedgerWriter(engine, spill_path=spill_dir / "spill.jsonl", flush_interval=0.05)
    try:
        writer.start()
        for record in build_records(1_000, start=0):  # warm-up: connection, statements
            writer.submit(record)
        if not writer.flush(60):
            raise SystemExit("the warm-up records were not written within 60 s")
        pid = backend_pid(engine) if engine.dialect.name == "postgresql" else None
        runs = []
        for run in range(repeats):
            batch = build_records(records, start=(run + 1) * 10_000_000)
            db_before = proc_cpu_seconds(pid) if pid else 0.0
            cpu_before, wall_before = time.process_time(), time.perf_counter()
            for record in batch:
                writer.submit(record)
            if not writer.flush(600):
                raise SystemExit(f"{records} records were not written within 600 s")
            wall = time.perf_counter() - wall_before
            cpu = time.process_time() - cpu_before
            db = proc_cpu_seconds(pid) - db_before if pid else None
            runs.append(
                {
                    "records_per_s": round(records / wall),
                    "writer_cpu_us": round(cpu / records * 1e6, 2),
                    "database_cpu_us": None if db is None else round(db / records * 1e6, 2),
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
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        for database in args.databases.split(","):
            spill_dir = Path(tmp) / database
            spill_dir.mkdir()
            if database == "sqlite":
                url = f"sqlite:///{Path(tmp) / 'ledger.db'}"
                migrate(url)
                results[database] = measure(url, args.records, args.repeats, spill_dir)
            elif database == "postgresql":
                with postgres_database(args.postgres) as url:
                    results[database] = measure(url, args.records, args.repeats, spill_dir)
            else:
                parser.error(f"unknown database {database!r} (sqlite, postgresql)")
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'database':<11} {'records/s':>10} {'writer µs/record':>17} {'database µs/record':>19}")
    for database, r in results.items():
        db = "-" if r["database_cpu_us"] is None else f"{r['database_cpu_us']:.2f}"
        print(f"{database:<11} {r['records_per_s']:>10,} {r['writer_cpu_us']:>17.2f} {db:>19}")


if __name__ == "__main__":
    main()
