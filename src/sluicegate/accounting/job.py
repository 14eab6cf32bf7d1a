"""The background job that keeps rollups current and purges what retention says to purge.

One daemon thread per gateway process: every ``retention.rollup_interval_seconds`` it runs
``Rollups.catch_up()``; once an hour (and at its first run) it purges. Several processes may
run it against one database: runs serialise on the rollups' lock and are idempotent.
Reports also catch up before they read, so the job only keeps that catch-up small.
With ``budgets``, each run then recomputes what every budget has spent and publishes the
subscriptions over theirs (``accounting.budgets``): right after the catch-up, so the current
hour's rollup holds every record committed so far.
Waiting uses real time (a thread cannot wait on an injected clock); the clock only decides
what is old enough to purge.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sluicegate.accounting.budgets import Budgets
from sluicegate.accounting.rollups import Rollups
from sluicegate.config.model import RetentionConfig
from sluicegate.threads import ROLLUP_NICENESS, IdleWhileCaughtUp, lower_priority

log = logging.getLogger("sluicegate.rollups")

PURGE_EVERY_SECONDS = 3600.0
#: The job spends at most about 1/PACING of its process's time: after a run that took T
#: seconds it waits at least PACING * T. A catch-up recomputes the current hour from its raw
#: records, so under heavy load (millions of records an hour) a run grows long; without
#: pacing, a fixed interval would let the job take an ever larger share of the CPU that
#: serves requests. Reports catch up on their own, so they stay exact either way.
PACING = 50.0


def next_wait(interval: float, last_run_seconds: float | None) -> float:
    """Seconds to wait before the next run (see :data:`PACING`)."""
    return max(interval, PACING * (last_run_seconds or 0.0))


@dataclass(frozen=True, slots=True)
class JobStats:
    runs: int
    failures: int
    last_run_seconds: float | None
    last_error: str | None


class RollupJob:
    """``start()`` once, ``stop()`` once; ``run_once()`` may be called from anywhere."""

    def __init__(
        self, rollups: Rollups, retention: RetentionConfig, budgets: Budgets | None = None
    ) -> None:
        self.rollups = rollups
        self.retention = retention
        self.budgets = budgets
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_purge = 0.0
        self._runs = self._failures = 0
        self._last_seconds: float | None = None
        self._last_error: str | None = None

    def __repr__(self) -> str:
        s = self.stats()
        alive = self._thread is not None and self._thread.is_alive()
        return (
            f"<RollupJob {'running' if alive else 'stopped'} runs={s.runs} failures={s.failures}>"
        )

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the rollup job was already started")
        self._thread = threading.Thread(target=self._loop, name="rollup-job", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self) -> None:
        """One catch-up, a purge when one is due, then the budgets (if any). Raises what the
        database raises (the budgets published last stay in force)."""
        started = time.monotonic()
        run = self.rollups.catch_up()
        if run.hours:
            log.debug("rollups: %d hour(s) recomputed in %.3f s", run.hours, run.seconds)
        if started >= self._next_purge and (
            self.retention.raw_records_days is not None
            or self.retention.hourly_rollups_days is not None
        ):
            purged = self.rollups.purge(
                raw_days=self.retention.raw_records_days,
                hourly_days=self.retention.hourly_rollups_days,
            )
            self._next_purge = started + PURGE_EVERY_SECONDS
            if purged.raw_deleted or purged.hourly_deleted:
                log.info(
                    "retention: deleted %d raw record(s) and %d hourly rollup row(s)",
                    purged.raw_deleted,
                    purged.hourly_deleted,
                )
        if self.budgets is not None:
            self.budgets.refresh()
        self._last_seconds = time.monotonic() - started

    def stats(self) -> JobStats:
        return JobStats(self._runs, self._failures, self._last_seconds, self._last_error)

    def _loop(self) -> None:
        # Background work (see sluicegate.threads): any request preempts it at once. If a
        # saturated loop starves it, reports still catch up before they read.
        lower_priority(ROLLUP_NICENESS)
        IdleWhileCaughtUp().update(backlog=False)
        while not self._stop.is_set():
            try:
                self.run_once()
                self._last_error = None
            except Exception as exc:  # the database may be down: try again next time
                self._failures += 1
                self._last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("rollups: run failed: %s", self._last_error)
            self._runs += 1
            self._stop.wait(next_wait(self.retention.rollup_interval_seconds, self._last_seconds))
