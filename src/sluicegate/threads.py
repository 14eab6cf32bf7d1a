"""Background threads that yield the CPU to the event loop.

The gateway serves requests on one event-loop thread; the ledger writer and the rollup job
are threads of the same process. When the process has a single core (one pinned worker per
core, as the benchmark and many deployments run it), a writer busy for a few milliseconds
inside SQLite (the GIL released) still takes that core from the event loop, and requests
wait: that was most of the 99th-percentile latency. On Linux each thread is a task with its
own nice value, so these threads lower theirs: the loop wins the core whenever both want
it, and the threads still get their share when the loop is saturated.
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
