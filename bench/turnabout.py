"""What `pairs.py` and `instructions.py` share: the command line naming targets and kinds,
the targets started once beside one fake upstream, and the turn-about order of their runs.

Why turn about: this host's speed drifts by more than the differences being measured, so
(target, kind) runs alternate in pairs, and every other pair runs in reverse order, so
that neither target nor kind always runs first (after the other's load, or in the host's
slower half of a pair).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import targets
from loadgen import wrk_command
from procs import Managed, start
from targets import Context, Launched, Target, wait_ready
from workload import BODIES

HERE = Path(__file__).resolve().parent


class Running(NamedTuple):
    name: str
    launched: Launched
    port: int


def add_arguments(
    parser: argparse.ArgumentParser, *, pairs: int, seconds: float, connections: int, top: int,
    port_base: int,
) -> None:  # fmt: skip
    """The options both tools take, with each tool's own defaults."""
    parser.add_argument("--targets", default="sluicegate", help="comma-separated target names")
    parser.add_argument("--kinds", default="json,stream")
    parser.add_argument("--pairs", type=int, default=pairs)
    parser.add_argument("--seconds", type=float, default=seconds)
    parser.add_argument("--connections", type=int, default=connections)
    parser.add_argument("--top", type=int, default=top)
    parser.add_argument("--port-base", type=int, default=port_base)
    parser.add_argument(
        "--against",
        metavar="REV",
        help="also run sluicegate (full policy) from git revision REV, as target "
        "sluicegate@REV: a change measured against its parent, turn about",
    )


def checkout_src(rev: str) -> Path:
    """``src`` of git revision ``rev``, exported to a temporary directory."""
    where = Path(tempfile.mkdtemp(prefix="sg-against-"))
    archive = subprocess.run(
        ["git", "-C", str(HERE.parent), "archive", rev, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where / "src"


def chosen_targets(args: argparse.Namespace, prog: str) -> dict[str, Target] | None:
    """The targets named by ``--targets`` (and ``--against``) in order; None, after saying
    so on stderr, when one is unknown or cannot be started."""
    names = args.targets.split(",")
    known = dict(targets.BY_NAME)
    if args.against:
        name = f"sluicegate@{args.against}"
        known[name] = targets.sluicegate_from(checkout_src(args.against), name)
        names.append(name)
    unknown = [n for n in names if n not in known or known[n].launch is None]
    if unknown:
        print(f"{prog}: no such target: {', '.join(unknown)}", file=sys.stderr)
        return None
    return {name: known[name] for name in names}


def context(tool: str, port_base: int) -> Context:
    """A fresh output directory; targets on CPU 1, the upstream on ``port_base``."""
    out = Path(tempfile.mkdtemp(prefix=f"sg-{tool}-"))
    return Context(
        out=out,
        pid_file=out / "pids",
        proxy_cpu=1,
        upstream_port=port_base,
        run_id=f"{tool}{os.getpid()}",
    )


@contextlib.contextmanager
def upstream(ctx: Context, *extra: str) -> Iterator[Managed]:
    """The fake upstream on ``ctx.upstream_port``, pinned to CPU 0, stopped on exit."""
    proc = start(
        "upstream",
        [sys.executable, str(HERE / "upstream.py"), "--port", str(ctx.upstream_port), *extra],
        log_dir=ctx.out,
        pid_file=ctx.pid_file,
        cpu=0,
    )
    try:
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def started(
    chosen: dict[str, Target], ctx: Context, *, ready_timeout: float, grace: float = 15.0
) -> Iterator[list[Running]]:
    """Each target started once, on the ports after the upstream's, ready; stopped (each
    given ``grace`` seconds) and cleaned up on exit, also when starting one fails."""
    running: list[Running] = []
    try:
        for i, (name, target) in enumerate(chosen.items()):
            assert target.launch is not None
            port = ctx.upstream_port + 1 + i
            launched = target.launch(ctx, port)
            running.append(Running(name, launched, port))
            wait_ready(launched, port, timeout=ready_timeout)
        yield running
    finally:
        for run in running:
            run.launched.proc.stop(grace=grace)
            for fn in run.launched.cleanup:
                fn()


def turns(
    running: list[Running], kinds: list[str], pairs: int
) -> Iterator[tuple[int, Running, str]]:
    """(pair, target, kind) in turn-about order: every other pair reversed, targets and kinds
    alike."""
    for pair in range(pairs):
        order = running if pair % 2 == 0 else running[::-1]
        for run in order:
            for kind in kinds if pair % 2 == 0 else kinds[::-1]:
                yield pair, run, kind


def load(
    ctx: Context, run: Running, kind: str, *, connections: int, seconds: float, timeout_s: int = 10
) -> subprocess.Popen[bytes]:
    """wrk, pinned to CPU 0, sending ``kind`` requests to ``run`` for ``seconds``."""
    body = ctx.out / f"{kind}.json"
    body.write_bytes(BODIES[kind])
    argv, env = wrk_command(
        f"http://127.0.0.1:{run.port}{targets.AZURE_PATH}",
        body_file=body,
        headers=run.launched.headers,
        connections=connections,
        duration=seconds,
        cpu=0,
        timeout_s=timeout_s,
    )
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
