"""Report latency over a large ledger: load N synthetic usage records (default ten million)
into SQLite (or PostgreSQL), build the rollups, then time the charge-back reports, the time
series and the forecast the dashboard and the admin API run.

    .venv/bin/python bench/report_bench.py                       # 10 M records, SQLite
    .venv/bin/python bench/report_bench.py --records 1000000
    .venv/bin/python bench/report_bench.py --url postgresql://postgres@127.0.0.1/bench

Measured, not asserted: prints one line per step and a JSON summary (``--out FILE``).
The synthetic month: 1,000 subscriptions in 50 teams, 4 deployments on 2 backends (one of them
a PTU reservation), traffic spread over 30 days with a daily cycle. Records are bulk-inserted
straight into ``usage_records`` (the ledger writer's path is measured by the load benchmarks).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sluicegate.accounting.chargeback import charge_report, usage_series
from sluicegate.accounting.forecast import break_even, forecast
from sluicegate.accounting.pricing import PriceTable
from sluicegate.accounting.rollups import Rollups
from sluicegate.clock import FakeClock
from sluicegate.config.loader import parse_config
from sluicegate.storage.engine import create_engine_for
from sluicegate.storage.migrations import migrate
from sluicegate.storage.schema import usage_records

MONTH = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
DEPLOYMENTS = [
    ("gpt-4o-mini", "east"),
    ("gpt-4o", "east"),
    ("gpt-4o-ptu", "ptu"),
    ("text-embedding-3-small", "east"),
]
CONFIG: dict[str, Any] = {
    "backends": [{"name": "east", "url": "http://e"}, {"name": "ptu", "url": "http://p"}],
    "deployments": [
        {"name": "gpt-4o-mini", "backend": "east", "model": "gpt-4o-mini"},
        {"name": "gpt-4o", "backend": "east", "model": "gpt-4o"},
        {"name": "gpt-4o-ptu", "backend": "ptu", "model": "gpt-4o"},
        {"name": "text-embedding-3-small", "backend": "east", "model": "text-embedding-3-small"},
    ],
    "products": [{"name": "standard"}],
    "prices": [
        {"deployment": "gpt-4o-mini", "input": 0.15, "cached_input": 0.075, "output": 0.6},
        {
            "deployment": "gpt-4o-mini",
            "input": 0.10,
            "output": 0.4,
            "effective_from": "2026-03-15T12:00:00Z",
        },
        {"model": "gpt-4o", "input": 2.5, "cached_input": 1.25, "output": 10},
        {"model": "text-embedding-3-small", "input": 0.02},
    ],
    "ptu": [{"backend": "ptu", "monthly_cost": 26000}],
    "ptu_quotes": [
        {"model": "gpt-4o-mini", "unit_monthly_cost": 260, "tokens_per_minute_per_unit": 23750}
    ],
}


def rows(n: int, start: int, seed: int, at: float | None = None) -> list[dict[str, Any]]:
    """``n`` records spread over the month's working hours (or all within a minute of ``at``)."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        k = start + i
        day = rnd.random() * 30
        hour_weight = rnd.random()
        ts = MONTH + int(day) * 86400 + (8 + 10 * hour_weight) * 3600 + rnd.random() * 3600
        if at is not None:
            ts = at - rnd.random() * 60
        sub = rnd.randrange(1000)
        dep, backend = DEPLOYMENTS[rnd.randrange(4)]
        prompt = rnd.randrange(20, 4000)
        completion = 0 if dep.startswith("text") else rnd.randrange(5, 800)
        out.append(
            {
                "request_id": f"b{k:09d}",
                "attempt": 1,
                "ts": ts,
                "subscription_id": f"sub_{sub:05d}",
                "owner": f"team-{sub % 50:02d}",
                "product": "standard",
                "deployment": dep,
                "backend": backend,
                "operation": "chat/completions",
                "status": 200,
                "outcome": "ok",
                "model": dep,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "cached_tokens": prompt // 4,
                "reasoning_tokens": 0,
                "streamed": k % 3 == 0,
                "usage_estimated": False,
                "ttfb_ms": 120.0,
                "duration_ms": 900.0,
                "caller": None,
                "error_code": None,
                "extra": "{}",
            }
        )
    return out


def timed(label: str, fn: Any, results: dict[str, float], repeat: int = 3) -> Any:
    best = float("inf")
    value = None
    for _ in range(repeat):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    results[label] = round(best, 4)
    print(f"{label:<48} {best * 1000:10.1f} ms (best of {repeat})", flush=True)
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--url", default="sqlite:///bench/out/report-bench.db")
    ap.add_argument("--batch", type=int, default=50_000)
    ap.add_argument("--reuse", action="store_true", help="keep an existing loaded database")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    if args.url.startswith("sqlite:///") and not args.reuse:
        Path(args.url.removeprefix("sqlite:///")).unlink(missing_ok=True)
    migrate(args.url)
    engine = create_engine_for(args.url)
    results: dict[str, float] = {"records": args.records}
    config = parse_config(CONFIG)
    prices = PriceTable(config)
    now = MONTH + 29.5 * 86400
    rollups = Rollups(engine, prices, FakeClock(now))

    if not args.reuse:
        t = time.perf_counter()
        for start in range(0, args.records, args.batch):
            n = min(args.batch, args.records - start)
            with engine.begin() as conn:
                conn.execute(insert(usage_records), rows(n, start, seed=start))
            if (start // args.batch) % 20 == 0:
                print(f"  loaded {start + n:,} records", flush=True)
        results["load_seconds"] = round(time.perf_counter() - t, 1)
        print(f"{'load':<48} {results['load_seconds']:10.1f} s", flush=True)
        t = time.perf_counter()
        run = rollups.catch_up()
        results["rollup_build_seconds"] = round(time.perf_counter() - t, 1)
        print(
            f"{'rollups built (' + str(run.hours) + ' hours)':<48} "
            f"{results['rollup_build_seconds']:10.1f} s",
            flush=True,
        )
    else:
        rollups.catch_up()

    # One more batch of fresh records, as the background job sees them every few seconds.
    with engine.begin() as conn:
        conn.execute(insert(usage_records), rows(2000, args.records + 1, seed=7, at=now))
    timed("incremental catch-up after 2,000 new records", rollups.catch_up, results, 1)
    timed("catch-up with nothing new", rollups.catch_up, results)

    end = MONTH + 31 * 86400
    for by in ("subscription", "owner", "deployment", "model"):
        report = timed(
            f"month report by {by}",
            lambda by=by: charge_report(engine, prices, start=MONTH, end=end, by=by),
            results,
        )
    print(f"  (last report: {len(report.rows)} rows, total {report.total.total_tokens:,} tokens)")
    timed(
        "report, unaligned range (edge hours + days)",
        lambda: charge_report(
            engine, prices, start=MONTH + 5.3 * 3600, end=end - 7.7 * 3600, by="owner"
        ),
        results,
    )
    timed(
        "one subscription's month",
        lambda: charge_report(
            engine, prices, start=MONTH, end=end, by="model", subscription_id="sub_00042"
        ),
        results,
    )
    timed(
        "daily series, top 8 subscriptions",
        lambda: usage_series(engine, prices, start=MONTH, end=end, granularity="day"),
        results,
    )
    timed(
        "hourly series by model, last 24 h",
        lambda: usage_series(
            engine, prices, start=now - 86400, end=now, granularity="hour", by="model"
        ),
        results,
    )
    timed("forecast page (50 subscriptions)", lambda: forecast(engine, prices, now), results)
    timed("break-even per deployment", lambda: break_even(engine, prices, config, now), results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
