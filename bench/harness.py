"""The benchmark run: every selected target, one at a time, against one fake upstream.

``bench/run.sh`` installs what is needed and calls this with the sluicegate virtualenv's
Python. For each target: start it pinned to the proxy CPU, check it functionally
(``probe``), warm it up, run every scenario (JSON and streaming, at 1 and 64 connections)
for each round, read its resident memory, stop it, then read what it left behind (the
ledger). Results go to ``bench/results.json``; ``report.py`` renders ``BENCHMARKS.md``.

``--soak SECONDS`` runs the soak instead: steady mixed load on each selected target (default
sluicegate) with resident memory sampled every 10 s; its result is merged into the same
``results.json`` under ``"soak"``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import machine
import report
from loadgen import Run, run_wrk
from probe import probe, upstream_requests
from procs import (
    BenchError,
    Managed,
    cpu_count,
    memory_kib,
    require_free_ports,
    start,
    wait_for_port,
    wait_idle,
)
from soak import soak_target
from targets import BENCH, BY_NAME, REPO, TARGETS, Context, Launched, Target, check_cluster_services
from workload import BODIES, SCENARIOS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs (3 s, 1 s warm-up)")
    p.add_argument("--targets", help="comma-separated: " + ",".join(t.name for t in TARGETS))
    p.add_argument("--soak", type=int, metavar="SECONDS", help="soak mode (at least 600 s)")
    p.add_argument("--duration", type=float, help="seconds per measured run (default 10)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per kind (default 5)")
    p.add_argument("--rounds", type=int, help="rounds per scenario (default 2)")
    p.add_argument(
        "--alternations",
        type=int,
        help="pairs of JSON and streaming runs at 64 connections, turn about, for the "
        "stream/JSON check (default 8; 3 with --quick; 0: none)",
    )
    p.add_argument(
        "--alternation-seconds", type=float, help="seconds per alternated run (default 3)"
    )
    p.add_argument("--port-base", type=int, default=9001, help="first of five ports")
    p.add_argument(
        "--stream-writes",
        choices=("event", "once"),
        default="event",
        help="the fake upstream writes each stream event apart (default, as Azure flushes) or "
        "the whole stream at once (a diagnostic: the cost of receiving the events apart)",
    )
    p.add_argument("--out", type=Path, default=BENCH / "out")
    p.add_argument("--results", type=Path, default=BENCH / "results.json")
    p.add_argument("--report", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--command", default="", help="the command line to print as reproducible")
    args = p.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 5.0)
    args.rounds = args.rounds or 2
    if args.alternations is None:
        args.alternations = 3 if args.quick else 8
    args.alternation_seconds = args.alternation_seconds or (2.0 if args.quick else 3.0)
    default = "sluicegate" if args.soak else ",".join(t.name for t in TARGETS)
    names = [n.strip() for n in (args.targets or default).split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    if not args.soak and "baseline" not in names:
        names.insert(0, "baseline")  # added latency is measured against it
    args.selected = [t for t in TARGETS if t.name in names]
    return args


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class Bench:
    """One harness run. Owns the upstream and the target being measured; ``close()`` stops
    everything it started."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        args.out.mkdir(parents=True, exist_ok=True)
        self.pid_file = Path(os.environ.get("BENCH_PID_FILE", str(args.out / "pids")))
        two = cpu_count() >= 2
        self.load_cpu: int | None = 0 if two else None
        self.proxy_cpu: int | None = 1 if two else None
        self.ctx = Context(
            args.out, self.pid_file, self.proxy_cpu, args.port_base, str(os.getpid())
        )
        self.upstream: Managed | None = None
        self.running: list[Managed] = []
        self.body_files: dict[str, Path] = {}
        for kind, body in BODIES.items():
            path = args.out / f"body-{kind}.json"
            path.write_bytes(body)
            self.body_files[kind] = path

    def port(self, target: Target) -> int:
        return int(self.args.port_base + target.port_offset)

    def start_upstream(self) -> Managed:
        argv = [
            str(REPO / ".venv/bin/python"),
            str(BENCH / "upstream.py"),
            "--port",
            str(self.args.port_base),
            "--stream-writes",
            self.args.stream_writes,
        ]
        up = start(
            "upstream", argv, log_dir=self.args.out, pid_file=self.pid_file, cpu=self.load_cpu
        )
        self.running.append(up)
        wait_for_port(up, self.args.port_base, 15)
        self.upstream = up
        return up

    def close(self) -> None:
        for proc in reversed(self.running):
            proc.stop()
        self.running.clear()

    # ------------------------------------------------------------ one target

    def launch(self, target: Target) -> Launched:
        assert self.upstream is not None
        if target.launch is None:
            return Launched(self.upstream, {"api-key": "bench"})
        launched = target.launch(self.ctx, self.port(target))
        self.running.append(launched.proc)
        try:
            wait_for_port(launched.proc, self.port(target), target.ready_timeout)
        except BaseException:
            self.discard(launched)
            raise
        return launched

    def url(self, target: Target) -> str:
        return f"http://127.0.0.1:{self.port(target)}{target.path}"

    def load(self, target: Target, launched: Launched, kind: str, conns: int, secs: float) -> Run:
        assert self.upstream is not None
        return run_wrk(
            self.url(target),
            body_file=self.body_files[kind],
            headers=launched.headers,
            connections=conns,
            duration=secs,
            proxy_pid=launched.proc.pid,
            upstream_pid=self.upstream.pid,
            cpu=self.load_cpu,
        )

    def finish(self, launched: Launched, record: dict[str, Any], forwarded_before: int) -> None:
        """Stop the target gracefully, then read what it left behind (the ledger)."""
        if launched.proc is self.upstream:
            return
        record["exit_code"] = launched.proc.stop()
        self.running.remove(launched.proc)
        record["upstream_total"] = upstream_requests(self.args.port_base) - forwarded_before
        for key, read in launched.after_stop.items():
            try:
                record[key] = read()
            except BenchError as exc:
                record[key] = {"error": str(exc)}

    def discard(self, launched: Launched) -> None:
        """Stop the target if still running and remove what it created (database, keys)."""
        if launched.proc is not self.upstream and launched.proc in self.running:
            launched.proc.stop()
            self.running.remove(launched.proc)
        for clean in launched.cleanup:
            clean()

    def measure(self, target: Target) -> dict[str, Any]:
        """Everything about one target; raises BenchError when it cannot be measured."""
        args = self.args
        record: dict[str, Any] = {"target": target.name, "label": target.label, "runs": []}
        forwarded_before = upstream_requests(args.port_base)
        launched = self.launch(target)
        try:
            record["probe"] = probe(
                target, self.port(target), launched.headers, upstream_port=args.port_base
            )
            for warning in record["probe"].get("warnings", []):
                print(f"  WARNING: {warning}", flush=True)
            rss0, _, _ = memory_kib(launched.proc.pid)
            record["rss_mib_start"] = round(rss0 / 1024, 1)
            # The host's speed now, on the target's CPU while it is idle (``speed_probe``).
            record["speed_probe_ms"] = machine.speed_probe(self.proxy_cpu)
            ticks = machine.cpu_ticks()
            for kind in ("json", "stream"):
                if args.warmup > 0:
                    self.load(target, launched, kind, 64, args.warmup)
            for rnd in range(1, args.rounds + 1):
                for kind, conns in SCENARIOS:
                    # Every run starts on an idle target: a latency run right after 64
                    # connections would measure the target catching up with them.
                    settle = wait_idle(launched.proc.pid)
                    before = upstream_requests(args.port_base)
                    run = self.load(target, launched, kind, conns, args.duration)
                    reached = upstream_requests(args.port_base) - before
                    entry = {
                        "round": rnd,
                        "kind": kind,
                        "concurrency": conns,
                        **run.as_dict(),
                        "upstream_requests": reached,
                        "settle_s": round(settle, 2),
                    }
                    record["runs"].append(entry)
                    _print_run(target.name, entry)
            if target.alternate and args.alternations > 0:
                record["alternated"] = self.alternate(target, launched)
            # Over the target's whole measurement: warm-up, rounds and alternated pairs.
            record["steal_share"] = machine.steal_share(ticks, machine.cpu_ticks())
            rss, hwm, nproc = memory_kib(launched.proc.pid)
            record["memory"] = {
                "rss_mib": round(rss / 1024, 1),
                "hwm_mib": round(hwm / 1024, 1),
                "processes": nproc,
                "workers": launched.workers,
                "rss_mib_per_worker": round(rss / 1024 / launched.workers, 1),
            }
            self.finish(launched, record, forwarded_before)
        finally:
            self.discard(launched)
        return record

    def alternate(self, target: Target, launched: Launched) -> dict[str, Any]:
        """JSON and streaming at 64 connections, turn about, ``--alternations`` times (the
        order swapped every other pair): the stream/JSON ratio per pair.

        Why: this host's speed drifts by up to ±20 % within minutes, and the rounds above
        measure the two kinds ~20 s apart each, so one ratio from them moves by as much as
        the gap it measures. Alternated short runs put the drift on both kinds alike; the
        check takes their median (``checks.py``)."""
        args = self.args
        pairs: list[dict[str, Any]] = []
        for n in range(args.alternations):
            pair: dict[str, Any] = {}
            for kind in ("json", "stream") if n % 2 == 0 else ("stream", "json"):
                wait_idle(launched.proc.pid)
                run = self.load(target, launched, kind, 64, args.alternation_seconds).as_dict()
                pair[kind] = {k: run[k] for k in _ALTERNATED_FIELDS}
            pairs.append(pair)
            j, st = pair["json"]["rps_per_core"], pair["stream"]["rps_per_core"]
            shown = f"×{st / j:.3f}" if j and st else "-"
            print(
                f"  {target.name:<20} pair {n + 1} json {j or 0:>7.0f}/core  "
                f"stream {st or 0:>7.0f}/core  stream/json {shown}",
                flush=True,
            )
        return {"seconds": args.alternation_seconds, "connections": 64, "pairs": pairs}


