"""Process accounting and clean stops, on real process trees."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

import procs


def test_tree_cpu_memory_and_stop(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    # A parent that forks a busy child: the tree is measured whole and stopped whole.
    script = f"{sys.executable} -c 'while True: pass' & wait"
    managed = procs.start("busy", ["bash", "-c", script], log_dir=tmp_path, pid_file=pid_file)
    try:
        deadline = time.monotonic() + 10
        while len(procs.tree(managed.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = procs.tree(managed.pid)
        assert len(members) == 2
        t0 = procs.cpu_seconds(managed.pid)
        time.sleep(0.5)
        assert procs.cpu_seconds(managed.pid) - t0 > 0.1
        rss, hwm, count = procs.memory_kib(managed.pid)
        assert count == 2
        assert 0 < rss <= hwm
        assert pid_file.read_text().startswith(f"{managed.pid} busy")
    finally:
        managed.stop(grace=2)
    assert not managed.alive()
    assert procs.group_running(managed.pid) == []  # the orphaned child too, not just dying
    for pid in members:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert pid_file.read_text() == ""


def test_a_process_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    managed = procs.start("dies", ["bash", "-c", "echo cannot bind; exit 3"], log_dir=tmp_path,
                          pid_file=tmp_path / "pids")  # fmt: skip
    with pytest.raises(procs.BenchError, match="exited with code 3") as info:
        procs.wait_for_port(managed, 1, timeout=10)
    assert "cannot bind" in str(info.value)
    managed.stop()


def test_busy_ports_are_named() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(procs.BenchError, match=f"{port} \\(nginx\\)"):
            procs.require_free_ports({"nginx": port})


def test_pin_uses_taskset_only_with_a_cpu() -> None:
    assert procs.pin(None, ["x"]) == ["x"]
    assert procs.pin(1, ["x", "y"]) == ["taskset", "-c", "1", "x", "y"]
    assert procs.cpu_count() == len(os.sched_getaffinity(0))


def test_wait_idle_returns_once_the_tree_stops_working(tmp_path: Path) -> None:
    # Busy for about 1.5 s, then asleep: idle is seen after the busy spell, not before.
    script = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass\n"
    script += "time.sleep(60)"
    managed = procs.start(
        "spell", [sys.executable, "-c", script], log_dir=tmp_path, pid_file=tmp_path / "pids"
    )
    try:
        waited = procs.wait_idle(managed.pid, window=0.25, timeout=10)
        assert 1.0 <= waited <= 3.0
        assert procs.wait_idle(managed.pid, window=0.25, timeout=10) < 0.5
    finally:
        managed.stop()
