"""Background threads lower their own priority, not the process's (sluicegate.threads)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sluicegate import threads as threads_module
from sluicegate.threads import IdleWhileCaughtUp, lower_priority, not_idle


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_only_the_calling_thread_is_reniced() -> None:
    seen: dict[str, int] = {}

    def background() -> None:
        assert lower_priority(5)
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=background)
    thread.start()
    thread.join()
    assert seen["thread"] == min(before + 5, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling policies are Linux's")
def test_idle_while_caught_up_switches_the_calling_thread_only() -> None:
    seen: list[int] = []

    def background() -> None:
        scheduling = IdleWhileCaughtUp()
        tid = threading.get_native_id()
        scheduling.update(backlog=False)
        seen.append(os.sched_getscheduler(tid))
        scheduling.update(backlog=True)
        seen.append(os.sched_getscheduler(tid))
        scheduling.update(backlog=False)
        seen.append(os.sched_getscheduler(tid))

    thread = threading.Thread(target=background)
    thread.start()
    thread.join()
    assert seen == [os.SCHED_IDLE, os.SCHED_OTHER, os.SCHED_IDLE]
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling policies are Linux's")
def test_another_thread_can_end_an_idle_period() -> None:
    scheduling = IdleWhileCaughtUp()
    went_idle, promoted = threading.Event(), threading.Event()
    seen: list[int] = []

    def background() -> None:
        tid = threading.get_native_id()
        scheduling.update(backlog=False)
        seen.append(os.sched_getscheduler(tid))
        went_idle.set()
        assert promoted.wait(10)
        seen.append(os.sched_getscheduler(tid))
        scheduling.update(backlog=False)  # the thread's own next decision still counts
        seen.append(os.sched_getscheduler(tid))

    thread = threading.Thread(target=background)
    thread.start()
    assert went_idle.wait(10)
    assert scheduling.idle
    scheduling.promote()  # from this thread, as LedgerWriter.submit does
    assert not scheduling.idle
    promoted.set()
    thread.join()
    assert seen == [os.SCHED_IDLE, os.SCHED_OTHER, os.SCHED_IDLE]
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling policies are Linux's")
def test_not_idle_gives_normal_scheduling_inside_the_block_only() -> None:
    seen: list[int] = []

    def background() -> None:
        tid = threading.get_native_id()
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        with not_idle():
            seen.append(os.sched_getscheduler(tid))
        seen.append(os.sched_getscheduler(tid))
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        with not_idle():  # a normal thread stays normal
            seen.append(os.sched_getscheduler(tid))
        seen.append(os.sched_getscheduler(tid))

    thread = threading.Thread(target=background)
    thread.start()
    thread.join()
    assert seen == [os.SCHED_OTHER, os.SCHED_IDLE, os.SCHED_OTHER, os.SCHED_OTHER]


_UNPRIVILEGED_PROBE = """
import importlib.util, json, os, sys, threading
spec = importlib.util.spec_from_file_location("threads_probe", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
out = {"uid": os.geteuid(), "can_leave": m.can_leave_idle(threading.get_native_id())}

def background():
    s = m.IdleWhileCaughtUp()
    s.update(backlog=False)
    out["policy_after_update"] = os.sched_getscheduler(threading.get_native_id())

t = threading.Thread(target=background)
t.start()
t.join()
main = threading.get_native_id()
os.sched_setscheduler(main, os.SCHED_IDLE, os.sched_param(0))
try:
    os.sched_setscheduler(main, os.SCHED_OTHER, os.sched_param(0))
    out["kernel_allows"] = True
except PermissionError:
    out["kernel_allows"] = False
print(json.dumps(out))
"""


def _probe(prefix: list[str], user: int | None) -> dict[str, object]:
    """Run ``_UNPRIVILEGED_PROBE`` with the system Python (the project's interpreter may live
    where ``nobody`` cannot read), behind ``prefix`` and as ``user``."""
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    module = Path(threads_module.__file__ or "").resolve()
    done = subprocess.run(
        [*prefix, python, "-c", _UNPRIVILEGED_PROBE, str(module)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        user=user,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, object] = json.loads(done.stdout)
    assert out["can_leave"] == out["kernel_allows"]
    expected = os.SCHED_IDLE if out["can_leave"] else os.SCHED_OTHER
    assert out["policy_after_update"] == expected
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling policies are Linux's")
def test_an_unprivileged_thread_never_goes_idle_for_good() -> None:
    """Without CAP_SYS_NICE (and with the default RLIMIT_NICE of 0) the kernel refuses to
    leave SCHED_IDLE: ``can_leave_idle`` must say so, and the thread stays normal. As
    ``nobody`` when the tests run as root."""
    out = _probe([], 65534 if os.geteuid() == 0 else None)
    assert out["uid"] != 0


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling policies are Linux's")
def test_root_without_cap_sys_nice_never_goes_idle_for_good() -> None:
    """Root in a container usually lacks CAP_SYS_NICE (Docker drops it): the kernel refuses
    there too, so being root must not count. ``setpriv`` (util-linux) drops the capability."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop a capability root has")
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv not found: install util-linux"
    out = _probe([setpriv, "--bounding-set=-sys_nice", "--inh-caps=-sys_nice"], None)
    assert out["uid"] == 0
    assert out["kernel_allows"] is False


def test_a_daemon_thread_call_answers_its_awaiter() -> None:
    async def main() -> tuple[int, str]:
        value = await threads_module.in_daemon_thread("t-value", lambda: 6 * 7)

        def fail() -> int:
            raise ValueError("no token")

        with pytest.raises(ValueError, match="no token") as caught:
            await threads_module.in_daemon_thread("t-error", fail)
        return value, str(caught.value)

    assert asyncio.run(main()) == (42, "no token")


def test_a_hung_daemon_thread_call_does_not_hold_the_loops_end() -> None:
    """``asyncio.run`` ends while the call is still blocked: nobody joins its thread
    (``asyncio.to_thread`` here held ``asyncio.run`` until the call returned)."""
    release = threading.Event()
    started = threading.Event()

    def hang() -> bool:
        started.set()
        return release.wait(30)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(threads_module.in_daemon_thread("t-hung", hang), 0.05)

    began = time.monotonic()
    try:
        asyncio.run(main())
        took = time.monotonic() - began
        assert took < 5, f"asyncio.run waited {took:.1f} s for the call"
        assert started.is_set()
        (thread,) = [t for t in threading.enumerate() if t.name == "t-hung"]
        assert thread.daemon and thread.is_alive()
    finally:
        release.set()
    thread.join(5)
    assert not thread.is_alive()  # its answer, after the loop closed, is dropped quietly