#: What ``Bench.alternate`` keeps of each run (``checks.py`` judges from these).
_ALTERNATED_FIELDS = ("rps", "rps_per_core", "proxy_cores", "requests", "error_count")


def _print_run(name: str, e: dict[str, Any]) -> None:
    lat = e["latency_ms"]
    per_core = f"{e['rps_per_core']:.0f}" if e["rps_per_core"] else "-"
    print(
        f"  {name:<20} r{e['round']} {e['kind']:<6} c={e['concurrency']:<3} "
        f"{e['rps']:>9.1f} req/s  {per_core:>7}/core  p50 {lat['p50']:.3f} ms  "
        f"p99 {lat['p99']:.3f} ms  proxy {e['proxy_cores']:.2f} cores  "
        f"errors {e['error_count']}  (settled {e['settle_s']:.1f} s)",
        flush=True,
    )


def check_prerequisites(targets: list[Target]) -> None:
    import shutil

    missing = [tool for tool in ("wrk", "taskset") if shutil.which(tool) is None]
    if any("nginx" in t.needs for t in targets) and shutil.which("nginx") is None:
        missing.append("nginx")
    if missing:
        raise BenchError(f"missing: {', '.join(missing)} (apt-get install wrk nginx util-linux)")
    if (
        any("litellm" in t.needs for t in targets)
        and not (BENCH / ".venv-litellm/bin/litellm").exists()
    ):
        raise BenchError("bench/.venv-litellm is missing: run bash bench/run.sh, which installs it")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    targets: list[Target] = args.selected
    try:
        check_prerequisites(targets)
        ports = {"upstream": args.port_base}
        ports.update({t.name: args.port_base + t.port_offset for t in targets if t.launch})
        require_free_ports(ports)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bench = Bench(args)
    meta = machine.describe(args, targets, bench.load_cpu, bench.proxy_cpu)
    if meta["loadavg_at_start"][0] > 0.5:
        print(f"warning: load average {meta['loadavg_at_start'][0]}: the machine is not quiet, "
              "so the figures will be noisy")  # fmt: skip
    if bench.proxy_cpu is None:
        print("warning: fewer than 2 CPUs: load, upstream and proxy share them (no pinning)")
    failures: dict[str, str] = {}
    records: list[dict[str, Any]] = []
    soak: dict[str, Any] | None = None
    try:
        bench.start_upstream()
        for target in targets:
            print(f"== {target.name}: {target.label}", flush=True)
            try:
                if "redis" in target.needs:
                    check_cluster_services()
                if args.soak:
                    soak = soak or {"meta": meta, "targets": []}
                    soak["targets"].append(soak_target(bench, target, args.soak))
                else:
                    records.append(bench.measure(target))
            except BenchError as exc:
                print(f"  FAILED: {exc}", flush=True)
                failures[target.name] = str(exc)
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        bench.close()
    meta["speed_probe_ms"]["end"] = machine.speed_probe(bench.proxy_cpu)
    if soak is not None:
        soak["failures"] = failures
        report.merge_soak(args.results, soak)
    else:
        report.write_results(args.results, meta, records, failures)
    report.render(args.results, args.report)
    print(f"results: {args.results}\nreport:  {args.report}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
