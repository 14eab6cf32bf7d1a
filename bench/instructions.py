"""Instructions per request: a target's user-space work counted by valgrind's callgrind, by
request kind, with where the difference between kinds (or revisions) goes by native function.

Why instructions: on a shared virtual machine the time a request takes drifts by more than
the changes worth measuring (±20 % within an hour, bench/analysis.md), and without the
processor's performance counters perf can only sample on timer ticks. callgrind counts the
instructions a process executes, the same count for the same work whatever else the host
does; it cannot see the kernel, and it says nothing about how fast those instructions ran
(cache misses, frequency). So this answers "how much more does the program do", never "how
much longer does it take": system time and stalls stay `pairs.py`'s to measure.

The target runs under callgrind (about 50 times slower), pinned as in `make bench`; wrk
loads it with one kind of request at a time, the kinds turn about, and each phase's count
is zeroed when the load has settled and dumped at its end (`callgrind_control`), divided by
the requests the upstream counted in between.

    .venv/bin/python bench/instructions.py [--targets sluicegate] [--kinds json,stream]
        [--pairs 2] [--seconds 20] [--connections 16] [--against REV] [--top 25]

Needs valgrind (Debian package ``valgrind``). Nothing is written to results.json.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import turnabout
from probe import upstream_requests
from procs import BenchError
from targets import Context

#: A name line of the callgrind format: ``fn=(12) name``, ``cfn=(12)``, ``ob=(3) /lib.so``.
_NAME_LINE = re.compile(r"^(fn|cfn|ob|cob)=\((\d+)\)(?: (.*))?$")


@dataclass
class Profile:
    """One callgrind dump: self cost (first event, ``Ir``) per function and per object."""

    functions: collections.Counter[str]
    objects: collections.Counter[str]

    @property
    def total(self) -> int:
        return sum(self.functions.values())


def parse_callgrind(lines: Iterable[str]) -> Profile:
    """Self cost per function of a callgrind output file (compressed names, inlined files and
    subposition compression as callgrind writes them). The cost line after a ``calls=`` line
    is the callee's inclusive cost, charged to the call: it is skipped, so the self costs sum
    to the file's ``totals:`` line."""
    names: dict[str, dict[str, str]] = {"fn": {}, "ob": {}}
    functions: collections.Counter[str] = collections.Counter()
    objects: collections.Counter[str] = collections.Counter()
    fn = ob = "???"
    positions = 1
    after_calls = False
    for raw in lines:
        line = raw.rstrip("\n")
        if not line or line[0] == "#":
            continue
        first = line[0]
        if first.isdigit() or first in "+-*":
            if after_calls:
                after_calls = False
                continue
            fields = line.split()
            if len(fields) > positions:
                cost = int(fields[positions])
                functions[fn] += cost
                objects[ob] += cost
            continue
        if (m := _NAME_LINE.match(line)) is not None:
            kind, ident, name = m.groups()
            table = names["ob" if kind.endswith("ob") else "fn"]
            if name is not None:
                table[ident] = name
            resolved = table.get(ident, f"({ident})")
            if kind == "fn":
                fn = resolved
            elif kind == "ob":
                ob = resolved
            continue
        if line.startswith("calls="):
            after_calls = True
        elif line.startswith("positions:"):
            positions = len(line.split()) - 1
    return Profile(functions, objects)


@dataclass
class Phase:
    target: str
    kind: str
    requests: int
    profile: Profile

    @property
    def per_request(self) -> float:
        return self.profile.total / max(1, self.requests)


