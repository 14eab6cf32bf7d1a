"""Background threads lower their own priority, not the process's (sluicegate.threads)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from sluicegate.threads import IdleWhileCaughtUp, lower_priority


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
