"""Alternating runs: CPU per request of targets and kinds measured turn about, for differences
too small for one `make bench` to show.

One `make bench` measures each scenario once or twice, minutes apart, and this host's speed
drifts by ±20 % within an hour. Here every target is started once and the (target, kind)
runs alternate in pairs (every other pair in reverse order), so drift spreads over all of
them alike; each run reports the target's CPU per request from `/proc` (user and system
apart; the requests are counted by the upstream, not by wrk) and, with ``--perf``, where
that CPU goes by native symbol (kernel included: `perf record` of the target's processes).

    .venv/bin/python bench/pairs.py [--targets sluicegate,bare] [--kinds json,stream]
        [--pairs 3] [--seconds 6] [--connections 64] [--stream-gap-ms 0]
        [--stream-writes event|once] [--perf]

``--stream-gap-ms`` paces the upstream's stream events (bench/upstream.py): at 64
connections without it a stream usually reaches the proxy whole, in one read; paced, every
event is a read and a write, as with a model generating tokens; ``--stream-writes once``
writes each stream whole (one segment instead of one per event). Nothing is written to
results.json; the output is what bench/analysis.md quotes.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import turnabout
from probe import upstream_requests
from procs import cpu_split, tree
from targets import Context

#: A line of `perf report --sort dso,sym --stdio`: share, object, [k] or [.], symbol.
_PERF_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.+?)\s*$")


@dataclass
class Sample:
    target: str
    kind: str
    requests: int
    seconds: float
    user_s: float
    system_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def user_us(self) -> float:
        return 1e6 * self.user_s / max(1, self.requests)

    @property
    def system_us(self) -> float:
        return 1e6 * self.system_s / max(1, self.requests)

    @property
    def per_core(self) -> float:
        """Requests per second per core of the target's own CPU use."""
        return 1e6 / max(1e-9, self.user_us + self.system_us)


def perf_symbols(data: Path) -> dict[str, float]:
    """Share of the samples (0-1) per ``object symbol`` in a `perf record` file."""
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shares: dict[str, float] = {}
    for line in report.splitlines():
        if (m := _PERF_LINE.match(line)) is not None:
            space = "kernel" if m.group(3) == "k" else m.group(2)
            shares[f"{space} {m.group(4)}"] = float(m.group(1)) / 100
    return shares


