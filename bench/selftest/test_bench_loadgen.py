"""wrk with bench/wrk/chat.lua against the real upstream and the bare proxy: the JSON line
is parsed, CPU is accounted, and the probe accepts what a correct proxy relays."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import probe
from loadgen import parse_wrk, run_wrk, wrk_command
from procs import BenchError
from targets import AZURE_PATH, BY_NAME
from workload import BODIES


@pytest.fixture
def bodies(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for kind, body in BODIES.items():
        out[kind] = tmp_path / f"{kind}.json"
        out[kind].write_bytes(body)
    return out


def _require_wrk() -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: apt-get install wrk (bench/run.sh does it)")


def _pid_of_listener(port: int) -> int:
    """The pid owning the listening socket (the fixture's process), from /proc."""
    inode = None
    hexport = f"{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(":" + hexport) and fields[3] == "0A":
            inode = fields[9]
    assert inode is not None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
            except OSError:
                continue
    raise AssertionError(f"no process owns port {port}")


def test_wrk_json_run_is_parsed_and_counted(upstream: int, bodies: dict[str, Path]) -> None:
    _require_wrk()
    pid = _pid_of_listener(upstream)
    run = run_wrk(
        f"http://127.0.0.1:{upstream}{AZURE_PATH}", body_file=bodies["json"], headers={},
        connections=4, duration=1, proxy_pid=pid, upstream_pid=pid, cpu=None,
    )  # fmt: skip
    assert run.requests > 100
    assert run.error_count == 0
    assert 0 < run.latency_ms["p50"] <= run.latency_ms["p99"] <= run.latency_ms["max"]
    assert run.proxy_cores > 0
    assert run.loadgen_cores > 0
    assert probe.upstream_stats(upstream)["json"] >= run.requests


def test_wrk_mix_sends_every_fourth_request_as_a_stream(
    upstream: int, bodies: dict[str, Path]
) -> None:
    _require_wrk()
    url = f"http://127.0.0.1:{upstream}{AZURE_PATH}"
    argv, env = wrk_command(
        url, body_file=bodies["json"], headers={"api-key": "k"}, connections=2, duration=1,
        cpu=None, mix_file=bodies["stream"],
    )  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    data = parse_wrk(url, done.returncode, done.stdout, done.stderr)
    stats = probe.upstream_stats(upstream)
    assert data["requests"] > 100
    share = stats["stream"] / (stats["stream"] + stats["json"])
    assert 0.2 < share < 0.3


def test_wrk_reports_error_statuses(upstream: int, bodies: dict[str, Path]) -> None:
    _require_wrk()
    pid = _pid_of_listener(upstream)
    run = run_wrk(
        f"http://127.0.0.1:{upstream}/nowhere", body_file=bodies["json"], headers={},
        connections=1, duration=1, proxy_pid=pid, upstream_pid=pid, cpu=None,
    )  # fmt: skip
    assert run.requests > 0
    assert run.errors["status"] == run.requests


def test_parse_wrk_failure_is_a_clear_error() -> None:
    with pytest.raises(BenchError, match="wrk failed"):
        parse_wrk("http://x", 1, "", "unable to connect")


def test_bare_proxy_passes_the_probe(bare_proxy: int, upstream: int) -> None:
    found = probe.probe(BY_NAME["bare"], bare_proxy, {"api-key": "k"}, upstream_port=upstream)
    assert found["upstream_requests"] == 2
    assert found["stream_events"] == 33


def test_probe_refuses_a_target_that_does_not_reach_the_upstream(
    spawn: Callable[[str, list[str]], int], upstream: int
) -> None:
    # The upstream itself answers, but counted against another (idle) upstream nothing
    # reached that one: the probe must not accept such a target.
    other = spawn("upstream.py", [])
    fast = dataclasses.replace(BY_NAME["bare"], ready_timeout=1.0)
    with pytest.raises(BenchError, match="0 of 2 requests reached the upstream"):
        probe.probe(fast, upstream, {}, upstream_port=other)


def test_probe_warns_when_the_limiter_header_is_missing(bare_proxy: int, upstream: int) -> None:
    target = dataclasses.replace(BY_NAME["bare"], expect_header=("x-ratelimit-limit-tokens", "1"))
    found = probe.probe(target, bare_proxy, {}, upstream_port=upstream)
    assert found["limiter_header"] is None
    assert "limiter not verified" in found["warnings"][0]
