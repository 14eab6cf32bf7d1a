"""Background threads lower their own priority, not the process's (sluicegate.threads)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from sluicegate.threads import lower_priority


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
