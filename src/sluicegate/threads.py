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

And one more kind of thread: ``in_daemon_thread`` runs a blocking call whose duration the
gateway does not control (a token or secret fetch through ``azure-identity``, which can hang
on an identity endpoint that accepts and never answers) where no shutdown waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TypeVar, cast

T = TypeVar("T")

log = logging.getLogger("sluicegate.threads")

#: Nice value of the ledger writer: at 10 it still gets about a tenth of a contended core,
#: more than it needs at the gateway's full throughput.
LEDGER_NICENESS = 10
#: Nice value of the rollup job: background work, idle (``SCHED_IDLE``) except while it holds
#: the SQLite write lock (:func:`not_idle`), when this share is what it gets on a busy core.
ROLLUP_NICENESS = 10


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
    """Switches one thread between ``SCHED_IDLE`` and normal scheduling (Linux; elsewhere a
    no-op). The thread itself calls :meth:`update` as often as convenient (a system call
    only when the state changes); any other thread may call :meth:`promote` to end an idle
    period at once, because a thread that went idle while caught up can be caught in the
    middle of its work when the event loop saturates the core, and gets no CPU until the
    loop pauses: the ledger writer was seen holding a batch for seconds while 15,000
    records queued behind it (each held in memory)."""

    def __init__(self) -> None:
        self._idle: bool | None = None
        self._tid: int | None = None
        self._lock = threading.Lock()
        self._supported = sys.platform == "linux" and hasattr(os, "SCHED_IDLE")

    @property
    def idle(self) -> bool:
        """True while the thread runs under ``SCHED_IDLE`` (a lock-free read, for a cheap
        check before :meth:`promote`)."""
        return self._idle is True

    def update(self, backlog: bool) -> None:
        """Idle when there is no ``backlog``, normal when there is one (from the thread)."""
        idle = not backlog
        if not self._supported or idle is self._idle:
            return
        with self._lock:
            self._tid = threading.get_native_id()
            if idle and not can_leave_idle(self._tid):
                self._supported = False  # it could never come back: stay normal
                return
            self._set(idle)

    def promote(self) -> None:
        """Back to normal scheduling now, if idle (from any thread); the thread's next
        :meth:`update` decides again."""
        if not self._supported or self._idle is not True:
            return
        with self._lock:
            if self._idle is True:
                self._set(False)

    def _set(self, idle: bool) -> None:
        # held: self._lock; self._tid is set
        assert self._tid is not None
        policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
        try:
            os.sched_setscheduler(self._tid, policy, os.sched_param(0))
        except OSError as exc:
            log.debug("could not change the scheduling of thread %s: %s", self._tid, exc)
            self._supported = False
            return
        self._idle = idle


def can_leave_idle(tid: int) -> bool:
    """Whether thread ``tid`` could switch from ``SCHED_IDLE`` back to normal scheduling.

    The kernel allows it only with ``CAP_SYS_NICE`` or when ``RLIMIT_NICE`` would allow the
    thread's nice value (``20 - nice``); the default limit is 0, so an unprivileged thread
    that went idle would stay idle, and be starved whenever the event loop saturates the core.
    Such a thread must not go idle at all. The capability is read, not inferred from the
    user: root in a container usually runs without it (Docker drops ``CAP_SYS_NICE``).
    """
    if _has_cap_sys_nice():
        return True
    try:
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    except (OSError, ValueError):
        return False
    return soft == resource.RLIM_INFINITY or soft >= 20 - nice


_CAP_SYS_NICE = 23  # linux/capability.h


def _has_cap_sys_nice() -> bool:
    """Whether this thread's effective capabilities include ``CAP_SYS_NICE``."""
    try:
        with open("/proc/thread-self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    except (OSError, ValueError):
        pass
    return False


@contextmanager
def not_idle() -> Iterator[None]:
    """Normal scheduling for the calling thread inside the block if it runs ``SCHED_IDLE``.

    For a background thread holding a lock that others wait for (the rollup job inside a
    SQLite write transaction): starved of CPU there, it would make them wait too.
    """
    tid = threading.get_native_id()
    idle = False
    if sys.platform == "linux" and hasattr(os, "SCHED_IDLE"):
        try:
            if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                idle = True
        except OSError as exc:
            log.debug("could not leave SCHED_IDLE in thread %s: %s", tid, exc)
    try:
        yield
    finally:
        if idle:
            with suppress(OSError):
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


def in_daemon_thread(name: str, fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run ``fn()`` in a new daemon thread named ``name``; the returned future (of the
    running loop) gets its result or its exception. Cancelling the future (a ``wait_for``
    that gave up) leaves the call running, its outcome then dropped.

    Why not ``asyncio.to_thread``: its executor's threads are joined when the loop shuts down
    (``shutdown_default_executor``) and again at interpreter exit, so one call hung on a
    socket held the gateway's stop for as long as the call lasted (minutes: azure-identity's
    own timeouts are 300 s a try). A daemon thread is waited for by nobody. For rare calls
    only (a thread per call): token and secret fetches, minutes apart.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    threading.Thread(
        target=call_and_settle, args=(loop, future, fn), name=name, daemon=True
    ).start()
    return future


def call_and_settle(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[T], fn: Callable[[], T]
) -> None:
    """In a worker thread: call ``fn()`` and hand its outcome to ``future`` in ``loop``
    (``settle_future``); nothing if the loop has closed meanwhile (nobody waits any more)."""
    error: BaseException | None = None
    result: T | None = None
    try:
        result = fn()
    except BaseException as exc:  # handed to the awaiting side, whatever it is
        error = exc
    with suppress(RuntimeError):
        loop.call_soon_threadsafe(settle_future, future, error, result)


def settle_future(future: asyncio.Future[T], error: BaseException | None, result: object) -> None:
    """Give ``future`` (in its loop's thread) the outcome of a call made in another thread:
    ``error``, else ``result``; nothing if it is done already (cancelled meanwhile)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(cast(T, result))
