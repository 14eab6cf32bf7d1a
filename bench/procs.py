"""Processes the benchmark starts: launch pinned to a CPU, account CPU and memory, stop them.

Every process is started in its own session (its process group id is its pid), written to
a pid file that ``run.sh``'s trap reads as a last resort, and stopped by signalling its
group: SIGTERM, then SIGKILL after a grace period. CPU time and resident memory are read
from ``/proc`` for the whole process tree (a master and its workers, a CLI and the server
it forks), so a proxy that forks is measured whole.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A problem the harness reports in one clear line and then stops or skips a target."""


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def pin(cpu: int | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run under ``taskset -c cpu`` (taskset execs, so the pid stays the same)."""
    return list(argv) if cpu is None else ["taskset", "-c", str(cpu), *argv]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def require_free_ports(ports: Mapping[str, int]) -> None:
    busy = [f"{port} ({who})" for who, port in ports.items() if port_in_use(port)]
    if busy:
        raise BenchError(
            "port(s) already in use: " + ", ".join(busy) + ". Stop whatever listens there "
            "(`ss -ltnp` shows it) or choose other ports with --port-base."
        )


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if Path(f"/proc/{pid}").exists():
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def group_running(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` that have not died yet (a zombie has: it
    only waits to be reaped)."""
    found = []
    for entry in os.listdir("/proc"):
        fields = _stat_fields(int(entry)) if entry.isdigit() else None
        if fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


def cpu_split(root: int) -> tuple[float, float]:
    """User and system CPU seconds of the live tree ``root`` (reaped children not counted)."""
    user = system = 0
    for pid in tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            user += int(fields[11])
            system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(root: int) -> float:
    """User + system CPU of the tree, plus what its reaped children used (cutime, cstime)."""
    user, system = cpu_split(root)
    fields = _stat_fields(root)
    reaped = (int(fields[13]) + int(fields[14])) / CLK_TCK if fields is not None else 0.0
    return user + system + reaped


def wait_idle(
    root: int, *, below: float = 0.05, window: float = 0.5, timeout: float = 20.0
) -> float:
    """Wait until the tree ``root`` uses less than ``below`` cores over ``window`` seconds,
    that is until it has finished what the previous load left it (sluicegate's ledger
    writer catching up on the records of 64 connections, say); at most ``timeout`` seconds.
    Returns the seconds waited."""
    started = time.monotonic()
    before = cpu_seconds(root)
    while True:
        time.sleep(window)
        after = cpu_seconds(root)
        waited = time.monotonic() - started
        if (after - before) / window < below or waited >= timeout:
            return waited
        before = after


def memory_kib(root: int) -> tuple[int, int, int]:
    """(VmRSS summed over the tree, VmHWM summed over the tree, number of processes) in KiB."""
    rss = hwm = count = 0
    for pid in tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        count += 1
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1])
    return rss, hwm, count


@dataclass
class Managed:
    """A started process group. ``stop()`` is idempotent."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    pid_file: Path
    _log: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM the group, wait up to ``grace`` seconds, then SIGKILL it."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Workers left behind by a master that exited still carry its group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        # ... and take a moment to die, the more so on a loaded machine: the next target must
        # not start beside them (their CPU, their ports).
        deadline = time.monotonic() + 5.0
        while (left := group_running(self.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        if left:
            print(f"warning: {self.name}: processes {left} still running after SIGKILL")
        self._log.close()
        _forget(self.pid_file, self.pid)
        return self.proc.returncode


def start(
    name: str,
    argv: Sequence[str],
    *,
    log_dir: Path,
    pid_file: Path,
    cpu: int | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Managed:
    """Start ``argv`` in a new session, pinned to ``cpu``, output to ``log_dir/name.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = log_path.open("wb")
    try:
        proc = subprocess.Popen(
            pin(cpu, argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        log.close()
        raise BenchError(f"{name}: cannot start {argv[0]}: {exc}") from exc
    with pid_file.open("a") as fh:
        fh.write(f"{proc.pid} {name}\n")
    return Managed(name, proc, log_path, pid_file, log)


def _forget(pid_file: Path, pid: int) -> None:
    try:
        lines = pid_file.read_text().splitlines()
    except OSError:
        return
    pid_file.write_text("".join(f"{ln}\n" for ln in lines if ln.split(" ", 1)[0] != str(pid)))


def wait_for_port(proc: Managed, port: int, timeout: float) -> None:
    """Return once ``port`` accepts connections; raise if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited with code {proc.proc.returncode} before listening on "
                f"{port}; last lines of {proc.log_path}:\n{proc.log_tail()}"
            )
        if port_in_use(port):
            return
        time.sleep(0.1)
    raise BenchError(
        f"{proc.name} did not listen on port {port} within {timeout:.0f} s; last lines of "
        f"{proc.log_path}:\n{proc.log_tail()}"
    )