def _control(*args: str) -> None:
    done = subprocess.run(["callgrind_control", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"callgrind_control {' '.join(args)} failed: {done.stderr.strip()}")


def _dump_file(out: Path, before: set[Path], timeout: float = 120) -> Path:
    """The dump file callgrind wrote after ``before`` was listed (it writes asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = sorted(set(out.glob("callgrind.out.*")) - before)
        if new:
            path = new[-1]
            size = -1
            while path.stat().st_size != size:  # still being written
                size = path.stat().st_size
                time.sleep(0.5)
            return path
        time.sleep(0.5)
    raise BenchError("callgrind wrote no dump")


def measure(args: argparse.Namespace, ctx: Context, run: turnabout.Running, kind: str) -> Phase:
    settle = 6.0  # under callgrind the connections take a while to reach a steady state
    seconds = args.seconds + settle + 10
    load = turnabout.load(
        ctx, run, kind, connections=args.connections, seconds=seconds, timeout_s=30
    )
    pid = str(run.launched.proc.pid)
    try:
        time.sleep(settle)
        _control("--zero", pid)
        before_requests = upstream_requests(args.port_base)
        time.sleep(args.seconds)
        before = set(ctx.out.glob("callgrind.out.*"))
        _control(f"--dump={run.name}-{kind}", pid)
        requests = upstream_requests(args.port_base) - before_requests
    finally:
        load.wait()
    path = _dump_file(ctx.out, before)
    with path.open() as fh:
        profile = parse_callgrind(fh)
    return Phase(run.name, kind, requests, profile)


def mean_profile(phases: list[Phase]) -> tuple[dict[str, float], dict[str, float]]:
    """Instructions per request by function and by object, averaged over ``phases``."""
    functions: collections.Counter[str] = collections.Counter()
    objects: collections.Counter[str] = collections.Counter()
    for phase in phases:
        n = max(1, phase.requests) * len(phases)
        functions.update({k: v / n for k, v in phase.profile.functions.items()})
        objects.update({k: v / n for k, v in phase.profile.objects.items()})
    return dict(functions), dict(objects)


def difference(a: list[Phase], b: list[Phase], top: int) -> list[str]:
    """Where ``b`` executes more (or fewer) instructions per request than ``a``."""
    fa, oa = mean_profile(a)
    fb, ob = mean_profile(b)
    label = f"{b[0].target} {b[0].kind} minus {a[0].target} {a[0].kind}"
    lines = ["", f"instructions per request by object ({label}):"]
    for key in sorted(set(oa) | set(ob), key=lambda k: -abs(ob.get(k, 0) - oa.get(k, 0)))[:8]:
        lines.append(
            f"  {ob.get(key, 0) - oa.get(key, 0):+9.0f}  ({oa.get(key, 0):9.0f} → "
            f"{ob.get(key, 0):9.0f})  {Path(key).name}"
        )
    lines.append(f"by function, largest differences ({label}):")
    keys = sorted(set(fa) | set(fb), key=lambda k: fb.get(k, 0) - fa.get(k, 0))
    for key in [*keys[::-1][:top], *keys[: max(3, top // 4)]]:
        lines.append(
            f"  {fb.get(key, 0) - fa.get(key, 0):+9.0f}  ({fa.get(key, 0):9.0f} → "
            f"{fb.get(key, 0):9.0f})  {key}"
        )
    return lines


def summarise(phases: list[Phase], kinds: list[str], top: int) -> list[str]:
    groups: dict[tuple[str, str], list[Phase]] = collections.defaultdict(list)
    for phase in phases:
        groups[(phase.target, phase.kind)].append(phase)
    lines = ["", "instructions per request (user space, the target's process):"]
    for (name, kind), group in groups.items():
        counts = " ".join(f"{p.per_request:,.0f}" for p in group)
        lines.append(
            f"  {name:<22} {kind:<6} {statistics.median(p.per_request for p in group):11,.0f}"
            f"  (phases: {counts}; {sum(p.requests for p in group)} requests)"
        )
    names = list(dict.fromkeys(p.target for p in phases))
    # Kinds compared within each target, then each kind across the first two targets.
    comparisons: list[tuple[str, list[Phase], list[Phase]]] = []
    if len(kinds) > 1:
        for name in names:
            a, b = groups[(name, kinds[0])], groups[(name, kinds[1])]
            comparisons.append(
                (f"{name}: {kinds[1]} ×{{:.4f}} the instructions of {kinds[0]}", a, b)
            )
    if len(names) > 1:
        for kind in kinds:
            a, b = groups[(names[0], kind)], groups[(names[1], kind)]
            comparisons.append(
                (f"{kind}: {names[1]} ×{{:.4f}} the instructions of {names[0]}", a, b)
            )
    for title, a, b in comparisons:
        ratio = statistics.median(p.per_request for p in b) / statistics.median(
            p.per_request for p in a
        )
        lines.extend(["", title.format(ratio), *difference(a, b, top)[1:]])
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    turnabout.add_arguments(parser, pairs=2, seconds=20.0, connections=16, top=25, port_base=9401)
    args = parser.parse_args(argv)
    for tool, package in (
        ("valgrind", "valgrind"),
        ("callgrind_control", "valgrind"),
        ("wrk", "wrk"),
    ):
        if shutil.which(tool) is None:
            print(f"instructions: {tool} not found: apt-get install {package}", file=sys.stderr)
            return 2
    chosen = turnabout.chosen_targets(args, "instructions")
    if chosen is None:
        return 2
    kinds = args.kinds.split(",")
    ctx = turnabout.context("instructions", args.port_base)
    ctx.wrap = (
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",  # startup is not counted; --zero starts each phase anyway
        f"--callgrind-out-file={ctx.out}/callgrind.out.%p",
    )
    phases: list[Phase] = []
    # Under callgrind a target starts ~50 times slower, and writes its last dump on exit.
    with (
        turnabout.upstream(ctx),
        turnabout.started(chosen, ctx, ready_timeout=300, grace=60) as running,
    ):
        for run in running:
            _control("--instr=on", str(run.launched.proc.pid))
            measure(args, ctx, run, kinds[0])  # warm-up, not counted
        for pair, run, kind in turnabout.turns(running, kinds, args.pairs):
            phase = measure(args, ctx, run, kind)
            phases.append(phase)
            print(
                f"pair {pair + 1} {run.name:<22} {kind:<6} {phase.requests:6d} requests"
                f"  {phase.per_request:11,.0f} instructions each",
                flush=True,
            )
    print("\n".join(summarise(phases, kinds, args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
