"""Where sluicegate's time goes under load: py-spy samples, summed by module and function.

Starts the fake upstream (CPU 0) and sluicegate with the benchmark's full-policy
configuration (CPU 1), drives it with wrk at 64 connections, samples the gateway with
py-spy for ``--seconds`` and prints the shares of CPU samples by thread, by package and by
function (inclusive). Needs ``py-spy`` on the PATH (``pip install py-spy``) and wrk.

    .venv/bin/python bench/profile.py [--kind json|stream] [--mode embedded|cluster]
        [--connections 64] [--stream-gap-ms 0]

The output is what bench/analysis.md quotes. Nothing is written to results.json.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import targets
from loadgen import wrk_command
from procs import start
from targets import Context, wait_ready
from workload import BODIES

HERE = Path(__file__).resolve().parent


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds used so far by each thread (native id) of ``pid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def thread_names(raw: Path) -> dict[int, str]:
    """Native thread id → Python thread name, from py-spy's ``--threads`` frames."""
    names: dict[int, str] = {}
    for line in raw.read_text().splitlines():
        head = line.split(";", 1)[0]
        if head.startswith("thread (") and "): " in head:
            tid, _, name = head[len("thread (") :].partition("): ")
            if tid.isdigit():
                names[int(tid)] = name
    return names


def summarise(raw: Path, top: int) -> str:
    """Shares of the event-loop thread's samples: per package of the innermost frame and
    per function anywhere on the stack (inclusive)."""
    packages: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].endswith("MainThread"):
            continue  # the event loop's thread only: the others are shown from /proc above
        frames = frames[1:]
        if not frames:
            continue
        n = int(count)
        total += n
        leaf = frames[-1]
        path = leaf[leaf.find("(") + 1 :].split(":")[0]
        parts = path.split("/")
        packages["/".join(parts[:2]) if parts[0] == "sluicegate" else parts[0]] += n
        for name in {f.split(" (")[0] for f in frames}:
            inclusive[name] += n
    # Thread shares come from /proc (see main): py-spy also samples a runnable thread that
    # is waiting for the core, which overstates low-priority threads.
    out = [f"event-loop thread samples: {total}", "", "by package (innermost frame):"]
    out += [f"  {100 * n / total:5.1f} %  {name}" for name, n in packages.most_common(top)]
    out += ["", "by function (inclusive):"]
    out += [f"  {100 * n / total:5.1f} %  {name}" for name, n in inclusive.most_common(top * 3)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("json", "stream"), default="json")
    parser.add_argument("--mode", choices=("embedded", "cluster"), default="embedded")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--target", help="a sluicegate target (bench/targets.py)")
    parser.add_argument("--port-base", type=int, default=9201)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--stream-gap-ms",
        type=float,
        default=0.0,
        help="pace the upstream's stream events (bench/upstream.py): the per-event path",
    )
    parser.add_argument("--raw", type=Path, help="also keep py-spy's raw stacks in this file")
    parser.add_argument("--native", action="store_true", help="sample C frames too (slower)")
    args = parser.parse_args(argv)
    if shutil.which("py-spy") is None:
        print("profile: py-spy is not on the PATH (pip install py-spy)", file=sys.stderr)
        return 2
    out = Path(tempfile.mkdtemp(prefix="sg-profile-"))
    load_cpu, proxy_cpu = 0, 1
    ctx = Context(
        out=out,
        pid_file=out / "pids",
        proxy_cpu=proxy_cpu,
        upstream_port=args.port_base,
        run_id=f"p{os.getpid()}",
    )
    upstream = start(
        "upstream",
        [
            sys.executable,
            str(HERE / "upstream.py"),
            "--port",
            str(args.port_base),
            "--stream-gap-ms",
            str(args.stream_gap_ms),
        ],
        log_dir=out,
        pid_file=out / "pids",
        cpu=load_cpu,
    )
    try:
        default = "sluicegate" if args.mode == "embedded" else "sluicegate-cluster"
        target = targets.BY_NAME[args.target or default]
        assert target.launch is not None
        port = args.port_base + 4
        launched = target.launch(ctx, port)
        try:
            wait_ready(launched, port, timeout=60)
            body = out / f"{args.kind}.json"
            body.write_bytes(BODIES[args.kind])
            wrk_argv, env = wrk_command(
                f"http://127.0.0.1:{port}{targets.AZURE_PATH}",
                body_file=body,
                headers=launched.headers,
                connections=args.connections,
                duration=args.seconds + 8,
                cpu=load_cpu,
            )
            load = subprocess.Popen(wrk_argv, env=env, stdout=subprocess.DEVNULL)
            time.sleep(3)
            raw = out / "profile.raw"
            pid = launched.proc.proc.pid
            before = thread_cpu(pid)
            subprocess.run(
                [
                    "py-spy", "record", "-p", str(pid), "-d", str(round(args.seconds)),
                    "-r", "400", "-f", "raw", "-o", str(raw), "--threads",
                    # --native needs the process paused per sample (blocking mode).
                    *(["--native"] if args.native else ["--nonblocking"]),
                ],
                check=True, capture_output=True,
            )  # fmt: skip
            after = thread_cpu(pid)
            load.wait()
            names = thread_names(raw)
            used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
            print("CPU by thread (from /proc, share of one core over the sampling):")
            for tid, seconds in sorted(used.items(), key=lambda item: -item[1]):
                if seconds > 0:
                    label = names.get(tid, "other (libuv, executor)")
                    print(f"  {100 * seconds / args.seconds:5.1f} %  {label}")
            print(summarise(raw, args.top))
            if args.raw is not None:
                shutil.copyfile(raw, args.raw)
        finally:
            launched.proc.stop()
            for fn in launched.cleanup:
                fn()
    finally:
        upstream.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