def measure(
    args: argparse.Namespace,
    ctx: Context,
    run: turnabout.Running,
    kind: str,
    perf_file: Path | None,
) -> Sample:
    settle = 2.0  # connections open and the target reaches its steady state first
    seconds = args.seconds + settle + 1
    load = turnabout.load(ctx, run, kind, connections=args.connections, seconds=seconds)
    try:
        time.sleep(settle)
        root = run.launched.proc.pid
        before_requests = upstream_requests(args.port_base)
        user0, system0 = cpu_split(root)
        started = time.monotonic()
        if perf_file is not None:
            pids = ",".join(str(p) for p in tree(root))
            subprocess.run(
                ["perf", "record", "-q", "-F", "1999", "-g", "-p", pids, "-o", str(perf_file),
                 "--", "sleep", str(args.seconds)],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        else:
            time.sleep(args.seconds)
        seconds = time.monotonic() - started
        user1, system1 = cpu_split(root)
        requests = upstream_requests(args.port_base) - before_requests
    finally:
        load.wait()
    return Sample(run.name, kind, requests, seconds, user1 - user0, system1 - system0)


def summarise(samples: list[Sample], kinds: list[str]) -> list[str]:
    lines = ["", "medians (CPU per request of the target's processes, µs):"]
    groups: dict[tuple[str, str], list[Sample]] = collections.defaultdict(list)
    for s in samples:
        groups[(s.target, s.kind)].append(s)
    for (name, kind), group in groups.items():
        lines.append(
            f"  {name:<22} {kind:<6} {statistics.median(s.rps for s in group):8.0f} req/s"
            f"  {statistics.median(s.per_core for s in group):8.0f} /core"
            f"  user {statistics.median(s.user_us for s in group):7.1f}"
            f"  sys {statistics.median(s.system_us for s in group):6.1f}"
            f"  ({len(group)} runs)"
        )
    if "json" in kinds and "stream" in kinds:
        lines.append("stream vs json per core, per pair (median):")
        for name in dict.fromkeys(s.target for s in samples):
            json_runs = groups[(name, "json")]
            stream_runs = groups[(name, "stream")]
            ratios = [b.per_core / a.per_core for a, b in zip(json_runs, stream_runs, strict=False)]
            shown = " ".join(f"{r:.3f}" for r in ratios)
            lines.append(f"  {name:<22} ×{statistics.median(ratios):.3f}  ({shown})")
    names = list(dict.fromkeys(s.target for s in samples))
    if len(names) > 1:
        first = names[0]
        lines.append(f"per core vs {first}, per pair (median):")
        for name in names[1:]:
            for kind in kinds:
                ratios = [
                    b.per_core / a.per_core
                    for a, b in zip(groups[(first, kind)], groups[(name, kind)], strict=False)
                ]
                shown = " ".join(f"{r:.3f}" for r in ratios)
                lines.append(f"  {name:<22} {kind:<6} ×{statistics.median(ratios):.3f}  ({shown})")
    return lines


def perf_difference(samples: list[Sample], files: list[Path | None], top: int) -> list[str]:
    """µs per request by symbol, averaged per (target, kind); the first two compared."""
    per: dict[tuple[str, str], list[dict[str, float]]] = collections.defaultdict(list)
    for sample, path in zip(samples, files, strict=True):
        if path is None:
            continue
        cpu_us = sample.user_us + sample.system_us
        shares = perf_symbols(path)
        per[(sample.target, sample.kind)].append({k: v * cpu_us for k, v in shares.items()})
    if len(per) < 2:
        return []
    (a_key, a_runs), (b_key, b_runs) = list(per.items())[:2]

    def mean(runs: list[dict[str, float]]) -> dict[str, float]:
        total: collections.Counter[str] = collections.Counter()
        for run in runs:
            total.update(run)
        return {k: v / len(runs) for k, v in total.items()}

    a, b = mean(a_runs), mean(b_runs)
    diff = sorted(set(a) | set(b), key=lambda k: b.get(k, 0.0) - a.get(k, 0.0))
    label = f"{b_key[0]} {b_key[1]} minus {a_key[0]} {a_key[1]}"
    lines = ["", f"perf, µs per request by symbol ({label}; largest differences):"]
    for k in [*diff[::-1][:top], *diff[: max(3, top // 4)]]:
        delta = b.get(k, 0.0) - a.get(k, 0.0)
        lines.append(f"  {delta:+7.2f}  ({a.get(k, 0.0):6.2f} → {b.get(k, 0.0):6.2f})  {k}")
    spaces = sorted({k.split(" ", 1)[0] for k in set(a) | set(b)})
    lines.append("by object:")
    for space in spaces:
        sa = sum(v for k, v in a.items() if k.split(" ", 1)[0] == space)
        sb = sum(v for k, v in b.items() if k.split(" ", 1)[0] == space)
        if max(sa, sb) >= 0.5:
            lines.append(f"  {sb - sa:+7.2f}  ({sa:6.2f} → {sb:6.2f})  {space}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    turnabout.add_arguments(parser, pairs=3, seconds=6.0, connections=64, top=20, port_base=9301)
    parser.add_argument("--stream-gap-ms", type=float, default=0.0)
    parser.add_argument("--stream-writes", choices=("event", "once"), default="event")
    parser.add_argument("--perf", action="store_true", help="also record with perf")
    args = parser.parse_args(argv)
    chosen = turnabout.chosen_targets(args, "pairs")
    if chosen is None:
        return 2
    kinds = args.kinds.split(",")
    ctx = turnabout.context("pairs", args.port_base)
    samples: list[Sample] = []
    files: list[Path | None] = []
    pacing = ("--stream-gap-ms", str(args.stream_gap_ms), "--stream-writes", args.stream_writes)
    with (
        turnabout.upstream(ctx, *pacing),
        turnabout.started(chosen, ctx, ready_timeout=60) as running,
    ):
        for pair, run, kind in turnabout.turns(running, kinds, args.pairs):
            perf_file = ctx.out / f"{run.name}-{kind}-{pair}.perf" if args.perf else None
            sample = measure(args, ctx, run, kind, perf_file)
            samples.append(sample)
            files.append(perf_file)
            print(
                f"pair {pair + 1} {run.name:<22} {kind:<6} {sample.rps:8.0f} req/s"
                f"  {sample.per_core:8.0f} /core  user {sample.user_us:7.1f} µs"
                f"  sys {sample.system_us:6.1f} µs",
                flush=True,
            )
    print("\n".join(summarise(samples, kinds)))
    if args.perf:
        print("\n".join(perf_difference(samples, files, args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
