"""Token counts of large request bodies, off the event loop, in one daemon thread.

Why: the gateway serves every request on one event-loop thread, and counting is pure Python
(about 0.1-0.3 µs a character of prose, up to ~2 µs a byte of text without breaks, see
``tokens/bpe.py``): an 8 MB body counted inline would hold every other tenant's requests
for seconds. Counted here, it costs the loop nothing but the GIL's hand-overs (the loop
gets the interpreter back at least every ``sys.getswitchinterval()``, 5 ms).

Why one thread of our own, not ``asyncio.to_thread``:

* the default executor is shared with the loop's ``getaddrinfo`` and anything else that
  calls ``to_thread``: a few multi-megabyte counts (six threads here) would hold name
  resolution for everyone while they run;
* counting holds the GIL, so a second counting thread adds no throughput, only contention:
  with N of them the loop waits its turn behind N threads at every switch. One thread, and
  counts queue in arrival order (a tenant sending huge bodies delays other huge bodies, never
  the small ones, which are counted inline);
* it is a daemon thread, so a count in progress never holds the gateway's stop (the default
  executor's threads are joined at the loop's end and at exit);
* it runs at a lower priority (a higher nice value): on a worker pinned to one core the
  loop's thread wins the core whenever both are ready.

Its callers: admission (``proxy/admission.py``) counts a large prompt here before forwarding,
and the relay (``proxy/relay.py``) counts here an answer's usage it has to estimate (no usage
came back) when the prompt or the answer is large.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sluicegate.threads import call_and_settle, lower_priority

T = TypeVar("T")

#: Nice value added to the counting thread (see the module docstring).
COUNTING_NICENESS = 10

#: Texts held in more bytes than this are counted in the counting thread, smaller ones inline
#: (a request body for a prompt, the answer's body or events kept for a completion: either
#: bounds the UTF-8 bytes of the text it holds). 16 KiB is ~3 ms of prose or code and ~35 ms
#: of the worst text (random letters without a break, ~2 µs a byte; see ``tokens/bpe.py``);
#: the hop to the thread costs ~0.1 ms and the GIL's hand-overs: worth it once counting costs
#: milliseconds, not for a chat of a few KB. Admission's bound for a prompt, and the relay's
#: for an estimate.
INLINE_COUNT_BYTES = 16 * 1024

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]


class CountingThread:
    """Runs calls one at a time, in submission order, in a daemon thread started on first
    use (and started again if it is gone, as in a child process after a fork).

    :meth:`run` returns a future of the calling loop; cancelling it drops a call that has not
    started yet, and the outcome of one that has. Safe to use from several loops and threads.
    """

    def __init__(self, name: str = "sluicegate-token-count") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Queue ``fn()``; the future (of the running loop) gets its result or exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._start()
        self._jobs.put((loop, future, fn))
        return future

    def _start(self) -> None:
        with self._lock:
            thread = self._thread
            if thread is not None and thread.is_alive():
                return
            if thread is not None:  # gone (a fork): what its queue held died with it
                self._jobs = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        lower_priority(COUNTING_NICENESS)
        jobs = self._jobs
        while True:
            loop, future, fn = jobs.get()
            # Read from another thread: a benign race, at worst a call whose outcome nobody
            # takes any more.
            if not future.cancelled():
                call_and_settle(loop, future, fn)


_counting: CountingThread | None = None


def counting_thread() -> CountingThread:
    """The process's counting thread (one for every loop and every caller)."""
    global _counting
    if _counting is None:
        _counting = CountingThread()
    return _counting
