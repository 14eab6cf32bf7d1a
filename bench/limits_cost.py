"""What the embedded mode's limits cost a request, away from any HTTP load.

Runs what the pipeline runs for the limits of one request of the benchmark
(``LimitsAdmitter.admit`` and ``finish``: the prompt estimate, the admission of a TPM and an
RPM counter in the in-memory store, the response headers, the settle of the estimate to the
reported usage) on the bench's JSON body, with the benchmark's product policy. The counters
start with a full minute of buckets and the clock moves 0.3 ms a request, as under steady
load (a sliding window of 61 one-second buckets).

* ``us``: time per request, best of ``--repeats`` runs of ``--requests``, on ``--cpu``;
* ``instructions`` (with ``--instructions``, needs valgrind): what callgrind counts per
  request, the difference between a run of ``2 × --requests`` and one of ``--requests``, so
  that start-up cancels out. The same count for the same work whatever the host does.

``--against REV`` measures git revision REV's code the same way, beside this checkout's.
Measured: the gateway's own types (a real ``RequestContext``, ``Subscription``, route and
policy); only the deployment is a stand-in holding the model name (the estimate reads
nothing else of it).

    .venv/bin/python bench/limits_cost.py [--instructions] [--against REV] [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class _Deployment:
    """Stands in for ``runtime.Deployment``, whose backend the limits never touch."""

    name: str
    model: str


def _harness() -> Any:
    """The admitter, a context factory and the fake clock, from the ``sluicegate`` on the
    import path (this checkout's, or ``--against``'s)."""
    import orjson

    from sluicegate.auth.subscriptions import Subscription, SubscriptionState
    from sluicegate.clock import FakeClock
    from sluicegate.limits import Limiter, LimitPolicy
    from sluicegate.limits.memory import MemoryStore
    from sluicegate.proxy.admission import LimitsAdmitter
    from sluicegate.proxy.context import RequestContext
    from sluicegate.proxy.deadlines import Deadlines
    from sluicegate.proxy.routes import match_route
    from sluicegate.tokens.usage import Usage

    sys.path.insert(0, str(HERE))
    from targets import LIMIT
    from workload import BODIES

    body = orjson.loads(BODIES["json"])
    policy = LimitPolicy(tokens_per_minute=LIMIT, requests_per_minute=LIMIT)
    clock = FakeClock()
    admitter = LimitsAdmitter(Limiter(MemoryStore(), clock), {"bench": (policy,)})
    sub = Subscription(
        "sub-bench", "bench", "bench", "bench", SubscriptionState.ACTIVE,
        b"h1", b"h2", "p1", "p2", 0.0, 1.0,
    )  # fmt: skip
    route = match_route("POST", "/openai/deployments/gpt-4o-mini/chat/completions")
    deployment = _Deployment("gpt-4o-mini", "gpt-4o-mini")
    deadlines = Deadlines()
    usage = Usage(23, 64, 87)

    async def one() -> Any:
        ctx = RequestContext("r", 0.0, 0.0, route, deadlines, client_ip="127.0.0.1")
        # `deployment` is the documented stand-in (see the module's docstring), not a
        # runtime.Deployment: a real one needs a backend, and its constructor differs between
        # the revisions --against measures. One statement, as measured before.
        ctx.subscription, ctx.deployment, ctx.json = sub, deployment, body  # type: ignore[assignment]
        await admitter.admit(ctx)
        ctx.usage, ctx.status = usage, 200
        await admitter.finish(ctx)
        clock.advance(0.0003)
        return ctx

    return one, clock


async def _run(requests: int, repeats: int) -> float:
    one, clock = _harness()
    for _ in range(62):  # a full minute of buckets
        for _ in range(3):
            await one()
        clock.advance(1.0)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(requests):
            await one()
        best = min(best, (time.perf_counter() - start) / requests)
    return best * 1e6


def _child(src: Path, requests: int, repeats: int, *wrap: str) -> subprocess.CompletedProcess[str]:
    argv = [*wrap, sys.executable, str(Path(__file__)), "--child", "--requests", str(requests)]
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [*argv, "--repeats", str(repeats)], env=env, capture_output=True, text=True, check=True
    )


def _instructions(src: Path, requests: int) -> int:
    """callgrind's count per request: a run of 2N minus a run of N, over N."""
    counts = []
    for n in (requests, 2 * requests):
        out = Path(tempfile.gettempdir()) / f"sg-limits-cost-{os.getpid()}-{n}.out"
        done = _child(src, n, 1, "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}")
        out.unlink(missing_ok=True)
        line = next(ln for ln in done.stderr.splitlines() if "Collected :" in ln)
        counts.append(int(line.rsplit(":", 1)[1].strip()))
    return round((counts[1] - counts[0]) / requests)


def measure(
    src: Path, requests: int, repeats: int, cpu: int | None, instructions: bool
) -> dict[str, Any]:
    wrap = ("taskset", "-c", str(cpu)) if cpu is not None else ()
    done = _child(src, requests, repeats, *wrap)
    result: dict[str, Any] = {"us": json.loads(done.stdout)["us"]}
    if instructions:
        result["instructions"] = _instructions(src, max(requests // 10, 500))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cpu", type=int, default=1, help="pin the timed runs (-1: no pin)")
    parser.add_argument("--instructions", action="store_true", help="count with callgrind")
    parser.add_argument("--against", metavar="REV", help="also measure git revision REV")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        us = asyncio.run(_run(args.requests, args.repeats))
        print(json.dumps({"us": us}))
        return 0
    if args.instructions and shutil.which("valgrind") is None:
        print("limits_cost.py: --instructions needs valgrind (apt-get install valgrind)")
        return 2
    sources = {"HEAD (this checkout)": HERE.parent / "src"}
    if args.against:
        from turnabout import checkout_src

        sources[args.against] = checkout_src(args.against)
    cpu = None if args.cpu < 0 else args.cpu
    results = {
        name: measure(src, args.requests, args.repeats, cpu, args.instructions)
        for name, src in sources.items()
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for name, result in results.items():
        counted = f"  {result['instructions']:,} instructions" if "instructions" in result else ""
        print(f"{name:24s} {result['us']:7.2f} µs per request (best of {args.repeats}){counted}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
