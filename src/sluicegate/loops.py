"""The running event loop, looked up without a system call per lookup."""

from __future__ import annotations

import asyncio


def running_loop(remembered: asyncio.AbstractEventLoop | None) -> asyncio.AbstractEventLoop:
    """``remembered`` while it is running, else ``asyncio.get_running_loop()``.

    Why: on Python 3.11 ``asyncio.get_running_loop()`` makes a ``getpid()`` system call every
    time (its check against forks), and the request path asked about five times per request
    (~6 % of the gateway's CPU). Callers keep the loop this returns and pass it back; a loop
    that no longer runs (a restarted server) is looked up again. Call it from the loop's thread.
    """
    if remembered is not None and remembered.is_running():
        return remembered
    return asyncio.get_running_loop()
