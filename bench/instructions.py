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
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import targets
from loadgen import wrk_command
from probe import upstream_requests
from procs import BenchError, start
from targets import Context, Launched, wait_ready
from workload import BODIES

HERE = Path(__file__).resolve().parent

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


def measure(
    args: argparse.Namespace, name: str, launched: Launched, port: int, kind: str, out: Path
) -> Phase:
    body = out / f"{kind}.json"
    body.write_bytes(BODIES[kind])
    settle = 6.0  # under callgrind the connections take a while to reach a steady state
    argv, env = wrk_command(
        f"http://127.0.0.1:{port}{targets.AZURE_PATH}",
        body_file=body,
        headers=launched.headers,
        connections=args.connections,
        duration=args.seconds + settle + 10,
        cpu=0,
        timeout_s=30,
    )
    pid = str(launched.proc.pid)
    load = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(settle)
        _control("--zero", pid)
        before_requests = upstream_requests(args.port_base)
        time.sleep(args.seconds)
        before = set(out.glob("callgrind.out.*"))
        _control(f"--dump={name}-{kind}", pid)
        requests = upstream_requests(args.port_base) - before_requests
    finally:
        load.wait()
    path = _dump_file(out, before)
    with path.open() as fh:
        profile = parse_callgrind(fh)
    return Phase(name, kind, requests, profile)


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
    for name in names:
        if len(kinds) > 1:
            a, b = groups[(name, kinds[0])], groups[(name, kinds[1])]
            ratio = statistics.median(p.per_request for p in b) / statistics.median(
                p.per_request for p in a
            )
            lines.append(f"{name}: {kinds[1]} ×{ratio:.3f} the instructions of {kinds[0]}")
            lines.extend(difference(a, b, top))
    if len(names) > 1:
        for kind in kinds:
            a, b = groups[(names[0], kind)], groups[(names[1], kind)]
            ratio = statistics.median(p.per_request for p in b) / statistics.median(
                p.per_request for p in a
            )
            lines.append(f"\n{kind}: {names[1]} ×{ratio:.4f} the instructions of {names[0]}")
            lines.extend(difference(a, b, top))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--targets", default="sluicegate", help="comma-separated target names")
    parser.add_argument("--kinds", default="json,stream")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--port-base", type=int, default=9401)
    parser.add_argument(
        "--against",
        metavar="REV",
        help="also count sluicegate (full policy) from git revision REV, as sluicegate@REV",
    )
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            package = "wrk" if tool == "wrk" else "valgrind"
            print(f"instructions: {tool} not found: apt-get install {package}", file=sys.stderr)
            return 2
    names = args.targets.split(",")
    known = dict(targets.BY_NAME)
    if args.against:
        from pairs import checkout_src

        name = f"sluicegate@{args.against}"
        known[name] = targets.sluicegate_from(checkout_src(args.against), name)
        names.append(name)
    kinds = args.kinds.split(",")
    unknown = [n for n in names if n not in known or known[n].launch is None]
    if unknown:
        print(f"instructions: no such target: {', '.join(unknown)}", file=sys.stderr)
        return 2
    out = Path(tempfile.mkdtemp(prefix="sg-instructions-"))
    ctx = Context(
        out=out,
        pid_file=out / "pids",
        proxy_cpu=1,
        upstream_port=args.port_base,
        run_id=f"instr{os.getpid()}",
        wrap=(
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",  # startup is not counted; --zero starts each phase anyway
            f"--callgrind-out-file={out}/callgrind.out.%p",
        ),
    )
    upstream = start(
        "upstream",
        [sys.executable, str(HERE / "upstream.py"), "--port", str(args.port_base)],
        log_dir=out,
        pid_file=out / "pids",
        cpu=0,
    )
    running: list[tuple[str, Launched, int]] = []
    phases: list[Phase] = []
    try:
        for i, name in enumerate(names):
            target = known[name]
            assert target.launch is not None
            port = args.port_base + 1 + i
            launched = target.launch(ctx, port)
            running.append((name, launched, port))
            wait_ready(launched, port, timeout=300)
            _control("--instr=on", str(launched.proc.pid))
            measure(args, name, launched, port, kinds[0], out)  # warm-up, not counted
        for pair in range(args.pairs):
            order = running if pair % 2 == 0 else running[::-1]
            for name, launched, port in order:
                for kind in kinds if pair % 2 == 0 else kinds[::-1]:
                    phase = measure(args, name, launched, port, kind, out)
                    phases.append(phase)
                    print(
                        f"pair {pair + 1} {name:<22} {kind:<6} {phase.requests:6d} requests"
                        f"  {phase.per_request:11,.0f} instructions each",
                        flush=True,
                    )
    finally:
        for _, launched, _ in running:
            launched.proc.stop(grace=60.0)  # callgrind writes its last dump on exit
            for fn in launched.cleanup:
                fn()
        upstream.stop()
    print("\n".join(summarise(phases, kinds, args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
