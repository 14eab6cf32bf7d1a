"""The process's open-file limit: every client and backend connection is a descriptor.

Many systems start a process with a soft limit of 1,024 descriptors and a far higher hard
limit; servers such as nginx (``worker_rlimit_nofile``) raise the soft one themselves. Past
the limit ``accept`` and ``connect`` fail, for every request at once.
"""

from __future__ import annotations

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]


def raise_open_file_limit(needed: int) -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` to ``needed`` (never lower it), as far as the hard
    limit allows. Returns the soft limit in force afterwards, or None when there is none."""
    if resource is None:  # pragma: no cover - not on Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft
