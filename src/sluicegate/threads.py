"""Background threads that yield the CPU to the event loop.

The gateway serves requests on one event-loop thread; the ledger writer and the rollup job
are threads of the same process. When the process has a single core (one pinned worker per
core, as the benchmark and many deployments run it), a writer busy for a few milliseconds
inside SQLite (the GIL released) still takes that core from the event loop, and requests
wait: that was most of the 99th-percentile latency. On Linux each thread is a task with its
own scheduling, so these threads lower theirs:

* ``lower_priority``: a higher nice value (a smaller share when the core is contended);
* ``IdleWhileCaughtUp``: the ``SCHED_IDLE`` policy while the thread keeps up with its work,
  so that any request preempts it at once (a nice value only changes the share: the
  kernel's EEVDF scheduler still lets the running thread finish its slice, milliseconds),
  and back to normal (with its nice value) when a backlog builds, so that it is never
  starved by a saturated event loop.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger("sluicegate.threads")

#: Nice value of the ledger writer: at 10 it still gets about a tenth of a contended core,
#: more than it needs at the gateway's full throughput.
LEDGER_NICENESS = 10
#: Nice value of the rollup job (pure background work).
ROLLUP_NICENESS = 19


def lower_priority(niceness: int) -> bool:
    """Raise the calling thread's nice value by ``niceness`` (Linux only; elsewhere
    ``setpriority`` would apply to the whole process, so nothing is done). True if done."""
    if sys.platform != "linux" or not hasattr(os, "setpriority"):
        return False
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(current + niceness, 19))
    except OSError as exc:  # e.g. a sandbox forbidding it: run at normal priority
        log.debug("could not lower the priority of thread %s: %s", tid, exc)
        return False
    return True


class IdleWhileCaughtUp:
    """Switches the calling thread between ``SCHED_IDLE`` and normal scheduling (Linux;
    elsewhere a no-op). Call :meth:`update` from the thread itself, as often as convenient:
    it makes a system call only when the state changes."""

    def __init__(self) -> None:
        self._idle: bool | None = None
        self._supported = sys.platform == "linux" and hasattr(os, "SCHED_IDLE")

    def update(self, backlog: bool) -> None:
        """Idle when there is no ``backlog``, normal when there is one."""
        idle = not backlog
        if not self._supported or idle is self._idle:
            return
        tid = threading.get_native_id()
        policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except OSError as exc:
            log.debug("could not change the scheduling of thread %s: %s", tid, exc)
            self._supported = False
            return
        self._idle = idle
